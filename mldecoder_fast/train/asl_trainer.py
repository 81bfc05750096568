"""What the two ML-Decoder paper recipes (multi-label MS-COCO and zero-shot NUS-WIDE) train with,
on the common ``Trainer``: Asymmetric Loss summed over the batch, Adam with decoupled or L2 weight
decay (none on biases and 1-D parameters), OneCycleLR stepped every optimizer step, model EMA
(docs/design.md, Training recipes)."""
from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import MULTILABEL_SCORES
from .ema import ModelEma
from .losses import AsymmetricLoss
from .optim import build_optimizer, build_scheduler
from .trainer import Trainer, TrainerConfig


@dataclass
class ASLConfig(TrainerConfig):
    epochs: int = 40
    batch_size: int = 56             # per process
    lr: float = 1e-4
    weight_decay: float = 1e-4
    workers: int = 8
    weight_decay_mode: str = "decoupled"   # decoupled (AdamW) | l2 (Adam, decay added to the gradient)
    pct_start: float = 0.2
    ema_decay: float = 0.9997
    ema_warmup: bool = False
    gamma_neg: float = 4
    gamma_pos: float = 0
    clip: float = 0.05


class ASLTrainer(Trainer):
    loss_sums_over_batch = True
    best_key = "mAP"
    score_keys = MULTILABEL_SCORES  # the model's and its EMA's score in an epoch row

    def build_optimizer(self):
        return build_optimizer(self.model, self.cfg.lr, self.cfg.weight_decay, self.cfg.weight_decay_mode)

    def build_scheduler(self):
        return build_scheduler(self.optimizer, self.cfg.lr, self.cfg.epochs, self.steps_per_epoch,
                               self.cfg.pct_start)

    def build_criterion(self):
        return AsymmetricLoss(self.cfg.gamma_neg, self.cfg.gamma_pos, self.cfg.clip)

    def build_ema(self):
        return ModelEma(self.model, self.cfg.ema_decay, self.cfg.ema_warmup)

    def checkpoint_metrics(self, row: dict) -> dict:
        """The model's and its EMA's score (``predict --weights auto`` takes the better one)."""
        return {k: row[k] for k in self.score_keys if k in row}

    def best_candidate(self, row: dict) -> dict | None:
        """The better of the model and its EMA."""
        model_key, ema_key = self.score_keys
        if model_key not in row:
            return None
        return {"mAP": max(row[model_key], row[ema_key]),
                "which": "ema" if row[ema_key] > row[model_key] else "model", "epoch": row["epoch"]}
