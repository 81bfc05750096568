"""Fused multi-head cross-attention (SPEC step 4): forward and backward.

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

Backward: one program per (batch, head, block of queries) walks the keys once, accumulates dq in
registers and writes its share of dk, dv per key tile. When all K queries fit one block (K <= 128,
every standard configuration) each dk, dv element has a single writer and is stored directly;
otherwise the blocks add into an fp32 buffer with atomics.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune, dot_precision, dropout_keep, next_pow2, num_sms, size_class

LOG2E = 1.4426950408889634

_FWD_CONFIGS = [
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1),   # small, safe
]
_BWD_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1),   # small, safe
]
_INTERP_CONFIG = triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)


@autotune(_FWD_CONFIGS, _INTERP_CONFIG,
          key=["K", "N", "QK_DIM", "HEAD_DIM", "BLOCK_K", "SIZE_CLASS", "DROPOUT"],
          sizes={"BLOCK_N": "N"})
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _attn_fwd_kernel(Q, KEYS, VALS, O, LSE, SEED,
                     H, K, N, D_OUT,
                     s_qb, s_qh, s_qk, s_qc, s_kb, s_kh, s_kn, s_kc, s_vb, s_vh, s_vn, s_vd,
                     qk_scale, p, drop_scale, SIZE_CLASS,
                     QK_DIM: tl.constexpr, HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores q[b, h, i, :] . keys[b, h, n, :] over QK_DIM (in BLOCK_C chunks when it is wider
    than one tile), values [b, h, n, :HEAD_DIM]; every operand addressed by (b, h, row, col)
    strides, so the same kernel reads kv [B, N, 2D] (per-head slices) or, for the folded form,
    queries qk [H, K, D] against the memory [B, N, D] itself (head stride 0)."""
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    dt = O.dtype.element_ty
    SINGLE_CHUNK: tl.constexpr = QK_DIM <= BLOCK_C

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    kmask = offs_k < K
    dmask = offs_d < HEAD_DIM

    # Shared queries have s_qb == 0: every program of a head reads the same block.
    q_base = Q + b * s_qb + h * s_qh + offs_k[:, None] * s_qk
    k_base = KEYS + b * s_kb + h * s_kh
    v_base = VALS + b * s_vb + h * s_vh + offs_d[None, :] * s_vd
    if SINGLE_CHUNK:
        q = tl.load(q_base + offs_c[None, :] * s_qc,
                    mask=kmask[:, None] & (offs_c < QK_DIM)[None, :], other=0.0).to(dt)
    rows = pid_bh * K + offs_k  # dropout row id of (b, h, query)
    if DROPOUT:
        seed = tl.load(SEED)

    m_i = tl.full([BLOCK_K], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + offs_n
        nmask = n < N
        if SINGLE_CHUNK:
            kt = tl.load(k_base + n[:, None] * s_kn + offs_c[None, :] * s_kc,
                         mask=nmask[:, None] & (offs_c < QK_DIM)[None, :], other=0.0).to(dt)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC)
        else:
            s = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for c0 in range(0, QK_DIM, BLOCK_C):
                c = c0 + offs_c
                cmask = c < QK_DIM
                qc = tl.load(q_base + c[None, :] * s_qc, mask=kmask[:, None] & cmask[None, :],
                             other=0.0).to(dt)
                kc = tl.load(k_base + n[:, None] * s_kn + c[None, :] * s_kc,
                             mask=nmask[:, None] & cmask[None, :], other=0.0).to(dt)
                s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC)
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        if DROPOUT:
            pr = tl.where(dropout_keep(seed, rows, start, p, BLOCK_N), pr, 0.0)
        v = tl.load(v_base + n[:, None] * s_vn, mask=nmask[:, None] & dmask[None, :],
                    other=0.0).to(dt)
        acc = acc * alpha[:, None] + tl.dot(pr.to(dt), v, input_precision=PREC)
        m_i = m_new

    acc = acc * (drop_scale / l_i)[:, None]
    col = h * HEAD_DIM + offs_d
    o_ptrs = O + (b * K + offs_k[:, None]) * D_OUT + col[None, :]
    tl.store(o_ptrs, acc.to(dt), mask=kmask[:, None] & dmask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * K + offs_k, m_i + tl.log2(l_i), mask=kmask)


@autotune(_BWD_CONFIGS, _INTERP_CONFIG, key=["K", "N", "HEAD_DIM", "BLOCK_K", "SIZE_CLASS", "DROPOUT"],
          sizes={"BLOCK_N": "N"}, reset_to_zero=["DKV"])
