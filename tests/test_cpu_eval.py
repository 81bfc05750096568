"""The CPU eval forward (paths/cpu_eval.py) against the reference.

It is what ``head(x)`` runs in eval without autograd on the CPU (backend torch) where oneDNN
computes the dtype: fp32 always (at its IEEE default), bf16 where the CPU has native bf16. Where
this CPU has none, the bf16 cases check that the op-by-op path ran instead, with the same bounds.
Bounds, against a float64 twin of the reference: 2x the reference's own error in the same dtype
(the benchmark's bound; different summation orders of the same precision), and at least 1e-5 in
fp32 (tests/rounding.py: tighter fp32 bounds hold only to within one machine's rounding).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from heads import make_input, make_pair, make_triple
from helpers import assert_close, rel_rms

from mldecoder_fast import paths
from mldecoder_fast.benchmark.launches import count_launches
from mldecoder_fast.ops import cpu_gemm
from mldecoder_fast.ops.torch_ops import group_fc_torch
from mldecoder_fast.paths import cpu_eval

BF16 = cpu_gemm.onednn_status(torch.bfloat16)[0]


def _path(head, x):
    return paths.choose(head, x, paths.facts_of(head, x))


def _expected(dtype: torch.dtype):
    return paths.CPU_EVAL if dtype == torch.float32 or BF16 else paths.OP_BY_OP


def _bound(exact: torch.Tensor, out_ref: torch.Tensor) -> float:
    return max(2 * rel_rms(exact, out_ref), 1e-5)


def _with_float64_twin(classes, groups, zsl=0):
    return make_triple(classes, groups, 64, 48, zsl=zsl)


@pytest.mark.parametrize("classes,groups,kind,batch,zsl", [
    (7, -1, "map", 3, 0),        # K = 7 = classes, G = 1
    (101, 10, "map", 2, 0),      # G = 11, padded tail of 9
    (5, 8, "map", 2, 0),         # groups > classes: K = 5
    (20, 3, "tokens", 1, 0),     # [B, N, C] input, B = 1
    (33, 4, "map", 1, 0),        # a [B, C, H, W] map with B = 1
    (1000, -1, "map", 5, 0),     # G = 10, odd batch
    (1, -1, "map", 3, 1),        # ZSL: 9 word vectors as queries
    (1, -1, "tokens", 1, 1),
])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_matches_reference(classes, groups, kind, batch, zsl, autocast):
    ref, fast, ref64 = _with_float64_twin(classes, groups, zsl=zsl)
    x = make_input(kind, batch, 48, tokens=10)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
        assert _path(fast, x) is _expected(autocast or torch.float32)
        out, out_ref = fast(x), ref(x)
    exact = ref64(x.double())
    assert out.dtype == torch.float32
    assert_close(f"cpu eval, autocast {autocast}", exact, out, _bound(exact, out_ref))


def test_input_layouts_and_dtypes():
    ref, fast, ref64 = _with_float64_twin(50, 10)
    base = torch.randn(3, 48, 4, 6)
    for x in (base, base.to(memory_format=torch.channels_last), base.transpose(2, 3), base[:, :, ::2, :],
              torch.randn(6, 48, 4, 5)[::3], torch.randn(2, 48, 9).transpose(1, 2), torch.randn(2, 9, 48),
              base[:1].to(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert _path(fast, x) is paths.CPU_EVAL
            exact = ref64(x.double())
            assert_close(f"layout {tuple(x.stride())}", exact, fast(x),
                         _bound(exact, ref(x.float())))


def test_bf16_parameters():
    ref, fast, ref64 = _with_float64_twin(40, 8)
    ref.bfloat16(), fast.bfloat16()
    x = torch.randn(3, 48, 3, 3)
    with torch.no_grad():
        assert _path(fast, x.bfloat16()) is _expected(torch.bfloat16)
        out = fast(x.bfloat16())
        assert out.dtype == torch.bfloat16
        exact = ref64(x.double())
        assert_close("bf16 params", exact, out, _bound(exact, ref(x.bfloat16())))


def test_where_it_does_not_run():
    """fp64 and fp16, autograd, training, an empty batch, the cpp backend and the MKL choice run
    op by op (or their training step); with oneDNN switched off the next forward does too."""
    _, fast = make_pair(30, 4, 64, 48)
    fast.eval()
    x = torch.randn(2, 48, 3, 3)
    with torch.no_grad():
        assert _path(fast, x) is paths.CPU_EVAL
        assert _path(fast, x[:0]) is paths.OP_BY_OP
        assert fast(x[:0]).shape == (0, 30)
        with torch.autocast("cpu", torch.float16):
            assert _path(fast, x) is paths.OP_BY_OP
        previous = cpu_gemm.set_cpu_gemm("mkl")
        try:
            assert _path(fast, x) is paths.OP_BY_OP
        finally:
            cpu_gemm.set_cpu_gemm(previous)
        fast.backend = "cpp"
        assert _path(fast, x) is paths.OP_BY_OP
        fast.backend = "torch"
    assert _path(fast, x.requires_grad_()) is paths.OP_BY_OP
    with torch.no_grad():
        assert _path(fast.double(), x.double()) is paths.OP_BY_OP


def test_ops_at_batch_one():
    """The ops it dispatches at batch 1: 15 from a [1, C, H, W] map, 14 from rows already in the
    compute dtype (a channels-last map), the budget of the serving path's docstring."""
    _, fast = make_pair(80, -1, 64, 48)
    fast.eval()
    expected = ["mkldnn._linear_pointwise", "aten.relu_", "mkldnn._linear_pointwise", "mkldnn._linear_pointwise",
                "aten._softmax", "aten.bmm", "aten.clone", "mkldnn._linear_pointwise", "aten.native_layer_norm",
                "mkldnn._linear_pointwise", "mkldnn._linear_pointwise", "aten.native_layer_norm", "aten.bmm",
                "aten.add"]
    x = torch.randn(1, 48, 5, 5)
    for inp, first in ((x, ["aten.copy_"]), (x.to(memory_format=torch.channels_last), []),
                       (torch.randn(1, 25, 48), [])):
        with torch.no_grad():
            ops = [launch.name for launch in count_launches(lambda inp=inp: fast(inp))]
        assert ops == first + expected, ops
    if BF16:   # bf16 rows under bf16 autocast: no copy either
        rows = torch.randn(1, 25, 48).bfloat16()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            ops = [launch.name for launch in count_launches(lambda: fast(rows))]
        assert ops == expected, ops


