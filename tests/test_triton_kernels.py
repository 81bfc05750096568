"""The Triton backend's fused kernels against plain PyTorch, forward and backward.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET):
shapes are tiny but odd (K, N, D, G not powers of two, N and G spanning several tiles, a padded
class tail), and the kernels' interpreter configs use 16-wide tiles so every loop and mask runs.
bf16 and full-size shapes need the GPU and are skipped here.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close

from mldecoder_fast.ops import triton_ops as T
from mldecoder_fast.ops.torch_ops import TorchOps

AVAILABLE, DETAIL = T.triton_status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"Triton kernels cannot run here: {DETAIL}")

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bf16 and full sizes; "
                                                 "the CPU interpreter gets bf16 wrong)")
# Relative RMS error allowed: fp32 (the interpreter computes dots in fp32; on a GPU fp32 dots are
# IEEE unless TF32 is enabled) and fp16 (operands rounded to fp16, fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}

TORCH = TorchOps()
TRITON = T.TritonOps()


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill every torch.empty with NaN (as fla's tests do): an element a kernel forgot to write fails."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _leaf(t, dtype=None):
    t = t.to(device=DEV, dtype=dtype or t.dtype)
    return t.detach().requires_grad_(True)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=False)


def _ref_copies(*ts):
    """fp32 leaf copies of the (already rounded) test inputs, for the reference computation."""
    return [_leaf(t.detach().float()) for t in ts]


def _check(name, ref_out, ref_grads, out, grads, dtype, out_dtype=None):
    """out_dtype: the output's expected dtype when it is not ``dtype`` (logits promote with an
    fp32 bias)."""
    assert out.dtype == (out_dtype or dtype), f"{name}: output dtype {out.dtype}"
    assert_close(f"{name} output", ref_out, out.float(), TOL[dtype])
    for i, (rg, g) in enumerate(zip(ref_grads, grads)):
        assert_close(f"{name} grad {i}", rg, g.float(), GRAD_TOL[dtype])


# ------------------------------------------------------------------------------------------------
# residual + dropout + LayerNorm
# ------------------------------------------------------------------------------------------------

def _ln_layout(layout, b, k, d):
    """(leaf tensors, function leaves -> (residual, x)) for the residual/x layouts the head uses."""
    if layout == "shared_residual":      # LN2 in eval: T1 [K, D] against O' [B, K, D]
        return [torch.randn(k, d), torch.randn(b, k, d)], lambda r, x: (r, x)
    if layout == "transposed_x":         # x a non-contiguous view
        return [torch.randn(b, k, d), torch.randn(k, b, d)], lambda r, x: (r, x.transpose(0, 1))
    # LN1 in training: T0 expanded (stride 0 on the batch) as both residual and x
    return [torch.randn(k, d)], lambda t0: (t0.unsqueeze(0).expand(b, k, d),) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["shared_residual", "transposed_x", "expanded_both"])
def test_layer_norm(dtype, layout, poison_empty):
    b, k, d = 3, 5, 40
    acts, arrange = _ln_layout(layout, b, k, d)
    acts = [_leaf(t, dtype) for t in acts]
    w, bias = _leaf(torch.randn(d)), _leaf(torch.randn(d))
    out = TRITON.residual_dropout_layer_norm(*arrange(*acts), 0.0, w, bias, 1e-5)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = _grads(out, acts + [w, bias], g)
    ref_inputs = _ref_copies(*acts, w, bias)
    ref = TORCH.residual_dropout_layer_norm(*arrange(*ref_inputs[:-2]), 0.0, *ref_inputs[-2:], 1e-5)
    _check(f"layer_norm[{layout}]", ref, _grads(ref, ref_inputs, g.float()), out, grads, dtype)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


# Philox offsets the ops get next to their seed (ops/triton_ops._DropoutSeeds); one past 2^32 so
# the offset's high word reaches the kernels too.
OFFSET, HIGH_OFFSET = 12, 2 ** 33 + 8


def test_layer_norm_frozen_inputs():
    """LN1 over the frozen learned queries: only the affine gradients are computed."""
    b, k, d = 3, 4, 24
    t0 = torch.randn(k, d, device=DEV)
    w, bias = _leaf(torch.randn(d)), _leaf(torch.randn(d))
    t0e = t0.unsqueeze(0).expand(b, k, d)
    out = TRITON.residual_dropout_layer_norm(t0e, t0e, 0.0, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = _grads(out, [w, bias], g)
    wr, br = _ref_copies(w, bias)
    ref = TORCH.residual_dropout_layer_norm(t0e, t0e, 0.0, wr, br, 1e-5)
    for name, a, e in zip(("dw", "db"), grads, _grads(ref, [wr, br], g)):
        assert_close(f"frozen LN {name}", e, a, 1e-5)


def test_layer_norm_dropout_matches_mask(poison_empty):
    """With a given seed the kernel drops exactly the elements of the mask it documents."""
    from mldecoder_fast.kernels._common import dropout_mask
    b, k, d, p = 4, 3, 24, 0.3
    r, x, w, bias = _leaf(torch.randn(b, k, d)), _leaf(torch.randn(b, k, d)), _leaf(torch.randn(d)), _leaf(torch.randn(d))
    seed = _seed(1234)
    out, _mean, _rstd = T.triton_layer_norm(r, x, seed, HIGH_OFFSET, p, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = _grads(out, [r, x, w, bias], g)
    keep = dropout_mask(seed, b * k, d, p, HIGH_OFFSET).view(b, k, d)
    assert 0.5 < keep.float().mean() < 0.9
    rr, xr, wr, br = _ref_copies(r, x, w, bias)
    ref = F.layer_norm(rr + xr * keep / (1 - p), (d,), wr, br, 1e-5)
    _check("layer_norm dropout", ref, _grads(ref, [rr, xr, wr, br], g), out, grads, torch.float32)


# ------------------------------------------------------------------------------------------------
# cross-attention
# ------------------------------------------------------------------------------------------------

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
    q = _leaf(torch.randn(k, dm) if shared else torch.randn(b, k, dm), dtype)
    kv = _leaf(torch.randn(b, n, 2 * dm), dtype)
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = _grads(out, [q, kv], g)
    qr, kvr = _ref_copies(q, kv)
    ref = TORCH.attention(qr, kvr, h, 0.0)
    _check(f"attention[shared={shared}, K={k}, d={d}]", ref, _grads(ref, [qr, kvr], g.float()),
           out, grads, dtype)


def test_head_split():
    from mldecoder_fast.kernels.attention import head_split
    assert [head_split(d) for d in (96, 80, 64, 24, 12, 128)] == [
        (64, 32), (64, 16), (64, 16), (16, 16), (16, 16), (128, 16)]


def test_attention_strided_kv(poison_empty):
    """kv as a column slice of a wider buffer and q as a non-contiguous view."""
    b, n, h, d, k = 2, 21, 2, 8, 9
    dm = h * d
    big = _leaf(torch.randn(b, n, 2 * dm + 5))
    kv = big[..., 3:3 + 2 * dm]
    qt = _leaf(torch.randn(dm, k))
    q = qt.t()
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn_like(out)
    grads = _grads(out, [qt, big], g)
    qr, bigr = _ref_copies(qt, big)
    ref = TORCH.attention(qr.t(), bigr[..., 3:3 + 2 * dm], h, 0.0)
    _check("attention strided", ref, _grads(ref, [qr, bigr], g), out, grads, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shared,k,h,d", ATTN_SHAPES)
def test_attention_dropout_matches_mask(dtype, shared, k, h, d, poison_empty):
    from mldecoder_fast.kernels._common import dropout_mask
    b, n, p = 2, 37, 0.2
    dm = h * d
    q = _leaf(torch.randn(k, dm) if shared else torch.randn(b, k, dm), dtype)
    kv = _leaf(torch.randn(b, n, 2 * dm), dtype)
    seed = _seed(99)
    out, _lse = T.triton_attention(q, kv, seed, OFFSET, h, p, dtype)
    g = torch.randn_like(out)
    grads = _grads(out, [q, kv], g)
    keep = dropout_mask(seed, b * h * k, n, p, OFFSET).view(b, h, k, n)
    qr, kvr = _ref_copies(q, kv)
    ref = _attention_ref(qr, kvr, h, keep, p)
    _check(f"attention dropout[shared={shared}, K={k}, d={d}]", ref,
           _grads(ref, [qr, kvr], g.float()), out, grads, dtype)


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
    """Batch-shared queries with W_k folded in (qk [H, K, D] against the memory [B, N, D])."""
    from mldecoder_fast.kernels._common import dropout_mask
    b, n, h, dm, k = 2, 37, 4, 80, 13
    qk = _leaf(torch.randn(h, k, dm) / dm ** 0.5, dtype)
    memory, v = _leaf(torch.randn(b, n, dm), dtype), _leaf(torch.randn(b, n, dm), dtype)
    seed = _seed(17) if p else None
    out, _lse = T.triton_shared_query_attention(qk, memory, v, seed, OFFSET, h, p, dtype)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = _grads(out, [qk, memory, v], g)
    keep = dropout_mask(seed, b * h * k, n, p, OFFSET).view(b, h, k, n) if p else None
    refs = _ref_copies(qk, memory, v)
    ref = _folded_ref(*refs, keep, p)
    _check(f"shared_query_attention[p={p}]", ref, _grads(ref, refs, g.float()), out, grads, dtype)
    if p == 0 and hasattr(TorchOps, "shared_query_attention"):
        via_ops = TRITON.shared_query_attention(qk, memory, v, h, 0.0)
        assert torch.equal(via_ops, out)


# ------------------------------------------------------------------------------------------------
# group FC and LayerNorm-3 + group FC
# ------------------------------------------------------------------------------------------------

# (B, K, D, G, classes): G = 7 with a padded tail of 2; G = 1 (K = classes, as COCO); G = 35 spans
# three 16-wide tiles; B = 19 spans two batch tiles.
GFC_SHAPES = [(19, 5, 40, 7, 33), (3, 9, 24, 1, 9), (2, 3, 20, 35, 101)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", GFC_SHAPES[:2])
def test_group_fc(dtype, shape, poison_empty):
    b, k, d, gs, c = shape
    h = _leaf(torch.randn(b, k, d), dtype)
    w, bias = _leaf(torch.randn(k, d, gs) / d ** 0.5), _leaf(torch.randn(c))
    out = TRITON.group_fc(h, w, bias, c)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = _grads(out, [h, w, bias], g)
    hr, wr, br = _ref_copies(h, w, bias)
    ref = TORCH.group_fc(hr, wr, br, c)
    _check(f"group_fc{shape}", ref, _grads(ref, [hr, wr, br], g.float()), out, grads, dtype,
           out_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", GFC_SHAPES)
def test_decode(dtype, shape, poison_empty):
    b, k, d, gs, c = shape
    r, x = _leaf(torch.randn(b, k, d), dtype), _leaf(torch.randn(b, k, d), dtype)
    lw, lb = _leaf(torch.randn(d)), _leaf(torch.randn(d))
    w, bias = _leaf(torch.randn(k, d, gs) / d ** 0.5), _leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = _grads(out, inputs, g)
    ref_inputs = _ref_copies(*inputs)
    ref = TORCH.decode(ref_inputs[0], ref_inputs[1], 0.0, *ref_inputs[2:4], 1e-5, *ref_inputs[4:], c)
    _check(f"decode{shape}", ref, _grads(ref, ref_inputs, g.float()), out, grads, dtype,
           out_dtype=torch.float32)


def test_decode_dropout_matches_mask(poison_empty):
    from mldecoder_fast.kernels._common import dropout_mask
    b, k, d, gs, c, p = 5, 4, 24, 3, 11, 0.3
    r, x = _leaf(torch.randn(b, k, d)), _leaf(torch.randn(b, k, d))
    lw, lb = _leaf(torch.randn(d)), _leaf(torch.randn(d))
    w, bias = _leaf(torch.randn(k, d, gs) / d ** 0.5), _leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    seed = _seed(5)
    out, _m, _s = T.triton_decode(r, x, seed, HIGH_OFFSET, p, lw, lb, 1e-5, w, bias, c,
                                  torch.float32)
    g = torch.randn_like(out)
    grads = _grads(out, inputs, g)
    keep = dropout_mask(seed, b * k, d, p, HIGH_OFFSET).view(b, k, d)
    rr, xr, lwr, lbr, wr, br = ref_inputs = _ref_copies(*inputs)
    hn = F.layer_norm(rr + xr * keep / (1 - p), (d,), lwr, lbr, 1e-5)
    ref = TORCH.group_fc(hn, wr, br, c)
    _check("decode dropout", ref, _grads(ref, ref_inputs, g), out, grads, torch.float32)


def test_no_grad_direct_path_matches_custom_ops():
    """Eager no-grad calls skip the custom-op dispatch; they must compute exactly the same."""
    b, k, n, h, d, gs, c = 2, 5, 19, 2, 16, 3, 14
    t1, o = torch.randn(k, d, device=DEV), torch.randn(b, k, d, device=DEV)
    kv, qk, mem = (torch.randn(b, n, 2 * d, device=DEV), torch.randn(h, k, d, device=DEV),
                   torch.randn(b, n, d, device=DEV))
    lw, lb = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV), torch.randn(c, device=DEV)
    calls = [
        lambda *a: TRITON.residual_dropout_layer_norm(a[0], a[1], 0.0, a[2], a[3], 1e-5),
        lambda *a: TRITON.attention(a[0], a[4], h, 0.0),
        lambda *a: TRITON.shared_query_attention(a[5], a[6], a[6], h, 0.0),
        lambda *a: TRITON.group_fc(a[1], a[7], a[8], c),
        lambda *a: TRITON.decode(a[1], a[1], 0.0, a[2], a[3], 1e-5, a[7], a[8], c),
    ]
    args = [t1, o, lw, lb, kv, qk, mem, w, bias]
    for i, fn in enumerate(calls):
        if i == 2 and not hasattr(TorchOps, "shared_query_attention"):
            continue
        with torch.no_grad():
            direct = fn(*args)
        via_op = fn(*[a.detach().requires_grad_(True) for a in args])
        assert torch.equal(direct, via_op.detach()), f"call {i}: direct path differs"


def test_autocast_dtypes_match_torch_backend():
    """Under autocast the fused ops return what the PyTorch ops return: attention in the autocast
    dtype, logits promoted to fp32 by the fp32 bias (as the reference's fp32 buffer)."""
    dt = torch.bfloat16 if CUDA else torch.float16   # the interpreter cannot run bf16
    b, k, n, h, d, gs, c = 2, 5, 19, 2, 16, 3, 14
    q, kv = torch.randn(b, k, d, device=DEV), torch.randn(b, n, 2 * d, device=DEV)
    r, x = torch.randn(b, k, d, device=DEV), torch.randn(b, k, d, device=DEV)
    lw, lb = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV) / 4, torch.randn(c, device=DEV)
    with torch.autocast(DEV, dtype=dt):
        for name, fn in [("attention", lambda ops: ops.attention(q, kv, h, 0.0)),
                         ("group_fc", lambda ops: ops.group_fc(r, w, bias, c)),
                         ("decode", lambda ops: ops.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c))]:
            want, got = fn(TORCH), fn(TRITON)
            assert got.dtype == want.dtype, f"{name}: {got.dtype} vs PyTorch's {want.dtype}"
            assert_close(f"{name} under autocast", want.float(), got.float(), 1e-2)


