"""The paper's query augmentation for zero-shot training (absent from the official code), applied to
the word queries of every training step; evaluation always uses the clean word vectors.

- noise: Gaussian noise added to every word query, with standard deviation ``noise`` x the
  vector's RMS entry (scale-free). 0: off.
- extra: ``extra`` random queries appended, drawn from a Gaussian with the word vectors'
  per-dimension mean and standard deviation, trained as negatives (target 0). 0: off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QueryAugment:
    """Training-time word-query augmentation (see the module docstring)."""
    noise: float = 0.1
    extra: int = 0

    def __call__(self, word_vectors: torch.Tensor, generator: torch.Generator | None = None):
        """(augmented queries [n + extra, 300], number of extra queries appended)."""
        v = word_vectors
        if self.noise > 0:
            rms = v.pow(2).mean(dim=1, keepdim=True).sqrt()
            v = v + self.noise * rms * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        if self.extra > 0:
            mean, std = word_vectors.mean(0), word_vectors.std(0, unbiased=False)
            extra = torch.randn((self.extra, v.shape[1]), generator=generator, dtype=v.dtype).to(v.device)
            v = torch.cat([v, mean + std * extra])
        return v, max(self.extra, 0)