@triton.jit(do_not_specialize=["SIZE_CLASS"])
def _attn_bwd_kernel(Q, KV, O, DO, LSE, SEED, DQ, DKV,
                     H, K, N, D_MODEL,
                     s_qb, s_qk, s_qd, s_kvb, s_kvn, s_kvd,
                     sm_scale, qk_scale, p, drop_scale, SIZE_CLASS,
                     HEAD_DIM: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
                     ATOMIC: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    dt = DO.dtype.element_ty

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    kmask = offs_k < K
    dmask = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d
    qmask = kmask[:, None] & dmask[None, :]

    q = tl.load(Q + b.to(tl.int64) * s_qb + offs_k[:, None] * s_qk + col[None, :] * s_qd,
                mask=qmask, other=0.0).to(dt)
    o_offs = (b.to(tl.int64) * K + offs_k[:, None]) * D_MODEL + col[None, :]
    do = tl.load(DO + o_offs, mask=qmask, other=0.0)
    o = tl.load(O + o_offs, mask=qmask, other=0.0).to(tl.float32)
    # rowsum(dA * A) = dO . O, dropout included (O already carries it).
    delta = tl.sum(do.to(tl.float32) * o, axis=1)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * K + offs_k, mask=kmask, other=0.0)
    rows = pid_bh * K + offs_k
    if DROPOUT:
        seed = tl.load(SEED)

    k_base = KV + b.to(tl.int64) * s_kvb + col[None, :] * s_kvd
    v_base = k_base + D_MODEL * s_kvd
    dk_base = DKV + b.to(tl.int64) * N * 2 * D_MODEL + col[None, :]
    dv_base = dk_base + D_MODEL
    dq = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + offs_n
        nmask = n < N
        ld_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + n[:, None] * s_kvn, mask=ld_mask, other=0.0).to(dt)
        v = tl.load(v_base + n[:, None] * s_kvn, mask=ld_mask, other=0.0).to(dt)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        pr = tl.exp2(s - lse[:, None])
        pr = tl.where(kmask[:, None] & nmask[None, :], pr, 0.0)          # softmax weights A
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)                # dL/d(dropped A)
        if DROPOUT:
            keep = dropout_keep(seed, rows, start, p, BLOCK_N)
            pd = tl.where(keep, pr * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            pd = pr
        ds = pr * (dp - delta[:, None])                                   # dL/dS, S = q k^T * scale
        dv_t = tl.dot(tl.trans(pd.to(dt)), do, input_precision=PREC)      # [BLOCK_N, BLOCK_D]
        dk_t = tl.dot(tl.trans(ds.to(dt)), q, input_precision=PREC) * sm_scale
        dq += tl.dot(ds.to(dt), k, input_precision=PREC)
        dkv_offs = n[:, None].to(tl.int64) * (2 * D_MODEL)
        if ATOMIC:
            tl.atomic_add(dk_base + dkv_offs, dk_t, mask=ld_mask)
            tl.atomic_add(dv_base + dkv_offs, dv_t, mask=ld_mask)
        else:
            tl.store(dk_base + dkv_offs, dk_t.to(DKV.dtype.element_ty), mask=ld_mask)
            tl.store(dv_base + dkv_offs, dv_t.to(DKV.dtype.element_ty), mask=ld_mask)

    dq_ptrs = DQ + (b.to(tl.int64) * K + offs_k[:, None]) * D_MODEL + col[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=qmask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------

def _dims(q: torch.Tensor, kv: torch.Tensor, num_heads: int):
    b, n, two_d = kv.shape
    d_model = two_d // 2
    return b, n, d_model, d_model // num_heads, q.shape[-2]


def _q_strides(q: torch.Tensor) -> tuple[int, int, int]:
    return (0, *q.stride()) if q.dim() == 2 else tuple(q.stride())


def _block_d(head_dim: int) -> int:
    return next_pow2(head_dim, 16)


def _fwd_block_k(k: int, programs_per_block: int, device: torch.device) -> int:
    """Queries per program: all of them (up to 128) unless that leaves SMs idle at small batch."""
    cap = 16 if INTERPRET else 128
    block = min(next_pow2(k, 16), cap)
    while block > 16 and programs_per_block * triton.cdiv(k, block) < num_sms(device):
        block //= 2
    return block


def _bwd_block_k(k: int) -> int:
    return min(next_pow2(k, 16), 16 if INTERPRET else 128)


def _launch_fwd(q4, keys4, vals4, o, lse, seed, h, k, n, qk_dim, hd, scale, p, out_dtype):
    """Strided (b, h, row, col) views: q4 of the queries, keys4 and vals4 of keys and values."""
    b = o.shape[0]
    has_drop = p > 0
    block_k = _fwd_block_k(k, b * h, o.device)
    chunk = 16 if INTERPRET else 64      # interpreted: small enough that tests run the chunk loop
    block_c = next_pow2(qk_dim, 16) if qk_dim <= 4 * chunk else chunk
    grid = (b * h, triton.cdiv(k, block_k))
    _attn_fwd_kernel[grid](
        q4[0], keys4[0], vals4[0], o, lse, seed if has_drop else lse,
        h, k, n, o.shape[2], *q4[1], *keys4[1], *vals4[1],
        scale * LOG2E, float(p), 1.0 / (1.0 - p) if has_drop else 1.0, size_class(b),
        QK_DIM=qk_dim, HEAD_DIM=hd, DROPOUT=has_drop, PREC=dot_precision(out_dtype),
        BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_D=_block_d(hd))


def attention_forward(q: torch.Tensor, kv: torch.Tensor, seed: torch.Tensor | None,
                      num_heads: int, p: float, out_dtype: torch.dtype):
    """Returns (o [B, K, D] in ``out_dtype``, lse [B, H, K] fp32, base 2)."""
    b, n, d_model, hd, k = _dims(q, kv, num_heads)
    o = torch.empty(b, k, d_model, dtype=out_dtype, device=kv.device)
    lse = torch.empty(b, num_heads, k, dtype=torch.float32, device=kv.device)
    if b == 0 or k == 0:
        return o, lse
    sqb, sqk, sqc = _q_strides(q)
    skb, skn, skc = kv.stride()
    q4 = (q, (sqb, hd * sqc, sqk, sqc))
    keys4 = (kv, (skb, hd * skc, skn, skc))
    vals4 = (kv.narrow(2, d_model, d_model), (skb, hd * skc, skn, skc))
    _launch_fwd(q4, keys4, vals4, o, lse, seed, num_heads, k, n, hd, hd, 1.0 / math.sqrt(hd), p,
                out_dtype)
    return o, lse


def folded_attention_forward(qk: torch.Tensor, memory: torch.Tensor, v: torch.Tensor,
                             seed: torch.Tensor | None, p: float, out_dtype: torch.dtype):
    """Shared queries with the key projection folded in: scores = memory . qk[h] (already scaled).

    qk [H, K, D], memory [B, N, D], v [B, N, D] -> (o [B, K, D], lse [B, H, K])."""
    h, k, d_model = qk.shape
    b, n, _ = memory.shape
    hd = v.shape[2] // h
    o = torch.empty(b, k, v.shape[2], dtype=out_dtype, device=memory.device)
    lse = torch.empty(b, h, k, dtype=torch.float32, device=memory.device)
    if b == 0 or k == 0:
        return o, lse
    if b >= 16 and qk.dtype != out_dtype:
        # Every program re-reads its queries once per key tile and score chunk: at large batch
        # one cast up front halves those reads; at small batch it would cost a launch.
        qk = qk.to(out_dtype)
    q4 = (qk, (0, *qk.stride()))
    keys4 = (memory, (memory.stride(0), 0, memory.stride(1), memory.stride(2)))
    vals4 = (v, (v.stride(0), hd * v.stride(2), v.stride(1), v.stride(2)))
    _launch_fwd(q4, keys4, vals4, o, lse, seed, h, k, n, d_model, hd, 1.0, p, out_dtype)
    return o, lse


def folded_attention_backward(do, qk, memory, v, seed, p):
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
        keep = dropout_mask(seed, b * h * k, n, p).view(b, h, k, n).to(a.dtype) / (1.0 - p)
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


def attention_backward(do: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, seed: torch.Tensor | None, num_heads: int, p: float):
    """Returns (dq shaped and typed as q, dkv shaped and typed as kv)."""
    b, n, d_model, hd, k = _dims(q, kv, num_heads)
    dev = kv.device
    do = do.contiguous()
    shared = q.dim() == 2
    if b == 0 or k == 0 or n == 0:
        return torch.zeros_like(q), torch.zeros_like(kv)
    has_drop = p > 0
    block_k = _bwd_block_k(k)
    atomic = triton.cdiv(k, block_k) > 1
    dkv = (torch.zeros(b, n, 2 * d_model, dtype=torch.float32, device=dev) if atomic
           else torch.empty(b, n, 2 * d_model, dtype=kv.dtype, device=dev))
    # A shared q gets per-sample gradients, summed below (no cross-program atomics).
    dq = torch.empty(b, k, d_model, dtype=torch.float32 if shared else q.dtype, device=dev)
    sm_scale = 1.0 / math.sqrt(hd)
    grid = (b * num_heads, triton.cdiv(k, block_k))
    _attn_bwd_kernel[grid](
        q, kv, o, do, lse, seed if has_drop else lse, dq, dkv,
        num_heads, k, n, d_model, *_q_strides(q), *kv.stride(),
        sm_scale, sm_scale * LOG2E, float(p), 1.0 / (1.0 - p) if has_drop else 1.0, size_class(b),
        HEAD_DIM=hd, DROPOUT=has_drop, PREC=dot_precision(do.dtype), ATOMIC=atomic,
        BLOCK_K=block_k, BLOCK_D=_block_d(hd))
    if shared:
        dq = dq.sum(0).to(q.dtype)
    if atomic:
        dkv = dkv.to(kv.dtype)
    return dq, dkv