def test_zsl_decode_falls_back():
    b, k, d = 2, 6, 16
    r, x, lw, lb = torch.randn(b, k, d), torch.randn(b, k, d), torch.randn(d), torch.randn(d)
    w, bias = torch.randn(d, 1), torch.randn(1)
    r, x, lw, lb, w, bias = (t.to(DEV) for t in (r, x, lw, lb, w, bias))
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, k)
    assert_close("zsl decode", TORCH.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, k), out, 1e-5)


def test_fallbacks_to_torch():
    """fp64 and empty batches take the PyTorch path and still give the right answer."""
    r, x = torch.randn(2, 3, 8, dtype=torch.float64, device=DEV), torch.randn(2, 3, 8, dtype=torch.float64, device=DEV)
    w, bias = torch.randn(8, dtype=torch.float64, device=DEV), torch.randn(8, dtype=torch.float64, device=DEV)
    assert_close("fp64 LN", TORCH.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5),
                 TRITON.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5), 1e-12)
    kv = torch.randn(0, 5, 16, device=DEV)
    assert TRITON.attention(torch.randn(3, 8, device=DEV), kv, 2, 0.0).shape == (0, 3, 8)


# ------------------------------------------------------------------------------------------------
# dropout: reproducibility and statistics
# ------------------------------------------------------------------------------------------------

