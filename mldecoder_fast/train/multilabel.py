"""The multi-label recipe (the ML-Decoder MS-COCO recipe, docs/design.md, Training recipes): the
``ASLTrainer`` (Asymmetric Loss, Adam, OneCycleLR, EMA) on multi-hot targets; after every epoch
the mAP of the model and of its EMA, the curves in ``curves.png``. Its data order is the one
``DataLoader(shuffle=True)`` gave it before it ran under torchrun (``samplers.DataLoaderOrder``),
sharded over the ranks under DDP.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .asl_trainer import ASLConfig, ASLTrainer
from .distributed import DistInfo
from .logs import plot_curves
from .metrics import chance_map, mean_average_precision

# The MS-COCO recipe of the paper (docs/design.md, Training recipes); --demo has its own (demo.py).
COCO_DEFAULTS = dict(model="tresnet_l", image_size=448, epochs=40, batch_size=56, lr=1e-4,
                     weight_decay=1e-4, ema_decay=0.9997, ema_warmup=False, decoder_embedding=768,
                     num_of_groups=-1, workers=8)


@dataclass
class TrainConfig(ASLConfig):
    out_dir: str = "runs/multilabel"
    plot: bool = True


class MultiLabelTrainer(ASLTrainer):
    order = "dataloader"

    def __init__(self, model, train_set, val_set, class_names, cfg: TrainConfig, model_args: dict,
                 device=None, info=None, log=print):
        if info is None and device is not None:
            info = DistInfo(device=torch.device(device))
        super().__init__(model, train_set, val_set, class_names, cfg, model_args, info, log)

    def validate(self) -> dict:
        scores, targets = self.gather_scores(self.model)
        scores_ema, _ = self.gather_scores(self.ema.module)
        return {"mAP": mean_average_precision(targets, scores),
                "mAP_ema": mean_average_precision(targets, scores_ema), "mAP_chance": chance_map(targets)}

    def epoch_message(self, row: dict) -> str:
        return (f"epoch {row['epoch']:.4g}/{self.cfg.epochs}  loss {row['train_loss']:.3f}  mAP "
                f"{row.get('mAP', float('nan')):.2f}  mAP(EMA) {row.get('mAP_ema', float('nan')):.2f}  "
                f"(chance {row.get('mAP_chance', float('nan')):.1f})  {row['images_per_s']:.1f} img/s  "
                f"train {row['train_s']:.1f}s val {row['val_s']:.1f}s")

    def log_fields(self) -> dict:
        return {"class_names": self.class_names}

    def summary_fields(self) -> dict:
        last = self.history["epochs"][-1] if self.history["epochs"] else {}
        return {"best_mAP": self.best["mAP"], "chance_mAP": last.get("mAP_chance")}

    def write_logs(self) -> None:
        super().write_logs()
        if self.cfg.plot:
            plot_curves(self.history, os.path.join(self.cfg.out_dir, "curves.png"), self.log)
