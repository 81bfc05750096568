"""Fused residual + dropout + LayerNorm: y = LN(residual + dropout(x)) in one pass, and its backward.

The head applies it three times (docs/design.md steps 3, 5, 6). Unfused, PyTorch runs dropout (mask +
scale), the add and the LayerNorm as separate passes over the activations and stores the dropout
mask; here one kernel reads ``residual`` and ``x`` once and writes ``y`` and two fp32 statistics
per row. The dropout mask is never stored: it is regenerated from (seed, row, column) in the
backward (see ``_common.dropout_keep``).

Rows: the output [..., R, D] is seen as [L, R, D], row m = l * R + r. ``residual`` and ``x`` may
broadcast to it (stride 0), e.g. a batch-shared [K, D] residual against per-sample [B, K, D].

Host side: the launch parameters of each (shapes, strides, dtypes, device, p, flags) are built
once (``_common.PlanCache``); the backward reduces the affine gradients' per-program partial sums
in its own last program (no separate reduction launches).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Launch, PlanCache, dropout_keep, next_pow2, num_sms, strides_3d


@triton.jit
def _load_rows(R, X, SEED, seed_offset, rows, cols, mask, R_DIM,
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
        keep = dropout_keep(tl.load(SEED), seed_offset, rows, 0, p, BLOCK_D)
        x = tl.where(keep, x * drop_scale, 0.0)
    return r + x


@triton.jit(do_not_specialize=["seed_offset"])
def _ln_fwd_kernel(R, X, Y, MEAN, RSTD, W, B, SEED, seed_offset,
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
    z = _load_rows(R, X, SEED, seed_offset, rows, cols, mask, R_DIM,
                   s_rl, s_rr, s_rd, s_xl, s_xr, s_xd, p, drop_scale, HAS_DROPOUT, BLOCK_D)
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


@triton.jit(do_not_specialize=["seed_offset"])
def _ln_bwd_kernel(DY, R, X, W, MEAN, RSTD, SEED, DZ, DX, PART, TICKET, DW, DB, seed_offset,
                   M, R_DIM, D, rows_per_prog,
                   s_rl, s_rr, s_rd, s_xl, s_xr, s_xd,
                   p, drop_scale,
                   HAS_DROPOUT: tl.constexpr, STORE_DZ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz = dL/d(residual + dropout(x)) and dx = dropout'(dz) (unless STORE_DZ is off: only the
    affine grads wanted). The affine grads (dw = sum dy * xhat, db = sum dy): each program stores
    its partial sums over its ``rows_per_prog`` rows in PART [2, programs, D], takes a ticket, and
    the last program to finish sums the partials (in program order: deterministic) into DW and DB
    (TICKET: zero at launch, this launch's own)."""
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
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
        z = _load_rows(R, X, SEED, seed_offset, rows, cols, mask, R_DIM,
                       s_rl, s_rr, s_rd, s_xl, s_xr, s_xd, p, drop_scale, HAS_DROPOUT, BLOCK_D)
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
                keep = dropout_keep(tl.load(SEED), seed_offset, rows, 0, p, BLOCK_D)
                tl.store(DX + offs, tl.where(keep, dz * drop_scale, 0.0).to(DX.dtype.element_ty),
                         mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(PART + pid * D + cols, dw_acc, mask=cmask)
    tl.store(PART + (progs + pid) * D + cols, db_acc, mask=cmask)
    # Every thread's partials stored before the ticket is drawn (the barrier), and visible to the
    # program that draws the last ticket (acq_rel).
    tl.debug_barrier()
    if tl.atomic_add(TICKET, 1, sem="acq_rel") == progs - 1:
        dw_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        db_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in range(0, progs, BLOCK_M):
            prog = j + tl.arange(0, BLOCK_M)
            pmask = (prog < progs)[:, None] & cmask[None, :]
            offs = prog[:, None] * D + cols[None, :]
            dw_sum += tl.sum(tl.load(PART + offs, mask=pmask, other=0.0, cache_modifier=".cg"), 0)
            db_sum += tl.sum(tl.load(PART + progs * D + offs, mask=pmask, other=0.0,
                                     cache_modifier=".cg"), 0)
        tl.store(DW + cols, dw_sum.to(DW.dtype.element_ty), mask=cmask)
        tl.store(DB + cols, db_sum.to(DB.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

MAX_D = 16384  # one row per register tile; wider rows go to PyTorch


def _blocks(d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d, 16)
    block_m = max(1, min(16, 4096 // block_d))
    num_warps = 4 if block_d <= 1024 else (8 if block_d <= 4096 else 16)
    return block_m, block_d, num_warps


def _drop_scalars(p: float) -> tuple[float, float]:
    return float(p), (1.0 / (1.0 - p) if p > 0 else 1.0)


class _Rows:
    """The row layout of residual + x (shapes of at most 3 dims broadcast to ``shape`` = [..., R, D],
    rows m = l * R + r) and the kernels' stride arguments."""

    def __init__(self, residual: torch.Tensor, x: torch.Tensor, shape: tuple):
        self.shape, self.d = shape, shape[-1]
        self.r_dim = shape[-2] if len(shape) >= 2 else 1
        self.m = self.r_dim * (shape[0] if len(shape) == 3 else 1)
        self.strides = (*strides_3d(residual, shape), *strides_3d(x, shape))


def _fwd_plan(residual, x, p, eps, out_dtype, store_y):
    shape = tuple(torch.broadcast_shapes(residual.shape, x.shape))
    rows = _Rows(residual, x, shape)
    block_m, block_d, num_warps = _blocks(rows.d)
    launch = Launch(_ln_fwd_kernel, (triton.cdiv(rows.m, block_m),),
                    (rows.m, rows.r_dim, rows.d, *rows.strides, *_drop_scalars(p), float(eps)),
                    dict(HAS_DROPOUT=p > 0, STORE_Y=store_y, BLOCK_M=block_m, BLOCK_D=block_d,
                         num_warps=num_warps))
    return shape, out_dtype or torch.result_type(residual, x), rows.m, launch


_FWD_PLANS = PlanCache(_fwd_plan)


def ln_forward(residual: torch.Tensor, x: torch.Tensor, seed: torch.Tensor | None, seed_offset: int,
               p: float, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               out_dtype: torch.dtype | None = None, store_y: bool = True):
    """Returns (y or None, mean [M] fp32, rstd [M] fp32), y = LN(residual + dropout(x)) shaped as
    the broadcast of the two inputs (at most 3 dims). ``seed`` (int64 tensor, one element) and the
    Philox ``seed_offset`` are read when p > 0."""
    key = (residual.shape, residual.stride(), residual.dtype, x.shape, x.stride(), x.dtype,
           x.device, p, eps, out_dtype, store_y)
    shape, dtype, m, launch = _FWD_PLANS(key, residual, x, p, eps, out_dtype, store_y)
    dev = x.device
    mean = torch.empty(m, dtype=torch.float32, device=dev)
    rstd = torch.empty(m, dtype=torch.float32, device=dev)
    y = torch.empty(shape, dtype=dtype, device=dev) if store_y else None
    if m:
        launch(residual, x, y if store_y else mean, mean, rstd,
               weight if store_y else mean, bias if store_y else mean,
               seed if p > 0 else mean, lead=(seed_offset,))
    return y, mean, rstd


def _bwd_plan(shape, residual, x, p, dz_dtype, input_grads, dev):
    rows = _Rows(residual, x, shape)
    block_m, block_d, num_warps = _blocks(rows.d)
    progs = min(triton.cdiv(rows.m, block_m), num_sms(dev) * (2 if INTERPRET else 4))
    rows_per_prog = triton.cdiv(triton.cdiv(rows.m, progs), block_m) * block_m
    progs = triton.cdiv(rows.m, rows_per_prog)
    launch = Launch(_ln_bwd_kernel, (progs,),
                    (rows.m, rows.r_dim, rows.d, rows_per_prog, *rows.strides, *_drop_scalars(p)),
                    dict(HAS_DROPOUT=p > 0, STORE_DZ=input_grads, BLOCK_M=block_m,
                         BLOCK_D=block_d, num_warps=num_warps))
    return rows.m, progs, launch


_BWD_PLANS = PlanCache(_bwd_plan)


def ln_backward(dy: torch.Tensor, residual: torch.Tensor, x: torch.Tensor,
                seed: torch.Tensor | None, seed_offset: int, p: float, weight: torch.Tensor,
                mean: torch.Tensor, rstd: torch.Tensor, dz_dtype: torch.dtype,
                input_grads: bool = True):
    """Gradients of y = LN(residual + dropout(x)) given dy (shaped as y).

    Returns (dz, dx or None, dw, db): dz = dL/d(residual + dropout(x)) shaped as y (the
    residual's gradient before any broadcast is summed), dx = dropout applied to dz (None when
    p == 0: then dx == dz), dw/db the affine gradients in ``weight``'s dtype.
    ``input_grads=False``: dz and dx are not computed (None), e.g. for LN1 over the frozen learned
    queries.
    """
    shape = dy.shape
    dev = dy.device
    if not dy.is_contiguous():
        dy = dy.contiguous()
    key = (shape, residual.shape, residual.stride(), residual.dtype, x.shape, x.stride(), x.dtype,
           dev, p, dz_dtype, input_grads)
    m, progs, launch = _BWD_PLANS(key, shape, residual, x, p, dz_dtype, input_grads, dev)
    has_drop = p > 0
    dz = torch.empty(shape, dtype=dz_dtype, device=dev) if input_grads else None
    dx = torch.empty(shape, dtype=x.dtype, device=dev) if has_drop and input_grads else None
    if m == 0:
        z = torch.zeros(shape[-1], dtype=weight.dtype, device=dev)
        return dz, dx, z, z.clone()
    part = torch.empty(2, progs, shape[-1], dtype=torch.float32, device=dev)
    # the last-program reduction's ticket, one per launch (zeroed: one small fill), so that two
    # launches in flight at once (other streams, CUDA graph replays) never count on the same one
    ticket = torch.zeros(1, dtype=torch.int32, device=dev)
    dw = torch.empty(shape[-1], dtype=weight.dtype, device=dev)
    db = torch.empty(shape[-1], dtype=weight.dtype, device=dev)
    launch(dy, residual, x, weight, mean, rstd, seed if has_drop else mean,
           dz if dz is not None else part, dx if dx is not None else part, part, ticket, dw, db,
           lead=(seed_offset,))
    return dz, dx, dw, db
