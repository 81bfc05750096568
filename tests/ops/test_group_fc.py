"""group_fc: the group fully-connected decoding, in each implementation (the ``impl`` parameter):

- ``torch``: ``group_fc_torch`` (mldecoder_fast/ops/torch_ops.py, one batched product);
- ``cpp`` / ``cuda``: the compiled extension (csrc/group_fc*.cpp/.cu,
  mldecoder_fast/ops/group_fc_extension.py: ``mldecoder_fast::group_fc``, its fake kernel and
  autograd registration), on the CPU / on a GPU;
- ``triton``: ``TritonOps.group_fc`` (mldecoder_fast/kernels/group_fc_decode.py,
  ``mldecoder_fast::triton_group_fc[_backward]``): on a GPU, else in Triton's CPU interpreter
  (fp32 and fp16 only); carries the ``triton`` mark.

Compared with an fp64 einsum reference written here (independent of every implementation);
low-precision results may differ from it by at most ~2x what the same-dtype PyTorch expression
differs by. The Triton kernel is also compared with the torch path as in tests/ops/test_decode.py.
CUDA cases carry "cuda" in their ids and are skipped (with the reason) when torch sees no GPU.

The extension is part of the build: when it is missing its tests fail, unless
MLDECODER_FAST_NO_EXT=1 says the install is pure Python on purpose (then they are skipped).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import NO_EXT, assert_close, rel_rms
from triton_helpers import (
    DEV,
    TORCH,
    TRITON,
    TRITON_MARKS,
    assert_autocast_dtype_matches_torch,
    assert_no_grad_direct_path,
    check,
    grads_of,
    leaf,
    opcheck,
    ref_copies,
)

from mldecoder_fast.ops import group_fc_extension as ext
from mldecoder_fast.ops import triton_registrations as R
from mldecoder_fast.ops.extension_ops import ExtensionOps
from mldecoder_fast.ops.torch_ops import TorchOps, group_fc_torch

EXT_MARKS = [pytest.mark.skipif(NO_EXT, reason="MLDECODER_FAST_NO_EXT=1: installed without the extension")]
needs_ext = EXT_MARKS[0]

ext.extension_status()  # load the extension (if built) so that torch.ops.mldecoder_fast has its ops
HAS_CUDA = torch.cuda.is_available()
OPS = torch.ops.mldecoder_fast

# impl -> (device, function (h, weight, bias, num_classes) -> logits)
IMPLS = {"torch": ("cpu", group_fc_torch), "cpp": ("cpu", ext.group_fc), "cuda": ("cuda", ext.group_fc),
         "triton": (DEV, TRITON.group_fc)}
_CPP = pytest.param("cpp", marks=EXT_MARKS)
_CUDA = pytest.param("cuda", marks=[*EXT_MARKS, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])
_TRITON = pytest.param("triton", marks=TRITON_MARKS)
EXT = [_CPP, _CUDA]                       # the extension's op, on each device
ALL = ["torch", _CPP, _CUDA, _TRITON]     # every implementation

# (B, K, D, num_classes); G = ceil(C / K) as in the head.
SHAPES = {
    "G1-K1": (4, 1, 8, 1),
    "G1-coco": (3, 80, 16, 80),
    "padded-tail": (5, 7, 24, 47),          # G = 7, last group has 5 of 7 columns
    "unused-groups": (3, 6, 8, 10),         # G = 2: groups 5 is all padding
    "D60": (4, 10, 60, 95),                 # D not a multiple of 8/16, tail of 5
    "B1": (1, 5, 16, 23),
    "B0": (0, 5, 16, 23),
    "openimages-9605": (2, 200, 16, 9605),  # G = 49: partial group of 1, three unused groups
    "imagenet21k-21843": (2, 100, 32, 21843),  # G = 219, tail of 162
}


def _group_size(k, c):
    return -(-c // k)


def _reference(h, weight, bias, num_classes):
    """fp64 einsum: [B, K, D] x [K, D, G] -> [B, K*G], slice, bias (ZSL: shared [D, 1])."""
    h, weight, bias = h.double(), weight.double(), bias.double()
    if weight.dim() == 2:
        return torch.einsum("bkd,d->bk", h, weight[:, 0]) + bias
    out = torch.einsum("bkd,kdg->bkg", h, weight).flatten(1)
    return out[:, :num_classes] + bias


def _make(shape, dtype=torch.float32, device="cpu", layout="transposed", zsl=False):
    """Inputs with requires_grad; h non-contiguous by default (a transpose, as in the head)."""
    b, k, d, c = shape
    if layout == "transposed":
        h = torch.randn(k, b, d, device=device).transpose(0, 1)
    elif layout == "strided-inner":
        h = torch.randn(b, k, 2 * d, device=device)[..., ::2]
    elif layout == "expanded":
        h = torch.randn(b, 1, d, device=device).expand(b, k, d)
    else:
        h = torch.randn(b, k, d, device=device)
    h = h.to(dtype).detach().requires_grad_()
    if zsl:
        weight = torch.randn(d, 1, device=device) * d ** -0.5
        bias = torch.randn(1, device=device)
    else:
        weight = torch.randn(k, d, _group_size(k, c), device=device) * d ** -0.5
        bias = torch.randn(c, device=device)
    weight = weight.to(dtype).requires_grad_()
    bias = bias.to(dtype).requires_grad_()
    return h, weight, bias


def _fwd_bwd(fn, h, weight, bias, num_classes, grad=None):
    for t in (h, weight, bias):
        t.grad = None
    out = fn(h, weight, bias, num_classes)
    if grad is None:
        grad = torch.randn(out.shape, device=out.device, dtype=torch.float64)
    out.backward(grad.to(device=out.device, dtype=out.dtype))
    return out, h.grad, weight.grad, bias.grad, grad


@contextlib.contextmanager
def _no_torch_fallback(impl, h, weight):
    """The Triton implementation must run its kernel, not fall back to the PyTorch path (which it
    does, by design, for an empty batch and the ZSL form)."""
    if impl != "triton" or h.shape[0] == 0 or weight.dim() != 3:
        yield
        return
    calls, real = [], TorchOps.group_fc

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TorchOps, "group_fc", spy)
        yield
    assert not calls, "TritonOps.group_fc fell back to the PyTorch path"


def _check_against_reference(shape, dtype, impl, layout="transposed", zsl=False, autocast=None):
    """Forward and the three gradients vs the fp64 reference, and the same dtypes as the
    PyTorch expression (run under the same autocast, if any)."""
    device, fn = IMPLS[impl]
    h, weight, bias = _make(shape, dtype, device, layout, zsl)
    c = shape[3]
    amp = (lambda: torch.autocast(device, dtype=autocast)) if autocast else contextlib.nullcontext
    with amp(), _no_torch_fallback(impl, h, weight):
        out, gh, gw, gb, grad = _fwd_bwd(fn, h, weight, bias, c)
    product = autocast or dtype
    # fp64 reference on the values the product sees (rounded to its dtype)
    h64, w64 = (t.detach().to(product).double().requires_grad_() for t in (h, weight))
    b64 = bias.detach().double().requires_grad_()
    ref, rgh, rgw, rgb, _ = _fwd_bwd(_reference, h64, w64, b64, c, grad)
    ht, wt, bt = (t.detach().clone().requires_grad_() for t in (h, weight, bias))
    with amp():
        base = _fwd_bwd(group_fc_torch, ht, wt, bt, c, grad)
    names = ("out", "grad_h", "grad_weight", "grad_bias")
    for name, o, t in zip(names, (out, gh, gw, gb), base[:4], strict=True):
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype}, PyTorch expression gives {t.dtype}"
    if product in (torch.float32, torch.float64):
        tol = 1e-5 if product == torch.float32 else 1e-12
        for name, r, o in zip(names, (ref, rgh, rgw, rgb), (out, gh, gw, gb), strict=True):
            assert_close(f"{name} {dtype}", r, o, tol)
        return
    # half types: at most 2x the error of the same-dtype PyTorch expression (+ a floor)
    floor = 2e-3 if product == torch.float16 else 1e-2
    for name, r, o, t in zip(names, (ref, rgh, rgw, rgb), (out, gh, gw, gb), base[:4], strict=True):
        assert_close(f"{name} {product}", r, o, max(2 * rel_rms(r, t), floor))


@needs_ext
def test_extension_is_built():
    ok, detail = ext.extension_status()
    assert ok, (f"the compiled extension is not available ({detail}); build it with "
                "`pip install --no-build-isolation -e .`, or set MLDECODER_FAST_NO_EXT=1")
    if HAS_CUDA:
        assert ext.cuda_kernels_available(), f"a GPU is present but {detail}"


# the Triton interpreter takes 7-20 s per case at these class counts: they run on a GPU
_SLOW_INTERPRETED = ("openimages-9605", "imagenet21k-21843")


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_fp32_matches_einsum(shape, impl):
    if impl == "triton" and not HAS_CUDA and shape in _SLOW_INTERPRETED:
        pytest.skip("too slow in the Triton CPU interpreter (runs on a GPU)")
    _check_against_reference(SHAPES[shape], torch.float32, impl)


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("layout", ["contiguous", "strided-inner", "expanded"])
def test_input_layouts(layout, impl):
    _check_against_reference(SHAPES["padded-tail"], torch.float32, impl, layout)


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("zsl", [False, True], ids=["grouped", "zsl"])
def test_grad_h_is_laid_out_like_h(zsl, impl):
    """A transposed h (as from a [K, B, D] producer) gets a transposed gradient: no copy in
    AccumulateGrad or upstream."""
    h, weight, bias = _make(SHAPES["padded-tail"], torch.float32, IMPLS[impl][0], "transposed", zsl)
    ext.group_fc(h, weight, bias, 47).sum().backward()
    assert h.grad.stride() == h.stride()


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", ["padded-tail", "D60", "unused-groups"])
def test_half_types(shape, dtype, impl):
    _check_against_reference(SHAPES[shape], dtype, impl)


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("zsl", [False, True], ids=["grouped", "zsl"])
def test_autocast(zsl, amp, impl):
    """Under autocast the head passes fp32 h, weight and bias: the product runs in the autocast
    dtype and the logits come out in fp32 (the fp32 bias promotes them), as with
    group_fc_torch; the gradients in each input's dtype."""
    shape = (3, 7, 24, 7) if zsl else SHAPES["padded-tail"]
    _check_against_reference(shape, torch.float32, impl, zsl=zsl, autocast=amp)


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zsl_form(dtype, impl):
    _check_against_reference((3, 7, 24, 7), dtype, impl, zsl=True)
    _check_against_reference((0, 7, 24, 7), dtype, impl, zsl=True)
    _check_against_reference((2, 7, 24, 7), dtype, impl, layout="strided-inner", zsl=True)


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("shape", ["padded-tail", "unused-groups", (2, 9, 8, 9), "B1"],
                         ids=["padded-tail", "unused-groups", "G1", "B1"])
