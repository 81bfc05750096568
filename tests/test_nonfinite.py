"""A NaN or an Inf in one sample's features reaches the logits as in the reference, in every path.

Non-finite activations are how users find a diverging backbone, a corrupt image or an fp16
overflow, so the head must not hide them: sample i's logits are non-finite exactly where the
reference's are, and no other sample's are. In training the loss is non-finite, the parameters
whose gradients the reference makes non-finite are the same, and the input gradient is non-finite
in the same samples. Checked in eval and training, fp32 and bf16 autocast, each CPU GEMM provider,
the torch and cpp backends, the op-by-op and fused training paths, and the launch-lean eval forward
and training kit of CUDA run on the CPU. (oneDNN's fused ReLU maps NaN to 0, so the providers
apply ReLU where NaN survives: ops/cpu_gemm.py.)
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from heads import make_pair
from helpers import CPU_BACKENDS

from mldecoder_fast.ops import cpu_gemm

# (classes, groups): COCO, ImageNet-1K, OpenImages (groups: a padded tail), ImageNet-21K
CONFIGS = [(80, -1), (1000, -1), (9605, 200), (21843, -1)]
VALUES = [float("nan"), float("inf")]
BATCH, FEATURES, SIDE = 3, 48, 3
BAD = 1   # the sample that gets the non-finite feature

# (backend, provider, path): provider "auto" picks mkl or onednn per product shape by timing; path
# "default" is what the head picks; "op-by-op" switches the fused
# training step off; "lean" runs the CUDA eval forward / training kit on the CPU
PATHS = [(backend, provider, "default") for backend in CPU_BACKENDS for provider in ("mkl", "onednn", "auto")]
PATHS += [("torch", "onednn", "op-by-op"), ("torch", "mkl", "lean")]


def _heads(classes, groups, backend, path):
    ref, fast = make_pair(classes, groups, 64, FEATURES, backend=backend)
    if path == "lean":
        fast.lean_eval_devices = ("cpu",)
        fast.lean_train_devices = ("cpu",)
    fast.fused_training = path != "op-by-op"
    return ref, fast


def _input(value):
    x = torch.randn(BATCH, FEATURES, SIDE, SIDE)
    x[BAD, 5, 1, 2] = value
    return x


def _autocast(bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    """Which samples (rows of the first axis) hold a non-finite value."""
    return ~torch.isfinite(t.float()).flatten(1).all(1)


@pytest.fixture
def provider(request, monkeypatch):
    monkeypatch.setitem(cpu_gemm._state, "mode", request.param)
    return request.param


# every (path, configuration, value, dtype): one parametrization for the eval and the training test
EVERY_CASE = pytest.mark.parametrize(
    "backend,provider,path,classes,groups,value,bf16",
    [pytest.param(b, p, path, c, g, v, bf16, id=f"{b}-{p}-{path}-{c}-{'nan' if v != v else 'inf'}-"
                  f"{'bf16' if bf16 else 'fp32'}")
     for b, p, path in PATHS for c, g in CONFIGS for v in VALUES for bf16 in (False, True)],
    indirect=["provider"])


@EVERY_CASE
def test_eval_logits_are_nonfinite_where_the_reference_s_are(backend, provider, path, classes, groups,
                                                               value, bf16):
    ref, fast = _heads(classes, groups, backend, path)
    ref.eval(), fast.eval()
    x = _input(value)
    with torch.no_grad(), _autocast(bf16):
        want, got = ref(x), fast(x)
    if path == "lean":
        assert any(isinstance(n, tuple) and n[0] == "lean_eval" for n in fast.caches.names())
    assert _bad_rows(want).tolist() == [i == BAD for i in range(BATCH)], "the reference itself"
    same = torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert same, (
        f"non-finite logits per sample {(~torch.isfinite(got)).sum(1).tolist()}, "
        f"reference {(~torch.isfinite(want)).sum(1).tolist()}")


def _train(head, x, target, bf16):
    """(logits, loss, input gradient, {parameter: whether its gradient has a non-finite value},
    whether the step ran as the fused training function) of one training step."""
    xx = x.clone().requires_grad_(True)
    head.train()
    with _autocast(bf16):
        out = head(xx)
    fused = type(out.grad_fn).__name__ == "HeadTrainStepBackward"
    loss = F.binary_cross_entropy_with_logits(out.float(), target, reduction="sum")
    loss.backward()
    grads = {n: bool((~torch.isfinite(p.grad)).any()) for n, p in head.named_parameters() if p.grad is not None}
    return out.detach(), loss.detach(), xx.grad, grads, fused


@EVERY_CASE
def test_training_step_is_nonfinite_where_the_reference_s_is(backend, provider, path, classes, groups,
                                                               value, bf16):
    ref, fast = _heads(classes, groups, backend, path)
    x = _input(value)
    target = (torch.rand(BATCH, classes) < 0.1).float()
    out_r, loss_r, gx_r, grads_r, _ = _train(ref, x, target, bf16)
    out_f, loss_f, gx_f, grads_f, fused = _train(fast, x, target, bf16)
    assert fused == (path != "op-by-op"), f"{path}: the fused training step ran: {fused}"
    assert not torch.isfinite(loss_r) and not torch.isfinite(loss_f)
    same = torch.equal(torch.isfinite(out_f), torch.isfinite(out_r))
    assert same, (
        f"non-finite logits per sample {(~torch.isfinite(out_f)).sum(1).tolist()}, "
        f"reference {(~torch.isfinite(out_r)).sum(1).tolist()}")
    assert _bad_rows(gx_f).tolist() == _bad_rows(gx_r).tolist(), "samples with a non-finite input gradient"
    assert grads_f == grads_r, "parameters with a non-finite gradient"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight", ["decoder.layers.0.linear1.weight", "decoder.layers.0.linear1.bias",
                                    "decoder.embed_standart.weight"])
@pytest.mark.parametrize("provider", ["mkl", "onednn"], indirect=True)
def test_a_nan_weight_reaches_every_logit_as_in_the_reference(provider, weight, bf16):
    """A NaN weight (a diverged checkpoint) is not hidden either, also after the head has run with
    finite weights (what it derives from them is per weight version)."""
    ref, fast = _heads(1000, -1, "torch", "default")
    ref.eval(), fast.eval()
    x = torch.randn(BATCH, FEATURES, SIDE, SIDE)
    with torch.no_grad(), _autocast(bf16):
        assert torch.isfinite(fast(x)).all()
        for head in (ref, fast):
            head.get_parameter(weight).view(-1)[3] = float("nan")
        want, got = ref(x), fast(x)
    assert not torch.isfinite(want).any(), "the reference itself"
    same = torch.equal(torch.isfinite(got), torch.isfinite(want))
    assert same, f"{int(torch.isfinite(got).sum())} finite logits, reference none"
