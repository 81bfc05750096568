"""MLDecoderFast (torch backend) against the reference MLDecoder on identical weights."""
from __future__ import annotations

import pytest
import torch
from heads import STANDARD_CONFIGS, check_train_grads, disable_dropout_, make_input, make_pair
from helpers import CPU_BACKENDS, assert_close

from mldecoder_fast import MLDecoder

# Every CPU backend runs the whole comparison; "cpp" needs the compiled extension, which CI builds
# (MLDECODER_FAST_NO_EXT=1 opts out, for a pure-Python install).


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def _ran(fast, backend):
    assert fast.active_backend == backend, (
        f"backend {backend!r} requested but {fast.active_backend!r} ran: see mldecoder_fast.backends()")


@pytest.mark.parametrize("name", list(STANDARD_CONFIGS))
def test_spec_configs_eval_and_train(name, backend):
    c, n, classes, k, kind = STANDARD_CONFIGS[name]
    # Full-size configurations at batch 2 with a few tokens: exercises the real K, G, D and C.
    zsl = kind == "zsl"
    ref, fast = make_pair(classes, k, 768, c, zsl=int(zsl), backend=backend)
    if zsl:
        v = torch.randn(classes, 300)
        ref.set_word_vectors(v), fast.set_word_vectors(v)
    x = make_input("tokens" if kind == "tokens" else "map", 2, c, tokens=min(n, 12))
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close(f"{name} eval", ref(x), fast(x), 1e-5)
    _ran(fast, backend)
    # Gradients in fp64: at full width an fp32 gradient moves by ~1e-3 (relative) whenever one of
    # the ~10^6 feed-forward pre-activations within rounding of zero lands on the other side of
    # the ReLU, and a GEMM library that rounds differently from the reference's (oneDNN vs MKL)
    # flips one or two of them (seen on openimages: 2 of 819,200). fp64 compares exactly.
    ref.double(), fast.double()
    if zsl:
        ref.set_word_vectors(v.double()), fast.set_word_vectors(v.double())
    check_train_grads(ref, fast, x.double(), 1e-10)


@pytest.mark.parametrize("classes,groups,kind,batch", [
    (7, -1, "map", 3),       # K = 7 = classes, G = 1
    (101, 10, "map", 2),     # G = 11, padded tail of 9
    (5, 8, "map", 2),        # groups > classes: K = 5
    (20, 3, "tokens", 1),    # [B, N, C] input, B = 1
    (33, 4, "map", 4),
])
def test_odd_shapes_fp64(classes, groups, kind, batch, backend):
    ref, fast = make_pair(classes, groups, dtype=torch.float64, backend=backend)
    x = make_input(kind, batch, 24, tokens=10, dtype=torch.float64)
    ref.eval(), fast.eval()
    assert_close("eval fp64", ref(x), fast(x), 1e-12)
    _ran(fast, backend)
    check_train_grads(ref, fast, x, 1e-10)


def test_padded_tail_and_shapes():
    ref, fast = make_pair(101, 10)
    assert fast.config.group_size == 11 and fast.decoder.duplicate_pooling.shape == (10, 32, 11)
    assert fast(torch.randn(2, 24, 3, 3)).shape == (2, 101)


def test_zsl_two_word_vector_sets(backend):
    ref, fast = make_pair(1, zsl=1, dtype=torch.float64, backend=backend)
    for n in (5, 11):
        v = torch.randn(n, 300, dtype=torch.float64)
        ref.set_word_vectors(v), fast.set_word_vectors(v)
        x = torch.randn(3, 24, 2, 2, dtype=torch.float64)
        ref.eval(), fast.eval()
        out = fast(x)
        assert out.shape == (3, n)
        assert_close(f"zsl n={n}", ref(x), out, 1e-12)
        check_train_grads(ref, fast, x, 1e-10)


def test_zsl_official_assignment_style():
    """Official training scripts assign head.decoder.query_embed = word_vectors directly."""
    ref, fast = make_pair(1, zsl=1)
    v = torch.randn(9, 300)
    ref.decoder.query_embed = v
    fast.decoder.query_embed = v
    x = torch.randn(2, 24, 3, 3)
    ref.eval(), fast.eval()
    assert_close("zsl assign", ref(x), fast(x), 1e-5)
    assert fast.num_classes == 9


def test_non_contiguous_and_channels_last_inputs(backend):
    ref, fast = make_pair(50, 10, backend=backend)
    ref.eval(), fast.eval()
    base = torch.randn(2, 24, 4, 6)
    for x in (base.to(memory_format=torch.channels_last), base.transpose(2, 3),
              base[:, :, ::2, :], torch.randn(6, 24, 4, 5)[::3]):
        assert_close("strided input", ref(x), fast(x), 1e-5)
    tokens = torch.randn(2, 24, 9).transpose(1, 2)  # [B, N, C] with a transposed layout
    assert_close("strided tokens", ref(tokens), fast(tokens), 1e-5)