def test_gradcheck_fp64(shape, impl):
    shape = SHAPES.get(shape, shape) if isinstance(shape, str) else shape
    h, weight, bias = _make(shape, torch.float64, IMPLS[impl][0])
    c = shape[3]
    assert torch.autograd.gradcheck(lambda *a: ext.group_fc(*a, c), (h, weight, bias))


@pytest.mark.parametrize("impl", EXT)
def test_gradcheck_fp64_zsl(impl):
    h, weight, bias = _make((2, 5, 6, 5), torch.float64, IMPLS[impl][0], zsl=True)
    assert torch.autograd.gradcheck(lambda *a: ext.group_fc(*a, 5), (h, weight, bias))


@pytest.mark.parametrize("impl", EXT)
@pytest.mark.parametrize("shape", ["padded-tail", "unused-groups", "openimages-9605", "B1"])
def test_every_output_element_is_written(shape, impl, monkeypatch):
    """The kernels allocate with torch.empty; poisoned with NaN, an element a kernel forgets
    (padding columns of grad_weight, unused groups, the partial group) shows up as NaN."""
    monkeypatch.setenv("MLDECODER_FAST_POISON_OUTPUTS", "1")
    h, weight, bias = _make(SHAPES[shape], torch.float32, IMPLS[impl][0])
    out, gh, gw, gb, _ = _fwd_bwd(ext.group_fc, h, weight, bias, SHAPES[shape][3])
    for name, t in (("out", out), ("grad_h", gh), ("grad_weight", gw), ("grad_bias", gb)):
        assert not torch.isnan(t).any(), f"{name}: unwritten (NaN) elements"
    k, g, c = weight.shape[0], weight.shape[2], SHAPES[shape][3]
    padding = gw.permute(0, 2, 1).reshape(k * g, -1)[c:]
    assert torch.equal(padding, torch.zeros_like(padding)), "padded weight columns got a gradient"
    _check_against_reference(SHAPES[shape], torch.float32, impl)  # still right when poisoned


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", ["padded-tail", "unused-groups", "B1", "imagenet21k-21843"])
def test_cpu_per_group_path(shape, dtype, monkeypatch):
    """The per-group BLAS path (torch builds without MKL's batched GEMM), poisoned outputs."""
    monkeypatch.setenv("MLDECODER_FAST_PER_GROUP_BLAS", "1")
    monkeypatch.setenv("MLDECODER_FAST_POISON_OUTPUTS", "1")
    _check_against_reference(SHAPES[shape], dtype, "cpp")
    _check_against_reference(SHAPES[shape], dtype, "cpp", layout="strided-inner")


