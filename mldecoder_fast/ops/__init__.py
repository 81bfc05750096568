"""The head's operations, one implementation per backend.

``MLDecoderFast`` runs its GEMMs with PyTorch and everything between them through an *ops*
object (see ``torch_ops.TorchOps`` for the interface and its plain-PyTorch reference
implementation). Backends override what they accelerate:

- ``torch``  : ``TorchOps``, plain PyTorch (batched group FC, SDPA).
- ``cpp`` / ``cuda``: the compiled extension's group FC (``ops/group_fc.py``), the rest from torch.
- ``triton`` : fused Triton kernels (``kernels/``) for attention, residual+dropout+LayerNorm and
  LayerNorm+group-FC decoding.
"""
from .torch_ops import TorchOps

__all__ = ["TorchOps"]