def test_batch_zero(backend):
    ref, fast = make_pair(30, 4, backend=backend)
    for mode in ("eval", "train"):
        getattr(fast, mode)()
        out = fast(torch.randn(0, 24, 3, 3))
        assert out.shape == (0, 30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_matches_within_dtype_error(dtype, backend):
    """Under autocast the fast head may differ from an fp64 reference by at most ~2x what the
    reference itself does under the same autocast."""
    ref, fast = make_pair(101, 10, 64, 48, backend=backend)
    ref64, _ = make_pair(101, 10, 64, 48)
    ref64.load_state_dict(ref.state_dict())
    ref64.double()
    x = torch.randn(4, 48, 3, 4)
    for m in (ref, fast, ref64):
        m.eval()
    exact = ref64(x.double())
    with torch.autocast("cpu", dtype=dtype):
        out_ref = ref(x)
        out_fast = fast(x)
    assert out_fast.dtype == out_ref.dtype
    from helpers import rel_rms
    base = rel_rms(exact, out_ref)
    assert base > 0
    assert_close(f"autocast {dtype}", exact, out_fast, 2 * base + 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(dtype, backend):
    """The whole head converted to a low-precision dtype (no autocast) runs and stays close."""
    ref, fast = make_pair(40, 8, 64, 48, backend=backend)
    ref64 = MLDecoder(40, 8, 64, 48).double()
    ref64.load_state_dict(ref.state_dict())
    ref.to(dtype).eval(), fast.to(dtype).eval(), ref64.eval()
    x = torch.randn(3, 48, 3, 3)
    exact = ref64(x.double())
    out_ref, out_fast = ref(x.to(dtype)), fast(x.to(dtype))
    assert out_fast.dtype == dtype
    from helpers import rel_rms
    base = rel_rms(exact, out_ref)
    assert_close(f"{dtype} params", exact, out_fast, 2 * base + 1e-6)


def test_nan_and_inf_propagate_like_reference(backend):
    ref, fast = make_pair(20, 5, backend=backend)
    ref.eval(), fast.eval()
    x = torch.randn(3, 24, 3, 3)
    x[1, 0, 0, 0] = float("nan")
    x[2, 3, 1, 1] = float("inf")
    r, f = ref(x), fast(x)
    assert torch.equal(torch.isnan(r), torch.isnan(f))
    assert torch.isfinite(f[0]).all() and torch.isnan(f[1]).all()
    assert_close("finite row", r[0:1], f[0:1], 1e-5)


def test_compile_fullgraph_train_step():
    ref, fast = make_pair(30, 4)
    disable_dropout_(ref), disable_dropout_(fast)
    ref.train(), fast.train()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 3, 3)
    out = compiled(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    assert_close("compiled", ref(x), out, 1e-5)
    assert_close("compiled grad", ref.decoder.duplicate_pooling.grad, fast.decoder.duplicate_pooling.grad, 1e-5)


@pytest.mark.parametrize("zsl", [0, 1])
def test_autocast_training_gradients_within_dtype_error(zsl, backend):
    """bf16 autocast, training with dropout off: every parameter gradient of the fast head is
    within ~2x of the reference's own bf16 error, both measured against an fp64 reference."""
    wv = torch.randn(20, 300) if zsl else None
    groups = -1 if zsl else 8
    ref, fast = make_pair(40, groups, 64, 48, zsl=zsl, word_vectors=wv, backend=backend)
    exact = MLDecoder(40, groups, 64, 48, zsl=zsl)
    exact.load_state_dict(ref.state_dict())
    exact.double()
    if zsl:
        exact.set_word_vectors(wv.double())
    for m in (ref, fast, exact):
        m.train()
        disable_dropout_(m)
    x = torch.randn(4, 48, 3, 3)
    exact(x.double()).square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref(x).float().square().sum().backward()
        fast(x).float().square().sum().backward()
    from helpers import rel_rms
    p_exact, p_ref = dict(exact.named_parameters()), dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is None:
            assert p_ref[name].grad is None, name
            continue
        base = rel_rms(p_exact[name].grad, p_ref[name].grad)
        # Floor of one bf16 rounding (2^-8): a one-element gradient (the ZSL bias) is a single
        # sum whose error is a draw, not an average, so the reference's own error can be ~0.
        assert_close(f"bf16 grad of {name}", p_exact[name].grad, p.grad, 2 * base + 2 ** -8)