@pytest.mark.parametrize("impl", EXT)
def test_deterministic_backward(impl):
    h, weight, bias = _make(SHAPES["imagenet21k-21843"], torch.float32, IMPLS[impl][0])
    first = _fwd_bwd(ext.group_fc, h, weight, bias, 21843)
    second = _fwd_bwd(ext.group_fc, h, weight, bias, 21843, first[-1])
    for name, a, b in zip(("out", "grad_h", "grad_weight", "grad_bias"), first[:4], second[:4], strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def _opcheck_samples(device):
    samples = []
    for name in ("padded-tail", "unused-groups", "G1-K1", "B0", "D60"):
        for dtype in (torch.float32, torch.float64):
            samples.append((SHAPES[name], dtype, False))
    samples.append(((3, 4, 8, 4), torch.float32, True))
    out = []
    for shape, dtype, zsl in samples:
        h, weight, bias = _make(shape, dtype, device, zsl=zsl)
        out.append((h, weight, bias, shape[3]))
    return out


@pytest.mark.parametrize("impl", [*EXT, _TRITON])
def test_opcheck(impl):
    """The registered ops' schema, fake (meta) kernel, autograd registration (and, for Triton,
    dynamic-shape AOT dispatch) per torch.library.opcheck."""
    if impl == "triton":
        b, k, d, gs, c = 3, 4, 20, 3, 10
        h, w, bias = leaf(torch.randn(b, k, d)), leaf(torch.randn(k, d, gs)), leaf(torch.randn(c))
        opcheck(R.triton_group_fc, (h, w, bias, c, torch.float32))
        opcheck(R.triton_group_fc_backward, (torch.randn(b, c, device=DEV), h.detach(), w.detach(),
                                             torch.float32))
        return
    for h, weight, bias, c in _opcheck_samples(IMPLS[impl][0]):
        torch.library.opcheck(OPS.group_fc.default, (h, weight, bias, c))
        with torch.no_grad():
            out = OPS.group_fc(h, weight, bias, c)
        grad = torch.randn_like(out)
        hd, wd, bd = h.detach(), weight.detach(), bias.detach()
        torch.library.opcheck(OPS.group_fc_grad_h.default, (grad, hd, wd, c))
        torch.library.opcheck(OPS.group_fc_grad_weight.default, (grad, hd, wd, c))
        torch.library.opcheck(OPS.group_fc_grad_bias.default, (grad, bd))


@pytest.mark.rounding
@pytest.mark.parametrize("impl", EXT)
def test_compile_fullgraph_forward_backward(impl):
    torch._dynamo.reset()
    shape = SHAPES["padded-tail"]
    h, weight, bias = _make(shape, torch.float32, IMPLS[impl][0])

    def step(h, weight, bias):
        return ext.group_fc(h, weight, bias, shape[3]).square().sum()

    eager = _fwd_bwd(lambda *a: step(*a[:3]).reshape(1), h, weight, bias, 0, torch.ones(1))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _fwd_bwd(lambda *a: compiled(*a[:3]).reshape(1), h, weight, bias, 0, torch.ones(1))
    for name, a, b in zip(("loss", "grad_h", "grad_weight", "grad_bias"), eager[:4], got[:4], strict=True):
        assert_close(f"compiled {name}", a, b, 1e-6)


@needs_ext
def test_compile_fullgraph_module_cpp_backend():
    """MLDecoderFast(backend="cpp") under torch.compile(fullgraph=True): forward + backward."""
    from heads import disable_dropout_, make_pair

    torch._dynamo.reset()
    ref, fast = make_pair(30, 4, backend="cpp")
    disable_dropout_(ref), disable_dropout_(fast)
    ref.train(), fast.train()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 24, 3, 3)
    out = compiled(x)
    assert fast.active_backend == "cpp"
    out.square().sum().backward()
    r = ref(x)
    r.square().sum().backward()
    assert_close("compiled module", r, out, 1e-5)
    assert_close("compiled module grad", ref.decoder.duplicate_pooling.grad,
                 fast.decoder.duplicate_pooling.grad, 1e-5)


