"""Model EMA: an exponential moving average of every weight and buffer, as the recipe's ModelEma."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """Keeps ``module``, a frozen eval-mode copy of a model, with e <- decay * e + (1 - decay) * m
    after every ``update(model)`` for floating-point tensors of the state_dict (parameters and
    buffers, BatchNorm statistics included); other buffers (counters) are copied.

    With ``warmup`` the decay of update t is min(decay, (1 + t) / (10 + t)), so that a short run's
    average is not dominated by the initial weights (the recipe has no warmup: 40 COCO epochs are
    ~80k updates).

    Its ``state_dict`` holds the averaged model and the update count, for exact resume.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        model_state = model.state_dict()
        ema_float, model_float = [], []
        for name, e in self.module.state_dict().items():
            m = model_state[name].detach()
            if e.is_floating_point():
                ema_float.append(e)
                model_float.append(m.to(device=e.device, dtype=e.dtype))
            else:
                e.copy_(m)
        if ema_float:
            torch._foreach_mul_(ema_float, decay)
            torch._foreach_add_(ema_float, model_float, alpha=1.0 - decay)

    def current_decay(self) -> float:
        """The decay the latest update used."""
        if self.warmup:
            return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        return self.decay

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
        self.updates = int(state.get("updates", 0))
