"""What the training step (``step.function.HeadTrainStep``) runs with: its kit (how each kind of work
runs on a device), the head's parameters in the step's order, the weights it reads (compute-dtype
copies made once per parameter version by ``derive_weights``) and its configuration."""
from __future__ import annotations

from typing import NamedTuple

import torch

from ...head.config import DropoutRates
from ..torch_ops import padded_group_bias
from .dropout_masks import dropout_scale


class StepKit(NamedTuple):
    """How a training step runs (see the module docstring)."""
    gemm: object
    compute: torch.dtype
    attention: str            # "explicit" | "fused" | "triton"
    regenerate: bool
    keep_ln_outputs: bool
    in_place_outputs: bool
    layer_norm: str           # "aten" | "triton"
    mask_dtype: torch.dtype = torch.bool


class StepParameters(NamedTuple):
    """The head's parameters in the order the step takes them (inputs for their gradients), or
    anything per parameter in that order (whether it needs a gradient, the gradient)."""
    We: object       # decoder.embed_standart.weight
    be: object
    ln1w: object     # decoder.layers.0.norm1
    ln1b: object
    Win: object      # decoder.layers.0.multihead_attn.in_proj_weight (q, k, v rows)
    bin: object
    Wo: object       # multihead_attn.out_proj
    bo: object
    ln2w: object     # norm2
    ln2b: object
    W1: object       # linear1
    b1: object
    W2: object       # linear2
    b2: object
    ln3w: object     # norm3
    ln3b: object
    Wg: object       # decoder.duplicate_pooling
    bg: object       # decoder.duplicate_pooling_bias


class StepWeights(NamedTuple):
    """What the step reads instead of the parameters: compute-dtype copies (or the parameters
    themselves where they have that dtype), made once per parameter version by ``derive_weights``."""
    We: torch.Tensor
    be: torch.Tensor
    t0: torch.Tensor | None   # the learned queries in the compute dtype (None: ZSL)
    ln1w: torch.Tensor
    ln1b: torch.Tensor
    Wq: torch.Tensor
    bq: torch.Tensor
    Wkv: torch.Tensor
    bkv: torch.Tensor
    Wo: torch.Tensor
    bo: torch.Tensor
    ln2w: torch.Tensor
    ln2b: torch.Tensor
    W1: torch.Tensor
    b1: torch.Tensor
    W2: torch.Tensor
    W2s: torch.Tensor            # W2 / (1 - p_ff) for the backward (CUDA), else W2 itself
    b2: torch.Tensor
    ln3w: torch.Tensor
    ln3b: torch.Tensor
    Wg: torch.Tensor
    bias: torch.Tensor           # group-FC bias [K, G] zero-padded (ZSL: [1]), in the parameters' dtype
    zero: torch.Tensor           # a 0-d zero in the compute dtype (addend of scaled products)


class StepConfig(NamedTuple):
    """What a step runs with besides its tensor inputs."""
    num_heads: int
    eps: tuple                    # LN1, LN2, LN3
    dropout: DropoutRates
    num_out: int                  # logits per sample
    zsl: bool
    extension_group_fc: bool      # the compiled extension's group-FC ops instead of bmm
    kit: StepKit
    weights: StepWeights


def derive_weights(params, t0, kit: StepKit, p_ff: float, zsl: bool,
                   into: StepWeights | None = None) -> StepWeights:
    """``StepWeights`` from the head's parameters (``StepParameters``) and T0
    (None for ZSL, whose queries change every step). With ``into`` (the weights of an earlier
    parameter version), every copy is written into its memory instead of new memory; views of the
    parameters (their dtype is the one wanted) are taken anew."""
    (We, be, ln1w, ln1b, Win, bin_, Wo, bo, ln2w, ln2b, W1, b1, W2, b2, ln3w, ln3b, Wg, bg) = params
    cd = kit.compute
    d = We.shape[0]

    def conv(name, t, scale=None):
        t = t.detach()
        if scale is None and t.dtype == cd:
            return t                                  # the parameter itself (or a view of it)
        old = None if into is None else getattr(into, name)
        if old is None or old.shape != t.shape or old.dtype != cd:
            return (t if scale is None else t * scale).to(cd)
        return old.copy_(t) if scale is None else torch.mul(t, scale, out=old)   # old: a copy

    with torch.no_grad():
        if zsl:
            bias = bg.detach()
        elif into is not None and into.bias.dtype == bg.dtype and into.bias.shape == (Wg.shape[0], Wg.shape[2]):
            bias = into.bias
            bias.view(-1)[:bg.shape[0]].copy_(bg)   # the padded tail stays zero
        else:
            bias = padded_group_bias(bg.detach(), Wg.shape[0], Wg.shape[2])
        sources = dict(We=We, be=be, t0=t0, ln1w=ln1w, ln1b=ln1b, Wq=Win[:d], bq=bin_[:d], Wkv=Win[d:],
                       bkv=bin_[d:], Wo=Wo, bo=bo, ln2w=ln2w, ln2b=ln2b, W1=W1, b1=b1, W2=W2, b2=b2,
                       ln3w=ln3w, ln3b=ln3b, Wg=Wg)
        made = {name: None if t is None else conv(name, t) for name, t in sources.items()}
        # CUDA folds the feed-forward dropout's scale into a copy of W2 (no launch to scale the
        # gradient); the CPU scales the gradient in place instead of holding a copy
        made["W2s"] = conv("W2s", W2, dropout_scale(p_ff)) if kit.in_place_outputs else made["W2"]
        zero = into.zero if into is not None and into.zero.dtype == cd else \
            torch.zeros((), dtype=cd, device=We.device)
        return StepWeights(**made, bias=bias, zero=zero)