BAD_ARGS = [
    ("h must be \\[B, K, D\\]", lambda h, w, b: (h[0], w, b, 47)),
    ("does not match weight", lambda h, w, b: (h[:, :3], w, b, 47)),
    ("does not match weight", lambda h, w, b: (h[..., :5], w, b, 47)),
    ("num_classes must be in", lambda h, w, b: (h, w, b, 50)),
    ("num_classes must be in", lambda h, w, b: (h, w, b, 0)),
    ("bias must be \\[47\\]", lambda h, w, b: (h, w, b[:-1], 47)),
    ("weight must be \\[K, D, G\\]", lambda h, w, b: (h, w[0, 0], b, 47)),
    ("ZSL\\) weight must be \\[D, 1\\]", lambda h, w, b: (h, w[0], b, 47)),
    ("same dtype", lambda h, w, b: (h, w.double(), b, 47)),
    ("must be float64, float32, float16 or bfloat16", lambda h, w, b: (h.int(), w.int(), b, 47)),
]


@needs_ext
@pytest.mark.parametrize("match,make_args", BAD_ARGS, ids=[m for m, _ in BAD_ARGS])
def test_clear_errors(match, make_args):
    h, weight, bias = (t.detach() for t in _make(SHAPES["padded-tail"], torch.float32))
    args = make_args(h, weight, bias)
    with pytest.raises(RuntimeError, match=match):
        OPS.group_fc(*args)
    # the fake (meta) kernel used by torch.compile rejects the same arguments
    if args[0].is_floating_point():
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError):
            OPS.group_fc(*meta)


