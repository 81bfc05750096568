"""No host synchronisation and no graph break in the head's forward and backward.

A value read back on the host (``.item()``, ``nonzero``, data-dependent shapes) makes the host wait
for the device every call, and breaks CUDA-graph capture; a graph break splits a compiled forward.
"""
from __future__ import annotations

import pytest
import torch
from heads import disable_dropout_, make_input, make_pair
from helpers import CPU_BACKENDS

from mldecoder_fast import MLDecoderFast
from mldecoder_fast.benchmark.launches import (
    HostSyncError,
    fake_cuda,
    forbid_host_sync,
    run_backward,
)


def _step(head, x, train: bool, backward):
    head.train(train)
    with torch.set_grad_enabled(train):
        out = head(x)
    if train:
        backward(out.float().square().sum())
    return out


def test_guard_catches_a_sync():
    with pytest.raises(HostSyncError), forbid_host_sync():
        torch.randn(3).sum().item()
    with pytest.raises(HostSyncError), forbid_host_sync():
        torch.nonzero(torch.randn(3) > 0)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("zsl", [0, 1], ids=["plain", "zsl"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_forward_and_backward(backend, zsl, autocast):
    """Eval (no grad, and with grad), training with dropout (fused CPU step in fp32, op by op under
    autocast), and the launch-lean eval path, on the CPU."""
    _, head = make_pair(33 if not zsl else 1, 4, zsl=zsl, backend=backend)
    x = make_input("map", 3, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), forbid_host_sync():
        _step(head, x, False, None)
        _step(head, x, True, lambda loss: loss.backward())
        head.eval()
        head(x.requires_grad_()).sum().backward()
        head.lean_eval_devices = ("cpu",)
        with torch.no_grad():
            head(x)
    assert head.decoder.embed_standart.weight.grad is not None


@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # the caches' keys
@pytest.mark.parametrize("zsl", [0, 1], ids=["plain", "zsl"])
def test_fake_cuda_forward_and_backward(zsl):
    """The torch backend on (fake) CUDA under bf16 autocast: the lean eval forward, and a training
    forward and backward (the backward node by node: the autograd engine needs a real device)."""
    with fake_cuda(torch.bfloat16):
        head = MLDecoderFast(33 if not zsl else 1, 4, 32, 24, zsl=zsl, backend="torch")
        if zsl:
            head.set_word_vectors(torch.randn(5, 300))
        x = torch.randn(2, 24, 3, 3, dtype=torch.bfloat16)
        with forbid_host_sync():
            _step(head, x, False, None)
            grads = {}
            _step(head, x, True, lambda loss: grads.update(run_backward(loss)))
    assert set(grads) == {p for p in head.parameters() if p.requires_grad}


# every backend in eval and training, plus the lean path (the torch backend's eval forward)
@pytest.mark.parametrize("backend, train, lean",
                         [pytest.param(b, t, False, id=f"{b}-{'train' if t else 'eval'}")
                          for b in CPU_BACKENDS for t in (False, True)]
                         + [pytest.param("torch", False, True, id="torch-eval-lean")])
def test_no_graph_break(backend, train, lean):
    _, head = make_pair(33, 4, backend=backend)
    disable_dropout_(head)
    head.train(train)
    if lean:
        head.lean_eval_devices = ("cpu",)
    x = make_input("map", 2, 24)
    torch._dynamo.reset()
    try:
        with torch.set_grad_enabled(train):
            explanation = torch._dynamo.explain(head)(x)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