@pytest.mark.parametrize("form", sorted(cpu_eval._PRODUCTS))
@pytest.mark.parametrize("batch,groups,g", [(1, 7, 11), (4, 5, 3)])
def test_group_fc_forms(form, batch, groups, g, monkeypatch):
    """Each of the two product forms the first call chooses between gives the group FC."""
    h = torch.randn(batch, groups, 24, dtype=torch.float64)
    weight = torch.randn(groups, 24, g, dtype=torch.float64)
    bias = torch.randn(groups * g - 2, dtype=torch.float64)
    padded = torch.nn.functional.pad(bias, (0, 2)).view(groups, g)
    monkeypatch.setattr(cpu_eval, "_FORMS", {(h.dtype, batch, groups, g, 24): form})
    out = cpu_eval.group_fc(h, weight.transpose(1, 2).contiguous(), padded, groups * g - 2)
    assert_close(f"group FC, {form}", group_fc_torch(h, weight, bias, groups * g - 2), out, 1e-12)


def test_group_fc_form_is_measured_once_per_shape(monkeypatch):
    timed = []

    def timer(calls):
        timed.append(sorted(calls))
        return {name: float(i) for i, name in enumerate(sorted(calls, reverse=True))}
    monkeypatch.setattr(cpu_eval, "_FORMS", {})
    monkeypatch.setattr(cpu_gemm, "time_candidates", timer)
    h, rows, bias = torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.zeros(3, 4)
    for _ in range(3):
        cpu_eval.group_fc(h, rows, bias, 12)
    assert timed == [sorted(cpu_eval._PRODUCTS)]
    assert cpu_eval._FORMS == {(torch.float32, 2, 3, 4, 8): sorted(cpu_eval._PRODUCTS, reverse=True)[0]}