@pytest.mark.rounding
@needs_ext
def test_status_and_backend_ops():
    ok, detail = ext.extension_status()
    assert isinstance(ok, bool) and isinstance(detail, str) and detail
    if not ok:
        pytest.fail(detail)
    h, weight, bias = _make(SHAPES["padded-tail"], torch.float32)
    ops = ExtensionOps()
    assert ops.name == "cpp"
    assert_close("ExtensionOps", TorchOps().group_fc(h, weight, bias, 47), ops.group_fc(h, weight, bias, 47), 1e-6)
    # inputs the op does not take go to the PyTorch path (meta: no kernel of ours)
    meta = [t.detach().to("meta") for t in (h, weight, bias)]
    assert not ext.supports(*meta)
    assert ops.group_fc(*meta, 47).shape == (5, 47)


@pytest.mark.rounding
@needs_ext
def test_load_failure_is_reported_not_raised(monkeypatch):
    """An extension that fails to import (e.g. built against another torch) leaves the package
    working: extension_status says why, ExtensionOps runs the PyTorch path."""
    import sys

    monkeypatch.setattr(ext, "_state", {"loaded": None, "detail": "not loaded yet"})
    monkeypatch.setitem(sys.modules, "mldecoder_fast._C", None)  # import raises ImportError
    ok, detail = ext.extension_status()
    assert not ok and "failed to load" in detail and "ModuleNotFoundError" in detail
    assert not ext.cuda_kernels_available()
    h, weight, bias = _make(SHAPES["padded-tail"], torch.float32)
    assert_close("fallback", group_fc_torch(h, weight, bias, 47), ExtensionOps().group_fc(h, weight, bias, 47), 1e-6)
    with pytest.raises(RuntimeError, match="unavailable"):
        ext.group_fc(h, weight, bias, 47)