def _train_step(seed):
    """LN -> attention -> decode with dropout, through TritonOps, seeded from torch's generator."""
    gen = torch.Generator().manual_seed(0)
    b, k, n, h, d, gs, c = 2, 5, 19, 2, 16, 3, 14
    t0 = torch.randn(k, d, generator=gen).to(DEV)
    kv = torch.randn(b, n, 2 * d, generator=gen).to(DEV).requires_grad_(True)
    lw = (1 + 0.1 * torch.randn(d, generator=gen)).to(DEV).requires_grad_(True)
    lb = (0.1 * torch.randn(d, generator=gen)).to(DEV).requires_grad_(True)
    w = (torch.randn(k, d, gs, generator=gen) / 4).to(DEV).requires_grad_(True)
    bias = torch.randn(c, generator=gen).to(DEV).requires_grad_(True)
    f = torch.randn(b, k, d, generator=gen).to(DEV).requires_grad_(True)
    torch.manual_seed(seed)
    t0e = t0.unsqueeze(0).expand(b, k, d)
    t1 = TRITON.residual_dropout_layer_norm(t0e, t0e, 0.1, lw, lb, 1e-5)
    o = TRITON.attention(t1, kv, h, 0.1)
    out = TRITON.decode(t1, o + f, 0.1, lw, lb, 1e-5, w, bias, c)
    grads = torch.autograd.grad(out.square().sum(), [kv, lw, lb, w, bias, f])
    return out, grads


