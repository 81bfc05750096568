"""attention / shared_query_attention: multi-head cross-attention, the Triton kernels
(mldecoder_fast/kernels/attention.py, ``mldecoder_fast::triton_attention[_backward]``,
``mldecoder_fast::triton_shared_query_attention[_backward]``) against the torch path (TorchOps) or
an explicit softmax reference, forward and backward. Their sm_90 register use:
tests/kernels/test_triton_spills.py; the module-level checks: tests/test_module.py."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close
from triton_helpers import (
    AUTOCAST_DTYPE,
    DEV,
    OFFSET,
    TORCH,
    TRITON,
    TRITON_MARKS,
    assert_autocast_dtype_matches_torch,
    assert_no_grad_direct_path,
    bf16_close,
    check,
    grads_of,
    leaf,
    needs_cuda,
    opcheck,
    ref_copies,
    seed,
)

from mldecoder_fast.ops import triton_registrations as R

pytestmark = TRITON_MARKS


def _attention_ref(q, kv, num_heads, keep=None, p=0.0):
    """Plain softmax attention with an explicit dropout mask keep [B, H, K, N]."""
    b, n, two_d = kv.shape
    dm = two_d // 2
    d = dm // num_heads
    kh = kv[..., :dm].reshape(b, n, num_heads, d).transpose(1, 2)
    vh = kv[..., dm:].reshape(b, n, num_heads, d).transpose(1, 2)
    nq = q.shape[-2]
    qh = (q.reshape(nq, num_heads, d).transpose(0, 1).unsqueeze(0) if q.dim() == 2
          else q.reshape(b, nq, num_heads, d).transpose(1, 2))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    if keep is not None:
        a = a * keep / (1 - p)
    return (a @ vh).transpose(1, 2).reshape(b, nq, dm)


# Interpreted tiles are 16 wide: K = 13 is one query block, K = 20 two (both passes of the
# backward loop over query blocks); N = 37 is three key tiles with a masked tail. Head dims:
# 12 (one 16-wide column block, masked), 24 (16 + a masked 16), 96 (64 + 32, the head's own).
ATTN_SHAPES = [(True, 13, 3, 12), (False, 20, 3, 12), (False, 20, 2, 96), (True, 13, 1, 24)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared,k,h,d", ATTN_SHAPES)
def test_attention(dtype, shared, k, h, d, poison_empty):
    b, n = 2, 37
    dm = h * d
    q = leaf(torch.randn(k, dm) if shared else torch.randn(b, k, dm), dtype)
    kv = leaf(torch.randn(b, n, 2 * dm), dtype)
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = grads_of(out, [q, kv], g)
    qr, kvr = ref_copies(q, kv)
    ref = TORCH.attention(qr, kvr, h, 0.0)
    check(f"attention[shared={shared}, K={k}, d={d}]", ref, grads_of(ref, [qr, kvr], g.float()),
          out, grads, dtype)


def test_attention_strided_kv(poison_empty):
    """kv as a column slice of a wider buffer and q as a non-contiguous view."""
    b, n, h, d, k = 2, 21, 2, 8, 9
    dm = h * d
    big = leaf(torch.randn(b, n, 2 * dm + 5))
    kv = big[..., 3:3 + 2 * dm]
    qt = leaf(torch.randn(dm, k))
    q = qt.t()
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn_like(out)
    grads = grads_of(out, [qt, big], g)
    qr, bigr = ref_copies(qt, big)
    ref = TORCH.attention(qr.t(), bigr[..., 3:3 + 2 * dm], h, 0.0)
    check("attention strided", ref, grads_of(ref, [qr, bigr], g), out, grads, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared,k,h,d", ATTN_SHAPES)
def test_attention_dropout_matches_mask(dtype, shared, k, h, d, poison_empty):
    from mldecoder_fast.kernels._common import dropout_mask
    b, n, p = 2, 37, 0.2
    dm = h * d
    q = leaf(torch.randn(k, dm) if shared else torch.randn(b, k, dm), dtype)
    kv = leaf(torch.randn(b, n, 2 * dm), dtype)
    s = seed(99)
    out, _lse = R.triton_attention(q, kv, s, OFFSET, h, p, dtype)
    g = torch.randn_like(out)
    grads = grads_of(out, [q, kv], g)
    keep = dropout_mask(s, b * h * k, n, p, OFFSET).view(b, h, k, n)
    qr, kvr = ref_copies(q, kv)
    ref = _attention_ref(qr, kvr, h, keep, p)
    check(f"attention dropout[shared={shared}, K={k}, d={d}]", ref,
          grads_of(ref, [qr, kvr], g.float()), out, grads, dtype)


def test_dropout_keep_rate_in_attention():
    """The attention kernel drops ~10% of the weights: with all-equal scores and v = 1 every output
    element is (kept count / N) / 0.9, so its mean over many rows is ~1."""
    b, n, h, d, k = 4, 64, 2, 16, 16
    q = torch.zeros(k, h * d, device=DEV)
    kv = torch.cat([torch.zeros(b, n, h * d), torch.ones(b, n, h * d)], dim=-1).to(DEV)
    torch.manual_seed(3)
    o = TRITON.attention(q, kv, h, 0.1)
    kept = o[..., 0] * 0.9          # fraction kept per (b, query), head 0
    assert abs(kept.mean().item() - 0.9) < 0.02


def _folded_ref(qk, memory, v, keep=None, p=0.0):
    h, k, _ = qk.shape
    b, n, dv = v.shape
    a = torch.einsum("hkc,bnc->bhkn", qk, memory).softmax(-1)
    if keep is not None:
        a = a * keep / (1 - p)
    o = a @ v.view(b, n, h, dv // h).transpose(1, 2)
    return o.transpose(1, 2).reshape(b, k, dv)


# D = 80 > 64: the score dimension is reduced in five 16-wide chunks when interpreted.
@pytest.mark.parametrize("dtype,p", [(torch.float32, 0.0), (torch.float16, 0.0), (torch.float32, 0.2)])
def test_shared_query_attention(dtype, p, poison_empty):
    """Batch-shared queries with W_k folded in (qk [H, K, D] against the memory [B, N, D]); without
    dropout, TritonOps.shared_query_attention gives exactly the custom op's output."""
    from mldecoder_fast.kernels._common import dropout_mask
    b, n, h, dm, k = 2, 37, 4, 80, 13
    qk = leaf(torch.randn(h, k, dm) / dm ** 0.5, dtype)
    memory, v = leaf(torch.randn(b, n, dm), dtype), leaf(torch.randn(b, n, dm), dtype)
    s = seed(17) if p else None
    out, _lse = R.triton_shared_query_attention(qk, memory, v, s, OFFSET, h, p, dtype)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = grads_of(out, [qk, memory, v], g)
    keep = dropout_mask(s, b * h * k, n, p, OFFSET).view(b, h, k, n) if p else None
    refs = ref_copies(qk, memory, v)
    ref = _folded_ref(*refs, keep, p)
    check(f"shared_query_attention[p={p}]", ref, grads_of(ref, refs, g.float()), out, grads, dtype)
    if p == 0:
        via_ops = TRITON.shared_query_attention(qk, memory, v, h, 0.0)
        assert torch.equal(via_ops, out)


