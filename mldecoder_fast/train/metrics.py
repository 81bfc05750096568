"""Validation metrics of the multi-label and ZSL recipes: mAP as the ML-Decoder / ASL code defines
it, and precision / recall / F1 of the top-k classes per image.

mAP, for one class: sort the samples by score, highest first; at every positive, the precision of
the list down to it; AP = the sum of those precisions / (number of positives + 1e-8). A class
with no positive scores 0 and still counts in the mean. mAP = 100 x the mean AP over classes.
This is hand-written rather than scikit-learn's ``average_precision_score`` because the official
numbers depend on that definition: scikit-learn leaves a class without positives undefined (and
warns), and its AP differs from the official one where scores tie.

Ties: the official code sorts with ``argsort()[::-1]``; here tied scores keep that order
deterministically (ascending stable sort, reversed: among equal scores the later sample first).
"""
from __future__ import annotations

import numpy as np
import torch

_EPS = 1e-8


def _as_2d(a, name):
    a = np.asarray(a.detach().cpu() if hasattr(a, "detach") else a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [num_samples, num_classes], got shape {a.shape}")
    return a


def average_precision(targets, scores) -> np.ndarray:
    """AP of every class: ``targets`` and ``scores`` are [num_samples, num_classes] (or 1-D for
    one class); targets are 1 for positives (anything else counts as negative). Returns [classes]."""
    t = _as_2d(targets, "targets")
    s = _as_2d(scores, "scores")
    if t.shape != s.shape:
        raise ValueError(f"targets {t.shape} and scores {s.shape} differ in shape")
    if t.shape[0] == 0:
        return np.zeros(t.shape[1])
    order = np.argsort(s, axis=0, kind="stable")[::-1]
    pos = np.take_along_axis(t, order, axis=0) == 1
    hits = np.cumsum(pos, axis=0)
    rank = np.arange(1, t.shape[0] + 1)[:, None]
    precision_at_pos = np.where(pos, hits / rank, 0.0)
    return precision_at_pos.sum(axis=0) / (pos.sum(axis=0) + _EPS)


def mean_average_precision(targets, scores) -> float:
    """mAP x 100 (the number the paper reports). Empty input gives 0."""
    t = _as_2d(targets, "targets")
    if t.size == 0:
        return 0.0
    return float(100.0 * average_precision(t, scores).mean())


def chance_map(targets) -> float:
    """Expected mAP of random scores: ~100 x the mean positive rate of the classes."""
    t = _as_2d(targets, "targets")
    return float(100.0 * (t == 1).mean(axis=0).mean()) if t.size else 0.0


def topk_prf(targets, scores, k: int) -> dict:
    """Precision, recall and F1 (x100) of the top-k scored classes of every image, micro-averaged
    over the images with at least one positive: P = hits / (k x images), R = hits / positives."""
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    if t.shape != s.shape:
        raise ValueError(f"targets {tuple(t.shape)} and scores {tuple(s.shape)} differ in shape")
    keep = (t == 1).any(dim=1)
    t, s = t[keep], s[keep]
    if t.shape[0] == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "images": 0}
    k = min(k, t.shape[1])
    top = s.topk(k, dim=1).indices
    hits = float((t.gather(1, top) == 1).sum())
    p = hits / (k * t.shape[0])
    r = hits / float((t == 1).sum())
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f1, "images": int(t.shape[0])}


def zsl_metrics(targets, scores, ks=(3, 5)) -> dict:
    """mAP (official definition, all images) and top-k precision/recall/F1 for one evaluation."""
    t, s = np.asarray(targets), np.asarray(scores)
    out = {"mAP": mean_average_precision(t, s)}
    for k in ks:
        prf = topk_prf(t, s, k)
        out.update({f"P@{k}": prf["precision"], f"R@{k}": prf["recall"], f"F1@{k}": prf["f1"]})
    return out
