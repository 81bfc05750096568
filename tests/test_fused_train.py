"""The CPU training step as one autograd function with a hand-written backward (ops/fused_train.py):
gradients against the reference and against finite differences (dropout on, fixed masks), masks,
frozen parameters, the switch back to the op-by-op path, and the memory it saves."""
from __future__ import annotations

import pytest
import torch
from heads import check_train_grads, disable_dropout_, make_input, make_pair
from helpers import assert_close

from mldecoder_fast.ops import cpu_gemm, fused_train
from mldecoder_fast.ops.fused_train import HeadTrainStep, drop_mask


def _fused_ran(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "HeadTrainStepBackward"


@pytest.mark.parametrize("classes,groups,kind,batch,layout", [
    (30, 4, "map", 3, "contiguous"),
    (101, 10, "map", 2, "channels_last"),   # padded tail (G = 11)
    (7, -1, "map", 1, "contiguous"),        # K = classes, B = 1
    (5, 9, "map", 2, "contiguous"),         # groups > classes
    (40, 8, "tokens", 2, "strided"),        # [B, N, C], non-contiguous
])
@pytest.mark.parametrize("backend", ["torch", "cpp"])   # cpp: the extension's group FC inside
def test_fused_step_matches_reference(classes, groups, kind, batch, layout, backend):
    torch.manual_seed(0)
    ref, fast = make_pair(classes, groups, dtype=torch.float64, backend=backend)
    x = make_input(kind, batch, 24, tokens=6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, 12, 48, dtype=torch.float64)[:, ::2, ::2]
    disable_dropout_(fast).train()
    assert _fused_ran(fast(x.requires_grad_(False)))
    assert fast.active_backend == backend
    check_train_grads(ref, fast, x, 1e-10)


def test_fused_step_zsl_matches_reference():
    torch.manual_seed(1)
    ref, fast = make_pair(1, zsl=1, dtype=torch.float64)
    x = torch.randn(3, 24, 2, 2, dtype=torch.float64)
    disable_dropout_(fast).train()
    assert _fused_ran(fast(x))
    check_train_grads(ref, fast, x, 1e-10)
    assert fast.wordvec_proj.weight.grad is not None


def test_fused_and_op_by_op_paths_agree():
    torch.manual_seed(2)
    _, fused = make_pair(50, 5)
    ops = type(fused).from_module(fused)
    ops.fused_training = False
    x = torch.randn(4, 24, 3, 3)
    disable_dropout_(ops).train()
    assert not _fused_ran(ops(x))
    check_train_grads(ops, fused, x, 1e-5)


def test_frozen_parameters_and_input_without_grad():
    torch.manual_seed(3)
    ref, fast = make_pair(60, 6, dtype=torch.float64)
    frozen = ("decoder.embed_standart.weight", "decoder.duplicate_pooling",
              "decoder.layers.0.norm3.bias", "decoder.layers.0.multihead_attn.in_proj_bias")
    for head in (ref, fast):
        for name, p in head.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
    disable_dropout_(ref).train(), disable_dropout_(fast).train()
    x = torch.randn(2, 24, 3, 3, dtype=torch.float64)           # no input gradient wanted
    out_r, out_f = ref(x), fast(x)
    assert _fused_ran(out_f)
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward(), (out_f * g).sum().backward()
    pr = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        if name in frozen or not p.requires_grad:
            assert p.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(f"grad of {name}", pr[name].grad, p.grad, 1e-10)


@pytest.mark.parametrize("per_sample_queries,ext", [(True, False), (False, False), (True, True)])
def test_backward_is_the_derivative_with_dropout_on(monkeypatch, per_sample_queries, ext):
    """Finite differences (fp64, fixed masks) of the whole function, every input at once."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    fixed = {}

    def fixed_mask(shape, p, device):
        key = (tuple(shape), p)
        if key not in fixed:
            fixed[key] = torch.rand(shape, generator=gen) < p
        return fixed[key]

    monkeypatch.setattr(fused_train, "drop_mask", fixed_mask)
    _, fast = make_pair(23, 4, decoder_embedding=16, dtype=torch.float64)
    layer = fast.decoder.layers[0]
    p_query = 0.3 if per_sample_queries else 0.0
    cfg = (8, (layer.norm1.eps, layer.norm2.eps, layer.norm3.eps), (p_query, 0.25, 0.2, 0.35, 0.15), 23, False,
           ext, cpu_gemm.TORCH, torch.float64)
    tokens = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    t0 = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in fast._fused_parameters()]
    # W1 / W2 are 2048 wide: shrink the feed-forward by slicing (the function takes any F)
    params[10], params[11], params[12] = (params[10][:24].detach().clone().requires_grad_(True),
                                          params[11][:24].detach().clone().requires_grad_(True),
                                          params[12][:, :24].detach().clone().requires_grad_(True))
    fn = lambda *args: HeadTrainStep.apply(cfg, *args)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (tokens, t0, *params), fast_mode=True, atol=1e-6, rtol=1e-5)
    assert len(fixed) == (5 if per_sample_queries else 4)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_mask_rate_and_reproducibility(p):
    torch.manual_seed(6)
    m = drop_mask((1000, 1001), p, "cpu")
    assert m.dtype == torch.bool and m.shape == (1000, 1001)
    n = m.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(m.float().mean().item() - p) < 5 * sigma
    # both 32-bit lanes of each random word are used, and both are unbiased
    lanes = m.view(-1)[: n - n % 2].view(-1, 2).float().mean(0)
    assert (lanes - p).abs().max().item() < 5 * sigma * 2 ** 0.5
    torch.manual_seed(6)
    assert torch.equal(m, drop_mask((1000, 1001), p, "cpu"))
    assert not torch.equal(m, drop_mask((1000, 1001), p, "cpu"))


def test_drop_mask_edges():
    assert drop_mask((3, 4), 1.0, "cpu").all()
    assert drop_mask((0, 4), 0.5, "cpu").shape == (0, 4)
    assert not drop_mask((10000,), 1e-12, "cpu").any()


def test_switch_off_and_double_backward():
    """fused_training=False runs op by op, which supports double backward; the fused function
    refuses it with PyTorch's once_differentiable error instead of a wrong answer."""
    torch.manual_seed(7)
    _, fast = make_pair(12, 3, dtype=torch.float64)
    disable_dropout_(fast).train()
    x = torch.randn(2, 24, 2, 2, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(fast(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
    fast.fused_training = False
    out = fast(x)
    assert not _fused_ran(out)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    gx.sum().backward()
    assert fast.decoder.embed_standart.weight.grad is not None


def test_low_precision_autocast_no_grad_and_empty_batch_use_the_op_path(monkeypatch):
    """fp16 autocast, low-precision parameters, no_grad and B = 0 run op by op; bf16 autocast
    over fp32 parameters takes the fused step (with bf16 products)."""
    calls = []
    apply = HeadTrainStep.apply
    monkeypatch.setattr(HeadTrainStep, "apply", lambda *a: calls.append(1) or apply(*a))
    _, fast = make_pair(12, 3)
    fast.train()
    x = torch.randn(2, 24, 2, 2)
    fast(x)
    assert len(calls) == 1                     # the spy sees the fused path when it runs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fused_ran(fast(x))
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _fused_ran(fast(x))
    with torch.no_grad():
        fast(x)
    assert fast(x[:0]).shape == (0, 12)
    assert not _fused_ran(fast.bfloat16()(x.bfloat16()))
    assert len(calls) == 2


def test_fused_step_keeps_less_memory():
    """Allocation count, not time: the fused step's peak is well under the op-by-op step's."""
    from mldecoder_fast.benchmark.timing import peak_memory_bytes
    torch.manual_seed(8)
    _, fast = make_pair(2000, 20, decoder_embedding=64, initial_num_features=48)
    fast.train()
    x = torch.randn(8, 48, 4, 4, requires_grad=True)

    def step():
        fast(x).sum().backward()
        fast.zero_grad(set_to_none=True)
        x.grad = None

    step()
    fused = peak_memory_bytes(step, "cpu")
    fast.fused_training = False
    step()
    ops = peak_memory_bytes(step, "cpu")
    assert fused < 0.8 * ops, f"fused step peak {fused / 1e6:.2f} MB vs op by op {ops / 1e6:.2f} MB"


def test_retain_graph_backward_twice():
    torch.manual_seed(9)
    _, fast = make_pair(20, 4, dtype=torch.float64)
    disable_dropout_(fast).train()
    x = torch.randn(2, 24, 2, 2, dtype=torch.float64, requires_grad=True)
    out = fast(x)
    assert _fused_ran(out)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    once = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    out.backward(g)
    for n, p in fast.named_parameters():
        if n in once:
            assert_close(f"twice {n}", 2 * once[n], p.grad, 1e-12)
    assert_close("twice input", 2 * gx, x.grad, 1e-12)
    with pytest.raises(RuntimeError, match="second time|already used"):
        out.backward(g)


def test_torch_func_transforms_use_the_op_path():
    """torch.func.grad over a training-mode head gives the same gradients as autograd."""
    from torch.func import functional_call, grad
    torch.manual_seed(10)
    _, fast = make_pair(12, 3, dtype=torch.float64)
    disable_dropout_(fast).train()
    x = torch.randn(2, 24, 2, 2, dtype=torch.float64)
    params = {k: v.detach() for k, v in fast.named_parameters() if v.requires_grad}
    grads = grad(lambda p: functional_call(fast, p, (x,)).square().sum())(params)
    out = fast(x)
    assert _fused_ran(out)
    out.square().sum().backward()
    for name, p in fast.named_parameters():
        if p.requires_grad:
            assert_close(f"torch.func grad of {name}", p.grad, grads[name], 1e-10)
