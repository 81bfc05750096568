"""The dropout masks of one fused training step (docs/design.md steps 3-6: five sites).

A mask is a ``bool`` tensor, True where the element is kept. Two ways to have them in the
backward (``HeadTrainStep`` picks one per step):

- **stored** (``StoredMasks``): each site's mask drawn on its own and kept until the backward. On the
  CPU from one 64-bit random word per two elements (``random_`` on int64 words compared as two int32
  lanes against ``p * 2**32``: the drop probability is ``p`` rounded to a multiple of 2**-32), about
  4x cheaper than ``bernoulli_`` there;
- **regenerated** (``RegeneratedMasks``): one flat buffer for every site, filled by one
  ``bernoulli_`` per run of sites with the same p, from the device's default generator; a clone of
  that generator's state taken just before (``Generator.clone_state``) is all the step keeps, and
  the backward redraws the same masks from a fresh clone of it (so a retained graph redraws them
  again). Nothing mask-sized lives between forward and backward, and on CUDA the draw is one
  launch per run of equal p.

Regeneration needs the generator's state on the host: outside CUDA graph capture. Under capture
the CUDA generator keeps its offset in device memory and a clone taken during capture would not
follow the graph's replays (read in torch 2.14's ``Generator.clone_state``/``graphsafe_*`` docs and
torch/_functorch/partitioners.py's note on CUDA-graph-safe RNG, not run here), so callers store
the masks there. Fake CUDA tensors (launch counting without a GPU) have no generator: they draw
without one.
"""
from __future__ import annotations

import math

import torch

_LANES = 2 ** 32


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """A bool mask of the kept elements, P(False) = p (p rounded to a multiple of 2**-32), from the
    default generator of ``device`` (so ``torch.manual_seed`` makes it reproducible)."""
    n = math.prod(shape)
    if p >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    threshold = -2 ** 31 + round(p * _LANES)
    return (words.view(torch.int32)[:n] >= threshold).view(shape)


class StoredMasks:
    """Masks drawn per site and kept: ``masks`` maps a site's name to its mask."""

    def __init__(self, sites, device):
        self.masks = {name: keep_mask(shape, p, device) for name, shape, p in sites}

    def redraw(self) -> dict:
        return dict(self.masks)


def _default_generator(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None  # fake CUDA tensors: nothing is drawn


class RegeneratedMasks:
    """Masks drawn into one buffer from the default generator; only its state is kept."""

    def __init__(self, sites, device):
        self.sites = [(name, tuple(shape), p) for name, shape, p in sites]
        self.device = torch.device(device)
        generator = _default_generator(self.device)
        self.state = None if generator is None else generator.clone_state()
        self.masks = self._draw(generator)

    def _draw(self, generator) -> dict:
        sizes = [math.prod(shape) for _, shape, _ in self.sites]
        flat = torch.empty(sum(sizes), dtype=torch.bool, device=self.device)
        start = 0
        i = 0
        while i < len(self.sites):   # one draw per run of sites with the same p
            j, end = i, start
            while j < len(self.sites) and self.sites[j][2] == self.sites[i][2]:
                end += sizes[j]
                j += 1
            flat[start:end].bernoulli_(1.0 - self.sites[i][2], generator=generator)
            i, start = j, end
        masks, start = {}, 0
        for (name, shape, _), size in zip(self.sites, sizes):
            masks[name] = flat[start:start + size].view(shape)
            start += size
        return masks

    def redraw(self) -> dict:
        """The forward's masks again, drawn from a fresh clone of the saved state."""
        return self._draw(None if self.state is None else self.state.clone_state())

    def release(self) -> None:
        """Forget the forward's masks (the backward redraws them)."""
        self.masks = None
