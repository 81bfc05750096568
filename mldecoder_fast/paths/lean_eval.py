"""The launch-lean eval forward: the head's computation (docs/design.md steps 1-7) in 12 launches.

At small batch a GPU forward is bound by the host (about 5-10 us of launch overhead per kernel
against a few us of work), so this path is built to launch as few kernels as plain PyTorch
allows, for eval without autograd, backend torch (``MLDecoderFast.lean_eval_devices`` says where
it runs; ``LEAN_EVAL`` is the path object):

- every weight is used in the compute dtype (the autocast dtype, else the parameters' own) from a
  copy made once per weight version (``LeanWeights``, kept in the head's ``caches``); nothing is
  cast or sliced per call;
- the input is read in its own layout: a channels-last map, [B, N, C] tokens or a batch of one is
  one [B*N, C] matrix (one GEMM with bias and relu in its epilogue); a [B, C, H, W] map is B
  transposed matrices of one batched GEMM (no transposed copy of the input);
- the products are laid out so that each one's output is the next one's operand as it is:
  the scores [B, H*K, N] and the values [B, D, N] give the attention output transposed,
  [B, D, K], which the output projection reads as [B, K, D];
- biases and residuals ride in the GEMMs (``baddbmm``/``addmm_`` accumulate onto them), which
  takes these exact rearrangements, all made once per weight version in full precision: the key
  projection folded into the queries whatever K (docs/design.md "What makes it fast"); the value
  bias moved past the attention, whose rows sum to one (A(MW_vᵀ + 1b_vᵀ)W_oᵀ = AMW_vᵀW_oᵀ +
  1(W_o b_v)ᵀ), into the out-projection's addend with the residual T1 and b_o; linear2's bias
  added by LN2's bias (LN2 gives T2' = T2 + b2, the step-6 residual with b2 already in it) and
  taken back out of linear1's input through its bias (b1' = b1 − W1 b2).

Launches (dispatched ops) per forward, the input in the compute dtype:
  1 input projection + bias + relu (``_addmm_activation``); a [B, C, H, W] map with B > 1: a
    ``bmm`` and an in-place clamp at -b_e (2; the bias moves into the out-projection's addend)
  2 values vᵀ = W_v Mᵀ (``bmm``)            3 scores qk Mᵀ (``bmm``)       4 softmax over N
  5 attention output Oᵀ = vᵀ Aᵀ (``bmm``)   6 out-projection + residual (``baddbmm``)
  7 LN2                                     8 linear1 + bias + relu (``_addmm_activation``)
  9 linear2 + residual, in place (``addmm_``)                              10 LN3
  11 group FC (``bmm``)                     12 bias add into the [B, classes] logits (``add``)
On CUDA each is one kernel, but for the ``baddbmm``, which first copies its addend into the
output. The CPU runs its own eval forward from these folded weights (``paths/cpu_eval.py``:
oneDNN's products on packed weights); tests run this one on the CPU to check it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..head.config import NUM_HEADS
from ..head.inputs import tokens_from_input
from ..ops.torch_ops import group_fc_padded_bias, padded_group_bias
from . import queries


class LeanWeights(NamedTuple):
    """What the lean forward reads, derived from the parameters once per version (compute dtype
    unless said otherwise)."""
    w_e: torch.Tensor      # [D, C] input projection (step 1)
    b_e: torch.Tensor      # [D]
    neg_b_e: torch.Tensor  # [D] -b_e
    qk: torch.Tensor       # [H*K, D] queries with the key projection folded in, / sqrt(d) (step 4)
    w_v: torch.Tensor      # [D, D] value projection
    w_o: torch.Tensor      # [D, D] output projection
    r2: torch.Tensor       # [K, D] T1 + b_o + W_o b_v: the out-projection's addend (steps 4-5)
    r2_shifted: torch.Tensor  # [K, D] r2 + W_o W_v b_e: the addend for a memory M - b_e
    ln2_w: torch.Tensor    # [D] LN2 weight (CUDA's LayerNorm takes its input's dtype only)
    ln2_b: torch.Tensor    # [D] LN2 bias + linear2's bias
    w1: torch.Tensor       # [F, D] linear1 (step 6)
    b1: torch.Tensor       # [F] b1 - W1 b2
    w2: torch.Tensor       # [D, F] linear2
    ln3_w: torch.Tensor    # [D] LN3 (as LN2's)
    ln3_b: torch.Tensor
    p: torch.Tensor        # [K, D, G] group-FC weight (step 7); ZSL: [D, 1]
    bias: torch.Tensor     # [K, G] zero-padded group-FC bias; ZSL: [1] (in the logits' dtype)


class LeanEval:
    """The path object (``paths/__init__.py``)."""
    name = "lean eval"

    def applies(self, head, x, facts) -> bool:
        # fp64 parameters under autocast: autocast leaves them alone, this path would not
        return (facts.backend == "torch" and facts.lean_eval_device and not facts.training
                and not facts.needs_grad and not (facts.autocast and facts.param_dtype == torch.float64))

    def derive(self, head, x, facts) -> LeanWeights:
        # Under autocast the products run in autocast's dtype and the logits come out in fp32 (CUDA
        # autocast runs LayerNorm in fp32, so the reference's T3 and logit buffer are fp32); without
        # it, everything is in the parameters' dtype.
        dtypes = (facts.autocast, torch.float32) if facts.autocast else (facts.param_dtype,) * 2
        # (per call: the sources' versions compared, no walk over the parameters: get_by_versions)
        return head.caches.get_by_versions(("lean_eval",) + dtypes, lambda: sources(head),
                                           lambda: derive(head, *dtypes), same=(head.decoder.query_embed,))

    def forward(self, head, x, derived: LeanWeights) -> torch.Tensor:
        layer = head.decoder.layers[0]
        num_out = derived.r2.shape[0] if head.config.zsl else head.config.num_classes
        return forward(x, derived, num_out, layer.norm2.eps, layer.norm3.eps)


def sources(head) -> list:
    """The tensors the derived weights depend on."""
    sources = list(head.parameters())
    if head.config.zsl:
        sources.append(head.decoder.query_embed)
    return sources


def derive(head, dtype: torch.dtype, out_dtype: torch.dtype) -> LeanWeights:
    """``LeanWeights`` for ``head`` (an ``MLDecoderFast``) in compute dtype ``dtype``, the logits
    in ``out_dtype``; the folded terms are computed in the parameters' precision (at least fp32)
    before the one rounding."""
    dec = head.decoder
    layer = dec.layers[0]
    attn = layer.multihead_attn
    d = head.config.embed_dim
    caches = head.caches
    pdt = dec.embed_standart.weight.dtype
    acc = torch.promote_types(pdt, torch.float32)

    def cast(w):
        return caches.cast(id(w), w, dtype)

    with torch.no_grad(), torch.autocast(dec.embed_standart.weight.device.type, enabled=False):
        t1, _, qk = queries.shared_queries(head)
        w_v = attn.in_proj_weight[2 * d:].to(acc)
        b_v = attn.in_proj_bias[2 * d:].to(acc)
        w_o = attn.out_proj.weight.to(acc)
        r2 = t1.to(acc) + attn.out_proj.bias.to(acc) + w_o @ b_v
        r2_shifted = r2 + w_o @ (w_v @ dec.embed_standart.bias.to(acc))
        b2 = layer.linear2.bias.to(acc)
        b1 = layer.linear1.bias.to(acc) - layer.linear1.weight.to(acc) @ b2
        k, g = qk.shape[1], dec.duplicate_pooling.shape[-1]
        bias = dec.duplicate_pooling_bias.detach().to(out_dtype)
        if not head.config.zsl:
            bias = padded_group_bias(bias, k, g)
        return LeanWeights(
            w_e=cast(dec.embed_standart.weight), b_e=cast(dec.embed_standart.bias),
            neg_b_e=(-dec.embed_standart.bias.detach()).to(dtype),
            qk=qk.reshape(-1, d).to(dtype), w_v=w_v.to(dtype), w_o=cast(attn.out_proj.weight),
            r2=r2.to(dtype), r2_shifted=r2_shifted.to(dtype),
            ln2_w=layer.norm2.weight.detach().to(dtype), ln2_b=(layer.norm2.bias.to(acc) + b2).to(dtype),
            w1=cast(layer.linear1.weight), b1=b1.to(dtype), w2=cast(layer.linear2.weight),
            ln3_w=layer.norm3.weight.detach().to(dtype), ln3_b=layer.norm3.bias.detach().to(dtype),
            p=cast(dec.duplicate_pooling), bias=bias)


def forward(x: torch.Tensor, w: LeanWeights, num_out: int, eps2: float, eps3: float) -> torch.Tensor:
    """Logits [B, num_out] of input x ([B, C, H, W] or [B, N, C]) from derived weights ``w``."""
    dtype = w.w_e.dtype
    with torch.autocast(x.device.type, enabled=False):   # every dtype below is chosen here
        tokens = tokens_from_input(x)                                        # [B, N, C] view
        if tokens.dtype != dtype:
            tokens = tokens.to(dtype)
        b, n, _ = tokens.shape
        d_model = w.w_e.shape[0]
        hd = d_model // NUM_HEADS
        k = w.r2.shape[0]
        memory, r2 = _memory(tokens, w)
        m_t = memory.transpose(1, 2)                                          # Mᵀ [B, D, N]
        v_t = torch.bmm(w.w_v.expand(b, -1, -1), m_t)                         # vᵀ [B, D, N]
        attn = torch.softmax(torch.bmm(w.qk.expand(b, -1, -1), m_t), dim=-1)  # A [B, H*K, N]
        o_t = torch.bmm(v_t.view(b * NUM_HEADS, hd, n),
                        attn.view(b * NUM_HEADS, k, n).transpose(1, 2))       # Oᵀ [B*H, d, K]
        x2 = torch.baddbmm(r2, o_t.view(b, d_model, k).transpose(1, 2),
                           w.w_o.t().expand(b, -1, -1))                       # T1 + O' [B, K, D]
        t2 = F.layer_norm(x2, (d_model,), w.ln2_w, w.ln2_b, eps2).view(b * k, d_model)  # T2 + b2
        hidden = torch._addmm_activation(w.b1, t2, w.w1.t())                 # relu(W1 T2 + b1)
        x3 = t2.addmm_(hidden, w.w2.t())                                      # T2 + W2 h + b2
        t3 = F.layer_norm(x3, (d_model,), w.ln3_w, w.ln3_b, eps3)             # T3 [B*K, D]
        return group_fc_padded_bias(t3.view(b, k, d_model), w.p, w.bias, num_out)


def _memory(tokens: torch.Tensor, w: LeanWeights):
    """The memory of design step 1, M = relu(tokens W_eᵀ + b_e) [B, N, D], read from the tokens
    without copying them; returned with the output projection's addend that goes with it."""
    b, n, c = tokens.shape
    if b == 1 or tokens.stride(0) == n * tokens.stride(1):
        # One [B*N, C] matrix (a view): bias and relu in the GEMM's epilogue.
        m = torch._addmm_activation(w.b_e, tokens.reshape(b * n, c), w.w_e.t())
        return m.view(b, n, -1), w.r2
    # A [B, C, H, W] map: B transposed [N, C] matrices of one batched GEMM, whose bias would cost
    # a copy into its output. Without it: relu(y + b_e) - b_e = max(y, -b_e) is one in-place
    # clamp, and the -b_e left in the memory is constant along the softmax axis in the scores and
    # passes through the attention's rows (which sum to one) into the addend r2_shifted.
    m = torch.bmm(tokens, w.w_e.t().expand(b, -1, -1)).clamp_(min=w.neg_b_e)
    return m, w.r2_shifted


LEAN_EVAL = LeanEval()
