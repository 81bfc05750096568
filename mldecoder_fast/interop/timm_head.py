"""Put an ML-Decoder head on any timm model, through timm's own feature API.

``add_ml_decoder_head(model, num_classes)`` replaces the model's pooling and classifier by an
ML-Decoder head fed with the model's unpooled features, and keeps the model a timm model:
``model(x)`` returns logits, ``forward_features`` / ``forward_head(pre_logits=True)`` /
``get_classifier`` / ``reset_classifier`` keep working, and ``model.num_classes`` and
``model.pretrained_cfg`` describe the new head.

Where the features come from (decided once, by one small probe forward in eval mode):

- ``"head"``: the model's own ``forward_head(..., pre_logits=True)`` after
  ``reset_classifier(0, global_pool="")``. This keeps whatever the model applies between its
  trunk and its classifier (ConvNeXt's head LayerNorm, ViT's ``fc_norm``) while pooling is off,
  so a ViT hands over every token, class token included.
- ``"features"``: ``forward_features`` directly, when the head would pool anyway (distilled DeiT)
  or when the head is a plain pool + dropout + linear ``ClassifierHead`` (TResNet, RegNet, Swin),
  which is then replaced as a whole.

Where the head is stored decides its state_dict prefix. It takes the classifier's place
(``pretrained_cfg["classifier"]``), or its ``ClassifierHead``'s place when it has one: ``fc.``
for ResNet and ``head.`` for TResNet, as in the official ML-Decoder checkpoints.

Feature layouts: [B, C, H, W] maps pass as they are, channels-last [B, H, W, C] maps (Swin,
``output_fmt == "NHWC"``) become [B, H*W, C] token sequences without a copy, token sequences
[B, N, C] pass as they are.
"""
from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["add_ml_decoder_head", "ml_decoder_of", "MLDecoderHeadConfig"]

_PROBE_SIDE = 64  # probe side for models without a fixed input size: small and a multiple of 32


@dataclass
class MLDecoderHeadConfig:
    """What ``add_ml_decoder_head`` decided; stored on the model as ``model.ml_decoder_cfg``."""
    path: str                 # module path of the head in the model (its state_dict prefix)
    source: str               # "head" (the model's forward_head, pooling off) or "features"
    layout: str               # "NCHW", "NHWC" or "NLC" (tokens)
    num_features: int         # C, the width the head consumes
    num_classes: int
    num_of_groups: int = -1
    decoder_embedding: int = 768
    zsl: int = 0
    fast: bool = True
    backend: str = "auto"
    head_kwargs: dict = field(default_factory=dict)


def add_ml_decoder_head(model: nn.Module, num_classes: int = -1, num_of_groups: int = -1,
                        decoder_embedding: int = 768, zsl: int = 0, fast: bool = True, *,
                        backend: str = "auto", input_size=None) -> nn.Module:
    """Replace the pooling + classifier of a timm ``model`` by an ML-Decoder head (in place).

    Args:
        model: a timm model (anything with ``forward_features``, ``forward_head``,
            ``reset_classifier`` and ``num_features``), random or pretrained.
        num_classes: outputs of the new head; -1 keeps ``model.num_classes``.
        num_of_groups, decoder_embedding, zsl: as the ML-Decoder constructor. A ZSL head needs its
            word vectors before the first forward: ``ml_decoder_of(model).set_word_vectors(v)``,
            v of shape [n, 300]; the model then returns [B, n].
        fast: ``MLDecoderFast`` (default) or the reference ``MLDecoder``.
        backend: backend of ``MLDecoderFast`` (ignored when ``fast=False``).
        input_size: (C, H, W) for the one probe forward, when the model's own configuration
            does not give a size it accepts.

    Returns the same ``model`` object. Raises ``TypeError`` for an object without timm's feature
    API (the model is then untouched) and ``ValueError`` for a timm model whose features or forward
    cannot feed the head (its classifier may then already be gone: create the model again).
    """
    _check_timm_model(model)
    if num_classes == -1:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        if num_classes < 1:
            raise ValueError(f"{type(model).__name__} has num_classes={num_classes}: pass "
                             "num_classes= to add_ml_decoder_head")
    classifier = _classifier_path(model)
    path, replace_parent = _head_path(model, classifier)

    pool_off = _reset_without_pooling(model)
    source, layout, width, probe_x = _probe(model, input_size, try_head=pool_off and not replace_parent)

    cfg = MLDecoderHeadConfig(path=path, source=source, layout=layout, num_features=width,
                              num_classes=num_classes, num_of_groups=num_of_groups,
                              decoder_embedding=decoder_embedding, zsl=zsl, fast=bool(fast),
                              backend=backend)
    model.ml_decoder_cfg = cfg
    _set_head(model, _build_head(model, cfg))
    # The methods live on the instance, so the model keeps its class (and so its checkpoints,
    # isinstance checks and copy.deepcopy for EMA keep working).
    model.forward_head = types.MethodType(_forward_head, model)
    model.get_classifier = types.MethodType(_get_classifier, model)
    model.reset_classifier = types.MethodType(_reset_classifier, model)
    if not zsl:
        _check_routing(model, probe_x, num_classes)
    return model