def test_dropout_reproducible():
    out1, g1 = _train_step(7)
    out2, g2 = _train_step(7)
    out3, g3 = _train_step(8)
    assert torch.equal(out1, out2), "same seed, different output"
    for a, b in zip(g1, g2):
        assert torch.equal(a, b), "same seed, different gradients"
    assert not torch.equal(out1, out3), "different seed, same output"
    assert not torch.equal(g1[0], g3[0]), "different seed, same kv gradient"


def test_dropout_keep_rate():
    from mldecoder_fast.kernels._common import dropout_mask
    keep = dropout_mask(_seed(2024), 256, 320, 0.1).float()
    rate = keep.mean().item()
    assert abs(rate - 0.9) < 0.006, f"keep rate {rate:.4f}, expected 0.9"
    # rows and columns behave alike, and neighbours are uncorrelated
    assert keep.mean(1).std() < 0.05 and keep.mean(0).std() < 0.05
    c = keep - keep.mean()
    corr = (c[:, 1:] * c[:, :-1]).mean() / c.var()
    assert abs(corr) < 0.02, f"neighbour correlation {corr:.3f}"
    other = dropout_mask(_seed(2025), 256, 320, 0.1).float()
    assert (keep != other).float().mean() > 0.1


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


# ------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_layer_norm():
    b, k, d = 2, 3, 20
    args = (_leaf(torch.randn(k, d)), _leaf(torch.randn(b, k, d)), _seed(3), OFFSET, 0.1,
            _leaf(torch.randn(d)), _leaf(torch.randn(d)), 1e-5)
    _opcheck(T.triton_layer_norm, args)
    y, mean, rstd = T.triton_layer_norm(*[a.detach() if torch.is_tensor(a) else a for a in args])
    for input_grads in (True, False):
        _opcheck(T.triton_layer_norm_backward,
                 (torch.randn_like(y), args[0].detach(), args[1].detach(), args[2], OFFSET, 0.1,
                  args[5].detach(), mean, rstd, input_grads))


