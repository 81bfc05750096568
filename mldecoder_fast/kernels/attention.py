"""Fused multi-head cross-attention (docs/design.md step 4): forward and backward.

O = dropout(softmax(q k^T / sqrt(d))) v per head, queries with no self-attention:

- q is either shared by the batch ([K, D], eval: read with batch stride 0, never expanded) or per
  sample ([B, K, D], training); k and v come from one fused projection kv [B, N, 2D] (k then v,
  head h at columns h*d .. h*d+d-1 of each half), read through strides.
- The softmax runs online over tiles of N (any N), statistics in fp32; the log-sum-exp of every
  row (base 2) is saved for the backward.
- Dropout on the attention weights is drawn in-kernel from (seed, row, key index) with Philox and
  regenerated identically in the backward; no mask is ever stored.
- The output is written as [B, K, D] with heads concatenated, ready for the output projection.

The same forward kernel serves the folded form used for batch-shared queries (inference): with
W_k folded into the queries (qk [H, K, D] = W_k,h^T q_h / sqrt(d), the key bias dropped as it is
constant along the softmax axis), the scores are qk[h] . memory[b, n] over all D, so the keys are
never projected; the kernel then reads the memory [B, N, D] for every head (head stride 0) and
reduces the score dimension in chunks. Its backward (rarely needed: training without query
dropout) is plain PyTorch using the kernel's own dropout mask.

Backward, in two passes (the structure of FlashAttention-2's), neither holding a whole head:

1. ``_attn_bwd_dq_kernel``, one program per (b, h, block of queries): delta = rowsum(dO * O),
   stored, then dq over tiles of keys, dS recomputed from q, k and the saved log-sum-exp.
2. ``_attn_bwd_dkv_kernel``, one program per (b, h, block of keys): k and v stay in registers
   while tiles of queries (q, dO, lse, delta) stream past; dk and dv are written once.

Every output element has one writer: no atomics, no fp32 staging buffer for dk/dv. Head dims are
split in two power-of-two column blocks (96 = 64 + 32) rather than padded, and query blocks are
tuned and pruned to K (80 queries: no 128-row block), so no production config spills registers
on sm_90 (``tests/kernels/test_triton_spills.py`` compiles them all offline).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Launch, PlanCache, autotune, dot_precision, dropout_keep, next_pow2, size_class

LOG2E = 1.4426950408889634

# Query blocks (BLOCK_K / BLOCK_M) are tuned like the key tiles and pruned to the number of
# queries (K = 80: 64 + 16-row blocks or 16-row blocks, not one 128-row block). Head dims are split
# in two power-of-two column blocks (96 = 64 + 32, see ``head_split``), never padded to 128. The
# dots' row blocks are 64 per 4 warps (Hopper's warp-group MMA shape): 32-row blocks and 128-row
# blocks at 4 warps spill registers on sm_90 (tests/kernels/test_triton_spills.py).
FWD_CONFIGS = [
    triton.Config({"BLOCK_K": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_K": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_K": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_K": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_K": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),   # small, safe
]
BWD_DQ_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),   # small, safe
]
BWD_DKV_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_M": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 128, "BLOCK_M": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_M": 16}, num_warps=4, num_stages=1),   # small, safe
]
_INTERP_FWD = triton.Config({"BLOCK_K": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
_INTERP_BWD = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)


@triton.jit
def _tile(ptr, rows, rmask, s_row, cols, s_col, HEAD_DIM: tl.constexpr):
    """[rows, cols] of one head (``ptr`` at its first column), 0 outside ``rmask`` and HEAD_DIM."""
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col,
                   mask=rmask[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)


@autotune(FWD_CONFIGS, _INTERP_FWD,
          key=["K", "N", "QK_DIM", "HEAD_DIM", "SIZE_CLASS", "DROPOUT"],
          sizes={"BLOCK_K": "K", "BLOCK_N": "N"})
@triton.jit(do_not_specialize=["SIZE_CLASS", "seed_offset"])
def _attn_fwd_kernel(Q, KEYS, VALS, OUT, LSE, SEED, seed_offset,
                     H, K, N, D_OUT,
                     s_qb, s_qh, s_qk, s_qc, s_kb, s_kh, s_kn, s_kc,
                     v_off, s_vb, s_vh, s_vn, s_vd,
                     qk_scale, p, drop_scale, SIZE_CLASS,
                     QK_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                     PREC: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores q[b, h, i, :] . keys[b, h, n, :] over QK_DIM, values [b, h, n, :HEAD_DIM]; every
    operand addressed by (b, h, row, col) strides (the values from ``v_off`` elements past VALS),
    so the same kernel reads kv [B, N, 2D] (per-head slices, the values its second half) or, for the
    folded form, queries qk [H, K, D] against the memory [B, N, D]
    itself (head stride 0), the score dimension then reduced in BLOCK_C chunks. Head columns:
    [0, D_LO) and, when HEAD_DIM > D_LO, [D_LO, D_LO + D_HI) (masked to HEAD_DIM)."""
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dt = OUT.dtype.element_ty
    SPLIT: tl.constexpr = HEAD_DIM > D_LO
    PER_HEAD: tl.constexpr = QK_DIM == HEAD_DIM  # scores over the head's own columns

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    ca = tl.arange(0, D_LO)
    cb = D_LO + tl.arange(0, D_HI)
    kmask = offs_k < K

    # Shared queries have s_qb == 0: every program of a head reads the same block.
    q_base = Q + b * s_qb + h * s_qh
    k_base = KEYS + b * s_kb + h * s_kh
    v_base = VALS + v_off + b * s_vb + h * s_vh
    if PER_HEAD:
        qa = _tile(q_base, offs_k, kmask, s_qk, ca, s_qc, HEAD_DIM).to(dt)
        if SPLIT:
            qb = _tile(q_base, offs_k, kmask, s_qk, cb, s_qc, HEAD_DIM).to(dt)
    rows = pid_bh * K + offs_k  # dropout row id of (b, h, query)
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_K, D_LO], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_K, D_HI], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + offs_n
        nmask = n < N
        if PER_HEAD:
            s = tl.dot(qa, tl.trans(_tile(k_base, n, nmask, s_kn, ca, s_kc, HEAD_DIM).to(dt)),
                       input_precision=PREC)
            if SPLIT:
                s = tl.dot(qb, tl.trans(_tile(k_base, n, nmask, s_kn, cb, s_kc, HEAD_DIM).to(dt)),
                           s, input_precision=PREC)
        else:
            s = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, QK_DIM, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                qc = _tile(q_base, offs_k, kmask, s_qk, c, s_qc, QK_DIM).to(dt)
                kc = _tile(k_base, n, nmask, s_kn, c, s_kc, QK_DIM).to(dt)
                s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC)
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        if DROPOUT:
            pr = tl.where(dropout_keep(seed, seed_offset, rows, start, p, BLOCK_N), pr, 0.0)
        pr = pr.to(dt)
        acc_a = tl.dot(pr, _tile(v_base, n, nmask, s_vn, ca, s_vd, HEAD_DIM).to(dt),
                       acc_a * alpha[:, None], input_precision=PREC)
        if SPLIT:
            acc_b = tl.dot(pr, _tile(v_base, n, nmask, s_vn, cb, s_vd, HEAD_DIM).to(dt),
                           acc_b * alpha[:, None], input_precision=PREC)
        m_i = m_new

    out_scale = (drop_scale / l_i)[:, None]
    o_base = OUT + h * HEAD_DIM
    o_rows = b * K + offs_k
    tl.store(o_base + o_rows[:, None] * D_OUT + ca[None, :], (acc_a * out_scale).to(dt),
             mask=kmask[:, None] & (ca < HEAD_DIM)[None, :])
    if SPLIT:
        tl.store(o_base + o_rows[:, None] * D_OUT + cb[None, :], (acc_b * out_scale).to(dt),
                 mask=kmask[:, None] & (cb < HEAD_DIM)[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * K + offs_k, m_i + tl.log2(l_i), mask=kmask)


@triton.jit
def _bwd_head_bases(Q, KV, pid_bh, H, K, D_MODEL, s_qb, s_qd, s_kvb, s_kvd, HEAD_DIM: tl.constexpr):
    """Where program (b, h) of either backward pass reads: (b as int64, h, q's base, the offset of
    O, dO and dq rows [B, K, D_MODEL], k's base, v's base)."""
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    k_base = KV + b * s_kvb + h * HEAD_DIM * s_kvd
    return (b, h, Q + b * s_qb + h * HEAD_DIM * s_qd, b * K * D_MODEL + h * HEAD_DIM, k_base,
            k_base + D_MODEL * s_kvd)


@autotune(BWD_DQ_CONFIGS, _INTERP_BWD, key=["K", "N", "HEAD_DIM", "SIZE_CLASS", "DROPOUT"],
          sizes={"BLOCK_M": "K", "BLOCK_N": "N"})
@triton.jit(do_not_specialize=["SIZE_CLASS", "seed_offset"])
def _attn_bwd_dq_kernel(Q, KV, OUT, DO, LSE, SEED, DQ, DELTA, seed_offset,
                        H, K, N, D_MODEL,
                        s_qb, s_qk, s_qd, s_kvb, s_kvn, s_kvd,
                        sm_scale, qk_scale, p, drop_scale, SIZE_CLASS,
                        HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                        D_LO: tl.constexpr, D_HI: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Pass 1 of the backward, one program per (b, h, BLOCK_M queries): delta = rowsum(dO * O)
    (stored for pass 2), then dq = sum over key tiles of dS k, with dS recomputed from q, k and
    the saved log-sum-exp. Each dq element has one writer."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b, h, q_base, o_off, k_base, v_base = _bwd_head_bases(Q, KV, pid_bh, H, K, D_MODEL, s_qb, s_qd,
                                                          s_kvb, s_kvd, HEAD_DIM)
    dt = DO.dtype.element_ty
    SPLIT: tl.constexpr = HEAD_DIM > D_LO

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    ca = tl.arange(0, D_LO)
    cb = D_LO + tl.arange(0, D_HI)
    mmask = offs_m < K

    qa = _tile(q_base, offs_m, mmask, s_qk, ca, s_qd, HEAD_DIM).to(dt)
    do_a = _tile(DO + o_off, offs_m, mmask, D_MODEL, ca, 1, HEAD_DIM)
    delta = tl.sum(do_a.to(tl.float32) * _tile(OUT + o_off, offs_m, mmask, D_MODEL, ca, 1,
                                                HEAD_DIM).to(tl.float32), axis=1)
    if SPLIT:
        qb = _tile(q_base, offs_m, mmask, s_qk, cb, s_qd, HEAD_DIM).to(dt)
        do_b = _tile(DO + o_off, offs_m, mmask, D_MODEL, cb, 1, HEAD_DIM)
        delta += tl.sum(do_b.to(tl.float32) * _tile(OUT + o_off, offs_m, mmask, D_MODEL, cb, 1,
                                                     HEAD_DIM).to(tl.float32), axis=1)
    stat = pid_bh.to(tl.int64) * K + offs_m
    tl.store(DELTA + stat, delta, mask=mmask)
    lse = tl.load(LSE + stat, mask=mmask, other=0.0)
    rows = pid_bh * K + offs_m
    if DROPOUT:
        seed = tl.load(SEED)

    dq_a = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, D_HI], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + offs_n
        nmask = n < N
        ka = _tile(k_base, n, nmask, s_kvn, ca, s_kvd, HEAD_DIM).to(dt)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        dp = tl.dot(do_a, tl.trans(_tile(v_base, n, nmask, s_kvn, ca, s_kvd, HEAD_DIM).to(dt)),
                    input_precision=PREC)
        if SPLIT:
            kb = _tile(k_base, n, nmask, s_kvn, cb, s_kvd, HEAD_DIM).to(dt)
            s = tl.dot(qb, tl.trans(kb), s, input_precision=PREC)
            dp = tl.dot(do_b, tl.trans(_tile(v_base, n, nmask, s_kvn, cb, s_kvd, HEAD_DIM).to(dt)),
                        dp, input_precision=PREC)
        pr = tl.where(nmask[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)  # softmax A
        if DROPOUT:  # dp = dL/d(dropped A); dL/dA = dp * keep / (1 - p)
            dp = tl.where(dropout_keep(seed, seed_offset, rows, start, p, BLOCK_N), dp * drop_scale, 0.0)
        ds = (pr * (dp - delta[:, None])).to(dt)                         # dL/dS, S = q k^T * scale
        dq_a = tl.dot(ds, ka, dq_a, input_precision=PREC)
        if SPLIT:
            dq_b = tl.dot(ds, kb, dq_b, input_precision=PREC)

    dq_base = DQ + o_off
    tl.store(dq_base + offs_m[:, None] * D_MODEL + ca[None, :],
             (dq_a * sm_scale).to(DQ.dtype.element_ty),
             mask=mmask[:, None] & (ca < HEAD_DIM)[None, :])
    if SPLIT:
        tl.store(dq_base + offs_m[:, None] * D_MODEL + cb[None, :],
                 (dq_b * sm_scale).to(DQ.dtype.element_ty),
                 mask=mmask[:, None] & (cb < HEAD_DIM)[None, :])


@autotune(BWD_DKV_CONFIGS, _INTERP_BWD, key=["K", "N", "HEAD_DIM", "SIZE_CLASS", "DROPOUT"],
          sizes={"BLOCK_M": "K", "BLOCK_N": "N"})
@triton.jit(do_not_specialize=["SIZE_CLASS", "seed_offset"])
def _attn_bwd_dkv_kernel(Q, KV, DO, LSE, DELTA, SEED, DKV, seed_offset,
                         H, K, N, D_MODEL,
                         s_qb, s_qk, s_qd, s_kvb, s_kvn, s_kvd,
                         sm_scale, qk_scale, p, drop_scale, SIZE_CLASS,
                         HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                         D_LO: tl.constexpr, D_HI: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """Pass 2, one program per (b, h, BLOCK_N keys): its k and v tiles stay in registers while
    tiles of BLOCK_M queries (q, dO, log-sum-exp, delta) stream past; works transposed (keys by
    queries) so the dropped weights and dS feed the dv and dk products directly. Each dk, dv
    element has one writer: stored once, in kv's dtype."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b, h, q_base, o_off, k_base, v_base = _bwd_head_bases(Q, KV, pid_bh, H, K, D_MODEL, s_qb, s_qd,
                                                          s_kvb, s_kvd, HEAD_DIM)
    dt = DO.dtype.element_ty
    SPLIT: tl.constexpr = HEAD_DIM > D_LO

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    ca = tl.arange(0, D_LO)
    cb = D_LO + tl.arange(0, D_HI)
    nmask = offs_n < N
    stat_base = pid_bh.to(tl.int64) * K

    ka = _tile(k_base, offs_n, nmask, s_kvn, ca, s_kvd, HEAD_DIM).to(dt)
    va = _tile(v_base, offs_n, nmask, s_kvn, ca, s_kvd, HEAD_DIM).to(dt)
    if SPLIT:
        kb = _tile(k_base, offs_n, nmask, s_kvn, cb, s_kvd, HEAD_DIM).to(dt)
        vb = _tile(v_base, offs_n, nmask, s_kvn, cb, s_kvd, HEAD_DIM).to(dt)
    if DROPOUT:
        seed = tl.load(SEED)

    dk_a = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, D_HI], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, D_HI], dtype=tl.float32)
    for start in range(0, K, BLOCK_M):
        m = start + offs_m
        mmask = m < K
        qa = _tile(q_base, m, mmask, s_qk, ca, s_qd, HEAD_DIM).to(dt)
        do_a = _tile(DO + o_off, m, mmask, D_MODEL, ca, 1, HEAD_DIM)
        s_t = tl.dot(ka, tl.trans(qa), input_precision=PREC)                 # [BLOCK_N, BLOCK_M]
        dp_t = tl.dot(va, tl.trans(do_a), input_precision=PREC)
        if SPLIT:
            qb = _tile(q_base, m, mmask, s_qk, cb, s_qd, HEAD_DIM).to(dt)
            do_b = _tile(DO + o_off, m, mmask, D_MODEL, cb, 1, HEAD_DIM)
            s_t = tl.dot(kb, tl.trans(qb), s_t, input_precision=PREC)
            dp_t = tl.dot(vb, tl.trans(do_b), dp_t, input_precision=PREC)
        # Queries past K: lse = +inf gives weight 0 (and dO = 0, delta = 0: dS = 0).
        lse = tl.load(LSE + stat_base + m, mask=mmask, other=float("inf"))
        delta = tl.load(DELTA + stat_base + m, mask=mmask, other=0.0)
        pr_t = tl.exp2(s_t * qk_scale - lse[None, :])                        # softmax A^T
        if DROPOUT:
            keep = tl.trans(dropout_keep(seed, seed_offset, pid_bh * K + m, n0, p, BLOCK_N))
            pd_t = tl.where(keep, pr_t * drop_scale, 0.0)
            dp_t = tl.where(keep, dp_t * drop_scale, 0.0)
        else:
            pd_t = pr_t
        ds_t = (pr_t * (dp_t - delta[None, :])).to(dt)
        pd_t = pd_t.to(dt)
        dv_a = tl.dot(pd_t, do_a, dv_a, input_precision=PREC)
        dk_a = tl.dot(ds_t, qa, dk_a, input_precision=PREC)
        if SPLIT:
            dv_b = tl.dot(pd_t, do_b, dv_b, input_precision=PREC)
            dk_b = tl.dot(ds_t, qb, dk_b, input_precision=PREC)

    out_dt = DKV.dtype.element_ty
    dk_base = DKV + b * N * 2 * D_MODEL + h * HEAD_DIM
    rows = offs_n[:, None].to(tl.int64) * (2 * D_MODEL)
    amask = nmask[:, None] & (ca < HEAD_DIM)[None, :]
    tl.store(dk_base + rows + ca[None, :], (dk_a * sm_scale).to(out_dt), mask=amask)
    tl.store(dk_base + D_MODEL + rows + ca[None, :], dv_a.to(out_dt), mask=amask)
    if SPLIT:
        bmask = nmask[:, None] & (cb < HEAD_DIM)[None, :]
        tl.store(dk_base + rows + cb[None, :], (dk_b * sm_scale).to(out_dt), mask=bmask)
        tl.store(dk_base + D_MODEL + rows + cb[None, :], dv_b.to(out_dt), mask=bmask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _q_strides(q: torch.Tensor) -> tuple[int, int, int]:
    return (0, *q.stride()) if q.dim() == 2 else tuple(q.stride())


def head_split(head_dim: int) -> tuple[int, int]:
    """(D_LO, D_HI): a head's columns as two power-of-two blocks, the second masked to the head
    dim (96 = 64 + 32, 80 = 64 + 16, 64 = 64 alone; D_HI is then unused). At least 16 each."""
    d_lo = max(16, 1 << (max(head_dim, 1).bit_length() - 1))
    return d_lo, next_pow2(head_dim - d_lo, 16) if head_dim > d_lo else 16


def _drop_scalars(p: float) -> tuple[float, float]:
    return float(p), (1.0 / (1.0 - p) if p > 0 else 1.0)


def _fwd_launch(b, h, k, n, d_out, q_strides, key_strides, val_strides, qk_dim, hd, scale, p,
                out_dtype):
    """The forward launch over strided (b, h, row, col) views of queries, keys and values
    (``val_strides`` led by the values' offset from their pointer, in elements)."""
    d_lo, d_hi = head_split(hd)

    def grid(meta):
        return (b * h, triton.cdiv(k, meta["BLOCK_K"]))

    return Launch(_attn_fwd_kernel, grid,
                  (h, k, n, d_out, *q_strides, *key_strides, *val_strides,
                   scale * LOG2E, *_drop_scalars(p), size_class(b)),
                  dict(QK_DIM=qk_dim, HEAD_DIM=hd, DROPOUT=p > 0, PREC=dot_precision(out_dtype),
                       D_LO=d_lo, D_HI=d_hi,
                       # score chunks of the folded form; interpreted: small enough that tests
                       # run the loop
                       BLOCK_C=16 if INTERPRET else 64))


def _kv_fwd_plan(q, kv, num_heads, p, out_dtype):
    b, n, two_d = kv.shape
    d_model = two_d // 2
    hd, k = d_model // num_heads, q.shape[-2]
    sqb, sqk, sqc = _q_strides(q)
    skb, skn, skc = kv.stride()
    heads = (skb, hd * skc, skn, skc)
    # values: the second half of kv's columns, through the keys' strides
    launch = _fwd_launch(b, num_heads, k, n, d_model, (sqb, hd * sqc, sqk, sqc), heads,
                         (d_model * skc, *heads), hd, hd, 1.0 / math.sqrt(hd), p, out_dtype)
    return (b, k, d_model), (b, num_heads, k), launch


_KV_FWD_PLANS = PlanCache(_kv_fwd_plan)


def attention_forward(q: torch.Tensor, kv: torch.Tensor, seed: torch.Tensor | None,
                      seed_offset: int, num_heads: int, p: float, out_dtype: torch.dtype):
    """Returns (o [B, K, D] in ``out_dtype``, lse [B, H, K] fp32, base 2)."""
    key = (q.shape, q.stride(), q.dtype, kv.shape, kv.stride(), kv.dtype, kv.device, num_heads,
           p, out_dtype, dot_precision(out_dtype))
    o_shape, lse_shape, launch = _KV_FWD_PLANS(key, q, kv, num_heads, p, out_dtype)
    o = torch.empty(o_shape, dtype=out_dtype, device=kv.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=kv.device)
    if o.numel():
        launch(q, kv, kv, o, lse, seed if p > 0 else lse, lead=(seed_offset,))
    return o, lse


def _folded_fwd_plan(qk, memory, v, p, out_dtype):
    h, k, d_model = qk.shape
    b, n, _ = memory.shape
    hd = v.shape[2] // h
    # At large batch one cast of the queries up front halves the kernel's re-reads of them (once
    # per key tile and score chunk); at small batch the cast would cost a launch.
    cast = b >= 16 and qk.dtype != out_dtype
    launch = _fwd_launch(b, h, k, n, v.shape[2], (0, k * d_model, d_model, 1) if cast else
                         (0, *qk.stride()),
                         (memory.stride(0), 0, memory.stride(1), memory.stride(2)),
                         (0, v.stride(0), hd * v.stride(2), v.stride(1), v.stride(2)),
                         d_model, hd, 1.0, p, out_dtype)
    return (b, k, v.shape[2]), (b, h, k), cast, launch


_FOLDED_FWD_PLANS = PlanCache(_folded_fwd_plan)


def folded_attention_forward(qk: torch.Tensor, memory: torch.Tensor, v: torch.Tensor,
                             seed: torch.Tensor | None, seed_offset: int, p: float,
                             out_dtype: torch.dtype):
    """Shared queries with the key projection folded in: scores = memory . qk[h] (already scaled).

    qk [H, K, D], memory [B, N, D], v [B, N, D] -> (o [B, K, D], lse [B, H, K])."""
    key = (qk.shape, qk.stride(), qk.dtype, memory.shape, memory.stride(), memory.dtype,
           v.shape, v.stride(), v.dtype, memory.device, p, out_dtype, dot_precision(out_dtype))
    o_shape, lse_shape, cast, launch = _FOLDED_FWD_PLANS(key, qk, memory, v, p, out_dtype)
    o = torch.empty(o_shape, dtype=out_dtype, device=memory.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=memory.device)
    if o.numel():
        if cast:
            qk = qk.to(out_dtype, memory_format=torch.contiguous_format)
        launch(qk, memory, v, o, lse, seed if p > 0 else lse, lead=(seed_offset,))
    return o, lse


def folded_attention_backward(do, qk, memory, v, seed, seed_offset, p):
    """Gradients of ``folded_attention_forward`` in plain PyTorch (fp32), with the kernels' own
    dropout mask: this form serves batch-shared queries, i.e. inference, and is differentiated only
    when training without query dropout. Returns (dqk, dmemory, dv) in the inputs' dtypes."""
    from ._common import dropout_mask
    h, k, d_model = qk.shape
    b, n, _ = memory.shape
    hd = v.shape[2] // h
    qk32, mem32 = qk.float(), memory.float()
    v32 = v.float().view(b, n, h, hd).transpose(1, 2)                       # [B, H, N, d]
    do32 = do.float().view(b, k, h, hd).transpose(1, 2)                     # [B, H, K, d]
    a = torch.einsum("hkc,bnc->bhkn", qk32, mem32).softmax(dim=-1)          # [B, H, K, N]
    if p > 0:
        keep = dropout_mask(seed, b * h * k, n, p, seed_offset).view(b, h, k, n).to(a.dtype)
        keep = keep / (1.0 - p)
    else:
        keep = None
    ad = a * keep if keep is not None else a
    dv = torch.matmul(ad.transpose(-1, -2), do32)                           # [B, H, N, d]
    dad = torch.matmul(do32, v32.transpose(-1, -2))                         # [B, H, K, N]
    da = dad * keep if keep is not None else dad
    ds = a * (da - (da * a).sum(-1, keepdim=True))
    dqk = torch.einsum("bhkn,bnc->hkc", ds, mem32)
    dmem = torch.einsum("bhkn,hkc->bnc", ds, qk32)
    dv = dv.transpose(1, 2).reshape(b, n, h * hd)
    return dqk.to(qk.dtype), dmem.to(memory.dtype), dv.to(v.dtype)


def _bwd_plan(q, kv, num_heads, p, do_dtype):
    b, n, two_d = kv.shape
    d_model = two_d // 2
    hd, k = d_model // num_heads, q.shape[-2]
    d_lo, d_hi = head_split(hd)
    sm_scale = 1.0 / math.sqrt(hd)
    args = (num_heads, k, n, d_model, *_q_strides(q), *kv.stride(),
            sm_scale, sm_scale * LOG2E, *_drop_scalars(p), size_class(b))
    consts = dict(HEAD_DIM=hd, DROPOUT=p > 0, PREC=dot_precision(do_dtype), D_LO=d_lo, D_HI=d_hi)
    dq = Launch(_attn_bwd_dq_kernel, lambda meta: (b * num_heads, triton.cdiv(k, meta["BLOCK_M"])),
                args, consts)
    dkv = Launch(_attn_bwd_dkv_kernel,
                 lambda meta: (b * num_heads, triton.cdiv(n, meta["BLOCK_N"])), args, consts)
    return (b, k, d_model), (b, num_heads, k), dq, dkv


_BWD_PLANS = PlanCache(_bwd_plan)


def attention_backward(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, seed: torch.Tensor | None, seed_offset: int,
                       num_heads: int, p: float):
    """Returns (dq shaped and typed as q, dkv shaped and typed as kv)."""
    if not do.is_contiguous():
        do = do.contiguous()
    dev = kv.device
    key = (q.shape, q.stride(), q.dtype, kv.shape, kv.stride(), kv.dtype, do.dtype, dev,
           num_heads, p, dot_precision(do.dtype))
    dq_shape, stat_shape, launch_dq, launch_dkv = _BWD_PLANS(key, q, kv, num_heads, p, do.dtype)
    if not kv.numel() or not do.numel():
        return torch.zeros_like(q), torch.zeros_like(kv)
    shared = q.dim() == 2
    dkv = torch.empty(kv.shape, dtype=kv.dtype, device=dev)
    delta = torch.empty(stat_shape, dtype=torch.float32, device=dev)
    # A shared q gets per-sample gradients, summed below (no cross-program atomics).
    dq = torch.empty(dq_shape, dtype=torch.float32 if shared else q.dtype, device=dev)
    seed = seed if p > 0 else lse
    launch_dq(q, kv, o, do, lse, seed, dq, delta, lead=(seed_offset,))
    launch_dkv(q, kv, do, lse, delta, seed, dkv, lead=(seed_offset,))
    if shared:
        dq = dq.sum(0).to(q.dtype)
    return dq, dkv
