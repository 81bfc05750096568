"""The CPU head's GEMM providers (ops/cpu_gemm.py): each one forced, against the reference (eval,
fused training step, bf16 autocast), the measure-once choice with injected timings, the run-time
fallback when oneDNN fails, and the switches that keep fp32 products in fp32. Eval runs op by op
here (the ``op_by_op_eval`` fixture): the CPU eval path (tests/test_cpu_eval.py) packs its own
oneDNN products."""
from __future__ import annotations

import warnings

import pytest
import torch
from heads import check_train_grads, disable_dropout_, make_pair
from helpers import assert_close, rel_rms

from mldecoder_fast import MLDecoder
from mldecoder_fast.ops import cpu_gemm

PROVIDERS = ["onednn", "mkl"]
pytestmark = pytest.mark.usefixtures("op_by_op_eval")


@pytest.fixture
def forced(request, monkeypatch):
    """Force one provider for the test and count the oneDNN products that ran."""
    monkeypatch.setitem(cpu_gemm._state, "mode", request.param)
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    calls = []
    linear = cpu_gemm.OneDnnGemm.linear
    monkeypatch.setattr(cpu_gemm.OneDnnGemm, "linear",
                        lambda self, *a, **kw: calls.append(1) or linear(self, *a, **kw))
    return request.param, calls


def _check_provider_ran(forced):
    mode, calls = forced
    assert (len(calls) > 0) == (mode == "onednn"), f"{mode}: {len(calls)} oneDNN products"
    calls.clear()


@pytest.mark.parametrize("forced", PROVIDERS, indirect=True)
@pytest.mark.parametrize("zsl", [0, 1])
def test_fp32_eval_and_training_step_match_reference(forced, zsl):
    wv = torch.randn(9, 300) if zsl else None
    ref, fast = make_pair(101, -1 if zsl else 10, 64, 48, zsl=zsl, word_vectors=wv)
    x = torch.randn(3, 48, 3, 4)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close("eval", ref(x), fast(x), 1e-5)
        assert_close("eval again (cached weights)", ref(x), fast(x), 1e-5)
    _check_provider_ran(forced)
    check_train_grads(ref, fast, x, 1e-4)       # the fused training step, forward and backward
    _check_provider_ran(forced)


def test_folded_score_product_runs_on_the_provider(monkeypatch):
    """Eval with few queries (H * K < D + K) takes the key-folded path: its score GEMM, memory
    [B, N, D] against qk [H * K, D], goes through the provider like the other products."""
    monkeypatch.setitem(cpu_gemm._state, "mode", "onednn")
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    shapes = []
    linear = cpu_gemm.OneDnnGemm.linear
    monkeypatch.setattr(cpu_gemm.OneDnnGemm, "linear",
                        lambda self, x, w, *a, **kw: shapes.append(tuple(w.shape)) or linear(self, x, w, *a, **kw))
    ref, fast = make_pair(33, 4, 64, 48)
    x = torch.randn(3, 48, 3, 4)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close("eval, folded scores", ref(x), fast(x), 1e-5)
    assert (8 * 4, 64) in shapes, shapes


@pytest.mark.parametrize("forced", PROVIDERS, indirect=True)
def test_fp64_stays_exact(forced):
    """fp64 has no oneDNN products: both settings run torch's, to fp64 accuracy."""
    ref, fast = make_pair(33, 4, dtype=torch.float64)
    x = torch.randn(2, 24, 3, 3, dtype=torch.float64)
    ref.eval(), fast.eval()
    with torch.no_grad():
        assert_close("eval fp64", ref(x), fast(x), 1e-12)
    check_train_grads(ref, fast, x, 1e-10)
    assert not forced[1]