@pytest.mark.parametrize("shared", [True, False])
def test_opcheck_attention(shared):
    b, n, h, d, k = 2, 19, 2, 8, 5
    q = _leaf(torch.randn(k, h * d) if shared else torch.randn(b, k, h * d))
    kv = _leaf(torch.randn(b, n, 2 * h * d))
    p = 0.0 if shared else 0.1
    seed = None if shared else _seed(11)
    _opcheck(T.triton_attention, (q, kv, seed, OFFSET, h, p, torch.float32))
    o, lse = T.triton_attention(q.detach(), kv.detach(), seed, OFFSET, h, p, torch.float32)
    _opcheck(T.triton_attention_backward,
             (torch.randn_like(o), q.detach(), kv.detach(), o, lse, seed, OFFSET, h, p))


def test_opcheck_group_fc_and_decode():
    b, k, d, gs, c = 3, 4, 20, 3, 10
    h, w, bias = _leaf(torch.randn(b, k, d)), _leaf(torch.randn(k, d, gs)), _leaf(torch.randn(c))
    _opcheck(T.triton_group_fc, (h, w, bias, c, torch.float32))
    _opcheck(T.triton_group_fc_backward, (torch.randn(b, c, device=DEV), h.detach(), w.detach(),
                                          torch.float32))
    r, x, lw, lb = _leaf(torch.randn(b, k, d)), _leaf(torch.randn(b, k, d)), _leaf(torch.randn(d)), _leaf(torch.randn(d))
    seed = _seed(4)
    _opcheck(T.triton_decode, (r, x, seed, OFFSET, 0.1, lw, lb, 1e-5, w, bias, c, torch.float32))
    _out, mean, rstd = T.triton_decode(r.detach(), x.detach(), seed, OFFSET, 0.1, lw.detach(), lb.detach(),
                                       1e-5, w.detach(), bias.detach(), c, torch.float32)
    _opcheck(T.triton_decode_backward, (torch.randn(b, c, device=DEV), r.detach(), x.detach(), seed,
                                        OFFSET, 0.1, lw.detach(), lb.detach(), mean, rstd, w.detach(),
                                        torch.float32))