def test_derived_weights_follow_parameter_updates():
    ref, fast, ref64 = _with_float64_twin(40, 8)
    x = torch.randn(2, 48, 3, 3)
    key = ("cpu_eval", torch.float32, torch.float32)
    with torch.no_grad():
        fast(x)
        held = fast.caches.held(key)
        fast(x)
        assert fast.caches.held(key) is held
        for name in ("decoder.layers.0.linear1.weight", "decoder.layers.0.linear2.bias",
                     "decoder.layers.0.multihead_attn.in_proj_bias", "decoder.duplicate_pooling"):
            for m in (ref, fast, ref64):
                m.get_parameter(name).add_(0.25)
            exact = ref64(x.double())
            assert_close(f"after updating {name}", exact, fast(x), _bound(exact, ref(x)))
        assert fast.caches.held(key) is not held


def test_a_nonfinite_linear1_weight_makes_every_logit_nan():
    """oneDNN's relu maps NaN to 0: the path carries a non-finite linear1 weight through LN2's
    bias instead, which makes every logit NaN: as the reference's for a NaN; for an Inf, where the
    reference's are NaN and elsewhere too (the op-by-op path's rule, ops/cpu_gemm.py)."""
    ref, fast = make_pair(30, 4, 64, 48)
    ref.eval(), fast.eval()
    x = torch.randn(2, 48, 3, 3)
    for value in (float("nan"), float("inf")):
        with torch.no_grad():
            for m in (ref, fast):
                m.decoder.layers[0].linear1.weight[3, 5] = value
            assert _path(fast, x) is paths.CPU_EVAL
            want, out = ref(x), fast(x)
        assert out.isnan().all() and want.isnan().any(), value
        assert want.isnan().all() or value == float("inf")


def test_a_onednn_failure_warns_and_runs_op_by_op(monkeypatch):
    _, fast = make_pair(30, 4, 64, 48)
    fast.eval()
    x = torch.randn(2, 48, 3, 3)
    with torch.no_grad():
        want = fast(x)

        def failing(*args):
            raise RuntimeError("could not create a primitive")
        monkeypatch.setattr(cpu_eval, "_linear", failing)
        monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
        with pytest.warns(RuntimeWarning, match="could not create a primitive"):
            out = fast(x)
        assert_close("after a oneDNN failure", want, out, 1e-5)
        assert _path(fast, x) is paths.OP_BY_OP
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fast(x)


def test_backends_says_where_it_runs():
    from mldecoder_fast import backends
    assert "few-ops oneDNN path in fp32" in backends()["torch"]["detail"]
    assert ("bf16" in backends()["torch"]["detail"].split("CPU eval")[1]) == BF16
    previous = cpu_gemm.set_cpu_gemm("mkl")
    try:
        assert "CPU eval without autograd: op by op" in backends()["torch"]["detail"]
    finally:
        cpu_gemm.set_cpu_gemm(previous)


def test_a_packing_failure_warns_and_later_forwards_run_op_by_op(monkeypatch):
    ref, fast, ref64 = _with_float64_twin(30, 4)
    x = torch.randn(2, 48, 3, 3)

    def failing(*args):
        raise RuntimeError("could not reorder the weight")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", failing)
    monkeypatch.setitem(cpu_gemm._state, "onednn_error", None)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="could not reorder the weight"):
            out = fast(x)
        exact = ref64(x.double())
        assert_close("after a packing failure", exact, out, _bound(exact, ref(x)))
        assert _path(fast, x) is paths.OP_BY_OP
