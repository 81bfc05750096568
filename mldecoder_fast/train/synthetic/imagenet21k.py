"""A generated ImageNet-21K-style dataset: small images, labels over all 21,843 classes, list files.

    python -m mldecoder_fast.train.imagenet21k OUT [--train-images N] [--val-images N] [--image-size 32]

writes

    OUT/classes.txt        one class name per line (21,843 wnid-like names, n00000000 ...)
    OUT/train.txt          "train/<dir>/<file>.png <class index>" per line
    OUT/val.txt            the same for the validation split
    OUT/train/, OUT/val/   PNG images
    OUT/meta.json          what was generated

for ``mldecoder-fast train singlelabel --train-list OUT/train.txt --val-list OUT/val.txt
--classes OUT/classes.txt``. Training labels are spread over every class: with at least as many
training images as classes every class appears (image i has class i mod C, in a shuffled order);
with fewer, the labels are evenly spaced over [0, C) so the highest indices are exercised too.
Validation images take their classes from the training labels.

Each image shows its class: the 15 bits of the class index (and a parity bit) as a 4 x 4 grid of
bright or dark cells, tinted by the class, with a random shift and pixel noise, so a model can
learn it (slowly: 21,843 classes from one or two images each).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ...cli.types import SEED, int_range

IMAGENET21K_CLASSES = 21843
_BITS = 16


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image [size, size, 3] encoding ``label``."""
    bits = [(label >> b) & 1 for b in range(_BITS - 1)]
    bits.append(sum(bits) & 1)
    grid = np.asarray(bits, dtype=np.float32).reshape(4, 4)
    tint = np.asarray([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], np.float32) / 255
    cells = grid[..., None] * (0.55 + 0.45 * tint) + (1 - grid[..., None]) * 0.15 * tint
    cell = max(size // 5, 1)
    img = np.kron(cells, np.ones((cell, cell, 1), np.float32))
    canvas = np.full((size, size, 3), 0.5, np.float32)
    h = min(img.shape[0], size)
    dy, dx = (int(v) for v in rng.integers(0, size - h + 1, size=2))
    canvas[dy:dy + h, dx:dx + h] = img[:h, :h]
    canvas += rng.normal(0, 0.06, canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def class_names(num_classes: int) -> list:
    return [f"n{i:08d}" for i in range(num_classes)]


def generate_imagenet21k(out_dir: str, num_classes: int = IMAGENET21K_CLASSES,
                         train_images: int | None = None, val_images: int = 2000,
                         image_size: int = 32, seed: int = 0, progress: bool = False) -> dict:
    """Write the dataset (see the module docstring); returns the paths and counts."""
    from PIL import Image
    if num_classes < 1 or image_size < 8:
        raise ValueError("num_classes must be >= 1 and image_size >= 8")
    train_images = num_classes if train_images is None else int(train_images)
    if train_images < 1 or val_images < 0:
        raise ValueError("train_images must be >= 1 and val_images >= 0")
    rng = np.random.default_rng(seed)
    if train_images >= num_classes:
        train_labels = np.arange(train_images) % num_classes
        rng.shuffle(train_labels)
    else:  # evenly spread over [0, C), with a random offset inside each stride
        stride = num_classes / train_images
        train_labels = np.minimum((np.arange(train_images) * stride
                                   + rng.uniform(0, stride, train_images)).astype(np.int64), num_classes - 1)
    val_labels = rng.choice(train_labels, size=val_images, replace=True) if val_images else np.zeros(0, int)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "classes.txt"), "w") as f:
        f.write("\n".join(class_names(num_classes)) + "\n")
    total = train_images + val_images
    done = 0
    for split, labels in (("train", train_labels), ("val", val_labels)):
        lines = []
        for i, c in enumerate(labels):
            rel = f"{split}/{i // 1000:04d}/{i:07d}.png"
            path = os.path.join(out_dir, rel)
            if i % 1000 == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(class_image(int(c), image_size, rng)).save(path, compress_level=1)
            lines.append(f"{rel} {int(c)}")
            done += 1
            if progress and done % 2000 == 0:
                print(f"  {done}/{total} images", file=sys.stderr)
        with open(os.path.join(out_dir, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
    meta = {"num_classes": num_classes, "train_images": train_images, "val_images": val_images,
            "image_size": image_size, "seed": seed,
            "train_classes_covered": int(len(np.unique(train_labels))),
            "classes": os.path.join(out_dir, "classes.txt"),
            "train_list": os.path.join(out_dir, "train.txt"),
            "val_list": os.path.join(out_dir, "val.txt")}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mldecoder_fast.train.imagenet21k",
                                description="Generate an ImageNet-21K-style dataset (list files + PNGs).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--num-classes", type=int_range(1), default=IMAGENET21K_CLASSES)
    p.add_argument("--train-images", type=int_range(1), default=None, help="default: one per class")
    p.add_argument("--val-images", type=int_range(0), default=2000)
    p.add_argument("--image-size", type=int_range(8), default=32)
    p.add_argument("--seed", type=SEED, default=0)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    meta = generate_imagenet21k(a.out, a.num_classes, a.train_images, a.val_images, a.image_size,
                                a.seed, progress=True)
    print(json.dumps(meta, indent=1))
    return 0