@pytest.fixture
def no_compile_caches(monkeypatch):
    """Compile from scratch: on-disk graph caches can hold code calling an op's older schema."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    monkeypatch.setattr(functorch_config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_fullgraph_with_backward(no_compile_caches):
    """LN -> attention -> decode compiled with fullgraph=True: same values and gradients as eager
    without dropout; with dropout it compiles (the seed comes from the compiled RNG) and trains."""
    b, k, n, h, d, gs, c = 2, 5, 19, 2, 16, 3, 14

    def step(t0, kv, lw, lb, w, bias, p):
        t1 = TRITON.residual_dropout_layer_norm(t0, t0, p, lw, lb, 1e-5)
        o = TRITON.attention(t1, kv, h, p)
        return TRITON.decode(t1, o, p, lw, lb, 1e-5, w, bias, c)

    leaves = [_leaf(torch.randn(b, k, d)), _leaf(torch.randn(b, n, 2 * d)), _leaf(1 + 0.1 * torch.randn(d)),
              _leaf(0.1 * torch.randn(d)), _leaf(torch.randn(k, d, gs) / 4), _leaf(torch.randn(c))]
    compiled = torch.compile(step, fullgraph=True)
    out_c = compiled(*leaves, 0.0)
    out_e = step(*leaves, 0.0)
    assert_close("compiled output", out_e, out_c, 1e-5)
    for ge, gc in zip(torch.autograd.grad(out_e.sum(), leaves), torch.autograd.grad(out_c.sum(), leaves)):
        assert_close("compiled grad", ge, gc, 1e-5)
    out_d = compiled(*leaves, 0.1)
    grads = torch.autograd.grad(out_d.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert not torch.equal(out_d, out_c)


# ------------------------------------------------------------------------------------------------
# GPU only: bf16 and full-size shapes
# ------------------------------------------------------------------------------------------------

def _bf16_close(name, ref32, out, torch_bf16):
    """FlashAttention's rule: the kernel's bf16 error vs fp32 is at most ~2x PyTorch's own bf16 error."""
    from helpers import rel_rms
    err, base = rel_rms(ref32, out.float()), rel_rms(ref32, torch_bf16.float())
    assert err <= 2 * base + 2e-3, f"{name}: bf16 error {err:.2e} vs PyTorch bf16 {base:.2e}"


