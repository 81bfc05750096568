"""How far one tensor is from another: the one measure of agreement the package uses (the export's
check, the benchmark's agreement check, the tests)."""
from __future__ import annotations

import torch


def rel_rms(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative RMS error of ``out`` against ``ref``, computed in float64: RMS(out - ref) / RMS(ref)."""
    ref = ref.detach().double()
    out = out.detach().double()
    den = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return float((ref - out).pow(2).mean().sqrt() / den)
