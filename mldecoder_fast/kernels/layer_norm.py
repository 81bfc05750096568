"""Fused residual + dropout + LayerNorm: y = LN(residual + dropout(x)) in one pass, and its backward.

The head applies it three times (docs/design.md steps 3, 5, 6). Unfused, PyTorch runs dropout (mask +
scale), the add and the LayerNorm as separate passes over the activations and stores the dropout
mask; here one kernel reads ``residual`` and ``x`` once and writes ``y`` and two fp32 statistics
per row. The dropout mask is never stored: it is regenerated from (seed, row, column) in the
backward (see ``_common.dropout_keep``).

Rows: the output [..., R, D] is seen as [L, R, D], row m = l * R + r. ``residual`` and ``x`` may
broadcast to it (stride 0), e.g. a batch-shared [K, D] residual against per-sample [B, K, D].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dropout_keep, next_pow2, num_sms, tensor_3d


@triton.jit
def _load_rows(R, X, SEED, rows, cols, mask, R_DIM,
               s_rl, s_rr, s_rd, s_xl, s_xr, s_xd, p, drop_scale,
               HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = residual + dropout(x) for a [rows, cols] tile, in fp32 (0 outside ``mask``)."""
    rows64 = rows.to(tl.int64)
    li = rows64 // R_DIM
    ri = rows64 % R_DIM
    cols64 = cols.to(tl.int64)
    r = tl.load(R + (li * s_rl + ri * s_rr)[:, None] + cols64[None, :] * s_rd,
                mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + (li * s_xl + ri * s_xr)[:, None] + cols64[None, :] * s_xd,
                mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), rows, 0, p, BLOCK_D)
        x = tl.where(keep, x * drop_scale, 0.0)
    return r + x


