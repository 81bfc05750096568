"""The Triton ops chained as the head runs them (LN -> attention -> decode) under
torch.compile(fullgraph=True): their torch.library registrations (fake kernels, autograd) let
inductor trace forward and backward. Each op's own opcheck: tests/ops/."""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from triton_helpers import TRITON, TRITON_MARKS, leaf

pytestmark = TRITON_MARKS


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

    leaves = [leaf(torch.randn(b, k, d)), leaf(torch.randn(b, n, 2 * d)), leaf(1 + 0.1 * torch.randn(d)),
              leaf(0.1 * torch.randn(d)), leaf(torch.randn(k, d, gs) / 4), leaf(torch.randn(c))]
    compiled = torch.compile(step, fullgraph=True)
    out_c = compiled(*leaves, 0.0)
    out_e = step(*leaves, 0.0)
    assert_close("compiled output", out_e, out_c, 1e-5)
    for ge, gc in zip(torch.autograd.grad(out_e.sum(), leaves), torch.autograd.grad(out_c.sum(), leaves),
                      strict=True):
        assert_close("compiled grad", ge, gc, 1e-5)
    out_d = compiled(*leaves, 0.1)
    grads = torch.autograd.grad(out_d.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)
    assert not torch.equal(out_d, out_c)
