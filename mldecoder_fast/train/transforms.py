"""Image transforms of the recipes.

- ``build_transforms``: the ML-Decoder recipes' (multi-label, ZSL): resize to a square; for
  training cutout then RandAugment (torchvision's); to a [0, 1] tensor, normalised by the
  backbone's mean/std unless they are the identity (TResNet).
- ``build_imagenet_transforms``: timm's ImageNet transforms for the single-label recipe.
"""
from __future__ import annotations

import torch


class Cutout:
    """Paint one rectangle of ``factor`` x the image's sides, centred at a random point (clipped at
    the borders), with a random colour (the recipe's cutout, factor 0.5). PIL in, PIL out; draws
    from torch's RNG so that seeded runs repeat."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def __call__(self, img):
        from PIL import ImageDraw
        w, h = img.size
        ch, cw = int(self.factor * h + 0.5), int(self.factor * w + 0.5)
        yc, xc = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y1, y2 = max(yc - ch // 2, 0), min(yc + ch // 2, h)
        x1, x2 = max(xc - cw // 2, 0), min(xc + cw // 2, w)
        color = tuple(int(c) for c in torch.randint(256, (3,)))
        img = img.copy()
        ImageDraw.Draw(img).rectangle([x1, y1, x2, y2], fill=color)
        return img

    def __repr__(self) -> str:
        return f"Cutout(factor={self.factor})"


def build_transforms(image_size: int, train: bool, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     randaugment: bool = True, cutout: float = 0.5):
    """The recipe's transforms: resize to a square; for training cutout then RandAugment; to a
    [0, 1] tensor, then normalised by the backbone's mean/std (identity for TResNet)."""
    from torchvision import transforms as T
    ops = [T.Resize((image_size, image_size))]
    if train:
        if cutout > 0:
            ops.append(Cutout(cutout))
        if randaugment:
            ops.append(T.RandAugment())
    ops.append(T.ToTensor())
    if tuple(mean) != (0.0, 0.0, 0.0) or tuple(std) != (1.0, 1.0, 1.0):
        ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


def build_imagenet_transforms(image_size: int, aa: str | None, interpolation: str, crop_pct: float,
                              mean, std):
    """timm's ``create_transform``: RandomResizedCrop + flip + RandAugment policy ``aa`` (None,
    "none" or "off": no RandAugment) for training, as timm's train.py with ``--aa``; resize +
    center crop ``crop_pct`` for validation. Returns (train, val)."""
    from timm.data import create_transform
    aa = aa if aa and aa.lower() not in ("none", "off", "") else None
    train = create_transform(image_size, is_training=True, auto_augment=aa,
                             interpolation=interpolation, mean=mean, std=std, re_prob=0.0)
    val = create_transform(image_size, is_training=False, interpolation=interpolation,
                           crop_pct=crop_pct, mean=mean, std=std)
    return train, val
