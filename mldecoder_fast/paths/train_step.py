"""The hand-written training step as paths: one autograd function (``ops/step/function.py``) run with
the kit of the device it is on (``ops.step.records.StepKit``: how each kind of work runs).

- ``CPU_STEP``: the GEMM provider's products (oneDNN or MKL), stored dropout masks (bool, or bf16
  under bf16 autocast), LayerNorm outputs recomputed in the backward: little memory;
- ``CUDA_STEP`` (on ``head.lean_train_devices``): cuBLAS products writing fp32 gradients
  themselves, one memory-efficient attention op where its kernel takes the heads (else the
  explicit products), masks redrawn in the backward except under CUDA graph capture: few launches;
- ``TRITON_STEP``: ``CUDA_STEP`` with the triton backend's attention and LayerNorm kernels.

Each takes training forwards with grad mode on, ``fused_training`` set, a non-empty batch, nothing
traced (torch.compile and torch.func run op by op), one floating dtype for all parameters (fp32
or fp64), and the input in the parameters' dtype; under autocast, fp32 parameters with bf16 (the
CPU) or bf16/fp16 (CUDA) products. The cpp backend's steps use the extension's group FC.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from ..head.backends import ops_for
from ..head.config import NUM_HEADS, DropoutRates
from ..head.inputs import tokens_from_input
from ..ops import cpu_gemm
from ..ops.step.attention import efficient_attention_takes
from ..ops.step.function import HeadTrainStep
from ..ops.step.records import StepConfig, StepKit, StepParameters, derive_weights
from . import queries


def step_parameters(head) -> StepParameters:
    dec = head.decoder
    layer = dec.layers[0]
    attn = layer.multihead_attn
    return StepParameters(
        dec.embed_standart.weight, dec.embed_standart.bias, layer.norm1.weight, layer.norm1.bias,
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
        layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
        layer.linear2.weight, layer.linear2.bias, layer.norm3.weight, layer.norm3.bias,
        dec.duplicate_pooling, dec.duplicate_pooling_bias)


class StepPlan(NamedTuple):
    """What one step runs with."""
    kit: StepKit
    params: StepParameters
    extension_group_fc: bool    # the compiled extension's group-FC ops instead of bmm
    dropout: DropoutRates       # the facts' rates


class TrainStep:
    """A path object (``paths/__init__.py``): the step with one device's kit."""

    def __init__(self, name: str, backends: tuple, lean: bool, triton: bool):
        self.name = name
        self.backends = backends
        self.lean = lean        # the launch-lean kit (on head.lean_train_devices) or the CPU's
        self.triton = triton    # the triton backend's attention and LayerNorm kernels

    def applies(self, head, x, facts) -> bool:
        if not (facts.backend in self.backends and facts.training and facts.grad_mode
                and facts.fused_training and not facts.empty and not facts.traced
                and facts.device in ("cpu", "cuda") and facts.lean_train_device == self.lean):
            return False
        dtype = facts.param_dtype
        if dtype not in (torch.float32, torch.float64) or facts.mixed_dtypes:
            return False
        if facts.autocast is None:
            dtypes_ok = facts.input_dtype == dtype
        else:
            # low-precision products from fp32 parameters (the input in fp32, or in the autocast
            # dtype as a backbone under autocast gives it): bf16 on the CPU's kit, bf16/fp16 lean
            low = (torch.bfloat16, torch.float16) if self.lean else (torch.bfloat16,)
            dtypes_ok = (facts.autocast in low and dtype == torch.float32
                         and facts.input_dtype in (dtype, facts.autocast))
        if not dtypes_ok:
            return False
        if self.triton:   # the kernels' domain: head dim, device and dtypes
            ops = ops_for(facts.backend)
            return head.config.embed_dim // NUM_HEADS <= 256 and ops._takes(x, dtypes=(facts.compute,))
        return True

    def derive(self, head, x, facts) -> StepPlan:
        capturing = facts.device == "cuda" and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        gemm = cpu_gemm.TORCH if self.lean else cpu_gemm.provider(facts.compute, x.device)
        kit = _kit(self.lean, self.triton, gemm, facts.device, facts.compute, facts.dropout.attention == 0,
                   head.config.embed_dim // NUM_HEADS, facts.mem_efficient_sdp, capturing)
        return StepPlan(kit, step_parameters(head), facts.backend == "cpp" and not head.config.zsl, facts.dropout)

    def forward(self, head, x, plan: StepPlan) -> torch.Tensor:
        layer = head.decoder.layers[0]
        kit, params = plan.kit, plan.params
        t0 = queries.base_queries(head)
        zsl = head.config.zsl
        rates = plan.dropout
        # the weights as the step reads them, made once per parameter version (an optimizer step)
        fixed_t0 = None if zsl else t0
        sources = list(params) + ([] if zsl else [t0])
        weights = head.caches.get(
            ("train_step", kit.compute, rates.feed_forward), sources,
            lambda: derive_weights(params, fixed_t0, kit, rates.feed_forward, zsl),
            lambda stale: derive_weights(params, fixed_t0, kit, rates.feed_forward, zsl, into=stale))
        config = StepConfig(num_heads=NUM_HEADS, eps=(layer.norm1.eps, layer.norm2.eps, layer.norm3.eps),
                            dropout=rates, num_out=t0.shape[0] if zsl else head.config.num_classes,
                            zsl=zsl, extension_group_fc=plan.extension_group_fc, kit=kit, weights=weights)
        return HeadTrainStep.apply(config, tokens_from_input(x), t0, *params)


@functools.cache
def _kit(lean: bool, triton: bool, gemm, device: str, compute: torch.dtype, no_attention_dropout: bool,
         head_dim: int, mem_efficient_sdp: bool, capturing: bool):
    """How the step runs here (activations in the compute dtype), one object per distinct
    argument list (``mem_efficient_sdp``: the setting ``efficient_attention_takes`` reads, a key
    here): the CPU kit (GEMM provider ``gemm``,
    stored masks, LayerNorm outputs recomputed), or the launch-lean one (cuBLAS/torch products, one
    fused attention op (``triton``: the Triton attention and LayerNorm kernels), masks regenerated
    in the backward except under CUDA graph capture, products writing fp32 gradients themselves on
    CUDA)."""
    if not lean:
        # masks in a 16-bit compute dtype (no cast per use), bool for fp32 (a quarter of the bytes)
        masks = compute if compute.itemsize == 2 else torch.bool
        return StepKit(gemm, compute, "explicit", regenerate=False,
                       keep_ln_outputs=False, in_place_outputs=False, layer_norm="aten", mask_dtype=masks)
    cuda = device == "cuda"
    # CUDA's memory-efficient attention within its domain; the CPU's flash kernel has no dropout
    fused = efficient_attention_takes(compute, head_dim) if cuda else no_attention_dropout
    attention = "triton" if triton else ("fused" if fused else "explicit")
    return StepKit(gemm, compute, attention, regenerate=not capturing,
                   keep_ln_outputs=True, in_place_outputs=cuda, layer_norm="triton" if triton else "aten")


CPU_STEP = TrainStep("CPU step", ("torch", "cpp"), lean=False, triton=False)
CUDA_STEP = TrainStep("CUDA step", ("torch", "cpp"), lean=True, triton=False)
TRITON_STEP = TrainStep("Triton step", ("triton",), lean=True, triton=True)