@pytest.mark.parametrize("forced", PROVIDERS, indirect=True)
@pytest.mark.parametrize("zsl", [0, 1])
def test_bf16_autocast_within_reference_error(forced, zsl):
    """bf16 autocast, eval and training (dropout off): output and every gradient within ~2x of the
    reference's own bf16 error, both against an fp64 reference."""
    wv = torch.randn(20, 300) if zsl else None
    groups = -1 if zsl else 8
    ref, fast = make_pair(40, groups, 64, 48, zsl=zsl, word_vectors=wv)
    exact = MLDecoder(40, groups, 64, 48, zsl=zsl)
    exact.load_state_dict(ref.state_dict())
    exact.double()
    if zsl:
        exact.set_word_vectors(wv.double())
    x = torch.randn(4, 48, 3, 3)
    for m in (ref, fast, exact):
        m.eval()
    with torch.no_grad():
        want = exact(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_ref, out_fast = ref(x), fast(x)
            assert_close("bf16 eval (cached copies)", want, fast(x), 2 * rel_rms(want, out_ref) + 1e-6)
    if not zsl:  # (ZSL eval under autocast: the reference returns bf16 logits, this head fp32)
        assert out_fast.dtype == out_ref.dtype
    assert_close("bf16 eval", want, out_fast, 2 * rel_rms(want, out_ref) + 1e-6)
    _check_provider_ran(forced)
    for m in (ref, fast, exact):
        disable_dropout_(m).train()
    exact(x.double()).square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x)
        assert type(out.grad_fn).__name__ == "HeadTrainStepBackward"
        ref(x).float().square().sum().backward()
        out.float().square().sum().backward()
    _check_provider_ran(forced)
    p_exact, p_ref = dict(exact.named_parameters()), dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if p.grad is None:
            assert p_ref[name].grad is None, name
            continue
        assert p.grad.dtype == torch.float32
        base = rel_rms(p_exact[name].grad, p_ref[name].grad)
        assert_close(f"bf16 grad of {name}", p_exact[name].grad, p.grad, 2 * base + 2 ** -8)


def test_choice_needs_a_ten_percent_margin():
    assert cpu_gemm.choose({"mkl": 1.0, "onednn": 0.95}) == "mkl"
    assert cpu_gemm.choose({"mkl": 1.0, "onednn": 0.85}) == "onednn"
    assert cpu_gemm.choose({"mkl": 0.5, "onednn": 1.0}) == "mkl"


