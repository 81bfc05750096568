"""Datasets of the recipes: images decoded from ``Sample`` paths, with multi-hot targets
(multi-label, ZSL) or a class index (single-label). An image that cannot be read stops training
with a ``BadImageError`` naming the file and its entry (json id, CSV or list line); none is skipped.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .formats.common import Sample
from .formats.image_lists import SampleTable


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded; the message names the file and its entry."""


def load_rgb(sample: Sample):
    """The image of ``sample`` as RGB, fully decoded (a truncated file fails here, not later)."""
    from PIL import Image
    try:
        with Image.open(sample.path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{sample.where}: image file {sample.path} is missing") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadImageError(f"{sample.where}: cannot decode image {sample.path} "
                            f"({type(exc).__name__}: {exc})") from None


class _ImageDataset(Dataset):
    """Decodes sample ``i``'s image and applies ``transform``; subclasses give the samples and
    the target."""

    def __init__(self, class_names, transform=None):
        self.class_names = list(class_names)
        self.transform = transform

    def sample(self, i: int) -> Sample:
        raise NotImplementedError

    def target(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        img = load_rgb(self.sample(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.target(i)


class MultiLabelDataset(_ImageDataset):
    """Images with multi-hot float targets [num_classes]."""

    def __init__(self, samples, class_names, transform=None):
        super().__init__(class_names, transform)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, i: int) -> Sample:
        return self.samples[i]

    def target(self, i: int) -> torch.Tensor:
        target = torch.zeros(len(self.class_names))
        target[list(self.samples[i].labels)] = 1
        return target


class SingleLabelDataset(_ImageDataset):
    """(image tensor, class index) pairs of a ``SampleTable``."""

    def __init__(self, table: SampleTable, class_names, transform=None):
        super().__init__(class_names, transform)
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def sample(self, i: int) -> Sample:
        return self.table.sample(i)

    def target(self, i: int) -> int:
        return int(self.table.labels[i])
