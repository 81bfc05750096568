"""A small real multi-label dataset that needs no download: digit mosaics.

scikit-learn ships 1,797 real 8x8 handwritten digits (the UCI optdigits test set). Each mosaic is
a ``grid`` x ``grid`` board with 1 to ``max_digits`` digits put in random cells; its labels are
the digits present (10 classes, "0" to "9"). The digits are split 60/40 into a training and a
held-out pool first, so validation mosaics are made only of handwriting the model never saw.
With the defaults a class is present in ~22% of the images: random scores give mAP ~22.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CLASS_NAMES = [str(d) for d in range(10)]


def load_digits():
    """(images [1797, 8, 8] float in [0, 1], labels [1797]) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise ImportError("the demo dataset comes from scikit-learn: pip install scikit-learn") from None
    d = sk_load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)


def make_mosaics(digits: torch.Tensor, labels: torch.Tensor, n: int, image_size: int = 64,
                 grid: int = 3, max_digits: int = 4, generator: torch.Generator | None = None):
    """``n`` mosaics: uint8 images [n, 3, S, S] and multi-hot targets [n, 10]."""
    cell = image_size // grid
    pad = image_size - cell * grid
    tiles = F.interpolate(digits[:, None], size=(cell, cell), mode="bilinear", align_corners=False)
    tiles = tiles[:, 0].clamp(0, 1)
    images = torch.zeros(n, image_size, image_size)
    targets = torch.zeros(n, len(CLASS_NAMES))
    for i in range(n):
        k = int(torch.randint(1, max_digits + 1, (), generator=generator))
        cells = torch.randperm(grid * grid, generator=generator)[:k]
        picks = torch.randint(len(digits), (k,), generator=generator)
        off = torch.randint(0, pad + 1, (2,), generator=generator) if pad else (0, 0)
        for c, p in zip(cells.tolist(), picks.tolist(), strict=True):
            r, col = divmod(c, grid)
            y0, x0 = int(off[0]) + r * cell, int(off[1]) + col * cell
            images[i, y0:y0 + cell, x0:x0 + cell] = tiles[p]
            targets[i, labels[p]] = 1
    images = (images * 255).round().to(torch.uint8)[:, None].expand(-1, 3, -1, -1).contiguous()
    return images, targets


class MosaicDataset(Dataset):
    """In-memory uint8 mosaics, served as float images normalised like the backbone's input."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, mean, std):
        self.images, self.target_tensor = images, targets
        self.class_names = list(CLASS_NAMES)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255)
        return (x - self.mean) / self.std, self.target_tensor[i]

    def save_examples(self, folder: str, count: int = 8) -> list:
        """Write the first ``count`` mosaics as PNGs named by their digits (for ``predict``)."""
        from PIL import Image
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i in range(min(count, len(self))):
            digits = "".join(c for c, t in zip(self.class_names, self.target_tensor[i], strict=True) if t > 0)
            path = os.path.join(folder, f"mosaic{i:02d}_digits_{digits}.png")
            Image.fromarray(self.images[i].permute(1, 2, 0).numpy()).save(path)
            paths.append(path)
        return paths


def demo_datasets(train_size: int, val_size: int, image_size: int, mean, std, seed: int = 0,
                  grid: int = 3, max_digits: int = 4):
    """(train, val) mosaic datasets; the digit pools and mosaics depend only on ``seed``."""
    digits, labels = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits), generator=g)
    n_train = int(0.6 * len(digits))
    tr, va = order[:n_train], order[n_train:]
    train = make_mosaics(digits[tr], labels[tr], train_size, image_size, grid, max_digits, g)
    val = make_mosaics(digits[va], labels[va], val_size, image_size, grid, max_digits, g)
    return MosaicDataset(*train, mean, std), MosaicDataset(*val, mean, std)