@pytest.mark.rounding
def test_auto_measures_each_shape_once_with_injected_timings():
    seen = []

    def timer(calls):
        assert set(calls) == {"mkl", "onednn"}
        seen.append(1)
        for call in calls.values():
            call()
        return {"mkl": 1.0, "onednn": 0.5} if len(seen) == 1 else {"mkl": 1.0, "onednn": 0.99}

    auto = cpu_gemm.AutoGemm(timer=timer)
    x, w, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(6)
    for _ in range(3):
        assert_close("auto linear", torch.addmm(b, x, w.t()), auto.linear(x, w, b), 1e-6)
    assert len(seen) == 1 and list(auto.decisions.values()) == ["onednn"]
    a = torch.randn(5, 7)
    for _ in range(2):
        assert_close("auto mm (transposed operand)", a.t().mm(x), auto.mm(a.t(), x), 1e-6)
    assert len(seen) == 2 and list(auto.decisions.values()) == ["onednn", "mkl"]
    auto.linear(torch.randn(9, 8), w, b)          # a new row count is a new shape
    assert len(seen) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_mm_copies_fewer_elements(monkeypatch, dtype):
    """oneDNN copies a strided input operand: ``mm(gᵀ, x)`` (a weight gradient) runs as
    ``linear(gᵀ, xᵀ)``, or as ``linear(xᵀ, gᵀ)ᵀ`` plus a copy of the result when that copies
    under half as many elements; either way it is the product, contiguous."""
    if not cpu_gemm.onednn_status(dtype)[0]:
        pytest.skip(cpu_gemm.onednn_status(dtype)[1])
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    inputs = []
    linear = cpu_gemm.OneDnnGemm.linear
    monkeypatch.setattr(cpu_gemm.OneDnnGemm, "linear",
                        lambda self, x, w, *a, **kw: inputs.append(tuple(x.shape)) or linear(self, x, w, *a, **kw))
    rows = 37
    cases = [((rows, 64), (rows, 8), False, (8, rows)),     # 2 (8·37 + 64·8) < 64·37: x, then transposed
             ((rows, 16), (rows, 64), False, (16, rows)),   # g narrower: g is the input
             ((rows, 64), (rows, 16), False, (64, rows)),   # 2 (16·37 + 64·16) > 64·37: g
             ((rows, 20), (rows, 16), True, (16, rows))]    # x stored by columns (xᵀ needs no copy): x
    for g_shape, x_shape, by_columns, input_shape in cases:
        g = torch.randn(g_shape).to(dtype)
        x = torch.randn(x_shape).to(dtype)
        if by_columns:
            x = x.t().contiguous().t()
        inputs.clear()
        out = cpu_gemm.ONEDNN.mm(g.t(), x)
        assert inputs == [input_shape], (g_shape, x_shape, inputs)
        assert out.is_contiguous() and out.shape == (g_shape[1], x_shape[1])
        exact = g.double().t() @ x.double()
        assert rel_rms(exact, out.double()) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_onednn_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setitem(cpu_gemm._state, "mode", "onednn")
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)

    def broken(*args):
        raise RuntimeError("oneDNN primitive creation failed (injected)")

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
    ref, fast = make_pair(30, 4)
    ref.eval(), fast.eval()
    x = torch.randn(2, 24, 3, 3)
    with pytest.warns(RuntimeWarning, match="oneDNN matrix product failed"):
        with torch.no_grad():
            assert_close("eval after a oneDNN failure", ref(x), fast(x), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_train_grads(ref, fast, x, 1e-4)
    assert cpu_gemm.provider(torch.float32, x.device) is cpu_gemm.TORCH
    assert "failed" in cpu_gemm.onednn_status()[1]


def test_reduced_precision_fp32_mode_keeps_fp32_products_off_onednn(monkeypatch):
    monkeypatch.setitem(cpu_gemm._state, "mode", "onednn")
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    # oneDNN's own fp32 math mode (PyTorch >= 2.9), else the global one that set it before
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    own = matmul is not None and hasattr(matmul, "fp32_precision")
    previous = matmul.fp32_precision if own else torch.get_float32_matmul_precision()
    try:
        if own:
            matmul.fp32_precision = "bf16"
        else:
            torch.set_float32_matmul_precision("medium")
        assert cpu_gemm.onednn_fp32_precision() not in ("none", "ieee")
        assert cpu_gemm.provider(torch.float32, torch.device("cpu")) is cpu_gemm.TORCH
    finally:
        if own:
            matmul.fp32_precision = previous
        else:
            torch.set_float32_matmul_precision(previous)
    assert cpu_gemm.provider(torch.float32, torch.device("cpu")) is cpu_gemm.ONEDNN
    assert cpu_gemm.provider(torch.float64, torch.device("cpu")) is cpu_gemm.TORCH
    assert cpu_gemm.provider(torch.float32, torch.device("meta")) is cpu_gemm.TORCH


def test_environment_variable_and_api(monkeypatch):
    monkeypatch.setitem(cpu_gemm._state, "mode", None)
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    for value, provider in (("mkl", cpu_gemm.TORCH), ("onednn", cpu_gemm.ONEDNN), ("auto", cpu_gemm.AUTO)):
        monkeypatch.setenv(cpu_gemm.ENV_VAR, value)
        cpu_gemm.set_cpu_gemm(None)
        assert cpu_gemm.provider(torch.float32, torch.device("cpu")) is provider
    assert cpu_gemm.set_cpu_gemm("mkl") == "auto"
    assert cpu_gemm.provider(torch.bfloat16, torch.device("cpu")) is cpu_gemm.TORCH
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "cublas")
    cpu_gemm.set_cpu_gemm(None)
    with pytest.raises(ValueError, match="CPU GEMM choice must be one of"):
        cpu_gemm.provider(torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU GEMM choice"):
        cpu_gemm.set_cpu_gemm("fast")


def test_backends_say_what_runs_the_cpu_gemms():
    from mldecoder_fast import backends
    assert "CPU GEMMs:" in backends()["torch"]["detail"]
