"""The data order of training and validation, on one process or sharded over DDP ranks.

- ``EpochSampler``: one rank's share of a training epoch. The global order comes from torch's
  ``DistributedSampler`` (or timm's ``RepeatAugSampler`` for repeated augmentation), or, for the
  multi-label recipe, ``DataLoaderOrder``; each hands rank r the positions r, r + W, r + 2W, ...
  of one global order, so step s of the W ranks together covers global positions
  [s*B, (s+1)*B) for the global batch B, whatever W is. The sampler yields ``(index, key)``: the
  key (epoch, global position) seeds that sample's augmentation (``KeyedDataset``). A run resumed
  mid-epoch, on the same or on a different number of processes with the same global batch, skips
  exactly the samples already seen, and every later global batch holds the same images with the
  same augmentations.
- ``EvalShardSampler``: validation positions r, r + W, ... without padding, so sums reduced over
  ranks count every validation image exactly once.
"""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .seeding import sample_seed, seed_everything

__all__ = ["EpochSampler", "DataLoaderOrder", "EvalShardSampler", "KeyedDataset"]

ORDERS = ("sampler", "dataloader")


class DataLoaderOrder(Sampler):
    """The order ``DataLoader(dataset, shuffle=True, generator=G)`` gives an epoch, with G seeded
    by ``seed * 100_003 + epoch`` (the multi-label recipe's order, which its recorded runs follow),
    rank r's share being positions r, r + W, ... (the tail that would not fill every rank is left
    out)."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.n, self.num_replicas, self.rank, self.seed = len(dataset), num_replicas, rank, seed
        self.num_samples = self.n // num_replicas
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=g)  # DataLoader's draw of its base seed
        order = torch.randperm(self.n, generator=g)[:self.num_samples * self.num_replicas]
        return iter(order[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EpochSampler(Sampler):
    """One rank's share of an epoch, as ``(dataset index, (epoch, global position))`` pairs.

    ``order="dataloader"`` uses ``DataLoaderOrder``; otherwise ``repeats > 1`` uses timm's
    ``RepeatAugSampler`` (each image ``repeats`` times per epoch, the copies on different ranks),
    and ``repeats == 1`` torch's ``DistributedSampler`` (shuffled, the tail dropped so every rank
    gets the same count). Both hand rank r the positions r, r + W, ... of one global
    order, so the global position of the j-th sample of rank r is j*W + r.

    ``set_epoch(epoch, skip_steps)`` picks the epoch (its order is seeded by ``seed`` and the epoch)
    and skips the first ``skip_steps`` local batches, for a resume in the middle of an epoch.
    ``steps`` is the number of full local batches per epoch (at most ``max_steps`` when that is > 0:
    shorter epochs).
    """

    def __init__(self, dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 repeats: int = 1, shuffle: bool = True, order: str = "sampler", max_steps: int = 0):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.repeats = repeats
        if order == "dataloader":
            self.base = DataLoaderOrder(dataset, world_size, rank, seed)
        elif repeats and repeats > 1:
            from timm.data.distributed_sampler import RepeatAugSampler
            self.base = RepeatAugSampler(dataset, num_replicas=world_size, rank=rank,
                                         shuffle=shuffle, num_repeats=repeats)
        else:
            from torch.utils.data import DistributedSampler
            self.base = DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                           shuffle=shuffle, seed=seed, drop_last=True)
        self.steps = len(self.base) // self.batch_size
        if max_steps > 0:
            self.steps = min(self.steps, max_steps)
        if self.steps == 0:
            raise ValueError(f"the training set ({len(dataset)} images, {len(self.base)} per process "
                             f"over {world_size} process(es)) is smaller than one batch of "
                             f"{self.batch_size} per process")
        self.epoch = 0
        self.skip_steps = 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip_steps = int(skip_steps)
        # RepeatAugSampler seeds its permutation with the epoch alone: fold the run seed in.
        repeat_aug = not isinstance(self.base, (torch.utils.data.DistributedSampler, DataLoaderOrder))
        self.base.set_epoch(self.seed * 100_003 + self.epoch if repeat_aug else self.epoch)

    def __iter__(self):
        start = self.skip_steps * self.batch_size
        end = self.steps * self.batch_size
        for j, index in enumerate(self.base):
            if j >= end:
                break
            if j >= start:
                yield int(index), (self.epoch, j * self.world_size + self.rank)

    def __len__(self) -> int:
        return (self.steps - self.skip_steps) * self.batch_size


class EvalShardSampler(Sampler):
    """Positions rank, rank + W, ... of a dataset, in order and without padding."""

    def __init__(self, dataset, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = len(dataset), int(rank), int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class KeyedDataset(Dataset):
    """Wraps a dataset so that item ``(index, (epoch, position))`` is drawn with python, numpy and
    torch generators seeded by ``sample_seed(seed, epoch, position)``: the augmentation of a sample
    depends on the run seed and its place in the epoch only, not on the worker, the rank, the
    number of processes or where a run was resumed. The caller's generator states are restored
    afterwards (the data may load in the main process, whose generators drive dropout)."""

    def __init__(self, base, seed: int = 0):
        self.base = base
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        if not isinstance(item, tuple):
            return self.base[item]
        index, (epoch, position) = item
        s = sample_seed(self.seed, epoch, position)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_everything(s)
            try:
                return self.base[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

