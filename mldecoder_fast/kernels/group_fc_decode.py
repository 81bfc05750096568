"""Group fully-connected decoding (docs/design.md step 7), optionally fused with LayerNorm-3 (end of step 6).

logits[b, k*G + g] = sum_d h[b, k, d] W[k, d, g] + bias[k*G + g]   for k*G + g < num_classes,

K independent [B, D] x [D, G] products in one launch (grid axis 1 = k). With the LayerNorm fused,
h is never stored: every program rebuilds its [B, D] tiles in the prologue from the pre-norm rows,
h = LN3(residual + dropout(x)) = (z - mean) * rstd * ln_w + ln_b, using per-row statistics from a
light pass of the LayerNorm kernel (``layer_norm.ln_forward(store_y=False)``) and the dropout mask
regenerated from the seed. The epilogue adds the bias and writes the class slice straight into
[B, num_classes]: the padded tail (k*G + g >= num_classes) is masked, never computed into a buffer.
Operands are cast in-kernel to the compute dtype (no copies of W), accumulation is fp32.

Backward: dh = dlogits_k W[k]^T (one kernel, stored once, then the LayerNorm backward kernel turns
it into the residual / x / affine gradients), dW[k] = h_k^T dlogits_k (h rebuilt in the prologue
again), dbias = column sums of dlogits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import Launch, PlanCache, autotune, dot_precision, dropout_keep, size_class, strides_3d, tl_dtype
from .layer_norm import ln_backward, ln_forward

# Production autotune lists (tests/kernels/test_triton_spills.py compiles each for sm_90 and fails on
# register spills: the 128 x 64 tiles need 8 warps, and so does the forward's 64 x 128 one with
# LayerNorm and dropout under Triton 3.7, at 255 registers and 48 bytes of stack with 4 warps).
FWD_CONFIGS = [
    triton.Config({"BLOCK_B": 128, "BLOCK_G": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 128, "BLOCK_G": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 64, "BLOCK_G": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 16, "BLOCK_G": 64, "BLOCK_D": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 64, "BLOCK_G": 16, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 16, "BLOCK_G": 16, "BLOCK_D": 64}, num_warps=4, num_stages=1),  # safe
]
DGRAD_CONFIGS = [
    triton.Config({"BLOCK_B": 128, "BLOCK_D": 128, "BLOCK_G": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 64, "BLOCK_D": 128, "BLOCK_G": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_B": 16, "BLOCK_D": 128, "BLOCK_G": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_B": 16, "BLOCK_D": 64, "BLOCK_G": 16}, num_warps=4, num_stages=1),  # safe
]
WGRAD_CONFIGS = [
    triton.Config({"BLOCK_D": 128, "BLOCK_G": 128, "BLOCK_B": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_D": 128, "BLOCK_G": 64, "BLOCK_B": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_D": 128, "BLOCK_G": 16, "BLOCK_B": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 64, "BLOCK_G": 16, "BLOCK_B": 16}, num_warps=4, num_stages=1),  # safe
]
# Interpreted: tiny tiles so the tests cover several tiles along every axis.
_INTERP_FWD = triton.Config({"BLOCK_B": 16, "BLOCK_G": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)
_INTERP_DGRAD = triton.Config({"BLOCK_B": 16, "BLOCK_D": 16, "BLOCK_G": 16}, num_warps=4, num_stages=1)
_INTERP_WGRAD = triton.Config({"BLOCK_D": 16, "BLOCK_G": 16, "BLOCK_B": 16}, num_warps=4, num_stages=1)


@triton.jit
def _load_h(R, X, MEAN, RSTD, LNW, LNB, SEED, seed_offset, offs_b, d_start, k,
            B, K, D, s_rb, s_rk, s_rd, s_xb, s_xk, s_xd, p, drop_scale,
            APPLY_LN: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [rows b, cols d_start ..] tile of h[:, k, :] in fp32 (0 outside), from h itself (X) or
    rebuilt as LN(residual + dropout(x)) with the row statistics."""
    offs_d = d_start + tl.arange(0, BLOCK_D)
    bmask = offs_b < B
    dmask = offs_d < D
    mask = bmask[:, None] & dmask[None, :]
    b64 = offs_b.to(tl.int64)
    x = tl.load(X + (b64 * s_xb + k * s_xk)[:, None] + offs_d[None, :] * s_xd,
                mask=mask, other=0.0).to(tl.float32)
    if APPLY_LN:
        if DROPOUT:
            rows = offs_b * K + k  # the row id of the LayerNorm kernels: (b, k) of [B, K, D]
            x = tl.where(dropout_keep(tl.load(SEED), seed_offset, rows, d_start, p, BLOCK_D),
                         x * drop_scale, 0.0)
        r = tl.load(R + (b64 * s_rb + k * s_rk)[:, None] + offs_d[None, :] * s_rd,
                    mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + b64 * K + k, mask=bmask, other=0.0)
        rstd = tl.load(RSTD + b64 * K + k, mask=bmask, other=0.0)
        lnw = tl.load(LNW + offs_d, mask=dmask, other=0.0).to(tl.float32)
        lnb = tl.load(LNB + offs_d, mask=dmask, other=0.0).to(tl.float32)
        h = ((r + x) - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :]
        x = tl.where(mask, h, 0.0)
    return x


