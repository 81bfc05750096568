"""The training step never calls CUDA's memory-efficient attention kernel outside its domain.

The fused step calls ``aten._scaled_dot_product_efficient_attention`` directly (its backward takes
the philox seed the forward returns), which bypasses SDPA's own checks. Those checks, written here
from PyTorch's ``sdp_utils.cpp`` (``can_use_mem_efficient_attention``), not from the head's code:

- the kernel is enabled (``torch.backends.cuda.enable_mem_efficient_sdp``);
- the inputs are fp32, fp16 or bf16;
- the head dim (query and value last dims) is a positive multiple of the minimum GEMM alignment,
  ``minimum_gemm_alignment``: with tensor cores (always in 16-bit; fp32 from sm80) 128 bits of the
  dtype, 8 elements in fp16/bf16 and 4 in fp32 (sm80 and newer, which the fake device stands for);
- the last dim of query, key and value has stride 1.

Walked on fake CUDA tensors (no GPU needed) over head dims from embeddings {40, 64, 200, 768}
(8 heads: 5, 8, 25, 96), fp16 / bf16 autocast and fp32, ZSL on and off: every call of the kernel
the step makes satisfies the table, and a step whose attention the kernel cannot take still runs
(its explicit attention).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mldecoder_fast import MLDecoderFast
from mldecoder_fast.benchmark.launches import fake_cuda, run_backward

EFFICIENT = {torch.ops.aten._scaled_dot_product_efficient_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention_backward.default}
ALIGNMENT = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in EFFICIENT:
            self.calls.append((func, args))
        return func(*args, **(kwargs or {}))


def _outside_domain(func, args, enabled: bool) -> list[str]:
    """What of the kernel's domain one call violates (empty: none)."""
    q, k, v = (args[1], args[2], args[3]) if "backward" in str(func) else args[:3]
    problems = [] if enabled else ["called while torch.backends.cuda.enable_mem_efficient_sdp(False)"]
    if q.dtype not in ALIGNMENT:
        return problems + [f"dtype {q.dtype}"]
    align = ALIGNMENT[q.dtype]
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.shape[-1] <= 0 or t.shape[-1] % align:
            problems.append(f"{name} head dim {t.shape[-1]} not a multiple of {align} in {q.dtype}")
        if t.stride(-1) != 1:
            problems.append(f"{name} last-dim stride {t.stride(-1)}")
    return problems


@pytest.mark.parametrize("enabled", [True, False], ids=["efficient_on", "efficient_off"])
@pytest.mark.parametrize("zsl", [0, 1])
@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16, None], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("embedding", [40, 64, 200, 768])
def test_training_step_attention_stays_in_the_kernel_domain(embedding, autocast, zsl, enabled):
    was = torch.backends.cuda.mem_efficient_sdp_enabled()
    torch.backends.cuda.enable_mem_efficient_sdp(enabled)
    try:
        with fake_cuda(autocast):
            head = MLDecoderFast(1 if zsl else 30, -1 if zsl else 6, embedding, 32, zsl=zsl).train()
            if zsl:
                head.set_word_vectors(torch.randn(5, 300))
            x = torch.randn(4, 32, 3, 3, requires_grad=True)
            with _Calls() as seen:
                out = head(x)
                grads = run_backward(out.float().sum())
    finally:
        torch.backends.cuda.enable_mem_efficient_sdp(was)
    assert type(out.grad_fn).__name__ == "HeadTrainStepBackward", "the fused training step ran"
    assert x in grads
    problems = [p for func, args in seen.calls for p in _outside_domain(func, args, enabled)]
    assert not problems, f"embedding {embedding} ({autocast}): " + "; ".join(problems)
    hd = embedding // 8
    dtype = autocast or torch.float32
    if enabled and hd % ALIGNMENT[dtype] == 0:   # inside the domain the kernel is used
        assert len(seen.calls) == 2, [str(f) for f, _ in seen.calls]
