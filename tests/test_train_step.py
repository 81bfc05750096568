"""The training step as one autograd function with a hand-written backward (ops/step/function.py), with
the CPU kit and with the launch-lean (CUDA) kit run on the CPU: gradients against the reference and
against finite differences (dropout on), masks (stored, regenerated), frozen parameters, the switch
back to the op-by-op path, and the memory it saves."""
from __future__ import annotations

import pytest
import torch
from heads import check_train_grads, disable_dropout_, make_input, make_pair
from helpers import assert_close

from mldecoder_fast import paths
from mldecoder_fast.head.config import DropoutRates
from mldecoder_fast.ops import cpu_gemm
from mldecoder_fast.ops.step import dropout_masks
from mldecoder_fast.ops.step.dropout_masks import keep_mask
from mldecoder_fast.ops.step.function import HeadTrainStep
from mldecoder_fast.ops.step.records import StepConfig, StepKit, StepParameters, derive_weights
from mldecoder_fast.paths import train_step
from mldecoder_fast.paths.train_step import step_parameters


def _fused_ran(out: torch.Tensor) -> bool:
    return type(out.grad_fn).__name__ == "HeadTrainStepBackward"


@pytest.mark.parametrize("classes,groups,kind,batch,layout", [
    (30, 4, "map", 3, "contiguous"),
    (101, 10, "map", 2, "channels_last"),   # padded tail (G = 11)
    (7, -1, "map", 1, "contiguous"),        # K = classes, B = 1
    (5, 9, "map", 2, "contiguous"),         # groups > classes
    (40, 8, "tokens", 2, "strided"),        # [B, N, C], non-contiguous
])
@pytest.mark.parametrize("backend,kit", [("torch", "cpu"), ("cpp", "cpu"),   # cpp: the extension's group FC
                                         ("torch", "lean")])   # the CUDA kit, run on the CPU