@needs_ext
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_bf16_full_size():
    """The issue's GPU setting: bf16, B = 256, 21,843 classes, D = 768."""
    _check_against_reference((256, 100, 768, 21843), torch.bfloat16, "cuda")


# ------------------------------------------------------------------------------------------------
# Triton: against the torch path (mixed fp16 activations / fp32 weights, as under the head's
# autocast), the no-grad direct path, autocast dtypes
# ------------------------------------------------------------------------------------------------

# (B, K, D, G, classes): G = 7 with a padded tail of 2 and B = 19 over two batch tiles; G = 1
# (K = classes, as COCO). tests/ops/test_decode.py runs these and a three-tile G.
TRITON_SHAPES = [(19, 5, 40, 7, 33), (3, 9, 24, 1, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("impl", [_TRITON])
def test_matches_torch_path(impl, dtype, shape, poison_empty):
    b, k, d, gs, c = shape
    h = leaf(torch.randn(b, k, d), dtype)
    w, bias = leaf(torch.randn(k, d, gs) / d ** 0.5), leaf(torch.randn(c))
    out = TRITON.group_fc(h, w, bias, c)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = grads_of(out, [h, w, bias], g)
    hr, wr, br = ref_copies(h, w, bias)
    ref = TORCH.group_fc(hr, wr, br, c)
    check(f"group_fc{shape}", ref, grads_of(ref, [hr, wr, br], g.float()), out, grads, dtype,
          out_dtype=torch.float32)


@pytest.mark.parametrize("impl", [_TRITON])
def test_no_grad_direct_path_matches_custom_op(impl):
    b, k, d, gs, c = 2, 5, 16, 3, 14
    o = torch.randn(b, k, d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV), torch.randn(c, device=DEV)
    assert_no_grad_direct_path(lambda o, w, bias: TRITON.group_fc(o, w, bias, c), [o, w, bias], "group_fc")


@pytest.mark.parametrize("impl", [_TRITON])
def test_autocast_dtype_matches_torch(impl):
    from triton_helpers import AUTOCAST_DTYPE
    b, k, d, gs, c = 2, 5, 16, 3, 14
    r = torch.randn(b, k, d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV) / 4, torch.randn(c, device=DEV)
    assert_autocast_dtype_matches_torch("group_fc", lambda ops: ops.group_fc(r, w, bias, c), AUTOCAST_DTYPE)