@triton.jit
def _ln_fwd_kernel(R, X, Y, MEAN, RSTD, W, B, SEED,
                   M, R_DIM, D,
                   s_rl, s_rr, s_rd, s_xl, s_xr, s_xd,
                   p, drop_scale, eps,
                   HAS_DROPOUT: tl.constexpr, STORE_Y: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    z = _load_rows(R, X, SEED, rows, cols, mask, R_DIM, s_rl, s_rr, s_rd, s_xl, s_xr, s_xd,
                   p, drop_scale, HAS_DROPOUT, BLOCK_D)
    mean = tl.sum(z, axis=1) / D
    zc = tl.where(mask, z - mean[:, None], 0.0)
    var = tl.sum(zc * zc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    if STORE_Y:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = zc * rstd[:, None] * w[None, :] + b[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_kernel(DY, R, X, W, MEAN, RSTD, SEED, DZ, DX, DW_PART, DB_PART,
                   M, R_DIM, D, rows_per_prog,
                   s_rl, s_rr, s_rd, s_xl, s_xr, s_xd,
                   p, drop_scale,
                   HAS_DROPOUT: tl.constexpr, STORE_DZ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz = dL/d(residual + dropout(x)) and dx = dropout'(dz) (unless STORE_DZ is off: only the
    affine grads wanted); per-program partial sums of the affine grads (dw = sum dy * xhat,
    db = sum dy) over its ``rows_per_prog`` rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row0 = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + i + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        z = _load_rows(R, X, SEED, rows, cols, mask, R_DIM, s_rl, s_rr, s_rd, s_xl, s_xr, s_xd,
                       p, drop_scale, HAS_DROPOUT, BLOCK_D)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if STORE_DZ:
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / D
            c2 = tl.sum(wdy, axis=1) / D
            dz = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
            if HAS_DROPOUT:
                keep = dropout_keep(tl.load(SEED), rows, 0, p, BLOCK_D)
                tl.store(DX + offs, tl.where(keep, dz * drop_scale, 0.0).to(DX.dtype.element_ty),
                         mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * D + cols, dw_acc, mask=cmask)
    tl.store(DB_PART + pid * D + cols, db_acc, mask=cmask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

MAX_D = 16384  # one row per register tile; wider rows go to PyTorch


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d, 16)
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return block_m, block_d, num_warps


def _strides(t3: torch.Tensor) -> tuple[int, int, int]:
    return tuple(t3.stride())


def out_shape_dtype(residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    return torch.broadcast_shapes(residual.shape, x.shape), torch.result_type(residual, x)


def ln_forward(residual: torch.Tensor, x: torch.Tensor, seed: torch.Tensor | None, p: float,
               weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype | None = None, store_y: bool = True):
    """Returns (y or None, mean [M] fp32, rstd [M] fp32), y = LN(residual + dropout(x)) shaped as
    the broadcast of the two inputs. ``seed`` (int64 tensor, one element) is read when p > 0."""
    shape, dtype = out_shape_dtype(residual, x)
    out_dtype = out_dtype or dtype
    d = shape[-1]
    r3, x3 = tensor_3d(residual, shape), tensor_3d(x, shape)
    m = r3.shape[0] * r3.shape[1]
    dev = x.device
    mean = torch.empty(m, dtype=torch.float32, device=dev)
    rstd = torch.empty(m, dtype=torch.float32, device=dev)
    y = torch.empty(shape, dtype=out_dtype, device=dev) if store_y else None
    if m == 0:
        return y, mean, rstd
    has_drop = p > 0
    block_m, block_d, num_warps = _blocks(d)
    dummy = mean
    _ln_fwd_kernel[(triton.cdiv(m, block_m),)](
        r3, x3, y if store_y else dummy, mean, rstd,
        weight if store_y else dummy, bias if store_y else dummy,
        seed if has_drop else dummy,
        m, r3.shape[1], d, *_strides(r3), *_strides(x3),
        float(p), 1.0 / (1.0 - p) if has_drop else 1.0, float(eps),
        HAS_DROPOUT=has_drop, STORE_Y=store_y, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps)
    return y, mean, rstd


def ln_backward(dy: torch.Tensor, residual: torch.Tensor, x: torch.Tensor,
                seed: torch.Tensor | None, p: float, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor, dz_dtype: torch.dtype,
                input_grads: bool = True):
    """Gradients of y = LN(residual + dropout(x)) given dy (shaped as y).

    Returns (dz, dx or None, dw fp32, db fp32): dz = dL/d(residual + dropout(x)) shaped as y (the
    residual's gradient before any broadcast is summed), dx = dropout applied to dz (None when
    p == 0: then dx == dz), dw/db the affine gradients. ``input_grads=False``: dz and dx are not
    computed (None), e.g. for LN1 over the frozen learned queries.
    """
    shape = dy.shape
    d = shape[-1]
    r3, x3 = tensor_3d(residual, shape), tensor_3d(x, shape)
    m = r3.shape[0] * r3.shape[1]
    dev = dy.device
    dy = dy.contiguous()
    has_drop = p > 0
    dz = torch.empty(shape, dtype=dz_dtype, device=dev) if input_grads else None
    dx = torch.empty(shape, dtype=x.dtype, device=dev) if has_drop and input_grads else None
    if m == 0:
        z = torch.zeros(d, dtype=torch.float32, device=dev)
        return dz, dx, z, z.clone()
    block_m, block_d, num_warps = _blocks(d)
    progs = min(triton.cdiv(m, block_m), num_sms(dev) * (2 if INTERPRET else 4))
    rows_per_prog = triton.cdiv(triton.cdiv(m, progs), block_m) * block_m
    progs = triton.cdiv(m, rows_per_prog)
    dw_part = torch.empty(progs, d, dtype=torch.float32, device=dev)
    db_part = torch.empty(progs, d, dtype=torch.float32, device=dev)
    _ln_bwd_kernel[(progs,)](
        dy, r3, x3, weight, mean, rstd, seed if has_drop else mean,
        dz if dz is not None else dw_part, dx if dx is not None else dw_part, dw_part, db_part,
        m, r3.shape[1], d, rows_per_prog, *_strides(r3), *_strides(x3),
        float(p), 1.0 / (1.0 - p) if has_drop else 1.0,
        HAS_DROPOUT=has_drop, STORE_DZ=input_grads, BLOCK_M=block_m, BLOCK_D=block_d,
        num_warps=num_warps)
    return dz, dx, dw_part.sum(0), db_part.sum(0)