@needs_cuda
@pytest.mark.parametrize("dtype,b,k,n,shared", [
    (torch.bfloat16, 32, 100, 196, False), (torch.bfloat16, 8, 80, 400, True),
    (torch.bfloat16, 4, 200, 49, False),   # K = 200: several query blocks in both passes
    (torch.float16, 32, 100, 196, False), (torch.float32, 8, 80, 196, False)])
def test_attention_full_size_cuda(dtype, b, k, n, shared):
    h, dm = 8, 768
    q32 = torch.randn(k, dm) if shared else torch.randn(b, k, dm)
    kv32 = torch.randn(b, n, 2 * dm)
    q, kv = _leaf(q32, dtype), _leaf(kv32, dtype)
    out = TRITON.attention(q, kv, h, 0.0)
    g = torch.randn_like(out)
    grads = _grads(out, [q, kv], g)
    qr, kvr = _ref_copies(q, kv)
    ref = TORCH.attention(qr, kvr, h, 0.0)
    ref_grads = _grads(ref, [qr, kvr], g.float())
    if dtype == torch.float32:
        assert_close("attention fp32", ref, out, 1e-3)  # TF32 may be on
        for rg, gg in zip(ref_grads, grads):
            assert_close("attention fp32 grad", rg, gg, 1e-3)
        return
    qt, kvt = _leaf(q.detach()), _leaf(kv.detach())
    tout = TORCH.attention(qt, kvt, h, 0.0)
    tgrads = _grads(tout, [qt, kvt], g)
    _bf16_close(f"attention {dtype}", ref, out, tout)
    for rg, gg, tg in zip(ref_grads, grads, tgrads):
        _bf16_close(f"attention {dtype} grad", rg, gg, tg)


@needs_cuda
@pytest.mark.parametrize("dtype,b,k,gs,c", [
    (torch.bfloat16, 64, 100, 219, 21843), (torch.bfloat16, 32, 80, 1, 80),
    (torch.bfloat16, 16, 200, 49, 9605), (torch.float16, 64, 100, 219, 21843)])
def test_decode_full_size_cuda(dtype, b, k, gs, c):
    d = 768
    r, x = _leaf(torch.randn(b, k, d), dtype), _leaf(torch.randn(b, k, d), dtype)
    lw, lb = _leaf(1 + 0.1 * torch.randn(d)), _leaf(0.1 * torch.randn(d))
    w, bias = _leaf(torch.randn(k, d, gs) / d ** 0.5), _leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c)
    g = torch.randn_like(out)
    grads = _grads(out, inputs, g)
    ref_inputs = _ref_copies(*inputs)
    ref = TORCH.decode(ref_inputs[0], ref_inputs[1], 0.0, *ref_inputs[2:4], 1e-5, *ref_inputs[4:], c)
    ref_grads = _grads(ref, ref_inputs, g.float())
    t_inputs = [_leaf(t.detach()) for t in inputs]
    with torch.autocast("cuda", dtype=dtype):  # PyTorch's own mixed-precision version
        tout = TORCH.decode(t_inputs[0], t_inputs[1], 0.0, *t_inputs[2:4], 1e-5, *t_inputs[4:], c)
    tgrads = _grads(tout, t_inputs, g.to(tout.dtype))
    _bf16_close(f"decode {dtype}", ref, out, tout)
    for i, (rg, gg, tg) in enumerate(zip(ref_grads, grads, tgrads)):
        _bf16_close(f"decode {dtype} grad {i}", rg, gg, tg)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_full_size_cuda(dtype):
    b, k, d = 256, 100, 768
    r, x = _leaf(torch.randn(b, k, d), dtype), _leaf(torch.randn(b, k, d), dtype)
    w, bias = _leaf(1 + 0.1 * torch.randn(d)), _leaf(0.1 * torch.randn(d))
    out = TRITON.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = _grads(out, [r, x, w, bias], g)
    ref_inputs = _ref_copies(r, x, w, bias)
    ref = TORCH.residual_dropout_layer_norm(*ref_inputs[:2], 0.0, *ref_inputs[2:], 1e-5)
    ref_grads = _grads(ref, ref_inputs, g.float())
    assert_close("LN full", ref, out.float(), 1e-2)
    for rg, gg in zip(ref_grads, grads):
        assert_close("LN full grad", rg, gg.float(), 2e-2)