def test_fused_step_matches_reference(classes, groups, kind, batch, layout, backend, kit):
    torch.manual_seed(0)
    ref, fast = make_pair(classes, groups, dtype=torch.float64, backend=backend)
    _set_kit(fast, kit)
    x = make_input(kind, batch, 24, tokens=6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(batch, 12, 48, dtype=torch.float64)[:, ::2, ::2]
    disable_dropout_(fast).train()
    assert _fused_ran(fast(x.requires_grad_(False)))
    assert fast.active_backend == backend
    check_train_grads(ref, fast, x, 1e-10)


def _set_kit(head, kit):
    """"lean": the launch-lean kit (the CUDA step's) on the CPU."""
    if kit == "lean":
        head.lean_train_devices = ("cuda", "cpu")
    return head


@pytest.mark.parametrize("kit", ["cpu", "lean"])
def test_fused_step_zsl_matches_reference(kit):
    torch.manual_seed(1)
    ref, fast = make_pair(1, zsl=1, dtype=torch.float64)
    _set_kit(fast, kit)
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


@pytest.mark.parametrize("layout", ["map", "channels_last", "tokens"])
def test_lean_kit_fp32_matches_reference(layout):
    """fp32 (the dtype CUDA runs without autocast): the lean kit within fp32 rounding."""
    torch.manual_seed(14)
    ref, fast = make_pair(101, 10, decoder_embedding=64, initial_num_features=48)
    _set_kit(fast, "lean")
    x = make_input("tokens" if layout == "tokens" else "map", 3, 48, tokens=12)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    disable_dropout_(fast).train()
    assert _fused_ran(fast(x))
    check_train_grads(ref, fast, x, 2e-5)


def _grads(head, x, g, dtype, autocast):
    """Output, input gradient and every parameter gradient (in fp64) of one backward of
    sum(head(x) * g), x cast to ``dtype``, under bf16 autocast on x's device when asked."""
    xx = x.to(dtype).clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = head(xx)
    (out.double() * g).sum().backward()
    result = {"output": out.detach().double(), "input grad": xx.grad.double()}
    result.update({n: p.grad.double() for n, p in head.named_parameters() if p.grad is not None})
    head.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("kit, input_dtype", [("lean", torch.float32), ("cpu", torch.float32),
                                               ("cpu", torch.bfloat16)])
@pytest.mark.parametrize("zsl", [0, 1])
def test_bf16_autocast_within_reference_error(zsl, kit, input_dtype):
    """bf16 autocast over fp32 parameters, the input in fp32 or in bf16 (as a backbone under
    autocast gives it). Both kits: bf16 products and activations, LayerNorm on bf16 copies, fp32
    gradients. Output, input and parameter gradients are off the fp64 truth by at most ~2x what
    the reference itself is off under the same autocast and input."""
    from helpers import rel_rms
    torch.manual_seed(15)
    ref, fast = make_pair(5 if zsl else 203, 20, decoder_embedding=64, initial_num_features=48, zsl=zsl)
    _set_kit(fast, kit)
    ref64 = type(ref)(5 if zsl else 203, 20, 64, 48, zsl).double()
    ref64.load_state_dict(ref.state_dict())
    if zsl:
        ref64.set_word_vectors(ref.decoder.query_embed.double())
    for head in (ref, fast, ref64):
        disable_dropout_(head).train()
    x = torch.randn(4, 48, 3, 3)
    g = torch.randn(4, 7 if zsl else 203, dtype=torch.float64)
    exact, base, ours = _grads(ref64, x, g, torch.float64, False), _grads(ref, x, g, input_dtype, True), \
        _grads(fast, x, g, input_dtype, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _fused_ran(fast(x.to(input_dtype)))
    assert set(ours) == set(exact)
    for name, truth in exact.items():
        assert ours[name].dtype == truth.dtype
        # The CPU's bf16 LayerNorm backward sums dγ/dβ with low-precision partial sums (measured:
        # 7e-3 relative error on an 80-row sum of bf16 values, fp32 weights or not) where the
        # reference's fp32 LayerNorm does not; CUDA's accumulates in fp32 (test_cuda_lean_step_...).
        factor = 3 if ".norm" in name else 2
        assert_close(f"bf16 {name}", truth, ours[name], factor * rel_rms(truth, base[name]) + 1e-6)


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


CPU_KIT = StepKit(cpu_gemm.TORCH, torch.float64, "explicit", regenerate=False,
                  keep_ln_outputs=False, in_place_outputs=False, layer_norm="aten")
LEAN_KIT = StepKit(cpu_gemm.TORCH, torch.float64, "explicit", regenerate=True,
                   keep_ln_outputs=True, in_place_outputs=False, layer_norm="aten")


def _small_step_inputs(fast, per_sample_queries):
    """A [2, 5, 24] token input, T0 [4, D] and the head's parameters as leaves in the head's dtype,
    the feed-forward shrunk to 24 wide (the function takes any F)."""
    dtype = fast.decoder.embed_standart.weight.dtype
    tokens = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    t0 = torch.randn(4, fast.config.embed_dim, dtype=dtype, requires_grad=True)
    params = step_parameters(fast)
    params = StepParameters(*[p.detach().clone().requires_grad_(True) for p in params._replace(
        W1=params.W1[:24], b1=params.b1[:24], W2=params.W2[:, :24])])
    return tokens, t0, params


TRITON_STEP_KITS = {kind: StepKit(cpu_gemm.TORCH, torch.float32, kind, regenerate=True,
                                  keep_ln_outputs=True, in_place_outputs=False, layer_norm=ln)
                    for kind, ln in (("explicit", "aten"), ("triton", "triton"))}


def _triton_host_calls(monkeypatch):
    """Counts the calls of the Triton kernels' host functions that the triton kit uses; {} when
    the kernels cannot run here (the test then skips)."""
    from mldecoder_fast.ops import triton_support
    available, detail = triton_support.triton_status()
    if not available:
        pytest.skip(f"Triton kernels cannot run here: {detail}")
    from triton_helpers import count_kernel_calls
    return count_kernel_calls(monkeypatch, {"layer_norm": ["ln_forward", "ln_backward"],
                                            "attention": ["attention_forward", "attention_backward"]})


@pytest.mark.triton
@pytest.mark.parametrize("classes,groups,kind,batch", [
    (30, 4, "map", 3),
    (101, 10, "tokens", 2),    # padded tail (G = 11)
    (7, -1, "map", 1),         # K = classes, B = 1
])
def test_triton_kit_matches_reference(monkeypatch, classes, groups, kind, batch):
    """The triton backend's step (its CUDA kit, forced on the CPU: the kernels in the
    interpreter, fp32): fused, with the Triton attention and LayerNorm kernels, equal to the
    reference in output, input gradient and every parameter gradient."""
    calls = _triton_host_calls(monkeypatch)
    torch.manual_seed(17)
    ref, fast = make_pair(classes, groups, backend="triton")
    _set_kit(fast, "lean")
    x = make_input(kind, batch, 24, tokens=7)
    check_train_grads(ref, fast, x, 1e-4)
    assert fast.active_backend == "triton"
    assert calls == {"ln_forward": 3, "ln_backward": 3, "attention_forward": 1, "attention_backward": 1}
    assert _fused_ran(fast(x))


@pytest.mark.triton
@pytest.mark.parametrize("per_sample_queries", [True, False])
def test_triton_kit_with_dropout_equals_the_explicit_kit_on_its_masks(monkeypatch, per_sample_queries):
    """Dropout on at every site (fp32, the interpreter): the triton kit's step equals the lean
    kit's explicit step given the same masks (the step's own, fixed, and the attention kernel's,
    drawn by ``kernels._common.dropout_mask`` from the seed and offset it used), in the output and
    the gradients of every input."""
    calls = _triton_host_calls(monkeypatch)
    from mldecoder_fast.kernels._common import dropout_mask
    torch.manual_seed(18)
    gen = torch.Generator().manual_seed(19)
    fixed = {}

    def fixed_draw(self, generator):
        return {name: fixed.setdefault(name, torch.rand(shape, generator=gen) >= p)
                for name, shape, p in self.sites}

    monkeypatch.setattr(dropout_masks.RegeneratedMasks, "_draw", fixed_draw)
    _, fast = make_pair(23, 4)
    ps = (0.3 if per_sample_queries else 0.0, 0.25, 0.2, 0.35, 0.15)
    inputs = _small_step_inputs(fast, per_sample_queries)
    inputs = (inputs[0], inputs[1], *inputs[2])

    def run(kind):
        out = _step_fn(fast, TRITON_STEP_KITS[kind], ps)(*inputs)
        attn = out.grad_fn.acts["attn"]
        g = torch.autograd.grad(out, inputs, torch.ones_like(out))
        return out, g, attn

    out_t, grads_t, (_, _, seed, offset) = run("triton")
    assert set(fixed) == ({"q", "o", "f", "r"} if per_sample_queries else {"o", "f", "r"})
    (B, N, _), K = inputs[0].shape, inputs[1].shape[0]
    fixed["a"] = dropout_mask(seed, B * 8 * K, N, ps[1], offset).view(B, 8, K, N)
    assert 0 < fixed["a"].sum() < fixed["a"].numel()
    out_e, grads_e, _ = run("explicit")
    assert calls == {"ln_forward": 3, "ln_backward": 3, "attention_forward": 1, "attention_backward": 1}
    assert_close("dropout output", out_e, out_t, 1e-5)
    for i, (ge, gt) in enumerate(zip(grads_e, grads_t, strict=True)):
        assert_close(f"dropout grad of input {i}", ge, gt, 1e-5)


def _step_fn(fast, kit, ps, ext=False, seed=None):
    """HeadTrainStep as a function of (tokens, t0, *params); the weights derived on every call (so
    that finite differences see the perturbed parameters); ``seed``: reseeded before each call."""
    layer = fast.decoder.layers[0]
    eps = (layer.norm1.eps, layer.norm2.eps, layer.norm3.eps)
    if ext:   # the extension's ops are registered when it is loaded (the head does it on use)
        from mldecoder_fast.ops.group_fc_extension import extension_status
        assert extension_status()[0], extension_status()[1]

    def fn(tokens, t0, *params):
        if seed is not None:
            torch.manual_seed(seed)
        rates = DropoutRates(*ps)
        config = StepConfig(num_heads=8, eps=eps, dropout=rates, num_out=23, zsl=False, extension_group_fc=ext,
                            kit=kit, weights=derive_weights(params, None, kit, rates.feed_forward, False))
        return HeadTrainStep.apply(config, tokens, t0, *params)
    return fn


@pytest.mark.parametrize("per_sample_queries,ext,p_res", [(True, False, 0.15), (False, False, 0.15),
                                                         (True, True, 0.15), (True, False, 0.0)])
def test_backward_is_the_derivative_with_dropout_on(monkeypatch, per_sample_queries, ext, p_res):
    """Finite differences (fp64, fixed stored masks) of the whole function, every input at once
    (also without the residual dropout, whose gradient the feed-forward's then shares)."""
    torch.manual_seed(4)
    gen = torch.Generator().manual_seed(5)
    fixed = {}

    def fixed_mask(shape, p, device, dtype=torch.bool):
        key = (tuple(shape), p)
        if key not in fixed:
            fixed[key] = torch.rand(shape, generator=gen) >= p
        return fixed[key].to(dtype)

    monkeypatch.setattr(dropout_masks, "keep_mask", fixed_mask)
    _, fast = make_pair(23, 4, decoder_embedding=16, dtype=torch.float64)
    ps = (0.3 if per_sample_queries else 0.0, 0.25, 0.2, 0.35, p_res)
    inputs = _small_step_inputs(fast, per_sample_queries)
    fn = _step_fn(fast, CPU_KIT, ps, ext)
    assert torch.autograd.gradcheck(fn, (inputs[0], inputs[1], *inputs[2]), fast_mode=True, atol=1e-6, rtol=1e-5)
    assert len(fixed) == sum(p > 0 for p in ps)


@pytest.mark.parametrize("in_place_outputs", [False, True], ids=["products", "in_place_outputs"])
@pytest.mark.parametrize("per_sample_queries", [True, False])
def test_lean_kit_backward_is_the_derivative_with_regenerated_masks(per_sample_queries, in_place_outputs):
    """The launch-lean kit (masks redrawn in the backward from the forward's generator state, LN
    outputs kept): finite differences, dropout on at every site, the seed fixed per call. With
    ``in_place_outputs`` as on CUDA: gradients written by the products into shared buffers, and the
    bias gradients b2+b1 and b_k+b_v+b_e each one sum over one buffer."""
    torch.manual_seed(4)
    _, fast = make_pair(23, 4, decoder_embedding=16, dtype=torch.float64)
    ps = (0.3 if per_sample_queries else 0.0, 0.25, 0.2, 0.35, 0.15)
    tokens, t0, params = _small_step_inputs(fast, per_sample_queries)
    kit = LEAN_KIT._replace(in_place_outputs=in_place_outputs)
    fn = _step_fn(fast, kit, ps, seed=11)
    assert torch.autograd.gradcheck(fn, (tokens, t0, *params), fast_mode=True, atol=1e-6, rtol=1e-5)
    # the masks do act: another seed gives other logits
    assert not torch.allclose(fn(tokens, t0, *params), _step_fn(fast, kit, ps, seed=12)(tokens, t0, *params))


def test_regenerated_masks_equal_the_forward_ones(monkeypatch):
    """The backward's masks are redrawn, identical to the forward's, for every site; nothing
    mask-sized is kept on the autograd context between the two."""
    draws = []
    draw = dropout_masks.RegeneratedMasks._draw

    def spy(self, generator):
        masks = draw(self, generator)
        draws.append({k: v.clone() for k, v in masks.items()})
        return masks

    monkeypatch.setattr(dropout_masks.RegeneratedMasks, "_draw", spy)
    torch.manual_seed(13)
    _, fast = make_pair(23, 4, decoder_embedding=16, dtype=torch.float64)
    tokens, t0, params = _small_step_inputs(fast, True)
    out = _step_fn(fast, LEAN_KIT, (0.3, 0.25, 0.2, 0.35, 0.15))(tokens, t0, *params)
    assert len(draws) == 1 and set(draws[0]) == {"q", "a", "o", "f", "r"}
    assert out.grad_fn.draw.masks is None                 # released after the forward
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    out.backward(g)                                       # a retained graph redraws them again
    assert len(draws) == 3
    for again in draws[1:]:
        for name, mask in draws[0].items():
            assert torch.equal(mask, again[name]), name
    rate = torch.cat([m.flatten() for m in draws[0].values()]).double().mean().item()
    assert 0.6 < rate < 0.9


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_rate_and_reproducibility(p):
    torch.manual_seed(6)
    m = ~keep_mask((1000, 1001), p, "cpu")
    assert m.dtype == torch.bool and m.shape == (1000, 1001)
    n = m.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(m.float().mean().item() - p) < 5 * sigma
    # the four 16-bit lanes of each random word are used, and all are unbiased
    lanes = m.view(-1)[: n - n % 4].view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max().item() < 5 * sigma * 2
    torch.manual_seed(6)
    assert torch.equal(m, ~keep_mask((1000, 1001), p, "cpu"))
    assert not torch.equal(m, ~keep_mask((1000, 1001), p, "cpu"))


@pytest.mark.parametrize("p", [2 ** -17, 3 * 2 ** -18, 0.1])
def test_keep_mask_resolves_ties_below_a_lane_step(p):
    """p off the 16-bit lanes' grid: the lane equal to floor(p * 2**16) is decided by more bits,
    so the rate is p, not p rounded to a multiple of 2**-16 (2**-17: 0 or 2**-16 without that)."""
    torch.manual_seed(8)
    n = 1 << 24
    dropped = (~keep_mask((n,), p, "cpu")).sum().item()
    assert abs(dropped - p * n) < 5 * (p * (1 - p) * n) ** 0.5


@pytest.mark.parametrize("p", [0.1, 0.5, 2 ** -4])   # with and without the tie-resolving draw
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_keep_mask_in_a_compute_dtype_is_the_bool_mask(p, dtype):
    """A mask drawn in a compute dtype is the bool mask of the same generator state as 0/1."""
    torch.manual_seed(9)
    as_bool = keep_mask((333, 77), p, "cpu")
    torch.manual_seed(9)
    as_dtype = keep_mask((333, 77), p, "cpu", dtype)
    assert as_dtype.dtype == dtype and as_dtype.shape == (333, 77)
    assert torch.equal(as_dtype, as_bool.to(dtype))
    assert 0 < as_bool.sum() < as_bool.numel()


def test_cpu_bf16_step_with_masks_in_bf16_equals_bool_masks(monkeypatch):
    """The CPU kit under bf16 autocast keeps its dropout masks in bf16; with dropout on at every
    site the step is bit for bit the one with bool masks drawn from the same seed."""
    torch.manual_seed(22)
    _, fast = make_pair(43, 8)
    fast.train()
    x = torch.randn(3, 24, 3, 3)
    kit_of = train_step._kit

    def run(mask_dtype):
        monkeypatch.setattr(train_step, "_kit", lambda *a: kit_of(*a)._replace(mask_dtype=mask_dtype))
        fast.zero_grad(set_to_none=True)
        torch.manual_seed(23)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(x)
        assert _fused_ran(out)
        assert {m.dtype for m in out.grad_fn.draw.masks.values()} == {mask_dtype}   # stored so
        out.float().square().sum().backward()
        return out, {n: p.grad for n, p in fast.named_parameters() if p.grad is not None}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        facts = paths.facts_of(fast, x)
    assert paths.choose(fast, x, facts) is paths.CPU_STEP
    assert paths.CPU_STEP.derive(fast, x, facts).kit.mask_dtype == torch.bfloat16
    out_b, grads_b = run(torch.bfloat16)
    out_m, grads_m = run(torch.bool)
    assert torch.equal(out_b, out_m)
    for name, g in grads_b.items():
        assert torch.equal(g, grads_m[name]), name


def test_keep_mask_edges():
    assert not keep_mask((3, 4), 1.0, "cpu").any()
    assert keep_mask((0, 4), 0.5, "cpu").shape == (0, 4)
    assert keep_mask((10000,), 1e-12, "cpu").all()


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
    """Allocation count, not time: the fused step's peak, with what the head keeps between steps,
    is well under the op-by-op step's."""
    from mldecoder_fast.benchmark.cases import held_bytes
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
    fused = peak_memory_bytes(step, "cpu") + held_bytes(fast)
    fast.fused_training = False
    fast.clear_caches()
    step()
    ops = peak_memory_bytes(step, "cpu") + held_bytes(fast)
    # (0.57 measured: nothing held, the ReLU backward in place)
    assert fused < 0.7 * ops, f"fused step peak {fused / 1e6:.2f} MB vs op by op {ops / 1e6:.2f} MB"


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["map", "channels_last"])
def test_cuda_lean_step_bf16_autocast_within_reference_error(layout):
    """On CUDA (the lean kit is the default there): the fused step is the one that runs, and under
    bf16 autocast every output and gradient is within 2x the reference's own error vs fp64."""
    from helpers import rel_rms
    torch.manual_seed(16)
    ref, fast = make_pair(203, 20, decoder_embedding=64, initial_num_features=48, device="cuda")
    ref64 = type(ref)(203, 20, 64, 48).double().cuda()
    ref64.load_state_dict(ref.state_dict())
    for head in (ref, fast, ref64):
        disable_dropout_(head).train()
    x = torch.randn(4, 48, 3, 3, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 203, dtype=torch.float64, device="cuda")
    exact, base, ours = _grads(ref64, x, g, torch.float64, False), _grads(ref, x, g, torch.float32, True), \
        _grads(fast, x, g, torch.float32, True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _fused_ran(fast(x))
    for name, truth in exact.items():
        assert_close(f"cuda bf16 {name}", truth, ours[name], 2 * rel_rms(truth, base[name]) + 1e-6)