@autotune(FWD_CONFIGS, _INTERP_FWD, key=["K", "D", "G", "SIZE_CLASS", "APPLY_LN", "DROPOUT"],
          sizes={"BLOCK_B": "B", "BLOCK_G": "G"})
@triton.jit(do_not_specialize=["SIZE_CLASS", "seed_offset"])
def _group_fc_fwd_kernel(R, X, MEAN, RSTD, LNW, LNB, SEED, W, BIAS, OUT, seed_offset,
                         B, K, D, G, C, SIZE_CLASS,
                         s_rb, s_rk, s_rd, s_xb, s_xk, s_xd, s_wk, s_wd, s_wg,
                         p, drop_scale,
                         APPLY_LN: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                         PREC: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    k = tl.program_id(1)
    nb = tl.cdiv(B, BLOCK_B)
    pid_b = pid % nb     # neighbouring programs share a W[k] tile (L2 reuse)
    pid_g = pid // nb
    dt: tl.constexpr = DOT  # the products' dtype; the logits are stored in OUT's dtype
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    w_base = W + k.to(tl.int64) * s_wk + offs_g[None, :] * s_wg
    acc = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        h = _load_h(R, X, MEAN, RSTD, LNW, LNB, SEED, seed_offset, offs_b, d0, k, B, K, D,
                    s_rb, s_rk, s_rd, s_xb, s_xk, s_xd, p, drop_scale, APPLY_LN, DROPOUT, BLOCK_D)
        w = tl.load(w_base + offs_d[:, None] * s_wd,
                    mask=(offs_d < D)[:, None] & gmask[None, :], other=0.0)
        acc = tl.dot(h.to(dt), w.to(dt), acc, input_precision=PREC)
    cls = k * G + offs_g
    cmask = gmask & (cls < C)
    acc += tl.load(BIAS + cls, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = OUT + offs_b.to(tl.int64)[:, None] * C + cls[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_b < B)[:, None] & cmask[None, :])


@autotune(DGRAD_CONFIGS, _INTERP_DGRAD, key=["K", "D", "G", "SIZE_CLASS"],
          sizes={"BLOCK_B": "B", "BLOCK_G": "G"})
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _group_fc_dgrad_kernel(DOUT, W, DH, B, K, D, G, C, SIZE_CLASS,
                           s_ob, s_wk, s_wd, s_wg,
                           DOT: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr):
    """dh[b, k, :] = sum_g dlogits[b, k*G + g] W[k, :, g], written as [B, K, D]."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    nb = tl.cdiv(B, BLOCK_B)
    pid_b = pid % nb
    pid_d = pid // nb
    dt: tl.constexpr = DOT
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    bmask = offs_b < B
    dmask = offs_d < D
    b64 = offs_b.to(tl.int64)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        cls = k * G + offs_g
        cmask = (offs_g < G) & (cls < C)
        dy = tl.load(DOUT + b64[:, None] * s_ob + cls[None, :],
                     mask=bmask[:, None] & cmask[None, :], other=0.0)
        w = tl.load(W + k.to(tl.int64) * s_wk + offs_g[:, None] * s_wg + offs_d[None, :] * s_wd,
                    mask=(offs_g < G)[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(dy.to(dt), w.to(dt), acc, input_precision=PREC)
    dh_ptrs = DH + (b64 * K + k)[:, None] * D + offs_d[None, :]
    tl.store(dh_ptrs, acc.to(DH.dtype.element_ty), mask=bmask[:, None] & dmask[None, :])


@autotune(WGRAD_CONFIGS, _INTERP_WGRAD, key=["K", "D", "G", "SIZE_CLASS", "APPLY_LN", "DROPOUT"],
          sizes={"BLOCK_B": "B", "BLOCK_G": "G"})
@triton.jit(do_not_specialize=["SIZE_CLASS", "seed_offset"])
def _group_fc_wgrad_kernel(R, X, MEAN, RSTD, LNW, LNB, SEED, DOUT, DW, seed_offset,
                           B, K, D, G, C, SIZE_CLASS,
                           s_rb, s_rk, s_rd, s_xb, s_xk, s_xd, s_ob,
                           p, drop_scale,
                           APPLY_LN: tl.constexpr, DROPOUT: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_B: tl.constexpr):
    """dW[k] = h_k^T dlogits_k over the batch; padded-tail columns get 0. DW is contiguous."""
    pid = tl.program_id(0)
    k = tl.program_id(1)
    nd = tl.cdiv(D, BLOCK_D)
    pid_d = pid % nd
    pid_g = pid // nd
    dt: tl.constexpr = DOT
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = offs_g < G
    cls = k * G + offs_g
    cmask = gmask & (cls < C)
    acc = tl.zeros([BLOCK_D, BLOCK_G], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        h = _load_h(R, X, MEAN, RSTD, LNW, LNB, SEED, seed_offset, offs_b, pid_d * BLOCK_D, k, B, K, D,
                    s_rb, s_rk, s_rd, s_xb, s_xk, s_xd, p, drop_scale, APPLY_LN, DROPOUT, BLOCK_D)
        dy = tl.load(DOUT + offs_b.to(tl.int64)[:, None] * s_ob + cls[None, :],
                     mask=(offs_b < B)[:, None] & cmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(h.to(dt)), dy.to(dt), acc, input_precision=PREC)
    dw_ptrs = DW + (k.to(tl.int64) * D + offs_d[:, None]) * G + offs_g[None, :]
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=(offs_d < D)[:, None] & gmask[None, :])


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def logits_dtype(compute_dtype: torch.dtype, bias: torch.Tensor) -> torch.dtype:
    """The logits' dtype: the products' dtype promoted with the bias (fp32 logits under autocast
    with fp32 parameters, as the reference's fp32 buffer gives)."""
    return torch.promote_types(compute_dtype, bias.dtype)


def _h_args(b, k, d, hx, hr=None, p=0.0):
    """The scalar arguments and constexprs that say how the kernels read h: from ``hx`` (h itself,
    [B, K, D]) or rebuilt as LN(hr + dropout(hx)) (``hr`` given: both broadcast to [B, K, D])."""
    shape = (b, k, d)
    apply_ln = hr is not None
    r_strides = strides_3d(hr if apply_ln else hx, shape)
    scalars = (*r_strides, *strides_3d(hx, shape))
    drop = apply_ln and p > 0
    return scalars, (float(p), 1.0 / (1.0 - p) if drop else 1.0), dict(APPLY_LN=apply_ln,
                                                                         DROPOUT=drop)


def _fwd_launch(b, k, d, weight, num_classes, compute_dtype, hx, hr=None, p=0.0):
    g = weight.shape[2]
    strides, drop, consts = _h_args(b, k, d, hx, hr, p)

    def grid(meta):
        return (triton.cdiv(b, meta["BLOCK_B"]) * triton.cdiv(g, meta["BLOCK_G"]), k)

    return Launch(_group_fc_fwd_kernel, grid,
                  (b, k, d, g, num_classes, size_class(b), *strides, *weight.stride(), *drop),
                  dict(consts, DOT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype)))


def _dgrad_launch(b, k, d, weight, num_classes, dout_stride, compute_dtype):
    g = weight.shape[2]

    def grid(meta):
        return (triton.cdiv(b, meta["BLOCK_B"]) * triton.cdiv(d, meta["BLOCK_D"]), k)

    return Launch(_group_fc_dgrad_kernel, grid,
                  (b, k, d, g, num_classes, size_class(b), dout_stride, *weight.stride()),
                  dict(DOT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype)))


