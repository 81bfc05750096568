"""The ``triton`` backend: fused Triton kernels (``mldecoder_fast/kernels``) behind ``TorchOps``.

Each kernel pair (forward, backward) is registered as a ``torch.library.custom_op`` in the
``mldecoder_fast`` namespace (names ``triton_*``) with a fake kernel and autograd, so the ops
work under ``torch.compile(fullgraph=True)``, in CUDA graphs and with ``opcheck``; the backward is
itself a custom op. Dropout: each op gets a seed (an int64 tensor in device memory) and a Philox
offset (an int) from ``_DropoutSeeds``, the kernels draw the mask from both and the backward
regenerates it from the same pair. Inputs the kernels do not take (fp64, CPU tensors outside the
interpreter, bf16 in the interpreter, more than 3 dims, empty batches, the ZSL projection) go to
the PyTorch implementation.

Host cost per call: the kernels' host functions keep their launch parameters per shape key
(``kernels._common.PlanCache``), so an eager call does its checks, a dict lookup, the output
allocations and the launch; no broadcast_shapes, views or seed draws (``tests/kernels/test_triton_host.py``
counts the ATen ops of each wrapper call).

Dtypes: under autocast the attention and the group-FC products run in the autocast dtype (as
PyTorch's own ops would) with fp32 accumulation; the LayerNorm returns the promoted dtype of its
inputs (fp32 statistics inside); gradients come back in each input's dtype.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

from .torch_ops import TorchOps

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def _triton_version() -> str | None:
    try:
        import triton
        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def triton_status() -> tuple[bool, str]:
    """(available, detail): can the Triton kernels run here? Never raises."""
    try:
        version = _triton_version()
        if version is None:
            return False, "triton is not importable"
        if torch.cuda.is_available():
            return True, f"triton {version} on CUDA ({torch.cuda.get_device_name()})"
        if _interpreting():
            return True, f"triton {version} in its CPU interpreter (TRITON_INTERPRET=1: slow, for tests)"
        return False, f"triton {version} installed, but no CUDA device (and TRITON_INTERPRET is not set)"
    except Exception as e:  # noqa: BLE001
        return False, f"triton status unknown: {type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Gradient of a broadcast: sum ``grad`` down to ``like``'s shape, in ``like``'s dtype."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU (custom ops get no device guard; Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n = n * s
    return n


def _broadcast_shapes(a: tuple, b: tuple) -> tuple | None:
    """torch.broadcast_shapes(a, b); None when they do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


_broadcast_cached = functools.lru_cache(maxsize=256)(_broadcast_shapes)


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """``_broadcast_shapes`` computed once per pair of shapes in eager mode; traced as is under
    torch.compile (which would bypass the cache anyway, with a warning)."""
    return _broadcast_shapes(a, b) if torch.compiler.is_compiling() else _broadcast_cached(a, b)


# dropout seeds ----------------------------------------------------------------------------------

def _philox_generator(device: torch.device):
    """``device``'s default PyTorch generator when it keeps a Philox offset (CUDA), else None."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _DropoutSeeds:
    """(seed tensor, Philox offset) for one op's dropout; the kernels key Philox by the seed, read
    from device memory, and count from the offset (``kernels._common.dropout_keep``).

    Eager, on a device whose generator keeps a Philox offset (CUDA), as PyTorch's own dropout
    does: the seed is the generator's seed, held in device memory (one int64 tensor per device,
    written again only when the generator is reseeded), and each op reserves 4 offsets of that
    generator on the host (``get_offset``/``set_offset``): no launch, no synchronisation. So
    ``torch.manual_seed`` and generator states saved and restored (checkpoint resume, activation
    checkpointing) reproduce the masks, consecutive ops and steps get fresh ones, and PyTorch's
    random ops on the same generator stay independent of these.

    While a CUDA graph is captured, under torch.compile, or with a generator without Philox offsets
    (the CPU one, i.e. the interpreter), a fresh seed is drawn with ``torch.randint`` instead
    (offset 0): PyTorch makes that draw graph-safe (every replay draws a new seed, so new masks) and
    the compiler traces it as its own RNG. A graph replay runs no Python, so the draw costs host time
    only when captured.
    """

    def __init__(self):
        self._seeds = {}  # device -> (generator seed, int64 [1] tensor holding it)

    def __call__(self, p: float, like: Tensor) -> tuple[Tensor | None, int]:
        if p <= 0:
            return None, 0
        device = like.device
        gen = None
        if not (torch.compiler.is_compiling() or _capturing(device)):
            gen = _philox_generator(device)
        if gen is None:
            return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device), 0
        seed = gen.initial_seed()
        held = self._seeds.get(device)
        if held is None or held[0] != seed:
            signed = seed - 2 ** 64 if seed >= 2 ** 63 else seed
            held = self._seeds[device] = (seed, torch.tensor([signed], dtype=torch.int64,
                                                              device=device))
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return held[1], offset


# residual + dropout + LayerNorm -----------------------------------------------------------------

@torch.library.custom_op("mldecoder_fast::triton_layer_norm", mutates_args=())
def triton_layer_norm(residual: Tensor, x: Tensor, seed: Tensor | None, seed_offset: int,
                      p: float, weight: Tensor, bias: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(residual + dropout(x)), row mean, row rstd)."""
    from ..kernels.layer_norm import ln_forward
    with _on_device(x):
        return ln_forward(residual, x, seed, seed_offset, p, weight, bias, eps)


