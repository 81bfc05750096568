"""The Triton kernels' dropout RNG: the documented mask's statistics, reproducibility of a whole
LN -> attention -> decode step under torch's seed, and (CUDA) Philox offsets reserved from the
device generator and new masks per CUDA-graph replay. Each op's output against its documented
mask: the *_dropout_matches_mask tests in tests/ops/; host-side seeds: test_triton_host.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_close
from triton_helpers import DEV, TRITON, TRITON_MARKS, needs_cuda, seed

pytestmark = TRITON_MARKS


def _train_step(step_seed):
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
    torch.manual_seed(step_seed)
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
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b), "same seed, different gradients"
    assert not torch.equal(out1, out3), "different seed, same output"
    assert not torch.equal(g1[0], g3[0]), "different seed, same kv gradient"


def test_dropout_keep_rate():
    from mldecoder_fast.kernels._common import dropout_mask
    keep = dropout_mask(seed(2024), 256, 320, 0.1).float()
    rate = keep.mean().item()
    assert abs(rate - 0.9) < 0.006, f"keep rate {rate:.4f}, expected 0.9"
    # rows and columns behave alike, and neighbours are uncorrelated
    assert keep.mean(1).std() < 0.05 and keep.mean(0).std() < 0.05
    c = keep - keep.mean()
    corr = (c[:, 1:] * c[:, :-1]).mean() / c.var()
    assert abs(corr) < 0.02, f"neighbour correlation {corr:.3f}"
    other = dropout_mask(seed(2025), 256, 320, 0.1).float()
    assert (keep != other).float().mean() > 0.1


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
