"""The recipes' models: a timm backbone with an ML-Decoder head (``add_ml_decoder_head``), rebuilt
from a checkpoint's ``model_args``, or initialised from a checkpoint's weights."""
from __future__ import annotations

import json

from torch import nn

from .checkpoint import check_classes, load_checkpoint

HEADS = ("fast", "reference")


def build_model(model_name: str, num_classes: int, head: str = "fast", num_of_groups: int = -1,
                decoder_embedding: int = 768, pretrained: bool = False, model_kwargs=None,
                backend: str = "auto", zsl: int = 0):
    """A timm backbone with an ML-Decoder head (``head``: "fast" or "reference"); ``zsl=1``: a
    zero-shot head whose classes are the word vectors set on it (``num_classes`` is then 1)."""
    try:
        import timm
    except ImportError:
        raise ImportError("training needs timm: pip install 'mldecoder-fast[timm]'") from None
    from ..interop.timm_head import add_ml_decoder_head
    if head not in HEADS:
        raise ValueError(f"head must be 'fast' or 'reference', got {head!r}")
    model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
    return add_ml_decoder_head(model, num_classes=num_classes, num_of_groups=num_of_groups,
                               decoder_embedding=decoder_embedding, zsl=zsl, fast=(head == "fast"),
                               backend=backend)


def build_zsl_model(model_name: str, head: str = "fast", decoder_embedding: int = 768,
                    pretrained: bool = False, model_kwargs=None, backend: str = "auto"):
    """A timm backbone with a zero-shot ML-Decoder head (word-vector queries)."""
    return build_model(model_name, 1, head=head, decoder_embedding=decoder_embedding,
                       pretrained=pretrained, model_kwargs=model_kwargs, backend=backend, zsl=1)


def zsl_head(model: nn.Module) -> nn.Module:
    """The ML-Decoder head of ``model`` (inside DDP too)."""
    from ..interop.timm_head import ml_decoder_of
    from .distributed import unwrap
    return ml_decoder_of(unwrap(model))


def model_from_args(model_args: dict, head=None, backend: str = "auto"):
    """Rebuild the model a checkpoint describes (random weights; load the state_dict after). A
    zero-shot model (``zsl``) scores the word vectors set on its head afterwards."""
    zsl = int(model_args.get("zsl", 0))
    return build_model(model_args["model"], 1 if zsl else model_args["num_classes"],
                       head=head or model_args.get("head", "fast"),
                       num_of_groups=model_args.get("num_of_groups", -1),
                       decoder_embedding=model_args.get("decoder_embedding", 768),
                       model_kwargs=model_args.get("model_kwargs") or {}, backend=backend, zsl=zsl)


def parse_model_kwargs(items) -> dict:
    """``--model-arg KEY=VALUE`` items as timm.create_model keyword arguments (JSON values; a
    value that is not JSON stays a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def init_from_checkpoint(model, path: str, class_names, log=print, trust_pickle: bool = False) -> None:
    """Load weights (not training state) from ``path``; the head must have as many classes.
    ``trust_pickle``: see ``mldecoder_fast.safe_load.load_file``."""
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    check_classes(ckpt, class_names, "the training data")
    own = model.state_dict()
    usable = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(ckpt["model"]) - set(usable))
    missing = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log(f"initial weights from {path}: {len(usable)} tensors loaded, {len(skipped)} skipped, "
        f"{len(missing)} left at their initial values")
    if not usable:
        raise ValueError(f"{path}: no tensor of this checkpoint fits the model")
