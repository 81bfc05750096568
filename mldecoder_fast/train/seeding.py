"""The random generators of a run: seeding them, and saving / restoring their states.

One helper seeds every recipe's global generators (python, numpy, torch), before the model is
built and before training. ``timm.utils.random_seed`` does the same but hands numpy the seed as is,
which numpy refuses above 2**32 - 1; ``rank_seed`` makes 63-bit seeds, so numpy gets them mod 2**32.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["seed_everything", "rank_seed", "sample_seed", "rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's (mod 2**32) and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's global generators (dropout, drop-path, mixup draws)."""
    return (int(seed) * 1_000_003 + int(rank) * 7919) % (2**63 - 1)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one sample's augmentation, from (run seed, epoch, global position)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) generator states, as tensors and plain values (a
    checkpoint entry that ``torch.load(weights_only=True)`` reads)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states ``rng_state`` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

