"""The dropout masks of one fused training step (docs/design.md steps 3-6: five sites).

A mask is True (1) where the element is kept: a ``bool`` tensor, or one in the dtype of the
tensors it multiplies (the CPU's bf16 step: there an elementwise op on a bool and a bf16 tensor
first casts the bool one, and ``addcmul`` with a bf16 mask measured 6x faster than with a bool
one, at twice the bytes). Two ways to have them in the
backward (``HeadTrainStep`` picks one per step):

- **stored** (``StoredMasks``): each site's mask drawn on its own and kept until the backward. On the
  CPU from one 64-bit random word per four elements (``keep_mask``: 16-bit lanes, the rare lane that
  ties with the threshold decided by 32 more random bits, so the drop probability is ``p`` rounded
  to a multiple of 2**-48), several times cheaper than ``bernoulli_`` there;
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

_LANE = 2 ** 16   # values of one 16-bit lane
_TIE = 2 ** 32    # resolution of the second draw that decides a tied lane


def keep_mask(shape, p: float, device, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """A mask of the kept elements in ``dtype`` (1 kept, 0 dropped), P(dropped) = p (p rounded to
    a multiple of 2**-48), from the default generator of ``device`` (so ``torch.manual_seed`` makes
    it reproducible).

    Each element reads a uniform 16-bit lane (four per 64-bit word drawn over the full range, which
    needs no modulo): below ``k = floor(p * 2**16)`` it is dropped, above kept; a lane equal to k
    (probability 2**-16: a handful per mask) is dropped with probability ``p * 2**16 - k``, from 32
    bits of its own. Half the random bits and a narrower compare than one 32-bit lane each. Shapes
    stay static (no host synchronisation): the tied lanes are looked for in at most ``_tie_bound``
    8-lane groups; should more groups hold one (probability below 1e-25), the rest are dropped."""
    n = math.prod(shape)
    k, rest = divmod(p * _LANE, 1.0)
    k, tie_drop = int(k), round(rest * _TIE)
    if tie_drop == _TIE:
        k, tie_drop = k + 1, 0
    if k >= _LANE:
        return torch.zeros(shape, dtype=dtype, device=device)
    words = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(-2 ** 63, None)
    lanes = words.view(torch.int16)[:n]
    tie = -2 ** 15 + k
    if not tie_drop:
        return torch.ge(lanes, tie, out=torch.empty(n, dtype=dtype, device=device)).view(shape)
    # Flags padded to whole 8-lane groups plus one spare group, which the search's padding indexes.
    groups = -(-n // 8)
    keep = torch.empty(8 * (groups + 1), dtype=dtype, device=device)
    tied = torch.empty(8 * (groups + 1), dtype=torch.bool, device=device)
    keep[n:] = tied[n:] = False
    torch.gt(lanes, tie, out=keep[:n])
    torch.eq(lanes, tie, out=tied[:n])
    found = torch.nonzero_static(tied.view(torch.int64), size=_tie_bound(n), fill_value=groups)
    lane = (found * 8 + torch.arange(8, device=device)).view(-1)
    draw = torch.empty(lane.numel(), dtype=torch.int32, device=device).random_(-2 ** 31, None)
    keep[lane] = torch.where(tied[lane], draw >= -2 ** 31 + tie_drop, keep[lane])
    return keep[:n].view(shape)


def _tie_bound(n: int) -> int:
    """How many 8-lane groups to search for tied lanes: twice the expected number (at most n/2**16)
    plus 64; more groups than that hold a tie with probability below 1e-25 at any n (Chernoff)."""
    return 2 * -(-n // _LANE) + 64


class StoredMasks:
    """Masks drawn per site and kept: ``masks`` maps a site's name to its mask (in ``dtype``)."""

    def __init__(self, sites, device, dtype: torch.dtype = torch.bool):
        self.masks = {name: keep_mask(shape, p, device, dtype) for name, shape, p in sites}

    def redraw(self) -> dict:
        return dict(self.masks)

    def release(self) -> None:
        """Forget the masks (after the last backward that needs them)."""
        self.masks = None


def _default_generator(device: torch.device):
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None  # fake CUDA tensors: nothing is drawn


class RegeneratedMasks:
    """Masks drawn into one buffer (in ``dtype``) from the default generator; only its state is
    kept."""

    def __init__(self, sites, device, dtype: torch.dtype = torch.bool):
        self.sites = [(name, tuple(shape), p) for name, shape, p in sites]
        self.device = torch.device(device)
        self.dtype = dtype
        generator = _default_generator(self.device)
        self.state = None if generator is None else generator.clone_state()
        self.masks = self._draw(generator)

    def _draw(self, generator) -> dict:
        sizes = [math.prod(shape) for _, shape, _ in self.sites]
        flat = torch.empty(sum(sizes), dtype=self.dtype, device=self.device)
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
        for (name, shape, _), size in zip(self.sites, sizes, strict=True):
            masks[name] = flat[start:start + size].view(shape)
            start += size
        return masks

    def redraw(self) -> dict:
        """The forward's masks again, drawn from a fresh clone of the saved state."""
        return self._draw(None if self.state is None else self.state.clone_state())

    def release(self) -> None:
        """Forget the forward's masks (the backward redraws them)."""
        self.masks = None


def dropout_scale(p: float) -> float:
    """The scale of kept elements, 1 / (1 - p) (0 when everything is dropped)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def dropped(x, keep, s: float, zero, out=None):
    """dropout(x) = s·x·keep in one op (``out=x``: in place); x itself without a mask."""
    if keep is None:
        return x
    return torch.addcmul(zero, x, keep, value=s, out=out) if out is not None else \
        torch.addcmul(zero, x, keep, value=s)
