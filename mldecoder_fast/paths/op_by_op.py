"""The op-by-op path: the head's computation (docs/design.md steps 1-7) as single PyTorch products
over all rows, and the backend's ops object (``ops/``) for everything between them: attention,
residual + dropout + LayerNorm, LayerNorm-3 + group-FC decoding. It takes every forward no other
path takes: any backend, device, dtype and mode, autograd of any order, torch.compile and
torch.func.

Without autograd the products run through the CPU GEMM provider (``ops/cpu_gemm.py``: oneDNN with
packed weights, or MKL), with the weights in the autocast dtype, each made once per weight version
and kept in the head's caches; the shared queries come from the caches too (``queries.py``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..head.backends import ops_for
from ..head.config import NUM_HEADS, DropoutRates
from ..head.inputs import tokens_from_input
from ..ops import cpu_gemm
from ..ops.torch_ops import folded_query_attention
from . import queries


class OpByOpPlan(NamedTuple):
    """What one op-by-op forward runs with."""
    ops: object            # the backend's ops object
    linear: object         # linear(x, weight, bias, rows, relu, nan_carried, nan_of)
    scores: object | None  # the CPU GEMM provider's product for the attention scores, else None
    needs_grad: bool
    dropout: DropoutRates  # the facts' rates (zero in eval)


class OpByOp:
    """The path object (``paths/__init__.py``)."""
    name = "op by op"

    def applies(self, head, x, facts) -> bool:
        return True

    def derive(self, head, x, facts) -> OpByOpPlan:
        ops = ops_for(facts.backend)
        scores = None
        if not facts.needs_grad and facts.backend in ("torch", "cpp") and facts.device == "cpu":
            # the CPU's score GEMM through the GEMM provider (oneDNN), as the other products
            scores = cpu_gemm.provider(facts.autocast or facts.input_dtype, x.device).linear
        return OpByOpPlan(ops, _linear(head, facts.needs_grad, x.device), scores, facts.needs_grad, facts.dropout)

    def forward(self, head, x, plan: OpByOpPlan) -> torch.Tensor:
        cfg = head.config
        dec = head.decoder
        layer = dec.layers[0]
        attn = layer.multihead_attn
        d = cfg.embed_dim
        ops, linear = plan.ops, plan.linear
        p_query, p_attn, p_out, p_ff, p_res = plan.dropout

        tokens = tokens_from_input(x)                                               # [B, N, C]
        memory = linear(tokens, dec.embed_standart.weight, dec.embed_standart.bias, relu=True)
        if p_query > 0:
            # Training: every sample draws its own dropout mask on the queries (docs/design.md step 3).
            t0 = queries.base_queries(head)
            t0 = t0.unsqueeze(0).expand(x.shape[0], -1, -1)
            t1 = ops.residual_dropout_layer_norm(t0, t0, p_query, layer.norm1.weight,
                                                 layer.norm1.bias, layer.norm1.eps)  # [B, K, D]
            q = F.linear(t1, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
            shared = False
        else:
            t1, q, qk = queries.shared_queries(head)                               # [K, D]
            shared = True
        k_queries = t1.shape[-2]
        if shared and NUM_HEADS * k_queries < d + k_queries:
            # Fewer FLOPs to fold W_k into the shared queries than to form the keys.
            v = linear(memory, attn.in_proj_weight, attn.in_proj_bias, slice(2 * d, None))
            if not plan.needs_grad:  # the cached queries in the memory's dtype, cast once per version
                qk = head.caches.cast("qk", qk, memory.dtype)
            if plan.scores is not None:
                o = folded_query_attention(qk, memory, v, NUM_HEADS, p_attn, plan.scores)
            else:
                o = ops.shared_query_attention(qk, memory, v, NUM_HEADS, p_attn)   # [B, K, D]
        else:
            kv = linear(memory, attn.in_proj_weight, attn.in_proj_bias, slice(d, None))  # [B, N, 2D]
            o = ops.attention(q, kv, NUM_HEADS, p_attn)                             # [B, K, D]
        o = linear(o, attn.out_proj.weight, attn.out_proj.bias)
        t2 = ops.residual_dropout_layer_norm(t1, o, p_out, layer.norm2.weight, layer.norm2.bias,
                                             layer.norm2.eps)
        # Without autograd the relu may map NaN to 0 here (oneDNN's post-op, ops/cpu_gemm.py): a NaN
        # row of T2 is added back below, and a non-finite linear1 weight makes linear2's bias NaN.
        f = linear(t2, layer.linear1.weight, layer.linear1.bias, relu=True, nan_carried=True)
        if p_ff > 0:
            f = F.dropout(f, p_ff, training=True)
        f = linear(f, layer.linear2.weight, layer.linear2.bias, nan_of=(layer.linear1.weight, layer.linear1.bias))
        num_out = k_queries if cfg.zsl else cfg.num_classes
        group_weight = dec.duplicate_pooling
        if not plan.needs_grad and torch.is_autocast_enabled(x.device.type):
            # the group-FC weight in the autocast dtype once per version, not per call (every
            # backend: the products cast their operands to that dtype anyway)
            group_weight = head.caches.cast(id(group_weight), group_weight,
                                            torch.get_autocast_dtype(x.device.type))
        return ops.decode(t2, f, p_res, layer.norm3.weight, layer.norm3.bias, layer.norm3.eps,
                          group_weight, dec.duplicate_pooling_bias, num_out)


def _linear(head, needs_grad: bool, device: torch.device):
    """``linear(x, weight, bias, rows, relu)`` = x weight[rows]^T + bias[rows] (then relu) for this
    forward.

    With autograd: ``F.linear`` (autocast casts as usual). Without: the GEMM provider
    (``ops/cpu_gemm.py``), with the weights in the autocast dtype and, for oneDNN, packed, each
    made once per weight version and kept in ``caches``."""
    if needs_grad:
        def linear(x, weight, bias, rows=slice(None), relu=False, nan_carried=False, nan_of=()):
            y = F.linear(x, weight[rows], bias[rows])
            return F.relu(y) if relu else y
        return linear
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    caches = head.caches

    def linear(x, weight, bias, rows=slice(None), relu=False, nan_carried=False, nan_of=()):
        dtype = autocast or x.dtype
        gemm = cpu_gemm.provider(dtype, device)
        w = caches.cast(id(weight), weight, dtype)[rows]
        b = caches.cast(id(bias), bias, dtype)[rows]
        packed = None
        if gemm is not cpu_gemm.TORCH:
            packed = caches.get(("packed", id(weight), rows.start, rows.stop, dtype), (weight,),
                                lambda: gemm.pack(w))
            if nan_of:   # a NaN in these weights made NaN everywhere here in the reference
                b = caches.get(("nan_of", id(bias), dtype), (bias, *nan_of), lambda: _with_nan_of(b, nan_of))
        return gemm.linear(x.to(dtype), w, b, packed, relu=relu, nan_carried=nan_carried)
    return linear


def _with_nan_of(bias: torch.Tensor, sources) -> torch.Tensor:
    """``bias``, all NaN if any of ``sources`` holds a non-finite value (no host sync: the same
    bits as ``bias`` otherwise)."""
    finite = torch.stack([t.detach().isfinite().all() for t in sources]).all()
    return torch.where(finite, bias, torch.full_like(bias, float("nan")))


OP_BY_OP = OpByOp()
