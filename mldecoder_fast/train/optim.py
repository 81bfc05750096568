"""Optimizer and schedule of the ML-Decoder recipes (multi-label, ZSL): Adam with weight decay on
weight matrices only, OneCycleLR with pct_start 0.2 (docs/design.md, Training recipes)."""
from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4,
                    mode: str = "decoupled") -> torch.optim.Optimizer:
    """``mode="decoupled"``: AdamW (the recipe in docs/design.md). ``mode="l2"``: Adam with the
    decay added to the gradient, which is what the official train.py's
    ``Adam(add_weight_decay(...))`` does. No decay on biases and 1-D parameters (norm scales);
    frozen parameters (the decoder's query embedding) are left out: timm's
    ``param_groups_weight_decay``."""
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, weight_decay)
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
