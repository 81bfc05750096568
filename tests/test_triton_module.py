"""MLDecoderFast(backend="triton") end to end against the reference MLDecoder on identical weights.

Interpreted on the CPU (tiny heads) when there is no GPU; on a GPU the same tests run the compiled
kernels, plus a bf16-autocast training step at a full standard size (docs/design.md, Configurations).
"""
from __future__ import annotations

import pytest
import torch
from heads import check_train_grads, disable_dropout_, make_input, make_pair
from helpers import assert_close, rel_rms

from mldecoder_fast.head.backends import select_ops
from mldecoder_fast.ops import triton_support as S

AVAILABLE, DETAIL = S.triton_status()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"Triton kernels cannot run here: {DETAIL}")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = 1e-4 if DEV == "cpu" else 2e-3   # GPU: TF32 may be on in the reference's matmuls


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the kernels' host functions (reached through the custom ops, or
    directly in eager no-grad mode), to prove the kernels, not a fallback, ran."""
    from triton_helpers import count_kernel_calls
    return count_kernel_calls(monkeypatch, {
        "layer_norm": ["ln_forward"], "attention": ["attention_forward", "folded_attention_forward"],
        "group_fc_decode": ["decode_forward"]})


# (classes, groups, decoder_embedding): K = 10 uses the kv attention kernel; K = 3 < (D + K) / 8
# makes the head fold W_k into its shared queries (the folded kernel).
CASES = [(101, 10, 32), (9, 3, 64)]


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", "cpp"] + (["cuda"] if DEV == "cuda" else []))
def test_low_precision_eval_reads_the_cached_group_fc_weight(backend, monkeypatch):
    """Eval under autocast hands the decode the group-FC weight cast once per version (the same
    tensor every call), whatever the backend, not the fp32 parameter (cast again per call); the
    logits stay within the reference's low-precision error. fp16: the dtype Triton's CPU
    interpreter runs (a GPU runs bf16 the same way)."""
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    ref, fast = make_pair(101, 10, 32, 24, backend=backend, device=DEV)
    ref64, _ = make_pair(101, 10, 32, 24, device=DEV)
    ref64.load_state_dict(ref.state_dict())
    ref64.double()
    for m in (ref, fast, ref64):
        m.eval()
    weights = []
    ops = select_ops(fast.backend, torch.device(DEV))[1]
    decode = type(ops).decode

    def spy(self, residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes):
        weights.append(weight)
        return decode(self, residual, x, p, ln_weight, ln_bias, eps, weight, bias, num_classes)
    monkeypatch.setattr(type(ops), "decode", spy)
    x = make_input("map", 3, 24, tokens=20, device=DEV)
    with torch.no_grad():
        exact = ref64(x.double())
        with torch.autocast(DEV, dtype=dtype):
            out_ref = ref(x)
            outs = [fast(x), fast(x)]
    assert len(weights) == 2 and weights[0] is weights[1] and weights[0].dtype == dtype
    for out in outs:
        assert out.dtype == out_ref.dtype
        assert_close(f"{backend} autocast eval", exact, out, 2 * rel_rms(exact, out_ref) + 1e-6)


@pytest.mark.parametrize("classes,groups,dim", CASES)
def test_eval_matches_reference(classes, groups, dim, kernel_calls):
    ref, fast = make_pair(classes, groups, dim, 24, backend="triton", device=DEV)
    ref.eval(), fast.eval()
    x = make_input("map", 3, 24, tokens=20, device=DEV)
    with torch.no_grad():
        assert_close("eval logits", ref(x), fast(x), RATIO)
    assert fast.active_backend == "triton"
    assert kernel_calls.get("decode_forward") == 1
    assert kernel_calls.get("ln_forward") == 1                 # LN2 (LN1 is in the head's cached queries)
    folded = groups * 8 < dim + groups
    assert kernel_calls.get("folded_attention_forward" if folded else "attention_forward") == 1


@pytest.mark.parametrize("classes,groups,dim", CASES)
def test_train_grads_match_reference(classes, groups, dim):
    """Training mode with dropout off: logits, input gradient and every parameter gradient."""
    ref, fast = make_pair(classes, groups, dim, 24, backend="triton", device=DEV)
    x = make_input("tokens", 2, 24, tokens=19, device=DEV)
    check_train_grads(ref, fast, x, RATIO)


@pytest.mark.parametrize("fused", [False, True], ids=["op_by_op", "fused_step"])
def test_train_with_dropout(kernel_calls, fused):
    """Dropout on (p = 0.1 everywhere): every fused op takes its dropout path; gradients flow to
    every parameter, the step is reproducible under torch.manual_seed and differs across seeds.
    Op by op (TritonOps) and as the one fused training step (ops/step/function.py with the Triton
    LayerNorm and attention kernels; what CUDA runs, forced here on any device)."""
    _ref, fast = make_pair(50, 10, 32, 24, backend="triton", device=DEV)
    fast.train()
    fast.fused_training = fused
    if fused:
        fast.lean_train_devices = ("cuda", "cpu")
    x = make_input("map", 2, 24, tokens=16, device=DEV)

    def step(seed):
        fast.zero_grad()
        torch.manual_seed(seed)
        out = fast(x)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in fast.named_parameters() if p.requires_grad}

    out1, g1 = step(1)
    out2, g2 = step(1)
    out3, _ = step(2)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert not torch.equal(out1, out3)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g1.values())
    # three steps: op by op LN1 and LN2 each (LN3 is in the decode kernel); the fused step runs
    # all three LayerNorms on the LayerNorm kernel and the group FC in torch
    assert kernel_calls.get("ln_forward") == (9 if fused else 6)
    assert kernel_calls.get("attention_forward") == 3
    assert kernel_calls.get("decode_forward", 0) == (0 if fused else 3)


def test_zsl_eval_matches_reference():
    v = torch.randn(6, 300, device=DEV)
    ref, fast = make_pair(6, -1, 32, 24, zsl=1, backend="triton", device=DEV, word_vectors=v)
    ref.eval(), fast.eval()
    x = make_input("map", 2, 24, tokens=9, device=DEV)
    with torch.no_grad():
        assert_close("zsl eval logits", ref(x), fast(x), RATIO)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (full size, bf16)")
@pytest.mark.parametrize("classes,groups,c,n", [(21843, 100, 2048, 49), (80, 80, 2048, 196)])
def test_full_size_bf16_autocast_cuda(classes, groups, c, n):
    """A standard-size bf16-autocast training step and eval: close to the fp32 reference, as close as
    the torch backend under the same autocast."""
    from helpers import rel_rms
    ref, fast = make_pair(classes, groups, 768, c, backend="triton", device=DEV)
    _r2, fast_torch = make_pair(classes, groups, 768, c, backend="torch", device=DEV)
    fast_torch.load_state_dict(ref.state_dict())
    x = make_input("map", 16, c, tokens=n, device=DEV)
    for head in (ref, fast, fast_torch):
        head.eval()
    with torch.no_grad():
        want = ref(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, base = fast(x), fast_torch(x)
    err, base_err = rel_rms(want, got.float()), rel_rms(want, base.float())
    assert err <= 2 * base_err + 2e-3, f"eval bf16: {err:.2e} vs torch backend {base_err:.2e}"
    for head in (ref, fast, fast_torch):
        head.train(), disable_dropout_(head)
    g = torch.randn_like(want)
    (ref(x) * g).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        (fast(x).float() * g).sum().backward()
        (fast_torch(x).float() * g).sum().backward()
    pf, pt = dict(fast.named_parameters()), dict(fast_torch.named_parameters())
    for name, p in ref.named_parameters():
        if p.requires_grad:
            err, base_err = rel_rms(p.grad, pf[name].grad), rel_rms(p.grad, pt[name].grad)
            assert err <= 2 * base_err + 5e-3, f"{name}: bf16 grad {err:.2e} vs torch backend {base_err:.2e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
def test_eval_cuda_graph_capture():
    """The small-batch eval forward (bf16 autocast) captures into a CUDA graph and replays on new
    inputs with the eager result (no host synchronisation or allocation inside the kernels' ops)."""
    _ref, fast = make_pair(1000, 100, 768, 2048, backend="triton", device=DEV)
    fast.eval()
    static_x = make_input("map", 1, 2048, tokens=49, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.cuda.stream(side):
            for _ in range(3):          # warm-up: autotuning, compilation, the head's caches
                fast(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fast(static_x)
        for _ in range(2):
            new = torch.randn_like(static_x)
            static_x.copy_(new)
            graph.replay()
            assert_close("graph replay", fast(new).float(), static_out.float(), 1e-3)