@triton_layer_norm.register_fake
def _(residual, x, seed, seed_offset, p, weight, bias, eps):
    shape = torch.broadcast_shapes(residual.shape, x.shape)
    m = _rows(shape)
    return (x.new_empty(shape, dtype=torch.result_type(residual, x)),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("mldecoder_fast::triton_layer_norm_backward", mutates_args=())
def triton_layer_norm_backward(dy: Tensor, residual: Tensor, x: Tensor, seed: Tensor | None,
                               seed_offset: int, p: float, weight: Tensor, mean: Tensor,
                               rstd: Tensor,
                               input_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dz, dx, dweight, dbias); dz = grad of residual + dropout(x) shaped as dy; dx is empty when
    p == 0 (it equals dz); both are empty without ``input_grads``."""
    from ..kernels.layer_norm import ln_backward
    with _on_device(dy):
        dz, dx, dw, db = ln_backward(dy, residual, x, seed, seed_offset, p, weight, mean, rstd,
                                     dy.dtype, input_grads)
    if dz is None:
        dz = dy.new_empty(0)
    if dx is None:
        dx = x.new_empty(0)
    return dz, dx, dw, db


@triton_layer_norm_backward.register_fake
def _(dy, residual, x, seed, seed_offset, p, weight, mean, rstd, input_grads):
    dz = dy.new_empty(dy.shape) if input_grads else dy.new_empty(0)
    dx = x.new_empty(dy.shape) if p > 0 and input_grads else x.new_empty(0)
    return dz, dx, weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _ln_setup(ctx, inputs, output):
    residual, x, seed, seed_offset, p, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(residual, x, seed, weight, mean, rstd)
    ctx.seed_offset, ctx.p = seed_offset, p


def _ln_backward(ctx, dy, _dmean, _drstd):
    residual, x, seed, weight, mean, rstd = ctx.saved_tensors
    need_r, need_x = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dz, dx, dw, db = triton_layer_norm_backward(dy, residual, x, seed, ctx.seed_offset, ctx.p,
                                                weight, mean, rstd, need_r or need_x)
    if ctx.p <= 0:
        dx = dz
    return (_sum_to(dz, residual) if need_r else None, _sum_to(dx, x) if need_x else None,
            None, None, None, dw, db, None)


triton_layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


# cross-attention -------------------------------------------------------------------------------

@torch.library.custom_op("mldecoder_fast::triton_attention", mutates_args=())
def triton_attention(q: Tensor, kv: Tensor, seed: Tensor | None, seed_offset: int,
                     num_heads: int, dropout_p: float,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(O [B, K, D] heads concatenated, log-sum-exp [B, H, K] fp32 base 2)."""
    from ..kernels.attention import attention_forward
    with _on_device(kv):
        return attention_forward(q, kv, seed, seed_offset, num_heads, dropout_p, out_dtype)


@triton_attention.register_fake
def _(q, kv, seed, seed_offset, num_heads, dropout_p, out_dtype):
    b, _n, two_d = kv.shape
    k = q.shape[-2]
    return (kv.new_empty(b, k, two_d // 2, dtype=out_dtype),
            kv.new_empty(b, num_heads, k, dtype=torch.float32))


@torch.library.custom_op("mldecoder_fast::triton_attention_backward", mutates_args=())
def triton_attention_backward(do: Tensor, q: Tensor, kv: Tensor, o: Tensor, lse: Tensor,
                              seed: Tensor | None, seed_offset: int, num_heads: int,
                              dropout_p: float) -> tuple[Tensor, Tensor]:
    from ..kernels.attention import attention_backward
    with _on_device(kv):
        return attention_backward(do, q, kv, o, lse, seed, seed_offset, num_heads, dropout_p)


@triton_attention_backward.register_fake
def _(do, q, kv, o, lse, seed, seed_offset, num_heads, dropout_p):
    return q.new_empty(q.shape), kv.new_empty(kv.shape)


def _attn_setup(ctx, inputs, output):
    q, kv, seed, seed_offset, num_heads, dropout_p, _out_dtype = inputs
    o, lse = output
    ctx.save_for_backward(q, kv, seed, o, lse)
    ctx.seed_offset, ctx.num_heads, ctx.dropout_p = seed_offset, num_heads, dropout_p


def _attn_backward(ctx, do, _dlse):
    q, kv, seed, o, lse = ctx.saved_tensors
    dq, dkv = triton_attention_backward(do, q, kv, o, lse, seed, ctx.seed_offset, ctx.num_heads,
                                        ctx.dropout_p)
    return dq, dkv, None, None, None, None, None


triton_attention.register_autograd(_attn_backward, setup_context=_attn_setup)


# cross-attention with batch-shared queries, key projection folded in ---------------------------

@torch.library.custom_op("mldecoder_fast::triton_shared_query_attention", mutates_args=())
def triton_shared_query_attention(qk: Tensor, memory: Tensor, v: Tensor, seed: Tensor | None,
                                  seed_offset: int, num_heads: int, dropout_p: float,
                                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(O [B, K, D], log-sum-exp [B, H, K]) of softmax(memory . qk[h]) v_h: see
    ``TorchOps.shared_query_attention``; qk [H, K, D] already carries 1/sqrt(d)."""
    from ..kernels.attention import folded_attention_forward
    with _on_device(memory):
        return folded_attention_forward(qk, memory, v, seed, seed_offset, dropout_p, out_dtype)


@triton_shared_query_attention.register_fake
def _(qk, memory, v, seed, seed_offset, num_heads, dropout_p, out_dtype):
    h, k, _ = qk.shape
    b = memory.shape[0]
    return (memory.new_empty(b, k, v.shape[2], dtype=out_dtype),
            memory.new_empty(b, h, k, dtype=torch.float32))


@torch.library.custom_op("mldecoder_fast::triton_shared_query_attention_backward", mutates_args=())
def triton_shared_query_attention_backward(do: Tensor, qk: Tensor, memory: Tensor, v: Tensor,
                                           seed: Tensor | None, seed_offset: int,
                                           dropout_p: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.attention import folded_attention_backward
    with _on_device(memory):
        return folded_attention_backward(do, qk, memory, v, seed, seed_offset, dropout_p)


@triton_shared_query_attention_backward.register_fake
def _(do, qk, memory, v, seed, seed_offset, dropout_p):
    return qk.new_empty(qk.shape), memory.new_empty(memory.shape), v.new_empty(v.shape)


def _sqa_setup(ctx, inputs, output):
    qk, memory, v, seed, seed_offset, _num_heads, dropout_p, _out_dtype = inputs
    ctx.save_for_backward(qk, memory, v, seed)
    ctx.seed_offset, ctx.dropout_p = seed_offset, dropout_p


def _sqa_backward(ctx, do, _dlse):
    qk, memory, v, seed = ctx.saved_tensors
    dqk, dmem, dv = triton_shared_query_attention_backward(do, qk, memory, v, seed,
                                                           ctx.seed_offset, ctx.dropout_p)
    return dqk, dmem, dv, None, None, None, None, None


triton_shared_query_attention.register_autograd(_sqa_backward, setup_context=_sqa_setup)


# group FC --------------------------------------------------------------------------------------

def _logits_dtype(compute_dtype: torch.dtype, bias: Tensor) -> torch.dtype:
    # as kernels.group_fc_decode.logits_dtype (importable without Triton)
    return torch.promote_types(compute_dtype, bias.dtype)


@torch.library.custom_op("mldecoder_fast::triton_group_fc", mutates_args=())
def triton_group_fc(h: Tensor, weight: Tensor, bias: Tensor, num_classes: int,
                    compute_dtype: torch.dtype) -> Tensor:
    """h [B, K, D], weight [K, D, G], bias [num_classes] -> logits [B, num_classes]: products in
    ``compute_dtype``, logits in promote(compute_dtype, bias dtype)."""
    from ..kernels.group_fc_decode import group_fc_forward
    with _on_device(h):
        return group_fc_forward(h, weight, bias, num_classes, compute_dtype)


@triton_group_fc.register_fake
def _(h, weight, bias, num_classes, compute_dtype):
    return h.new_empty(h.shape[0], num_classes, dtype=_logits_dtype(compute_dtype, bias))


@torch.library.custom_op("mldecoder_fast::triton_group_fc_backward", mutates_args=())
def triton_group_fc_backward(dout: Tensor, h: Tensor, weight: Tensor,
                             compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dh in ``compute_dtype``, dW in weight's dtype)."""
    from ..kernels.group_fc_decode import group_fc_backward
    with _on_device(h):
        return group_fc_backward(dout, h, weight, compute_dtype)


@triton_group_fc_backward.register_fake
def _(dout, h, weight, compute_dtype):
    return h.new_empty(h.shape, dtype=compute_dtype), weight.new_empty(weight.shape)


def _gfc_setup(ctx, inputs, output):
    h, weight, bias, _num_classes, compute_dtype = inputs
    ctx.save_for_backward(h, weight, bias)
    ctx.compute_dtype = compute_dtype


def _gfc_backward(ctx, dout):
    h, weight, bias = ctx.saved_tensors
    dh, dw = triton_group_fc_backward(dout, h, weight, ctx.compute_dtype)
    db = dout.sum(0, dtype=torch.float32).to(bias.dtype)
    return dh.to(h.dtype), dw, db, None, None


triton_group_fc.register_autograd(_gfc_backward, setup_context=_gfc_setup)


# LayerNorm-3 + group FC ------------------------------------------------------------------------

@torch.library.custom_op("mldecoder_fast::triton_decode", mutates_args=())
def triton_decode(residual: Tensor, x: Tensor, seed: Tensor | None, seed_offset: int, p: float,
                  ln_weight: Tensor, ln_bias: Tensor, eps: float, weight: Tensor, bias: Tensor,
                  num_classes: int, compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(group FC of LN(residual + dropout(x)) [B, num_classes], row mean, row rstd); dtypes as
    ``triton_group_fc``."""
    from ..kernels.group_fc_decode import decode_forward
    with _on_device(x):
        return decode_forward(residual, x, seed, seed_offset, p, ln_weight, ln_bias, eps, weight,
                              bias, num_classes, compute_dtype)


@triton_decode.register_fake
def _(residual, x, seed, seed_offset, p, ln_weight, ln_bias, eps, weight, bias, num_classes,
      compute_dtype):
    shape = torch.broadcast_shapes(residual.shape, x.shape)
    m = _rows(shape)
    return (x.new_empty(shape[0], num_classes, dtype=_logits_dtype(compute_dtype, bias)),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("mldecoder_fast::triton_decode_backward", mutates_args=())
def triton_decode_backward(dout: Tensor, residual: Tensor, x: Tensor, seed: Tensor | None,
                           seed_offset: int, p: float, ln_weight: Tensor, ln_bias: Tensor,
                           mean: Tensor, rstd: Tensor, weight: Tensor,
                           compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, dx, d ln_weight, d ln_bias, dW); dz shaped [B, K, D]; dx empty when p == 0 (= dz)."""
    from ..kernels.group_fc_decode import decode_backward
    with _on_device(x):
        dz, dx, dlnw, dlnb, dw = decode_backward(dout, residual, x, seed, seed_offset, p, ln_weight,
                                                 ln_bias, mean, rstd, weight, compute_dtype)
    if dx is None:
        dx = dz.new_empty(0, dtype=x.dtype)
    return dz, dx, dlnw, dlnb.to(ln_bias.dtype), dw


@triton_decode_backward.register_fake
def _(dout, residual, x, seed, seed_offset, p, ln_weight, ln_bias, mean, rstd, weight,
      compute_dtype):
    shape = torch.broadcast_shapes(residual.shape, x.shape)
    dz = x.new_empty(shape, dtype=torch.result_type(residual, x))
    dx = x.new_empty(shape) if p > 0 else x.new_empty(0)
    return (dz, dx, ln_weight.new_empty(ln_weight.shape), ln_bias.new_empty(ln_bias.shape),
            weight.new_empty(weight.shape))


def _decode_setup(ctx, inputs, output):
    residual, x, seed, seed_offset, p, ln_weight, ln_bias, _eps, weight, bias, _nc, compute_dtype = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(residual, x, seed, ln_weight, ln_bias, mean, rstd, weight, bias)
    ctx.seed_offset, ctx.p = seed_offset, p
    ctx.compute_dtype = compute_dtype


def _decode_backward(ctx, dout, _dmean, _drstd):
    residual, x, seed, ln_weight, ln_bias, mean, rstd, weight, bias = ctx.saved_tensors
    dz, dx, dlnw, dlnb, dw = triton_decode_backward(dout, residual, x, seed, ctx.seed_offset, ctx.p,
                                                    ln_weight, ln_bias, mean, rstd, weight,
                                                    ctx.compute_dtype)
    if ctx.p <= 0:
        dx = dz
    db = dout.sum(0, dtype=torch.float32).to(bias.dtype)
    return (_sum_to(dz, residual), _sum_to(dx, x), None, None, None, dlnw, dlnb, None, dw, db,
            None, None)


triton_decode.register_autograd(_decode_backward, setup_context=_decode_setup)


# ------------------------------------------------------------------------------------------------
# The ops object
# ------------------------------------------------------------------------------------------------

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
        self._interpret = _interpreting()
        self._available = _triton_version() is not None
        self._seeds = _DropoutSeeds()

    def _takes(self, *tensors: Tensor, dtypes=()) -> bool:
        """Whether the kernels run these tensors (else the PyTorch implementation does)."""
        if not self._available:
            return False
        want = "cpu" if self._interpret else "cuda"
        allowed = (torch.float16, torch.float32) if self._interpret else _FLOAT_DTYPES
        for t in tensors:
            if t.device.type != want or t.dtype not in allowed:
                return False
        return all(dt in allowed for dt in dtypes)

    def residual_dropout_layer_norm(self, residual, x, p, weight, bias, eps):
        if (weight is None or bias is None or x.numel() == 0 or residual.shape[-1:] != x.shape[-1:]
                or x.dim() > 3 or residual.dim() > 3 or x.shape[-1] > 16384
                or _broadcast(residual.shape, x.shape) is None
                or not self._takes(residual, x, weight, bias)):
            return super().residual_dropout_layer_norm(residual, x, p, weight, bias, eps)
        seed, offset = self._seeds(p, x)
        if _eager_no_grad(residual, x, weight, bias):
            from ..kernels.layer_norm import ln_forward
            with _on_device(x):
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
            with _on_device(kv):
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
            with _on_device(memory):
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
            with _on_device(h):
                return group_fc_forward(h, weight, bias, int(num_classes), dtype)
        return triton_group_fc(h, weight, bias, int(num_classes), dtype)

    def decode(self, residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes):
        shape = _broadcast(residual.shape, x.shape)
        if (weight.dim() != 3 or shape is None or len(shape) != 3 or shape[0] == 0
                or ln_weight is None or ln_bias is None or shape[-1] > 16384):
            return super().decode(residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes)
        dtype = _compute_dtype(x.device.type, residual, x)
        if not self._takes(residual, x, ln_weight, ln_bias, weight, bias, dtypes=(dtype,)):
            return super().decode(residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes)
        seed, offset = self._seeds(p, x)
        if _eager_no_grad(residual, x, ln_weight, ln_bias, weight, bias):
            from ..kernels.group_fc_decode import decode_forward
            with _on_device(x):
                return decode_forward(residual, x, seed, offset, float(p), ln_weight, ln_bias,
                                      float(eps), weight, bias, int(num_classes), dtype)[0]
        out, _mean, _rstd = triton_decode(residual, x, seed, offset, float(p), ln_weight, ln_bias,
                                          float(eps), weight, bias, int(num_classes), dtype)
        return out
