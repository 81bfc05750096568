"""Constructor arguments of the ML-Decoder head, resolved and checked once.

Both the reference and the fast head go through `resolve_config`, so an impossible
argument fails the same way, early, with a message naming what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

NUM_HEADS = 8
FEEDFORWARD_DIM = 2048
DROPOUT_P = 0.1
LAYER_NORM_EPS = 1e-5
WORDVEC_DIM = 300


class DropoutRates(NamedTuple):
    """The decoder layer's five dropout rates, in the order of the forward (docs/design.md)."""
    query: float           # dropout1, on the queries (step 3)
    attention: float       # the attention weights (step 4)
    output: float          # dropout2, on the output projection (step 5)
    feed_forward: float    # dropout, inside the feed-forward (step 6)
    residual: float        # dropout3, on the feed-forward's output (step 6)


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int          # classes for the non-ZSL head (ignored by ZSL: n comes from the word vectors)
    num_queries: int          # K
    embed_dim: int            # D
    num_features: int         # C
    group_size: int           # G = ceil(num_classes / K)
    zsl: bool

    @property
    def head_dim(self) -> int:
        return self.embed_dim // NUM_HEADS


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy integers are fine
            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    return value


def resolve_config(num_classes, num_of_groups=-1, decoder_embedding=768,
                   initial_num_features=2048, zsl=0) -> HeadConfig:
    num_classes = _as_int("num_classes", num_classes)
    num_of_groups = _as_int("num_of_groups", num_of_groups)
    decoder_embedding = _as_int("decoder_embedding", decoder_embedding)
    initial_num_features = _as_int("initial_num_features", initial_num_features)
    if zsl not in (0, 1, False, True):
        raise ValueError(f"zsl must be 0 or 1, got {zsl!r}")
    zsl = bool(zsl)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_of_groups == 0:
        raise ValueError("num_of_groups must be positive (or negative for the default of 100), got 0")
    if initial_num_features < 1:
        raise ValueError(f"initial_num_features must be >= 1, got {initial_num_features}")
    k = 100 if num_of_groups < 0 else num_of_groups
    k = min(k, num_classes)
    d = 768 if decoder_embedding < 0 else decoder_embedding
    if d == 0 or d % NUM_HEADS != 0:
        raise ValueError(
            f"decoder_embedding must be a positive multiple of {NUM_HEADS} (the decoder has "
            f"{NUM_HEADS} attention heads), got {decoder_embedding}")
    g = math.ceil(num_classes / k)
    return HeadConfig(num_classes=num_classes, num_queries=k, embed_dim=d,
                      num_features=initial_num_features, group_size=g, zsl=zsl)