@needs_cuda
def test_dropout_training_bf16_cuda():
    """bf16 training with dropout on every op: finite, reproducible, and keeps ~90%."""
    b, k, n, h, d = 16, 100, 49, 8, 768
    q = _leaf(torch.randn(b, k, d), torch.bfloat16)
    kv = _leaf(torch.randn(b, n, 2 * d), torch.bfloat16)
    torch.manual_seed(1)
    o1 = TRITON.attention(q, kv, h, 0.1)
    torch.manual_seed(1)
    o2 = TRITON.attention(q, kv, h, 0.1)
    assert torch.equal(o1, o2) and torch.isfinite(o1).all()
    gq, gkv = _grads(o1, [q, kv], torch.randn_like(o1))
    assert torch.isfinite(gq).all() and torch.isfinite(gkv).all()


@needs_cuda
def test_dropout_seeds_cuda_eager_and_graph_replay():
    """Eager: each dropout op reserves 4 Philox offsets of the CUDA generator (no seed launch) and
    consecutive calls draw new masks. Captured in a CUDA graph: every replay draws new masks, and
    the backward of a captured step regenerates that replay's masks (its gradient matches)."""
    b, k, d = 4, 20, 64
    t1, w, bias = torch.randn(k, d, device=DEV), torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    x = torch.randn(b, k, d, device=DEV)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.manual_seed(3)
    y1 = TRITON.residual_dropout_layer_norm(t1, x, 0.3, w, bias, 1e-5)
    assert gen.get_offset() == 4
    y2 = TRITON.residual_dropout_layer_norm(t1, x, 0.3, w, bias, 1e-5)
    assert not torch.equal(y1, y2)
    torch.manual_seed(3)
    assert torch.equal(y1, TRITON.residual_dropout_layer_norm(t1, x, 0.3, w, bias, 1e-5))

    xs = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: plans and compilation
            TRITON.residual_dropout_layer_norm(t1, xs, 0.3, w, bias, 1e-5).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    xs.grad = None
    with torch.cuda.graph(graph):
        y = TRITON.residual_dropout_layer_norm(t1, xs, 0.3, w, bias, 1e-5)
        (gx,) = torch.autograd.grad(y, xs, torch.ones_like(y))
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append((y.clone(), gx.clone()))
    assert not torch.equal(outs[0][0], outs[1][0]), "two replays drew the same mask"
    for out, grad in outs:
        # the backward's mask: the elements of x with a gradient; the forward must have used it
        keep = grad != 0
        assert 0.6 < keep.float().mean().item() < 0.8
        ref = F.layer_norm(t1 + x * keep / 0.7, (d,), w, bias, 1e-5)
        assert_close("replayed forward with the backward's mask", ref, out, 1e-5)

def test_autotune_pruning():
    """The GPU autotuners drop tiles larger than the problem (pure Python: runs everywhere)."""
    import triton
    from mldecoder_fast.kernels._common import prune_by_size
    cfgs = [triton.Config({"BLOCK_B": bb, "BLOCK_G": bg}) for bb, bg in [(128, 128), (64, 16), (16, 64), (16, 16)]]
    prune = prune_by_size({"BLOCK_B": "B", "BLOCK_G": "G"})
    kept = prune(cfgs, {"B": 1, "G": 1})
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in kept] == [(16, 16)]
    assert len(prune(cfgs, {"B": 256, "G": 219})) == 4
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in prune(cfgs, {"B": 40, "G": 219})] == [(64, 16), (16, 64), (16, 16)]
    assert len(prune(cfgs[:1], {"B": 1, "G": 1})) == 1  # never empty
    from mldecoder_fast.kernels._common import _safe_only
    safe = _safe_only(prune)(cfgs, {"B": 256, "G": 219})
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in safe] == [(16, 16)]