@pytest.mark.parametrize("op", ["attention", "shared_query_attention"])
def test_no_grad_direct_path_matches_custom_op(op):
    b, k, n, h, d = 2, 5, 19, 2, 16
    if op == "attention":
        t1, kv = torch.randn(k, d, device=DEV), torch.randn(b, n, 2 * d, device=DEV)
        assert_no_grad_direct_path(lambda q, kv: TRITON.attention(q, kv, h, 0.0), [t1, kv], op)
    else:
        qk, mem = torch.randn(h, k, d, device=DEV), torch.randn(b, n, d, device=DEV)
        assert_no_grad_direct_path(lambda qk, m: TRITON.shared_query_attention(qk, m, m, h, 0.0), [qk, mem], op)


def test_autocast_dtype_matches_torch():
    b, k, n, h, d = 2, 5, 19, 2, 16
    q, kv = torch.randn(b, k, d, device=DEV), torch.randn(b, n, 2 * d, device=DEV)
    assert_autocast_dtype_matches_torch("attention", lambda ops: ops.attention(q, kv, h, 0.0), AUTOCAST_DTYPE)


def test_empty_batch_falls_back_to_torch():
    kv = torch.randn(0, 5, 16, device=DEV)
    assert TRITON.attention(torch.randn(3, 8, device=DEV), kv, 2, 0.0).shape == (0, 3, 8)


