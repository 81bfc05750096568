"""The standard configurations (docs/design.md, Configurations), as data the benchmarks run on.

``BenchConfig.make_head`` builds a head for a configuration, ``make_input`` its input (on the
device and in the dtype asked for). ZSL configurations train on ``zsl_train_classes`` word vectors
and evaluate on ``zsl_eval_classes`` others, as the NUS-WIDE recipe does.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

WORDVEC_DIM = 300


@dataclass(frozen=True)
class BenchConfig:
    name: str
    num_features: int              # C
    num_tokens: int                # N (H*W of the feature map, or the sequence length)
    num_classes: int               # classes (ZSL: word vectors of the training set)
    num_of_groups: int = -1        # constructor argument (-1: the default of 100)
    input_kind: str = "map"        # "map": [B, C, H, W]; "tokens": [B, N, C]
    zsl: bool = False
    zsl_eval_classes: int = 0      # ZSL: word vectors used in eval mode
    decoder_embedding: int = 768
    note: str = ""

    # Derived sizes (the head's K and G), as the constructor resolves them.
    @property
    def num_queries(self) -> int:
        if self.zsl:
            return self.num_classes
        k = 100 if self.num_of_groups < 0 else self.num_of_groups
        return min(k, self.num_classes)

    @property
    def group_size(self) -> int:
        return 1 if self.zsl else math.ceil(self.num_classes / self.num_queries)

    def classes_for(self, mode: str) -> int:
        """Output width in a mode: ZSL evaluates on its own (unseen) class set."""
        if self.zsl and mode == "eval":
            return self.zsl_eval_classes
        return self.num_classes

    def queries_for(self, mode: str) -> int:
        return self.classes_for(mode) if self.zsl else self.num_queries

    def constructor_kwargs(self) -> dict:
        return dict(num_classes=self.num_classes, num_of_groups=self.num_of_groups,
                    decoder_embedding=self.decoder_embedding,
                    initial_num_features=self.num_features, zsl=int(self.zsl))

    def make_head(self, cls, **extra):
        return cls(**self.constructor_kwargs(), **extra)

    def word_vectors(self, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Deterministic stand-ins for GloVe vectors (unit-norm rows, like normalised embeddings)."""
        n = self.classes_for(mode)
        seed = 1234 if mode == "train" else 4321
        g = torch.Generator().manual_seed(seed) if generator is None else generator
        v = torch.randn(n, WORDVEC_DIM, generator=g)
        return v / v.norm(dim=1, keepdim=True)

    def make_input(self, batch: int, device, dtype, seed: int = 0) -> torch.Tensor:
        """Random features (never zeros): post-ReLU-like, positive, unit-scale."""
        g = torch.Generator().manual_seed(seed)
        if self.input_kind == "tokens":
            shape = (batch, self.num_tokens, self.num_features)
            x = torch.randn(shape, generator=g)
        else:
            side = math.isqrt(self.num_tokens)
            if side * side != self.num_tokens:
                raise ValueError(f"{self.name}: N = {self.num_tokens} is not a square feature map")
            x = torch.randn((batch, self.num_features, side, side), generator=g).relu_()
        return x.to(device=device, dtype=dtype)

    def shrunk(self) -> BenchConfig:
        """A small copy with the same structure (K/G ratio, input kind, ZSL), for quick runs."""
        classes = max(1, self.num_classes // 20)
        groups = self.num_of_groups if self.num_of_groups < 0 else max(1, self.num_of_groups // 20)
        return dataclasses.replace(
            self, name=self.name + "-tiny", num_features=max(32, self.num_features // 16),
            num_tokens=16 if self.input_kind == "map" else 20, num_classes=classes,
            num_of_groups=min(groups, 10) if groups > 0 else 10,
            zsl_eval_classes=max(1, self.zsl_eval_classes // 20), decoder_embedding=64)


STANDARD_CONFIGS: dict[str, BenchConfig] = {c.name: c for c in [
    BenchConfig("coco-tresnet_l-448", 2048, 196, 80, note="MS-COCO, paper's main multi-label setting"),
    BenchConfig("imagenet1k-resnet50-224", 2048, 49, 1000, note="single-label ImageNet"),
    BenchConfig("openimages-tresnet_m-224", 2048, 49, 9605, num_of_groups=200,
                note="OpenImages, 200 groups"),
    BenchConfig("imagenet21k-resnet50-224", 2048, 49, 21843, note="ImageNet-21K, the large-class target"),
    BenchConfig("vit-b16-224", 768, 197, 1000, input_kind="tokens", note="token input [B, N, C]"),
    BenchConfig("zsl-nus-wide-224", 2048, 49, 925, zsl=True, zsl_eval_classes=81,
                note="ZSL word queries (300-d): train on 925 seen, eval on 81 unseen"),
]}

# Class counts of the scaling study (ResNet-50 224 px features, default 100 groups).
SCALING_CLASSES = (80, 1000, 10_000, 21_843, 50_000, 100_000)


def scaling_config(num_classes: int, num_features: int = 2048, num_tokens: int = 49) -> BenchConfig:
    return BenchConfig(f"resnet50-224-{num_classes}cls", num_features, num_tokens, num_classes)


def select(names: str | None, quick: bool = False) -> list[BenchConfig]:
    """Configurations by comma-separated names (or unique prefixes); all when ``names`` is empty."""
    if not names or names == "all":
        chosen = list(STANDARD_CONFIGS.values())
    else:
        chosen = []
        for raw in names.split(","):
            raw = raw.strip()
            if not raw:
                continue
            hits = [c for n, c in STANDARD_CONFIGS.items() if n == raw] or \
                   [c for n, c in STANDARD_CONFIGS.items() if n.startswith(raw)]
            if len(hits) != 1:
                known = ", ".join(STANDARD_CONFIGS)
                what = "ambiguous" if hits else "unknown"
                raise ValueError(f"{what} configuration {raw!r}; known: {known}")
            chosen.append(hits[0])
    return [c.shrunk() for c in chosen] if quick else chosen
