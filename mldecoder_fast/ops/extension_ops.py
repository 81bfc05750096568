"""Backends ``cpp`` and ``cuda``: the plain-PyTorch ops with the compiled group FC.

Only ``group_fc`` changes (docs/design.md step 7, the op that dominates at tens of thousands of
classes); everything else is ``TorchOps``. Inputs the compiled op does not take (a device
without kernels in this build, an unsupported dtype, or an extension that failed to load) go
to the PyTorch path, so an ops object of this class always works.
"""
from __future__ import annotations

import torch

from . import group_fc_extension as _ext
from .torch_ops import TorchOps


class ExtensionOps(TorchOps):
    name = "cpp"

    def group_fc(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
        if _ext.supports(h, weight, bias):
            return _ext.group_fc(h, weight, bias, num_classes)
        return super().group_fc(h, weight, bias, num_classes)

