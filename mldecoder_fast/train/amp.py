"""Mixed precision of the training recipes: which autocast dtype ``--amp`` means on a device, and
the autocast context every forward of a trainer runs under."""
from __future__ import annotations

import torch

AMP_CHOICES = ("auto", "fp16", "bf16", "off")


def resolve_amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: fp16 on CUDA (with a GradScaler), off elsewhere; None means full precision."""
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    try:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[amp]
    except KeyError:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}") from None


def autocast(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast`` in ``dtype``, or a disabled one when ``dtype`` is None."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)
