"""A miniature NUS-WIDE zero-shot data set in the official formats (data.csv,
benchmark_81_v0.json, wordvec_array.pth, images/), for trying ``mldecoder-fast train zsl``.

The images are coloured shapes on grey; a class is a (colour, shape) pair whose word vector is the
sum of a colour and a shape vector (plus a little noise). The unseen pairs use only colours and
shapes that the seen pairs show, so they can be recognised from their word vectors.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch

from ..formats.nus_wide import CSV_NAME, SPLIT_NAME, WORDVEC_DIM, WORDVEC_NAME

_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "purple": (150, 50, 190), "cyan": (40, 200, 210)}
_SHAPES = ("square", "circle", "triangle", "cross")


def _draw(draw, shape, box, color):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        w = max((x1 - x0) // 4, 1)
        draw.rectangle([(x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1], fill=color)
        draw.rectangle([x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w], fill=color)


def make_miniature(out_dir: str, train_images: int = 96, val_images: int = 32, image_size: int = 48,
                   seed: int = 0, max_objects: int = 3) -> dict:
    """Write data.csv, benchmark_81_v0.json, wordvec_array.pth and images/ (see the module
    docstring); returns a description."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    colors, shapes = list(_COLORS), list(_SHAPES)
    classes = sorted(f"{c}_{s}" for c in colors for s in shapes)
    unseen = sorted(f"{c}_{shapes[i % len(shapes)]}" for i, c in enumerate(colors))
    seen = [c for c in classes if c not in unseen]
    color_vec = {c: rng.normal(0, 1, WORDVEC_DIM) for c in colors}
    shape_vec = {s: rng.normal(0, 1, WORDVEC_DIM) for s in shapes}
    wv = np.stack([color_vec[c.split("_")[0]] + shape_vec[c.split("_")[1]] + rng.normal(0, 0.1, WORDVEC_DIM)
                   for c in classes], axis=1).astype(np.float32)            # [300, C], official layout
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    if train_images < len(classes) or val_images < len(unseen):
        raise ValueError(f"the miniature needs >= {len(classes)} training and >= {len(unseen)} "
                         "validation images (every class must occur in data.csv)")
    for split, n in (("train", train_images), ("val", val_images)):
        # every class occurs in training, every unseen class in validation
        cycle = classes if split == "train" else unseen
        for i in range(n):
            k = int(rng.integers(1, max_objects + 1))
            labels = rng.choice(classes, size=k, replace=True).tolist()
            if i < len(cycle):
                labels[0] = cycle[i]
            labels = sorted(set(labels))
            img = Image.new("RGB", (image_size, image_size), (128, 128, 128))
            draw = ImageDraw.Draw(img)
            side = image_size // 3
            for lab in labels:
                c, s = lab.split("_")
                x0, y0 = (int(v) for v in rng.integers(0, image_size - side, size=2))
                _draw(draw, s, [x0, y0, x0 + side, y0 + side], _COLORS[c])
            rel = f"images/{split}_{i:05d}.png"
            img.save(os.path.join(out_dir, rel))
            rows.append((rel, str(labels), split))
    with open(os.path.join(out_dir, CSV_NAME), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "label", "split"])
        w.writerows(rows)
    with open(os.path.join(out_dir, SPLIT_NAME), "w") as f:
        json.dump({"train class": seen, "test class": unseen}, f, indent=1)
    torch.save(torch.from_numpy(wv), os.path.join(out_dir, WORDVEC_NAME))
    return {"classes": len(classes), "seen": len(seen), "unseen": len(unseen),
            "train_images": train_images, "val_images": val_images, "dir": out_dir}

