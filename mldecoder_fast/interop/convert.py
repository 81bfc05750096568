"""Converting existing heads (ours, the official one, timm's) and whole models to MLDecoderFast."""
from __future__ import annotations

import torch
from torch import nn

from .layouts import is_timm_layout, timm_to_official


def is_ml_decoder_head(module: nn.Module) -> bool:
    """True for this package's heads, the official ML-Decoder head and timm's copy."""
    from ..head.reference import _HeadBase
    if isinstance(module, _HeadBase):
        return True
    dec = getattr(module, "decoder", None)
    if isinstance(dec, nn.Module) and hasattr(dec, "duplicate_pooling") and hasattr(dec, "embed_standart"):
        return True  # official layout
    return (isinstance(getattr(module, "duplicate_pooling", None), torch.Tensor)
            and isinstance(getattr(module, "embed_standart", None), nn.Linear)
            and isinstance(dec, nn.Module))  # timm layout


def head_kwargs(state_dict) -> dict:
    """Constructor kwargs of the head whose official-layout ``state_dict`` is given."""
    embed = state_dict["decoder.embed_standart.weight"]
    zsl = "wordvec_proj.weight" in state_dict
    kwargs = dict(decoder_embedding=embed.shape[0], initial_num_features=embed.shape[1], zsl=int(zsl))
    if zsl:
        kwargs.update(num_classes=1, num_of_groups=-1)
        return kwargs
    num_classes = state_dict["decoder.duplicate_pooling_bias"].shape[0]
    k, _, g = state_dict["decoder.duplicate_pooling"].shape
    kwargs.update(num_classes=num_classes, num_of_groups=k)
    if (num_classes + k - 1) // k != g:
        raise ValueError(f"head has {k} groups of {g} classes for {num_classes} classes; this "
                         f"package computes ceil({num_classes}/{k}) = {(num_classes + k - 1) // k}")
    return kwargs


def head_arguments(module: nn.Module):
    """(constructor kwargs, official-layout state_dict, word vectors or None) of an existing head."""
    if not is_ml_decoder_head(module):
        raise TypeError(f"{type(module).__name__} is not an ML-Decoder head (this package's, the "
                        f"official one, or timm's)")
    sd = module.state_dict()
    if is_timm_layout(sd):
        sd = timm_to_official(sd)
    kwargs = head_kwargs(sd)
    word_vectors = None
    if kwargs["zsl"]:
        wv = getattr(getattr(module, "decoder", None), "query_embed", None)
        if isinstance(wv, torch.Tensor):
            word_vectors = wv
    return kwargs, sd, word_vectors


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ML-Decoder head inside ``model`` (in place) by an MLDecoderFast with the same
    weights; returns ``model`` (or the converted head if ``model`` itself is one)."""
    from ..head.fast import MLDecoderFast
    if is_ml_decoder_head(model) and not isinstance(model, MLDecoderFast):
        return MLDecoderFast.from_module(model, backend=backend)
    for name, child in list(model.named_children()):
        if isinstance(child, MLDecoderFast):
            continue
        if is_ml_decoder_head(child):
            setattr(model, name, MLDecoderFast.from_module(child, backend=backend))
        else:
            convert(child, backend=backend)
    return model
