"""The reference ML-Decoder head: the correctness oracle of this package.

It restates the published head (Ridnik et al., 2021; docs/design.md) step by step, with the
official parameter tree and state_dict keys, and the official computation, deliberately including
its inefficiencies: the batch-independent query path is recomputed for every sample, attention runs
through ``nn.MultiheadAttention`` on a [K, B, D] layout, and the group fully-connected layer is a
Python loop of K matmuls into a zero-filled [B, K, G] buffer that is then sliced. Benchmarks against
this class therefore say what users of the official code gain.

Unlike the official code it runs on every supported PyTorch (README, Supported versions): the
decoder stack is a plain module list instead of ``nn.TransformerDecoder`` (whose forward changed
in PyTorch 2.1 in ways the official layer does not accept); the state_dict keys are unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..interop.layouts import load_state_dict_pre_hook
from .config import DROPOUT_P, FEEDFORWARD_DIM, LAYER_NORM_EPS, NUM_HEADS, WORDVEC_DIM, resolve_config
from .inputs import check_input, check_word_vectors, tokens_from_input


class DecoderLayer(nn.Module):
    """One decoder layer without self-attention: residual-dropout-LN, cross-attention, feed-forward.

    Attribute names (and so state_dict keys) are the official ones.
    """

    def __init__(self, d_model: int, nhead: int = NUM_HEADS, dim_feedforward: int = FEEDFORWARD_DIM,
                 dropout: float = DROPOUT_P, layer_norm_eps: float = LAYER_NORM_EPS):
        super().__init__()
        # Creation order follows the official layer, so that a seeded construction draws the same
        # random numbers in the same order.
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # tgt: [K, B, D] queries, memory: [N, B, D] tokens (sequence-first, as the official code).
        tgt = tgt + self.dropout1(tgt)
        tgt = self.norm1(tgt)
        tgt2 = self.multihead_attn(tgt, memory, memory)[0]
        tgt = tgt + self.dropout2(tgt2)
        tgt = self.norm2(tgt)
        tgt2 = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        tgt = tgt + self.dropout3(tgt2)
        tgt = self.norm3(tgt)
        return tgt


class DecoderStack(nn.Module):
    """Holds the decoder's parameters under the official names (``decoder.*``).

    ``embed_standart``, ``query_embed``, ``duplicate_pooling`` and ``duplicate_pooling_bias`` are
    attached by the head, as in the official code. ``query_embed`` is an ``nn.Embedding`` for the
    ordinary head; in ZSL mode it is a plain attribute holding the current word vectors [n, 300]
    (official training scripts assign it directly).
    """

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        self.layers = nn.ModuleList([layer])

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory)
        return tgt


def build_head_parameters(head: nn.Module, num_classes, num_of_groups, decoder_embedding,
                          initial_num_features, zsl) -> None:
    """Create the official parameter tree on ``head`` (shared by the reference and the fast head)."""
    cfg = resolve_config(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl)
    head.config = cfg
    d, k = cfg.embed_dim, cfg.num_queries
    embed_standart = nn.Linear(cfg.num_features, d)
    if not cfg.zsl:
        query_embed = nn.Embedding(k, d)
        query_embed.requires_grad_(False)
    else:
        query_embed = None
    layer = DecoderLayer(d_model=d)
    head.decoder = DecoderStack(layer)
    head.decoder.embed_standart = embed_standart
    head.decoder.query_embed = query_embed
    head.zsl = int(cfg.zsl)
    if cfg.zsl:
        # D == 300 is impossible under the 8-head rule, so the projection always has parameters.
        head.wordvec_proj = nn.Linear(WORDVEC_DIM, d)
        head.decoder.duplicate_pooling = nn.Parameter(torch.empty(d, 1))
        head.decoder.duplicate_pooling_bias = nn.Parameter(torch.empty(1))
        head.decoder.duplicate_factor = 1
    else:
        head.decoder.num_classes = cfg.num_classes
        head.decoder.duplicate_factor = cfg.group_size
        head.decoder.duplicate_pooling = nn.Parameter(torch.empty(k, d, cfg.group_size))
        head.decoder.duplicate_pooling_bias = nn.Parameter(torch.empty(cfg.num_classes))
    nn.init.xavier_normal_(head.decoder.duplicate_pooling)
    nn.init.constant_(head.decoder.duplicate_pooling_bias, 0)


class _HeadBase(nn.Module):
    """Constructor, parameter tree and word-vector handling shared by the reference and fast heads."""

    def __init__(self, num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768,
                 initial_num_features: int = 2048, zsl: int = 0):
        super().__init__()
        build_head_parameters(self, num_classes, num_of_groups, decoder_embedding,
                              initial_num_features, zsl)
        # Also load timm's layout of the same parameters (keys renamed on the way in).
        self.register_load_state_dict_pre_hook(load_state_dict_pre_hook)

    # ZSL ---------------------------------------------------------------------------------------
    def set_word_vectors(self, word_vectors: torch.Tensor) -> None:
        """Select the class set of a ZSL head: ``word_vectors`` is [n, 300]; the output is [B, n]."""
        if not self.config.zsl:
            raise RuntimeError("set_word_vectors() is only for ZSL heads (constructed with zsl=1)")
        check_word_vectors(word_vectors)
        self.decoder.query_embed = word_vectors

    @property
    def word_vectors(self):
        return self.decoder.query_embed if self.config.zsl else None

    @property
    def num_classes(self) -> int:
        """Width of the output: the class count, or the number of word vectors in ZSL mode."""
        if self.config.zsl:
            wv = self.decoder.query_embed
            return 0 if wv is None else int(wv.shape[0])
        return self.config.num_classes

    def extra_repr(self) -> str:
        c = self.config
        s = (f"num_classes={c.num_classes}, num_of_groups={c.num_queries}, "
             f"decoder_embedding={c.embed_dim}, initial_num_features={c.num_features}")
        return s + (", zsl=1" if c.zsl else f", group_size={c.group_size}")


class MLDecoder(_HeadBase):
    """The faithful, readable ML-Decoder head (official constructor, parameters and computation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        tokens = tokens_from_input(x)                                          # [B, N, C]
        memory = F.relu(self.decoder.embed_standart(tokens), inplace=True)     # [B, N, D]
        bs = memory.shape[0]
        if self.zsl:
            word_vectors = self.decoder.query_embed.to(self.wordvec_proj.weight)   # its device and dtype
            query_embed = F.relu(self.wordvec_proj(word_vectors))             # [n, D]
        else:
            query_embed = self.decoder.query_embed.weight                      # [K, D]
        tgt = query_embed.unsqueeze(1).expand(-1, bs, -1)                      # [K, B, D]
        h = self.decoder(tgt, memory.transpose(0, 1))                          # [K, B, D]
        h = h.transpose(0, 1)                                                  # [B, K, D]
        out_extrap = torch.zeros(h.shape[0], h.shape[1], self.decoder.duplicate_factor,
                                 device=h.device, dtype=h.dtype)
        group_fc_loop(h, self.decoder.duplicate_pooling, out_extrap)
        if not self.zsl:
            h_out = out_extrap.flatten(1)[:, :self.decoder.num_classes]
        else:
            h_out = out_extrap.flatten(1)
        h_out += self.decoder.duplicate_pooling_bias
        return h_out


def group_fc_loop(h: torch.Tensor, duplicate_pooling: torch.Tensor, out: torch.Tensor) -> None:
    """The official group FC: one matmul per query, written into ``out`` [B, K, G]."""
    for i in range(h.shape[1]):
        w_i = duplicate_pooling[i] if duplicate_pooling.dim() == 3 else duplicate_pooling
        out[:, i, :] = torch.matmul(h[:, i, :], w_i)