@pytest.mark.parametrize("shared", [True, False])
def test_opcheck_attention(shared):
    b, n, h, d, k = 2, 19, 2, 8, 5
    q = leaf(torch.randn(k, h * d) if shared else torch.randn(b, k, h * d))
    kv = leaf(torch.randn(b, n, 2 * h * d))
    p = 0.0 if shared else 0.1
    s = None if shared else seed(11)
    opcheck(R.triton_attention, (q, kv, s, OFFSET, h, p, torch.float32))
    o, lse = R.triton_attention(q.detach(), kv.detach(), s, OFFSET, h, p, torch.float32)
    opcheck(R.triton_attention_backward,
            (torch.randn_like(o), q.detach(), kv.detach(), o, lse, s, OFFSET, h, p))


@needs_cuda
@pytest.mark.parametrize("dtype,b,k,n,shared", [
    (torch.bfloat16, 32, 100, 196, False), (torch.bfloat16, 8, 80, 400, True),
    (torch.bfloat16, 4, 200, 49, False),   # K = 200: several query blocks in both passes
    (torch.float16, 32, 100, 196, False), (torch.float32, 8, 80, 196, False)])
def test_attention_full_size_cuda(dtype, b, k, n, shared):
    h, dm = 8, 768
    q32 = torch.randn(k, dm) if shared else torch.randn(b, k, dm)
    kv32 = torch.randn(b, n, 2 * dm)
    q, kv = leaf(q32, dtype), leaf(kv32, dtype)
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn_like(out)
    grads = grads_of(out, [q, kv], g)
    qr, kvr = ref_copies(q, kv)
    ref = TORCH.attention(qr, kvr, h, 0.0)
    ref_grads = grads_of(ref, [qr, kvr], g.float())
    if dtype == torch.float32:
        assert_close("attention fp32", ref, out, 1e-3)  # TF32 may be on
        for rg, gg in zip(ref_grads, grads, strict=True):
            assert_close("attention fp32 grad", rg, gg, 1e-3)
        return
    qt, kvt = leaf(q.detach()), leaf(kv.detach())
    tout = TORCH.attention(qt, kvt, h, 0.0)
    tgrads = grads_of(tout, [qt, kvt], g)
    bf16_close(f"attention {dtype}", ref, out, tout)
    for rg, gg, tg in zip(ref_grads, grads, tgrads, strict=True):
        bf16_close(f"attention {dtype} grad", rg, gg, tg)


@needs_cuda
def test_dropout_training_bf16_cuda():
    """bf16 training with dropout on every op: finite, reproducible, and keeps ~90%."""
    b, k, n, h, d = 16, 100, 49, 8, 768
    q = leaf(torch.randn(b, k, d), torch.bfloat16)
    kv = leaf(torch.randn(b, n, 2 * d), torch.bfloat16)
    torch.manual_seed(1)
    o1 = TRITON.attention(q, kv, h, 0.1)
    torch.manual_seed(1)
    o2 = TRITON.attention(q, kv, h, 0.1)
    assert torch.equal(o1, o2) and torch.isfinite(o1).all()
    gq, gkv = grads_of(o1, [q, kv], torch.randn_like(o1))
    assert torch.isfinite(gq).all() and torch.isfinite(gkv).all()
