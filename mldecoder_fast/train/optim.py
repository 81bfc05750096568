"""Optimizer and schedule of the ML-Decoder recipes (multi-label, ZSL): Adam with weight decay on
weight matrices only, OneCycleLR with pct_start 0.2 (docs/design.md, Training recipes)."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Always two groups, decayed (weights of rank >= 2) and not decayed (biases and 1-D
    parameters such as norm scales); frozen parameters (the decoder's query embedding) are left
    out. timm's ``param_groups_weight_decay`` picks the same parameters but returns a single group
    when ``weight_decay`` is 0 (or when one group would be empty), and an optimizer state saved
    with two groups could then not be resumed: the group layout is part of every checkpoint."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4,
                    mode: str = "decoupled") -> torch.optim.Optimizer:
    """``mode="decoupled"``: AdamW (the recipe in docs/design.md). ``mode="l2"``: Adam with the
    decay added to the gradient, which is what the official train.py's
    ``Adam(add_weight_decay(...))`` does. Decay on weight matrices only (``param_groups``)."""
    groups = param_groups(model, weight_decay)
    if mode == "decoupled":
        return torch.optim.AdamW(groups, lr=lr)
    if mode == "l2":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"weight decay mode must be 'decoupled' or 'l2', got {mode!r}")


def build_scheduler(optimizer, lr: float, epochs: int, steps_per_epoch: int,
                    pct_start: float = 0.2):
    """OneCycleLR over ``epochs * steps_per_epoch`` steps, stepped after every optimizer step."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                               steps_per_epoch=steps_per_epoch, pct_start=pct_start)
