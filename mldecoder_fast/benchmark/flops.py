"""Work of the head, for the roofline floor (docs/benchmarks.md, Work and the floor).

FLOPs of one forward, B batch, N tokens, C input features, D embedding, F feed-forward width,
K queries, G classes per group:

    2BNCD (input projection) + 4BND^2 (k, v) + 4BKND (attention) + 2BKD^2 (output projection)
    + 4BKDF (feed-forward) + 2BKDG (group FC)
    + q projection: 2BKD^2 in training (per-sample queries), 2KD^2 in eval (once per batch)

ZSL adds the word-vector projection 2K*300*D (K = number of word vectors, G = 1). A training step
(forward + backward) counts 3x the forward. Elementwise work (bias, ReLU, LayerNorm, softmax,
dropout) is not counted: it is small next to the GEMMs and is what fusion hides.

Bytes: what must move at least once. Eval reads the input and every parameter and writes the
logits; a training step also writes one gradient per trainable parameter and for the input, and
re-reads the parameters in the backward. Activations saved for the backward are not counted
(a fused implementation can recompute them).
"""
from __future__ import annotations

from ..head.config import FEEDFORWARD_DIM, WORDVEC_DIM
from .configs import BenchConfig


def forward_flops(cfg: BenchConfig, batch: int, mode: str) -> float:
    b, n, c, d, f = batch, cfg.num_tokens, cfg.num_features, cfg.decoder_embedding, FEEDFORWARD_DIM
    k = cfg.queries_for(mode)
    g = cfg.group_size
    total = (2 * b * n * c * d + 4 * b * n * d * d + 4 * b * k * n * d + 2 * b * k * d * d
             + 4 * b * k * d * f + 2 * b * k * d * g)
    total += 2 * b * k * d * d if mode == "train" else 2 * k * d * d
    if cfg.zsl:
        total += 2 * k * WORDVEC_DIM * d
    return float(total)


def step_flops(cfg: BenchConfig, batch: int, mode: str) -> float:
    """FLOPs of one timed step: a forward in eval, forward + backward (3x) in training."""
    fwd = forward_flops(cfg, batch, mode)
    return 3.0 * fwd if mode == "train" else fwd


def parameter_count(cfg: BenchConfig, mode: str = "eval") -> tuple[int, int]:
    """(all parameters, trainable parameters) of the head, as docs/design.md's parameter table lists them."""
    c, d, f = cfg.num_features, cfg.decoder_embedding, FEEDFORWARD_DIM
    k = cfg.queries_for(mode)
    layer = 3 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (f * d + f) + (d * f + d)
    embed = c * d + d
    if cfg.zsl:
        head = WORDVEC_DIM * d + d + d + 1
        frozen = 0
    else:
        head = k * d * cfg.group_size + cfg.num_classes
        frozen = k * d  # query_embed: saved, read, never trained
    trainable = embed + layer + head
    return trainable + frozen, trainable


def step_bytes(cfg: BenchConfig, batch: int, mode: str, itemsize: int, param_itemsize: int = 4) -> float:
    """Bytes that one step must move at least once (see module docstring)."""
    k_classes = cfg.classes_for(mode)
    x = batch * cfg.num_tokens * cfg.num_features * itemsize
    logits = batch * k_classes * itemsize
    n_all, n_train = parameter_count(cfg, mode)
    params = n_all * param_itemsize
    if mode == "train":
        # forward reads params + input, writes logits; backward reads logits' grad, params again,
        # input again, writes every gradient.
        return float(2 * params + n_train * param_itemsize + 3 * x + 2 * logits)
    return float(params + x + logits)
