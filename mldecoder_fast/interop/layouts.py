"""State-dict layouts: the official one (ours), timm's copy, and whole-model checkpoints.

Official (and this package's) keys sit under ``decoder.``: ``decoder.embed_standart.*``,
``decoder.query_embed.weight``, ``decoder.duplicate_pooling``, ``decoder.duplicate_pooling_bias``,
``decoder.layers.0.*``. timm's head keeps the first four at its top level. Whole-model checkpoints
(``{'model': state_dict}``) carry the head under ``head.`` (TResNet) or ``fc.`` (ResNet-style).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

# timm key (relative to the head) -> official key
_TIMM_TO_OFFICIAL = {
    "embed_standart.weight": "decoder.embed_standart.weight",
    "embed_standart.bias": "decoder.embed_standart.bias",
    "query_embed.weight": "decoder.query_embed.weight",
    "duplicate_pooling": "decoder.duplicate_pooling",
    "duplicate_pooling_bias": "decoder.duplicate_pooling_bias",
}
_OFFICIAL_TO_TIMM = {v: k for k, v in _TIMM_TO_OFFICIAL.items()}
HEAD_PREFIXES = ("head.", "fc.")
_MARKER = "decoder.duplicate_pooling"


def is_timm_layout(state_dict: Mapping, prefix: str = "") -> bool:
    return (prefix + "duplicate_pooling") in state_dict and (prefix + _MARKER) not in state_dict


def timm_to_official(state_dict: Mapping, prefix: str = "") -> OrderedDict:
    """Rename timm's keys (under ``prefix``) to the official layout; other keys pass through."""
    out = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith(prefix) and key[len(prefix):] in _TIMM_TO_OFFICIAL:
            key = prefix + _TIMM_TO_OFFICIAL[key[len(prefix):]]
        out[key] = value
    return out


def official_to_timm(state_dict: Mapping) -> OrderedDict:
    """Rename an official/our head state_dict to timm's layout (no ZSL in timm)."""
    if any(k.startswith("wordvec_proj.") for k in state_dict):
        raise ValueError("timm's ML-Decoder has no zero-shot mode: a ZSL state_dict has no timm layout")
    return OrderedDict((_OFFICIAL_TO_TIMM.get(k, k), v) for k, v in state_dict.items())


def head_state_dict(checkpoint: Mapping, prefix: str | None = None) -> OrderedDict:
    """The head's own state_dict from a head or whole-model checkpoint, in the official layout.

    ``checkpoint`` may be ``{'model': sd, ...}``, ``{'state_dict': sd}`` or a state_dict. The head
    prefix is found automatically (``head.``, ``fc.``, or none) unless given.
    """
    sd = checkpoint
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
            break
    sd = OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in sd.items())
    if prefix is None:
        candidates = [""] + list(HEAD_PREFIXES) + sorted(
            {k[: k.index(_MARKER)] for k in sd if _MARKER in k}
            | {k[: -len("duplicate_pooling")] for k in sd if k.endswith("duplicate_pooling")})
        for cand in candidates:
            if (cand + _MARKER) in sd or (cand + "duplicate_pooling") in sd:
                prefix = cand
                break
        else:
            raise KeyError("no ML-Decoder head found in the checkpoint (looked for keys ending in "
                           "'decoder.duplicate_pooling' or 'duplicate_pooling')")
    head = OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix))
    if not head:
        raise KeyError(f"no keys with prefix {prefix!r} in the checkpoint")
    if is_timm_layout(head):
        head = timm_to_official(head)
    return head


def load_state_dict_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                             unexpected_keys, error_msgs):
    """Accept timm's layout wherever the head sits in a model (renames keys in place)."""
    if is_timm_layout(state_dict, prefix):
        renamed = timm_to_official({k: state_dict[k] for k in list(state_dict) if k.startswith(prefix)},
                                   prefix)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update(renamed)
