"""The Triton kernels (``mldecoder_fast/kernels``) registered as ``torch.library.custom_op``s in the
``mldecoder_fast`` namespace (names ``triton_*``), each with a fake kernel and autograd (the backward
itself a custom op), so they work under ``torch.compile(fullgraph=True)``, in CUDA graphs and with
``opcheck``. Registered when the triton backend's module is imported (``triton_ops.py`` imports
this one), which imports no Triton: each op imports its kernel module on its first call."""
from __future__ import annotations

import torch
from torch import Tensor

from .triton_support import on_device, rows_of, sum_to

# residual + dropout + LayerNorm -----------------------------------------------------------------

@torch.library.custom_op("mldecoder_fast::triton_layer_norm", mutates_args=())
def triton_layer_norm(residual: Tensor, x: Tensor, seed: Tensor | None, seed_offset: int,
                      p: float, weight: Tensor, bias: Tensor,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(LN(residual + dropout(x)), row mean, row rstd)."""
    from ..kernels.layer_norm import ln_forward
    with on_device(x):
        return ln_forward(residual, x, seed, seed_offset, p, weight, bias, eps)


@triton_layer_norm.register_fake
def _(residual, x, seed, seed_offset, p, weight, bias, eps):
    shape = torch.broadcast_shapes(residual.shape, x.shape)
    m = rows_of(shape)
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
    with on_device(dy):
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
    return (sum_to(dz, residual) if need_r else None, sum_to(dx, x) if need_x else None,
            None, None, None, dw, db, None)


triton_layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


# cross-attention -------------------------------------------------------------------------------

@torch.library.custom_op("mldecoder_fast::triton_attention", mutates_args=())
def triton_attention(q: Tensor, kv: Tensor, seed: Tensor | None, seed_offset: int,
                     num_heads: int, dropout_p: float,
                     out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(O [B, K, D] heads concatenated, log-sum-exp [B, H, K] fp32 base 2)."""
    from ..kernels.attention import attention_forward
    with on_device(kv):
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
    with on_device(kv):
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
    with on_device(memory):
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
    with on_device(memory):
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
    with on_device(h):
        return group_fc_forward(h, weight, bias, num_classes, compute_dtype)


@triton_group_fc.register_fake
def _(h, weight, bias, num_classes, compute_dtype):
    return h.new_empty(h.shape[0], num_classes, dtype=_logits_dtype(compute_dtype, bias))


@torch.library.custom_op("mldecoder_fast::triton_group_fc_backward", mutates_args=())
def triton_group_fc_backward(dout: Tensor, h: Tensor, weight: Tensor,
                             compute_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(dh in ``compute_dtype``, dW in weight's dtype)."""
    from ..kernels.group_fc_decode import group_fc_backward
    with on_device(h):
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
    with on_device(x):
        return decode_forward(residual, x, seed, seed_offset, p, ln_weight, ln_bias, eps, weight,
                              bias, num_classes, compute_dtype)


@triton_decode.register_fake
def _(residual, x, seed, seed_offset, p, ln_weight, ln_bias, eps, weight, bias, num_classes,
      compute_dtype):
    shape = torch.broadcast_shapes(residual.shape, x.shape)
    m = rows_of(shape)
    return (x.new_empty(shape[0], num_classes, dtype=_logits_dtype(compute_dtype, bias)),
            x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32))


@torch.library.custom_op("mldecoder_fast::triton_decode_backward", mutates_args=())
def triton_decode_backward(dout: Tensor, residual: Tensor, x: Tensor, seed: Tensor | None,
                           seed_offset: int, p: float, ln_weight: Tensor, ln_bias: Tensor,
                           mean: Tensor, rstd: Tensor, weight: Tensor,
                           compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, dx, d ln_weight, d ln_bias, dW); dz shaped [B, K, D]; dx empty when p == 0 (= dz)."""
    from ..kernels.group_fc_decode import decode_backward
    with on_device(x):
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
    return (sum_to(dz, residual), sum_to(dx, x), None, None, None, dlnw, dlnb, None, dw, db,
            None, None)


triton_decode.register_autograd(_decode_backward, setup_context=_decode_setup)
