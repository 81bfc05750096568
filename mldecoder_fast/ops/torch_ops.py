"""Plain-PyTorch implementation of the head's operations: the interface every backend follows.

Shapes: B batch, N tokens, K queries, D = H * d embedding, G classes per group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_group_bias(bias: torch.Tensor, num_queries: int, group_size: int) -> torch.Tensor:
    """bias [num_classes] -> [K, G], zero on the padded tail (whose outputs are discarded)."""
    pad = num_queries * group_size - bias.shape[0]
    return F.pad(bias, (0, pad)).view(num_queries, group_size)


def group_fc_padded_bias(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """docs/design.md step 7 without autograd (eval, or inside a hand-written backward), the bias
    already laid out as ``padded_group_bias`` gives it ([K, G]; ZSL [1]): one batched product, then
    the bias added while writing the logits in class order (one pass instead of ``group_fc_torch``'s
    copy and add; ``out=`` has no autograd). The logits take the bias's dtype, as the reference's."""
    b, k, d_model = h.shape
    if weight.dim() == 2:  # ZSL: one projection shared by every query
        return torch.add(torch.mm(h.reshape(b * k, d_model), weight).view(b, k), bias)
    return logits_with_bias(torch.bmm(h.transpose(0, 1), weight).transpose(0, 1), bias, num_classes)


def logits_with_bias(products: torch.Tensor, bias: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The group FC's products [B, K, G] (any strides) plus its bias [K, G], written once into the
    [B, num_classes] logits in class order, in the bias's dtype (``out=``: no autograd)."""
    b, k, g = products.shape
    out = torch.empty((b, k, g), dtype=bias.dtype, device=products.device)
    torch.add(products, bias, out=out)
    out = out.view(b, k * g)
    return out if k * g == num_classes else out[:, :num_classes]


def group_fc_torch(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   num_classes: int) -> torch.Tensor:
    """docs/design.md step 7 as one batched product.

    h [B, K, D]; weight [K, D, G] and bias [num_classes] -> logits [B, num_classes];
    ZSL: weight [D, 1] and bias [1] shared by all K queries -> logits [B, K].
    """
    # Output dtype follows the reference: h's dtype outside autocast; under autocast the product
    # runs in low precision and the fp32 bias add promotes the logits back to fp32 (as the
    # reference's fp32 buffer does).
    if weight.dim() == 2:  # ZSL: one shared projection
        return torch.matmul(h, weight).squeeze(-1) + bias
    k, _, g = weight.shape
    b = h.shape[0]
    out = torch.bmm(h.transpose(0, 1), weight)                    # [K, B, G]
    out = out.transpose(0, 1).reshape(b, k * g)                    # one copy into class order
    if k * g != num_classes:
        out = out[:, :num_classes]
    return out + bias


def folded_query_attention(qk: torch.Tensor, memory: torch.Tensor, v: torch.Tensor, num_heads: int,
                           dropout_p: float, scores=F.linear) -> torch.Tensor:
    """Attention for queries shared by the batch, with the key projection folded into them.

    Since q_h . (W_k,h m + b_k,h) = (W_k,h^T q_h) . m + q_h . b_k,h and the last term is
    constant along the softmax axis, the scores are one GEMM of the memory against
    qk [H, K, D] (= W_k,h^T q_h / sqrt(d), computed once per weight version), and the keys
    are never formed. memory [B, N, D], v [B, N, D] -> [B, K, D]. ``scores(memory, qk)``: the
    score product (a CPU path without autograd passes its GEMM provider's, ``ops/cpu_gemm.py``).
    """
    h, k, d_model = qk.shape
    b, n, _ = memory.shape
    d = d_model // num_heads
    qk = qk.reshape(h * k, d_model).to(memory.dtype)
    attn = scores(memory, qk).view(b, n, h, k).permute(0, 2, 3, 1).softmax(dim=-1)   # [B, H, K, N]
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, training=True)
    o = torch.matmul(attn, v.view(b, n, h, d).transpose(1, 2))            # [B, H, K, d]
    return o.transpose(1, 2).reshape(b, k, d_model)


class TorchOps:
    """The interface of the operations between the GEMMs, implemented with PyTorch's own ops.

    Dropout probabilities are passed explicitly (0 in eval). Every method must accept
    non-contiguous inputs and B = 0.
    """

    name = "torch"

    def residual_dropout_layer_norm(self, residual: torch.Tensor, x: torch.Tensor, p: float,
                                    weight: torch.Tensor, bias: torch.Tensor,
                                    eps: float) -> torch.Tensor:
        """LayerNorm(residual + dropout(x, p)); ``residual`` broadcasts to ``x``'s shape."""
        if p > 0:
            x = F.dropout(x, p, training=True)
        return F.layer_norm(residual + x, (x.shape[-1],), weight, bias, eps)

    def attention(self, q: torch.Tensor, kv: torch.Tensor, num_heads: int,
                  dropout_p: float) -> torch.Tensor:
        """Multi-head cross-attention with softmax(q k^T / sqrt(d)), dropout on the weights.

        q: [K, D] shared by the batch, or [B, K, D] per sample; kv: [B, N, 2D] (k then v).
        Returns [B, K, D] (heads concatenated).
        """
        b, n, two_d = kv.shape
        d_model = two_d // 2
        d = d_model // num_heads
        kv = kv.view(b, n, 2, num_heads, d)
        k = kv[:, :, 0].transpose(1, 2)                               # [B, H, N, d]
        v = kv[:, :, 1].transpose(1, 2)
        nq = q.shape[-2]
        if q.dim() == 2:
            qh = q.view(nq, num_heads, d).transpose(0, 1).unsqueeze(0).expand(b, -1, -1, -1)
        else:
            qh = q.view(b, nq, num_heads, d).transpose(1, 2)
        qh = qh.to(k.dtype)
        o = F.scaled_dot_product_attention(qh, k, v, dropout_p=dropout_p)  # [B, H, K, d]
        return o.transpose(1, 2).reshape(b, nq, d_model)

    def shared_query_attention(self, qk: torch.Tensor, memory: torch.Tensor, v: torch.Tensor,
                               num_heads: int, dropout_p: float) -> torch.Tensor:
        """Attention for queries shared by the batch, with the key projection folded into them
        (``folded_query_attention``). qk [H, K, D], memory [B, N, D], v [B, N, D] -> [B, K, D]."""
        return folded_query_attention(qk, memory, v, num_heads, dropout_p)

    def group_fc(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 num_classes: int) -> torch.Tensor:
        return group_fc_torch(h, weight, bias, num_classes)

    def decode(self, residual: torch.Tensor, x: torch.Tensor, p: float, ln_weight: torch.Tensor,
               ln_bias: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor,
               num_classes: int) -> torch.Tensor:
        """docs/design.md step 6's residual + LN3 and step 7: group FC of LayerNorm(residual + dropout(x))."""
        h = self.residual_dropout_layer_norm(residual, x, p, ln_weight, ln_bias, eps)
        return self.group_fc(h, weight, bias, num_classes)
