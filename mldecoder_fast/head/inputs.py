"""Input checks shared by every head: bad input fails here, in Python, with a clear message."""
from __future__ import annotations

import torch

from .config import WORDVEC_DIM

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_input(head, x) -> None:
    """Validate a head input against the head's configuration and parameters."""
    cfg = head.config
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"ML-Decoder expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ML-Decoder expects a floating-point input (float32, float16, bfloat16 "
                        f"or float64), got {x.dtype}")
    c = cfg.num_features
    if x.dim() == 4:
        if x.shape[1] != c:
            hint = ""
            if x.shape[-1] == c:
                hint = (" (this looks like a channels-last [B, H, W, C] map: pass "
                        "x.permute(0, 3, 1, 2))")
            raise ValueError(f"ML-Decoder expects a [B, C, H, W] input with C = {c} features, got "
                             f"shape {tuple(x.shape)}{hint}")
        if x.shape[2] * x.shape[3] == 0:
            raise ValueError(f"ML-Decoder input has no spatial tokens: shape {tuple(x.shape)}")
    elif x.dim() == 3:
        if x.shape[2] != c:
            raise ValueError(f"ML-Decoder expects a [B, N, C] input with C = {c} features, got "
                             f"shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"ML-Decoder input has no tokens: shape {tuple(x.shape)}")
    else:
        raise ValueError(f"ML-Decoder expects an input of rank 4 [B, C, H, W] or rank 3 [B, N, C], "
                         f"got rank {x.dim()} with shape {tuple(x.shape)}")
    weight = head.decoder.embed_standart.weight
    if x.device != weight.device:
        raise ValueError(f"input is on {x.device} but the ML-Decoder head's parameters are on "
                         f"{weight.device}: move one of them (head.to(x.device))")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"input dtype {x.dtype} does not match the head's parameter dtype "
                        f"{weight.dtype}: convert one of them, or run under torch.autocast")
    if cfg.zsl and head.decoder.query_embed is None:
        raise RuntimeError("this ZSL head has no word vectors: call set_word_vectors(v) with v of "
                           f"shape [n, {WORDVEC_DIM}] (one row per class) before the forward")


def check_word_vectors(v) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"word vectors must be a torch.Tensor of shape [n, {WORDVEC_DIM}], got "
                        f"{type(v).__name__}")
    if v.dim() != 2 or v.shape[1] != WORDVEC_DIM or v.shape[0] < 1:
        raise ValueError(f"word vectors must have shape [n, {WORDVEC_DIM}] with n >= 1, got "
                         f"{tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"word vectors must be floating point, got {v.dtype}")


def tokens_from_input(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] (a view); [B, N, C] passes through."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    return x
