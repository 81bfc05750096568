"""The query path (docs/design.md steps 2-3): T0, T1 = LN1(2 T0), q = T1 W_q + b_q. It does not
depend on the input: outside training-mode query dropout every path computes it once per forward
for the whole batch, and without autograd reads it from the head's caches, made once per version
of the tensors it depends on."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..head.config import NUM_HEADS


def sources(head) -> list:
    """The tensors the queries depend on."""
    layer = head.decoder.layers[0]
    attn = layer.multihead_attn
    tensors = [layer.norm1.weight, layer.norm1.bias, attn.in_proj_weight, attn.in_proj_bias]
    if head.config.zsl:
        tensors += [head.wordvec_proj.weight, head.wordvec_proj.bias, head.decoder.query_embed]
    else:
        tensors.append(head.decoder.query_embed.weight)
    return tensors


def base_queries(head) -> torch.Tensor:
    """T0 [K, D]: the learned queries, or relu(wordvec_proj(V)) in ZSL mode."""
    if head.config.zsl:
        v = head.decoder.query_embed.to(head.wordvec_proj.weight)   # its device and dtype
        return F.relu(head.wordvec_proj(v))
    return head.decoder.query_embed.weight


def shared_queries(head):
    """(T1 [K, D], q [K, D], qk [H, K, D]) for the whole batch (eval, or query dropout p == 0).

    qk = W_k,h^T q_h / sqrt(d) per head: the queries with the key projection folded in (see
    ``ops.torch_ops.folded_query_attention``)."""
    layer = head.decoder.layers[0]
    d = head.config.embed_dim
    attn = layer.multihead_attn

    def compute():
        t0 = base_queries(head)
        t1 = F.layer_norm(2 * t0, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
        q = F.linear(t1, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
        hd = d // NUM_HEADS
        w_k = attn.in_proj_weight[d:2 * d].view(NUM_HEADS, hd, d)
        acc = torch.promote_types(w_k.dtype, torch.float32)
        with torch.autocast(w_k.device.type, enabled=False):  # fold in full precision
            qk = torch.einsum("khc,hcd->hkd", q.to(acc).view(-1, NUM_HEADS, hd),
                              w_k.to(acc)) / math.sqrt(hd)
        qk = qk.to(w_k.dtype)
        return t1, q, qk

    inputs = sources(head)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    if needs_grad:
        return compute()

    def compute_full_precision():
        with torch.autocast(inputs[0].device.type, enabled=False):
            return compute()
    return head.caches.get("queries", inputs, compute_full_precision)
