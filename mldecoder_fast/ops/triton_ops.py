"""The ``triton`` backend: fused Triton kernels (``mldecoder_fast/kernels``) behind ``TorchOps``.

``TritonOps`` calls each kernel through its custom op (``triton_registrations.py``: fake kernel and
autograd, for torch.compile, CUDA graphs and ``opcheck``), or, eager and without autograd, its host
function directly. Dropout: each op gets a seed (an int64 tensor in device memory) and a Philox
offset (an int) from ``triton_support.DropoutSeeds``, the kernels draw the mask from both and the
backward regenerates it from the same pair. Inputs the kernels do not take (fp64, CPU tensors
outside the interpreter, bf16 in the interpreter, more than 3 dims, empty batches, the ZSL
projection) go to the PyTorch implementation.

Host cost per call: the kernels' host functions keep their launch parameters per shape key
(``kernels._common.PlanCache``), so an eager call does its checks, a dict lookup, the output
allocations and the launch; no broadcast_shapes, views or seed draws (``tests/kernels/test_triton_host.py``
counts the ATen ops of each wrapper call).

Dtypes: under autocast the attention and the group-FC products run in the autocast dtype (as
PyTorch's own ops would) with fp32 accumulation; the LayerNorm returns the promoted dtype of its
inputs (fp32 statistics inside); gradients come back in each input's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .torch_ops import TorchOps
from .triton_registrations import (
    triton_attention,
    triton_decode,
    triton_group_fc,
    triton_layer_norm,
    triton_shared_query_attention,
)
from .triton_support import KERNEL_DTYPES, DropoutSeeds, broadcast, interpreting, on_device, triton_version


def _compute_dtype(device_type: str, *tensors: Tensor) -> torch.dtype:
    """The dtype a product runs in: the autocast dtype when autocast is on, else the promotion."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dtype:  # (torch.promote_types is an ATen op: only when the dtypes differ)
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _eager_no_grad(*tensors: Tensor) -> bool:
    """True when nothing is traced or differentiated: the kernels' host functions are then called
    directly, skipping the custom-op dispatch (tens of microseconds of Python per op, which is
    most of the cost of a small-batch inference step). Autograd and torch.compile always go
    through the custom ops."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class TritonOps(TorchOps):
    """Fused Triton kernels for the operations between the head's GEMMs."""

    name = "triton"

    def __init__(self):
        self._interpret = interpreting()
        self._available = triton_version() is not None
        self._seeds = DropoutSeeds()

    def _takes(self, *tensors: Tensor, dtypes=()) -> bool:
        """Whether the kernels run these tensors (else the PyTorch implementation does)."""
        if not self._available:
            return False
        want = "cpu" if self._interpret else "cuda"
        allowed = (torch.float16, torch.float32) if self._interpret else KERNEL_DTYPES
        for t in tensors:
            if t.device.type != want or t.dtype not in allowed:
                return False
        return all(dt in allowed for dt in dtypes)

    def residual_dropout_layer_norm(self, residual, x, p, weight, bias, eps):
        if (weight is None or bias is None or x.numel() == 0 or residual.shape[-1:] != x.shape[-1:]
                or x.dim() > 3 or residual.dim() > 3 or x.shape[-1] > 16384
                or broadcast(residual.shape, x.shape) is None
                or not self._takes(residual, x, weight, bias)):
            return super().residual_dropout_layer_norm(residual, x, p, weight, bias, eps)
        seed, offset = self._seeds(p, x)
        if _eager_no_grad(residual, x, weight, bias):
            from ..kernels.layer_norm import ln_forward
            with on_device(x):
                return ln_forward(residual, x, seed, offset, float(p), weight, bias, float(eps))[0]
        y, _mean, _rstd = triton_layer_norm(residual, x, seed, offset, float(p), weight, bias,
                                            float(eps))
        return y

    def attention(self, q, kv, num_heads, dropout_p):
        if kv.dim() != 3 or q.dim() not in (2, 3) or kv.numel() == 0 or q.shape[-2] == 0:
            return super().attention(q, kv, num_heads, dropout_p)
        b, _n, two_d = kv.shape
        d_model = two_d // 2
        if (two_d % 2 or q.shape[-1] != d_model or d_model % num_heads
                or d_model // num_heads > 256 or (q.dim() == 3 and q.shape[0] != b)):
            return super().attention(q, kv, num_heads, dropout_p)
        dtype = _compute_dtype(kv.device.type, kv)
        if not self._takes(q, kv, dtypes=(dtype,)):
            return super().attention(q, kv, num_heads, dropout_p)
        seed, offset = self._seeds(dropout_p, kv)
        if _eager_no_grad(q, kv):
            from ..kernels.attention import attention_forward
            with on_device(kv):
                return attention_forward(q, kv, seed, offset, int(num_heads), float(dropout_p),
                                         dtype)[0]
        o, _lse = triton_attention(q, kv, seed, offset, int(num_heads), float(dropout_p), dtype)
        return o

    def shared_query_attention(self, qk, memory, v, num_heads, dropout_p):
        ok = (qk.dim() == 3 and memory.dim() == 3 and v.dim() == 3 and memory.shape[0] > 0
              and qk.shape[1] > 0 and qk.shape[0] == num_heads and qk.shape[2] == memory.shape[2]
              and v.shape[:2] == memory.shape[:2] and v.shape[2] % num_heads == 0
              and v.shape[2] // num_heads <= 256)
        dtype = _compute_dtype(memory.device.type, memory, v)
        if not ok or not self._takes(qk, memory, v, dtypes=(dtype,)):
            return super().shared_query_attention(qk, memory, v, num_heads, dropout_p)
        seed, offset = self._seeds(dropout_p, memory)
        if _eager_no_grad(qk, memory, v):
            from ..kernels.attention import folded_attention_forward
            with on_device(memory):
                return folded_attention_forward(qk, memory, v, seed, offset, float(dropout_p),
                                                dtype)[0]
        o, _lse = triton_shared_query_attention(qk, memory, v, seed, offset, int(num_heads),
                                                float(dropout_p), dtype)
        return o

    def group_fc(self, h, weight, bias, num_classes):
        if weight.dim() != 3 or h.dim() != 3 or h.shape[0] == 0:
            return super().group_fc(h, weight, bias, num_classes)
        dtype = _compute_dtype(h.device.type, h)
        if not self._takes(h, weight, bias, dtypes=(dtype,)):
            return super().group_fc(h, weight, bias, num_classes)
        if _eager_no_grad(h, weight, bias):
            from ..kernels.group_fc_decode import group_fc_forward
            with on_device(h):
                return group_fc_forward(h, weight, bias, int(num_classes), dtype)
        return triton_group_fc(h, weight, bias, int(num_classes), dtype)

    def decode(self, residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes):
        shape = broadcast(residual.shape, x.shape)
        if (weight.dim() != 3 or shape is None or len(shape) != 3 or shape[0] == 0
                or ln_weight is None or ln_bias is None or shape[-1] > 16384):
            return super().decode(residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes)
        dtype = _compute_dtype(x.device.type, residual, x)
        if not self._takes(residual, x, ln_weight, ln_bias, weight, bias, dtypes=(dtype,)):
            return super().decode(residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes)
        seed, offset = self._seeds(p, x)
        if _eager_no_grad(residual, x, ln_weight, ln_bias, weight, bias):
            from ..kernels.group_fc_decode import decode_forward
            with on_device(x):
                return decode_forward(residual, x, seed, offset, float(p), ln_weight, ln_bias,
                                      float(eps), weight, bias, int(num_classes), dtype)[0]
        out, _mean, _rstd = triton_decode(residual, x, seed, offset, float(p), ln_weight, ln_bias,
                                          float(eps), weight, bias, int(num_classes), dtype)
        return out