def ml_decoder_of(model: nn.Module) -> nn.Module:
    """The ML-Decoder head that ``add_ml_decoder_head`` put on ``model``."""
    cfg = getattr(model, "ml_decoder_cfg", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no head added by add_ml_decoder_head")
    return model.get_submodule(cfg.path)


# checks and placement ----------------------------------------------------------------------------
def _check_timm_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_ml_decoder_head expects a timm model (torch.nn.Module), got "
                        f"{type(model).__name__}")
    if getattr(model, "ml_decoder_cfg", None) is not None:
        raise ValueError(f"{type(model).__name__} already has an ML-Decoder head (at "
                         f"'{model.ml_decoder_cfg.path}'): use model.reset_classifier(num_classes) "
                         "to change its class count")
    missing = [a for a in ("forward_features", "forward_head", "reset_classifier", "num_features")
               if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"add_ml_decoder_head needs a timm model with the timm feature API (forward_features, "
            f"forward_head, reset_classifier, num_features); {type(model).__module__}."
            f"{type(model).__name__} has no {', '.join(missing)}. Create the model with "
            "timm.create_model(...), or put the head on by hand: MLDecoderFast(num_classes, "
            "initial_num_features=C) applied to a [B, C, H, W] or [B, N, C] feature tensor")


def _classifier_path(model) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier")
    if isinstance(names, (tuple, list)):
        names = names[0] if names else None
    if names:
        try:
            model.get_submodule(names)
            return names
        except AttributeError:
            pass
    clf = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(clf, (tuple, list)):
        clf = clf[0] if clf else None
    for name, module in model.named_modules():
        if name and module is clf:
            return name
    raise ValueError(f"cannot find the classifier of {type(model).__name__}: neither "
                     "pretrained_cfg['classifier'] nor get_classifier() names a submodule")


def _head_path(model, classifier: str):
    """Where the ML-Decoder goes, and whether it replaces the classifier's ClassifierHead."""
    try:
        from timm.layers import ClassifierHead
    except ImportError:  # pragma: no cover - the model came from timm, so timm is there
        ClassifierHead = ()
    parent_name, _, leaf = classifier.rpartition(".")
    if parent_name and leaf == "fc" and type(model.get_submodule(parent_name)) is ClassifierHead:
        # A ClassifierHead is pooling + dropout + fc only: replacing it whole loses nothing and
        # gives the official prefix (``head.`` for TResNet).
        return parent_name, True
    return classifier, False


def _reset_without_pooling(model) -> bool:
    """Drop the classifier; turn pooling off where the model allows it. True if pooling is off."""
    try:
        model.reset_classifier(0, global_pool="")
        return True
    except (TypeError, ValueError, AssertionError, NotImplementedError, RuntimeError, KeyError):
        model.reset_classifier(0)
        return False


def _probe_sizes(model, input_size):
    if input_size is not None:
        yield tuple(int(s) for s in input_size)
        return
    cfg = getattr(model, "pretrained_cfg", None) or {}
    cfg_size = tuple(cfg.get("input_size") or (3, 224, 224))
    chans = int(getattr(model, "in_chans", cfg_size[0]))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:  # transformers built for one size (ViT, Swin): that size
        img = (img, img) if isinstance(img, int) else tuple(img)
        yield (chans, *img)
    yield (chans, _PROBE_SIDE, _PROBE_SIDE)
    yield (chans, *cfg_size[1:])


