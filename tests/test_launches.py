"""Kernel launches per forward of the torch backend on CUDA, counted without a GPU.

The head runs on fake CUDA tensors under forced bf16 autocast, with bf16 features as a backbone
under autocast produces them (``mldecoder_fast.benchmark.launches``); every dispatched op that
launches device work counts one. bench/launch_counts.py prints the same count beside the
profiler's kernel count on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from mldecoder_fast import MLDecoderFast
from mldecoder_fast.benchmark.launches import (
    count_launches,
    describe,
    fake_cuda,
    run_backward,
    total_kernels,
)

# name -> (classes, K, C, H', W')
CONFIGS = {"coco": (80, 80, 2048, 14, 14), "imagenet21k": (21843, 100, 2048, 7, 7)}

# The eval forward, launch by launch (paths/lean_eval.py). A [B, C, H, W] map with B > 1 is B
# transposed matrices: its input projection is a batched GEMM, then relu(y + b_e) - b_e in place.
PROJECT_ONE_MATRIX = [("aten._addmm_activation", "input projection + bias + relu (cuBLASLt epilogue)")]
PROJECT_BATCHED = [("aten.bmm", "input projection, batched over B transposed [N, C] inputs"),
                   ("aten.clamp_", "max(y, -b_e) = relu(y + b_e) - b_e, in place")]
AFTER_MEMORY = [
    ("aten.bmm", "values vᵀ = W_v Mᵀ"),
    ("aten.bmm", "scores: key-folded queries qk Mᵀ"),
    ("aten._softmax", "softmax over the tokens"),
    ("aten.bmm", "attention output Oᵀ = vᵀ Aᵀ"),
    ("aten.baddbmm", "output projection onto T1 + b_o + W_o b_v"),
    ("aten.native_layer_norm", "LN2 (bias + linear2's bias)"),
    ("aten._addmm_activation", "linear1 + bias + relu (cuBLASLt epilogue)"),
    ("aten.addmm_", "linear2 onto T2 + b2, in place"),
    ("aten.native_layer_norm", "LN3"),
    ("aten.bmm", "group FC"),
    ("aten.add", "group-FC bias, into the fp32 [B, classes] logits"),
]
# The budget is 12 launches at B = 1 and 256. Met where the input is one [B*N, C] matrix
# (B = 1, channels_last). A [B, C, H, W] map with B > 1 takes 13: no single plain-PyTorch GEMM
# reads it untransposed with bias and relu in its epilogue (cuBLASLt's epilogue is exposed for
# 2-d products only), and no other pair of launches merges without a hidden copy (the scores
# and values share a GEMM only if the softmax reads a strided slice, which CUDA's softmax makes
# contiguous first; a (head, batch)-batched attention output cannot be laid out for one
# output-projection GEMM).
BUDGET = {"one matrix": 12, "batched": 13}


def _eval_launches(config: str, batch: int, channels_last: bool):
    classes, k, c, h, w = CONFIGS[config]
    with fake_cuda(torch.bfloat16):
        head = MLDecoderFast(classes, k, 768, c, backend="torch").eval()
        x = torch.randn(batch, c, h, w, dtype=torch.bfloat16)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            return count_launches(lambda: head(x))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_eval_forward_launch_budget(config, batch, channels_last):
    launches = _eval_launches(config, batch, channels_last)
    one_matrix = batch == 1 or channels_last
    expected = (PROJECT_ONE_MATRIX if one_matrix else PROJECT_BATCHED) + AFTER_MEMORY
    got = [x.name for x in launches]
    assert got == [op for op, _ in expected], (
        "eval forward launches changed:\n" + describe(launches) + "\nexpected:\n"
        + "\n".join(f"{op:<28} {what}" for op, what in expected))
    assert len(launches) <= BUDGET["one matrix" if one_matrix else "batched"]
    # No casts, no copies: every weight comes from the caches in bf16, the input is read as is.
    assert not any(x.name in ("aten._to_copy", "aten.clone", "aten.copy_") for x in launches)
    assert launches[-1].dtypes == (torch.float32,)  # logits in fp32, as the reference's


def test_eval_forward_casts_bf16_weights_once():
    """The first forward makes the bf16 copies, the next ones only read them; a parameter update
    makes them again once."""
    with fake_cuda(torch.bfloat16):
        head = MLDecoderFast(80, 80, 768, 2048, backend="torch").eval()
        x = torch.randn(2, 2048, 7, 7, dtype=torch.bfloat16)
        with torch.no_grad():
            first = count_launches(lambda: head(x), warmup=0)
            again = count_launches(lambda: head(x), warmup=0)
            head.decoder.layers[0].linear1.weight.mul_(2.0)
            updated = count_launches(lambda: head(x), warmup=0)
    casts = [x for x in first if x.name == "aten._to_copy"]
    assert len(casts) >= 8, describe(first)
    assert len(again) == 13
    assert len(updated) > len(again)


def test_counter_sees_autocast_casts_and_views_cost_nothing():
    """The counter can fail: an fp32 weight under bf16 autocast costs a cast per call (the
    region's cache is cleared between calls), and views are free."""
    with fake_cuda(torch.bfloat16):
        w = torch.nn.Parameter(torch.randn(16, 32))
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        launches = count_launches(lambda: torch.nn.functional.linear(x.t().t(), w).view(2, 32))
    assert [x.name for x in launches] == ["aten._to_copy", "aten.mm"]
    assert total_kernels(launches) == 2


def test_multi_kernel_ops_are_named():
    with fake_cuda(None):
        bias = torch.randn(8)
        a = torch.randn(3, 5, 4)
        b = torch.randn(3, 4, 8)
        launches = count_launches(lambda: (torch.baddbmm(bias, a, b), torch.addmm(bias, a[0], b[0]),
                                           torch.softmax(a.transpose(1, 2), -1)))
    assert [(x.name, x.kernels) for x in launches] == [
        ("aten.baddbmm", 2), ("aten.addmm", 1), ("aten._softmax", 2)]
    assert "copy" in launches[0].why and "contiguous" in launches[2].why


def test_run_backward_matches_autograd():
    """The node-by-node backward used on fake CUDA gives autograd's gradients (real CPU tensors:
    broadcast biases, a tensor used twice, a dtype cast, a frozen input)."""
    from heads import disable_dropout_, make_pair
    _, head = make_pair(33, 4, dtype=torch.float64)
    disable_dropout_(head)
    head.fused_training = False
    x = torch.randn(3, 24, 2, 3, dtype=torch.float64, requires_grad=True)
    out = head(x)
    g = torch.randn_like(out)
    leaves = run_backward(out, g)
    params = [p for p in head.parameters() if p.requires_grad]
    expected = torch.autograd.grad(head(x), [x] + params, g)
    assert set(leaves) == set([x] + params)
    for t, e in zip([x] + params, expected, strict=True):
        torch.testing.assert_close(leaves[t], e)


# A training step of the torch backend (ops/step/function.py, launch-lean kit), launch by launch:
# forward then backward, a [B, C, H, W] map that needs its gradient (as a backbone's features do).
TRAIN_FORWARD = [
    ("aten.bernoulli_", "every dropout mask of the step (q, o, f, r sites; p = 0.1) in one draw"),
    ("aten.copy_", "the [B, C, H, W] map as [B*N, C] rows (not for channels-last or B = 1)"),
    ("aten._addmm_activation", "memory M = relu(x W_eᵀ + b_e) (cuBLASLt epilogue)"),
    ("aten.addmm", "keys and values, one GEMM with bias epilogue"),
    ("aten.addcmul", "u1 = T0 + dropout(T0), per sample"),
    ("aten.native_layer_norm", "LN1 → T1 in bf16"),
    ("aten.addmm", "q = T1 W_qᵀ + b_q"),
    ("aten._scaled_dot_product_efficient_attention", "attention with its dropout (philox seed/offset kept)"),
    ("aten.addmm", "output projection + b_o"),
    ("aten.addcmul", "u2 = T1 + dropout(O')"),
    ("aten.native_layer_norm", "LN2 → T2 in bf16"),
    ("aten._addmm_activation", "linear1 + b1 + relu (cuBLASLt epilogue)"),
    ("aten.addcmul", "feed-forward dropout, in place"),
    ("aten.addmm", "linear2 + b2"),
    ("aten.addcmul", "u3 = T2 + dropout(f2)"),
    ("aten.native_layer_norm", "LN3 → T3 in bf16"),
    ("aten.bmm", "group FC"),
    ("aten.add", "group-FC bias into the fp32 logits"),
]
TRAIN_BACKWARD = [
    ("aten.bernoulli_", "the dropout masks redrawn from the forward's generator state"),
    ("aten._to_copy", "logit gradient to bf16 (21K, whose last group is padded: aten.cat of it and a "
     "zero tail into a bf16 [B, K*G], 2 kernels)"),
    ("aten.bmm", "group-FC input gradient, written as [B, K, D]"),
    ("aten.sum", "group-FC bias gradient"),
    ("aten.native_layer_norm_backward", "LN3 backward (2 kernels)"),
    ("aten.addcmul", "residual dropout's gradient, into the feed-forward gradient buffer"),
    ("aten.mm", "W2 gradient, fp32 out"),
    ("aten.mm", "gradient of the dropped hidden layer (dropout scale in a cached W2 copy)"),
    ("aten.threshold_backward", "relu + its dropout (zero exactly where the kept output is), into the "
     "same buffer"),
    ("aten.sum", "b2 and b1 gradients: one sum over that buffer"),
    ("aten.mm", "W1 gradient, fp32 out"),
    ("aten.addmm", "T2 gradient: linear1 path onto the residual's (2 kernels: addend copy, GEMM)"),
    ("aten.native_layer_norm_backward", "LN2 backward (2 kernels)"),
    ("aten.addcmul", "output dropout's gradient"),
    ("aten.mm", "W_o gradient, fp32 out"),
    ("aten.sum", "b_o gradient"),
    ("aten.mm", "attention output gradient"),
    ("aten._scaled_dot_product_efficient_attention_backward", "attention backward, its dropout mask "
     "regenerated (2 kernels)"),
    ("aten.cat", "key and value gradients side by side, into the projection gradient buffer"),
    ("aten.mm", "W_k, W_v gradient into in_proj_weight's gradient rows D:3D, fp32"),
    ("aten.mm", "memory gradient"),
    ("aten.threshold_backward", "memory relu, into the same buffer"),
    ("aten.sum", "b_k, b_v and b_e gradients: one sum over that buffer"),
    ("aten.mm", "W_q gradient into rows :D, fp32"),
    ("aten.sum", "b_q gradient"),
    ("aten.addmm", "T1 gradient: q path onto the residual's (2 kernels)"),
    ("aten.native_layer_norm_backward", "LN1 backward, parameters only (1 kernel)"),
    ("aten.mm", "W_e gradient, fp32 out"),
    ("aten.bmm", "input gradient written as [B, C, N] (the map's own layout; channels-last: one mm)"),
    ("aten.bmm", "group-FC weight gradient, fp32 out"),
    ("aten._foreach_copy_", "the six LayerNorm parameter gradients (bf16, as CUDA's LayerNorm takes "
     "bf16 weights with bf16 input) cast to fp32 rows of one tensor (one multi-tensor kernel)"),
]
# The launch-lean CUDA training step's budget: forward at most 20 dispatched ops (met: 18, 17 for a
# channels-last map) and forward + backward at most 45 (not met with plain PyTorch ops: 49 at COCO and 21K for a
# [B, C, H, W] map; one fewer channels-last). What stands above 45: four bias-gradient sums (no
# cuBLAS epilogue reduces a GEMM operand for torch; b2+b1 and b_k+b_v+b_e already share a sum each,
# b_q and the group-FC bias cannot join: other row counts, or written inside the attention op),
# the mask redraw and the two mask-apply passes of the backward (the issue forbids storing the
# masks), the bf16 cast of the logit gradient (with the zero padding at 21K), the key/value
# gradient concatenation (the memory-efficient attention backward never returns them packed
# unless there are as many queries as tokens), and the input-row copy of an NCHW map.
TRAIN_BUDGET = {"forward": 20, "step": 49}


def _training_launches(config: str, channels_last: bool):
    classes, k, c, h, w = CONFIGS[config]
    with fake_cuda(torch.bfloat16):
        head = MLDecoderFast(classes, k, 768, c, backend="torch").train()
        x = torch.randn(256, c, h, w, dtype=torch.bfloat16)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        g = torch.randn(256, classes)
        fwd = count_launches(lambda: head(x))
        grads = {}
        step = count_launches(lambda: grads.update(run_backward(head(x), g)))
        assert type(head(x).grad_fn).__name__ == "HeadTrainStepBackward"
    return head, x, fwd, step, grads


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_step_launch_budget(config, channels_last):
    """Training forward and forward + backward of the fused step on fake CUDA (bf16 autocast,
    B = 256), every launch named; the gradients reach the input and every trainable parameter
    in fp32, none through a cast of the parameters."""
    head, x, fwd, step, grads = _training_launches(config, channels_last)
    classes, k, *_ = CONFIGS[config]
    padded = classes % k != 0
    expected_fwd = [op for op, what in TRAIN_FORWARD if not (channels_last and op == "aten.copy_")]
    expected_bwd = [("aten.mm" if channels_last and what.startswith("input gradient") else
                     "aten.cat" if padded and what.startswith("logit gradient") else op)
                    for op, what in TRAIN_BACKWARD]
    got = [x.name for x in step]
    assert [x.name for x in fwd] == expected_fwd, "training forward launches changed:\n" + describe(fwd)
    assert got == expected_fwd + expected_bwd, "training step launches changed:\n" + describe(step)
    assert len(fwd) <= TRAIN_BUDGET["forward"]
    assert len(step) <= TRAIN_BUDGET["step"]
    params = {p for p in head.parameters() if p.requires_grad}
    assert set(grads) == params | {x}
    assert all(grads[p].dtype == torch.float32 for p in params)
    assert grads[x].dtype == torch.bfloat16 and grads[x].stride() == x.stride()
    print(f"\n{config} {'channels_last' if channels_last else 'nchw'} training B=256: forward "
          f"{len(fwd)} launches, forward+backward {len(step)} ({total_kernels(step)} kernels)")


def test_training_weights_cast_once_per_optimizer_step():
    """The bf16 weight copies are made by the first step and after a parameter update only (all of
    them at once: an optimizer step updates every parameter), then in the copies' own memory."""
    with fake_cuda(torch.bfloat16):
        head = MLDecoderFast(80, 80, 768, 2048, backend="torch").train()
        x = torch.randn(4, 2048, 7, 7, dtype=torch.bfloat16)
        first = count_launches(lambda: head(x), warmup=0)
        again = count_launches(lambda: head(x), warmup=0)
        with torch.no_grad():
            head.decoder.layers[0].linear1.weight.mul_(2.0)
        updated = count_launches(lambda: head(x), warmup=0)
    assert len(again) == len(TRAIN_FORWARD)
    assert not any(x.name == "aten._to_copy" for x in again)
    made = [x for x in first[:-len(again)] if x.name == "aten._to_copy"]
    refreshed = [x for x in updated[:-len(again)] if x.name in ("aten.copy_", "aten.mul")]
    assert len(made) >= 19 and not any(x.name == "aten._to_copy" for x in updated)
    # every cast is refreshed by a copy (W2's scaled copy by a mul with out=), and so is the
    # zero-padded group-FC bias (made by a pad)
    assert sorted([x.shapes[0] for x in made] + [(80,)]) == sorted(x.shapes[0] for x in refreshed)
    assert [x.name for x in updated[-len(again):]] == [x.name for x in again]


def test_launch_counts_script(tmp_path):
    """bench/launch_counts.py (the GPU check's stage) runs without a GPU and reports the fake
    counts of the rows it would compare with the profiler's."""
    import json

    from helpers import load_bench_script
    script = load_bench_script("launch_counts")
    out = tmp_path / "counts.json"
    assert script.main(["--device", "cpu", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    evals = {(r["batch"], r["layout"]): r["fake"] for r in rows if r["mode"] == "eval"}
    assert evals == {(1, "nchw"): 12, (1, "channels_last"): 12, (256, "nchw"): 13,
                     (256, "channels_last"): 12}
    assert {r["mode"] for r in rows} == {"eval", "train", "train+bwd"}