def _wgrad_launch(b, k, d, weight, num_classes, dout_stride, compute_dtype, hx, hr=None, p=0.0):
    g = weight.shape[2]
    strides, drop, consts = _h_args(b, k, d, hx, hr, p)

    def grid(meta):
        return (triton.cdiv(d, meta["BLOCK_D"]) * triton.cdiv(g, meta["BLOCK_G"]), k)

    return Launch(_group_fc_wgrad_kernel, grid,
                  (b, k, d, g, num_classes, size_class(b), *strides, dout_stride, *drop),
                  dict(consts, DOT=tl_dtype(compute_dtype), PREC=dot_precision(compute_dtype)))


def _contiguous_cols(dout: torch.Tensor) -> torch.Tensor:
    return dout if dout.stride(1) == 1 else dout.contiguous()


def _gfc_fwd_plan(h, weight, bias, num_classes, compute_dtype):
    b, k, d = h.shape
    return ((b, num_classes), logits_dtype(compute_dtype, bias),
            _fwd_launch(b, k, d, weight, num_classes, compute_dtype, h))


_GFC_FWD_PLANS = PlanCache(_gfc_fwd_plan)


def group_fc_forward(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_classes: int,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """h [B, K, D], weight [K, D, G], bias [num_classes] -> logits [B, num_classes], products in
    ``compute_dtype`` (fp32 accumulation), logits in ``logits_dtype``."""
    key = (h.shape, h.stride(), h.dtype, weight.shape, weight.stride(), weight.dtype, bias.dtype,
           h.device, num_classes, compute_dtype, dot_precision(compute_dtype))
    out_shape, out_dtype, launch = _GFC_FWD_PLANS(key, h, weight, bias, num_classes, compute_dtype)
    out = torch.empty(out_shape, dtype=out_dtype, device=h.device)
    if out.numel():
        launch(h, h, h, h, h, h, h, weight, bias, out, lead=(0,))
    return out


def _gfc_bwd_plan(dout, h, weight, compute_dtype):
    b, k, d = h.shape
    c = dout.shape[1]
    return (_dgrad_launch(b, k, d, weight, c, dout.stride(0), compute_dtype),
            _wgrad_launch(b, k, d, weight, c, dout.stride(0), compute_dtype, h))


_GFC_BWD_PLANS = PlanCache(_gfc_bwd_plan)


def group_fc_backward(dout: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                      compute_dtype: torch.dtype):
    """Returns (dh [B, K, D] in ``compute_dtype``, dW [K, D, G] in weight's dtype)."""
    dout = _contiguous_cols(dout)
    key = (dout.shape, dout.stride(), dout.dtype, h.shape, h.stride(), h.dtype, weight.shape,
           weight.stride(), weight.dtype, h.device, compute_dtype, dot_precision(compute_dtype))
    dgrad, wgrad = _GFC_BWD_PLANS(key, dout, h, weight, compute_dtype)
    dh = torch.empty(h.shape, dtype=compute_dtype, device=h.device)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if not h.shape[0]:
        return dh, dw.zero_()
    dgrad(dout, weight, dh)
    wgrad(h, h, h, h, h, h, h, dout, dw, lead=(0,))
    return dh, dw


def _decode_fwd_plan(residual, x, p, weight, bias, num_classes, compute_dtype):
    b, k, d = torch.broadcast_shapes(residual.shape, x.shape)
    return ((b, num_classes), logits_dtype(compute_dtype, bias),
            _fwd_launch(b, k, d, weight, num_classes, compute_dtype, x, residual, p))


_DECODE_FWD_PLANS = PlanCache(_decode_fwd_plan)


def decode_forward(residual, x, seed, seed_offset, p, ln_weight, ln_bias, eps, weight, bias,
                   num_classes, compute_dtype):
    """logits of LN(residual + dropout(x)) [B, K, D] through the group FC, without storing the
    normalized rows. Returns (logits, mean, rstd), the statistics fp32 [B*K] for the backward."""
    _, mean, rstd = ln_forward(residual, x, seed, seed_offset, p, None, None, eps, store_y=False)
    key = (residual.shape, residual.stride(), residual.dtype, x.shape, x.stride(), x.dtype,
           weight.shape, weight.stride(), weight.dtype, bias.dtype, x.device, p, num_classes,
           compute_dtype, dot_precision(compute_dtype))
    out_shape, out_dtype, launch = _DECODE_FWD_PLANS(key, residual, x, p, weight, bias,
                                                     num_classes, compute_dtype)
    out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    if out.numel():
        launch(residual, x, mean, rstd, ln_weight, ln_bias, seed if p > 0 else mean, weight, bias,
               out, lead=(seed_offset,))
    return out, mean, rstd


def _decode_bwd_plan(dout, residual, x, p, weight, compute_dtype):
    shape = tuple(torch.broadcast_shapes(residual.shape, x.shape))
    b, k, d = shape
    c = dout.shape[1]
    return (shape, torch.result_type(residual, x),
            _dgrad_launch(b, k, d, weight, c, dout.stride(0), compute_dtype),
            _wgrad_launch(b, k, d, weight, c, dout.stride(0), compute_dtype, x, residual, p))


_DECODE_BWD_PLANS = PlanCache(_decode_bwd_plan)


def decode_backward(dout, residual, x, seed, seed_offset, p, ln_weight, ln_bias, mean, rstd,
                    weight, compute_dtype):
    """Returns (dz, dx or None, d ln_weight, d ln_bias, dW) with dz = dL/d(residual + dropout(x))
    shaped [B, K, D] (dx None when p == 0: then dx == dz); the LN affine grads in ``ln_weight``'s
    dtype."""
    dout = _contiguous_cols(dout)
    key = (dout.shape, dout.stride(), dout.dtype, residual.shape, residual.stride(),
           residual.dtype, x.shape, x.stride(), x.dtype, weight.shape, weight.stride(),
           weight.dtype, x.device, p, compute_dtype, dot_precision(compute_dtype))
    shape, dz_dtype, dgrad, wgrad = _DECODE_BWD_PLANS(key, dout, residual, x, p, weight,
                                                      compute_dtype)
    dh = torch.empty(shape, dtype=compute_dtype, device=x.device)
    dgrad(dout, weight, dh)
    dz, dx, dlnw, dlnb = ln_backward(dh, residual, x, seed, seed_offset, p, ln_weight, mean, rstd,
                                     dz_dtype)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    wgrad(residual, x, mean, rstd, ln_weight, ln_bias, seed if p > 0 else mean, dout, dw,
          lead=(seed_offset,))
    return dz, dx, dlnw, dlnb, dw