def _probe(model, input_size, try_head: bool):
    """One eval-mode forward of one image: where the unpooled features are, their layout, width."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    errors = []
    feats = x = None
    model.eval()
    try:
        with torch.no_grad():
            for size in _probe_sizes(model, input_size):
                try:
                    x = torch.zeros((1, *size), device=device, dtype=dtype)
                    feats = model.forward_features(x)
                    break
                except Exception as exc:  # noqa: BLE001 - a size the model rejects: try the next
                    errors.append(f"{size}: {type(exc).__name__}: {exc}")
            if feats is None:
                raise ValueError(f"cannot run {type(model).__name__}.forward_features to find its "
                                 f"feature layout ({'; '.join(errors)}); pass input_size=(C, H, W)")
            if try_head:
                try:
                    pre = type(model).forward_head(model, feats, pre_logits=True)
                except TypeError:
                    pre = None
                if isinstance(pre, torch.Tensor) and pre.dim() in (3, 4):
                    return ("head",) + _layout(model, pre) + (x,)
    finally:
        model.train(was_training)
    if not isinstance(feats, torch.Tensor) or feats.dim() not in (3, 4):
        what = (f"a tensor of shape {tuple(feats.shape)}" if isinstance(feats, torch.Tensor)
                else type(feats).__name__)
        raise ValueError(
            f"{type(model).__name__} cannot take an ML-Decoder head: its forward_features returns "
            f"{what}, and the head needs unpooled features, a [B, C, H, W] / [B, H, W, C] map or "
            "a [B, N, C] token sequence")
    return ("features",) + _layout(model, feats) + (x,)


def _check_routing(model, x, num_classes) -> None:
    """``model(x)`` must now end in the new head (timm models call forward_head in forward)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], num_classes):
        what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(model).__name__}.forward does not go through forward_head (its "
                         f"output is {what}, not [B, {num_classes}] logits): add_ml_decoder_head "
                         "cannot serve this model")


def _layout(model, y: torch.Tensor):
    if y.dim() == 3:
        return "NLC", int(y.shape[-1])
    widths = {int(getattr(model, "num_features", -1)), int(getattr(model, "head_hidden_size", -1) or -1)}
    fmt = str(getattr(model, "output_fmt", "") or "").upper()
    if fmt == "NHWC" or (fmt != "NCHW" and y.shape[1] not in widths and y.shape[-1] in widths):
        return "NHWC", int(y.shape[-1])
    return "NCHW", int(y.shape[1])


def _build_head(model, cfg: MLDecoderHeadConfig) -> nn.Module:
    kwargs = dict(num_classes=cfg.num_classes, num_of_groups=cfg.num_of_groups,
                  decoder_embedding=cfg.decoder_embedding, initial_num_features=cfg.num_features,
                  zsl=cfg.zsl, **cfg.head_kwargs)
    if cfg.fast:
        from ..head.fast import MLDecoderFast
        head = MLDecoderFast(**kwargs, backend=cfg.backend)
    else:
        from ..head.reference import MLDecoder
        head = MLDecoder(**kwargs)
    param = next(iter(model.parameters()), None)
    if param is not None:
        head.to(device=param.device, dtype=param.dtype if param.is_floating_point() else None)
    head.train(model.training)
    return head


def _set_head(model, head: nn.Module) -> None:
    cfg = model.ml_decoder_cfg
    parent_name, _, leaf = cfg.path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, head)
    model.num_classes = cfg.num_classes
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    pretrained_cfg.update(num_classes=cfg.num_classes, classifier=cfg.path,
                          ml_decoder=dict(num_of_groups=cfg.num_of_groups,
                                          decoder_embedding=cfg.decoder_embedding, zsl=cfg.zsl,
                                          num_features=cfg.num_features))
    model.pretrained_cfg = pretrained_cfg


# methods installed on the model -------------------------------------------------------------------
def _forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    cfg = self.ml_decoder_cfg
    if cfg.source == "head":
        x = type(self).forward_head(self, x, pre_logits=True)
    if cfg.layout == "NHWC":
        x = x.flatten(1, 2)  # [B, H, W, C] -> [B, H*W, C]: the NCHW token order, no copy
    if pre_logits:
        return x
    return self.get_submodule(cfg.path)(x)


def _get_classifier(self) -> nn.Module:
    return self.get_submodule(self.ml_decoder_cfg.path)


def _reset_classifier(self, num_classes: int, global_pool=None) -> None:
    """A new ML-Decoder head with ``num_classes`` outputs (same groups and width); 0 removes it,
    so that ``model(x)`` returns the unpooled features the head would take."""
    if global_pool not in (None, ""):
        raise ValueError(f"this model has an ML-Decoder head, which replaces pooling: "
                         f"global_pool={global_pool!r} is not supported")
    cfg = self.ml_decoder_cfg
    cfg.num_classes = int(num_classes)
    head = _build_head(self, cfg) if num_classes > 0 else nn.Identity()
    _set_head(self, head)
