"""The eager-expert head: what a PyTorch-savvy user would write by hand.

It is the second baseline of every benchmark (docs/benchmarks.md, What is compared): MLDecoderFast must beat it, not
only the reference. It computes the head of docs/design.md with the ordinary tools of plain PyTorch:

- the k and v projections as one GEMM over the fused [2D, D] weight;
- ``F.scaled_dot_product_attention`` instead of ``nn.MultiheadAttention``;
- in eval, the batch-independent query path (LN1 and the q projection) once per call, not once
  per sample (no caching across calls: that is a library's job, not a user's);
- the group fully-connected layer as one ``torch.bmm`` over the K groups, no zero buffer.

Its parameters carry the official names, so ``load_state_dict(reference.state_dict())`` works.
It is written independently of ``MLDecoderFast`` on purpose: it is a yardstick, not a wrapper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..head.config import DROPOUT_P, FEEDFORWARD_DIM, LAYER_NORM_EPS, NUM_HEADS, WORDVEC_DIM, resolve_config
from ..head.inputs import check_input, tokens_from_input


class _CrossAttentionWeights(nn.Module):
    """Holds the attention weights under ``nn.MultiheadAttention``'s names (in_proj_*, out_proj)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d))
        self.out_proj = nn.Linear(d, d)
        self.dropout = dropout
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)


class _Layer(nn.Module):
    def __init__(self, d: int, ff: int = FEEDFORWARD_DIM, dropout: float = DROPOUT_P):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm2 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.norm3 = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.multihead_attn = _CrossAttentionWeights(d, dropout)
        self.linear1 = nn.Linear(d, ff)
        self.linear2 = nn.Linear(ff, d)
        # One module per dropout site, as in the official layer (p is read at every call).
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)


class _Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, k = cfg.embed_dim, cfg.num_queries
        self.embed_standart = nn.Linear(cfg.num_features, d)
        self.layers = nn.ModuleList([_Layer(d)])
        if cfg.zsl:
            self.query_embed = None  # word vectors [n, 300], set by set_word_vectors()
            self.duplicate_pooling = nn.Parameter(torch.empty(d, 1))
            self.duplicate_pooling_bias = nn.Parameter(torch.zeros(1))
        else:
            self.query_embed = nn.Embedding(k, d).requires_grad_(False)
            self.duplicate_pooling = nn.Parameter(torch.empty(k, d, cfg.group_size))
            self.duplicate_pooling_bias = nn.Parameter(torch.zeros(cfg.num_classes))
        nn.init.xavier_normal_(self.duplicate_pooling)


class ExpertMLDecoder(nn.Module):
    """ML-Decoder in idiomatic, eager PyTorch; same constructor and state_dict as ``MLDecoder``."""

    def __init__(self, num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768,
                 initial_num_features: int = 2048, zsl: int = 0):
        super().__init__()
        self.config = resolve_config(num_classes, num_of_groups, decoder_embedding,
                                     initial_num_features, zsl)
        self.zsl = int(self.config.zsl)
        self.decoder = _Decoder(self.config)
        if self.zsl:
            self.wordvec_proj = nn.Linear(WORDVEC_DIM, self.config.embed_dim)

    def set_word_vectors(self, word_vectors: torch.Tensor) -> None:
        if not self.zsl:
            raise RuntimeError("set_word_vectors() is only for ZSL heads")
        self.decoder.query_embed = word_vectors

    @property
    def num_classes(self) -> int:
        if self.zsl:
            return 0 if self.decoder.query_embed is None else int(self.decoder.query_embed.shape[0])
        return self.config.num_classes

    def _queries(self) -> torch.Tensor:
        """T0 [K, D]: the learned queries, or the projected word vectors in ZSL mode."""
        if self.zsl:
            v = self.decoder.query_embed.to(self.wordvec_proj.weight)
            return F.relu(self.wordvec_proj(v))
        return self.decoder.query_embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        dec = self.decoder
        layer = dec.layers[0]
        attn = layer.multihead_attn
        d = self.config.embed_dim
        heads = NUM_HEADS
        tokens = tokens_from_input(x)                                       # [B, N, C]
        b, n = tokens.shape[:2]

        memory = F.relu(dec.embed_standart(tokens))                         # [B, N, D]
        w_q, w_kv = attn.in_proj_weight[:d], attn.in_proj_weight[d:]
        b_q, b_kv = attn.in_proj_bias[:d], attn.in_proj_bias[d:]
        kv = F.linear(memory, w_kv, b_kv)                                   # one GEMM for k and v
        k, v = kv.view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4)   # [B, H, N, d] each

        t0 = self._queries()                                                # [K, D]
        nq = t0.shape[0]
        if self.training:
            # Each sample draws its own dropout mask on the queries, so T1 is per-sample.
            t0 = t0.unsqueeze(0).expand(b, -1, -1)
            t1 = layer.norm1(t0 + layer.dropout1(t0))                       # [B, K, D]
            q = F.linear(t1, w_q, b_q).view(b, nq, heads, d // heads).transpose(1, 2)
        else:
            # Batch-independent: one [K, D] query projection for the whole batch.
            t1 = layer.norm1(t0 + t0)                                       # [K, D]
            q = F.linear(t1, w_q, b_q).view(nq, heads, d // heads).transpose(0, 1)
            q = q.unsqueeze(0).expand(b, -1, -1, -1)
        q = q.to(k.dtype)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        o = attn.out_proj(o.transpose(1, 2).reshape(b, nq, d))               # [B, K, D]

        t2 = layer.norm2(t1 + layer.dropout2(o))
        ff = layer.linear2(layer.dropout(F.relu(layer.linear1(t2))))
        t3 = layer.norm3(t2 + layer.dropout3(ff))                           # [B, K, D]
        return self._group_fc(t3)

    def _group_fc(self, h: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        w = dec.duplicate_pooling
        if self.zsl:  # one projection shared by every class query
            return (h @ w.to(h.dtype)).squeeze(-1) + dec.duplicate_pooling_bias.to(h.dtype)
        kq, _, g = w.shape
        out = torch.bmm(h.transpose(0, 1), w.to(h.dtype))                   # [K, B, G]
        out = out.transpose(0, 1).reshape(h.shape[0], kq * g)[:, :self.config.num_classes]
        return out + dec.duplicate_pooling_bias.to(out.dtype)
