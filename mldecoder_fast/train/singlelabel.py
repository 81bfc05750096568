"""The single-label recipe for any class count (ImageNet-1K, ImageNet-21K) on the common
``Trainer``, on one process or under ``torchrun`` (DDP).

The defaults are the ImageNet A2 recipe of docs/design.md (Training recipes): ResNet-50, LAMB
lr 4e-3, weight decay 0.02 (none on biases and norm weights), cosine schedule with 5 warm-up epochs
over 300 epochs, batch 256 per process, binary cross-entropy with target threshold 0.2, mixup
0.1, cutmix 1.0, RandAugment rand-m7-mstd0.5-inc1, repeated augmentation x3, bicubic, mixed
precision on GPU. The remaining A2 settings follow timm's "ResNet strikes back" A2 (warm-up from
lr 1e-4, final lr 1e-6, drop-path 0.05, no label smoothing, validation crop 0.95). Validation:
top-1 / top-5 accuracy and mean cross-entropy, each image counted once over all ranks; best.pth
keeps the best top-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import distributed as D
from .trainer import Trainer, TrainerConfig

A2_DEFAULTS = dict(model="resnet50", image_size=224, epochs=300, batch_size=256, lr=4e-3,
                   opt="lamb", weight_decay=0.02, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6,
                   loss="bce", bce_target_thresh=0.2, smoothing=0.0, mixup=0.1, cutmix=1.0,
                   aa="rand-m7-mstd0.5-inc1", aug_repeats=3, interpolation="bicubic",
                   crop_pct=0.95, drop_path=0.05, workers=8)


@dataclass
class SingleLabelConfig(TrainerConfig):
    epochs: int = 300
    batch_size: int = 256            # per process
    lr: float = 4e-3
    weight_decay: float = 0.02
    workers: int = 8
    out_dir: str = "runs/singlelabel"
    opt: str = "lamb"                # any timm optimizer name (lamb, adamw, ...)
    warmup_epochs: float = 5
    warmup_lr: float = 1e-4
    min_lr: float = 1e-6
    loss: str = "bce"                # bce (with target threshold) | ce (softmax cross-entropy)
    bce_target_thresh: float | None = 0.2
    smoothing: float = 0.0
    mixup: float = 0.1
    cutmix: float = 1.0
    aa: str | None = "rand-m7-mstd0.5-inc1"
    aug_repeats: int = 3
    image_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.95


class SingleLabelTrainer(Trainer):
    best_key = "top1"
    stop_on_nonfinite = False        # as timm's train.py: fp16 overflow steps are the scaler's

    def __init__(self, model: nn.Module, train_set, val_set, class_names, cfg: SingleLabelConfig,
                 model_args: dict, info: D.DistInfo | None = None, log=print):
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch size per process, got {cfg.batch_size}")
        self.repeats = cfg.aug_repeats
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=cfg.smoothing, num_classes=len(class_names))
        super().__init__(model, train_set, val_set, class_names, cfg, model_args, info, log)

    def build_optimizer(self):
        from timm.optim import create_optimizer_v2
        return create_optimizer_v2(self.model, opt=self.cfg.opt, lr=self.cfg.lr,
                                   weight_decay=self.cfg.weight_decay, filter_bias_and_bn=True)

    def build_scheduler(self):
        from timm.scheduler import CosineLRScheduler
        cfg = self.cfg
        return CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr,
                                 warmup_t=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
                                 warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)

    def build_criterion(self):
        from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
        cfg = self.cfg
        if cfg.loss == "bce":
            return BinaryCrossEntropy(smoothing=cfg.smoothing, target_threshold=cfg.bce_target_thresh)
        if cfg.loss == "ce":
            return (SoftTargetCrossEntropy() if self.mixup is not None
                    else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing))
        raise ValueError(f"--loss must be bce or ce, got {cfg.loss!r}")

    def prepare_batch(self, x, y):
        return self.mixup(x, y) if self.mixup is not None else (x, y)

    def validate(self) -> dict:
        k = min(5, len(self.class_names))
        sums = torch.zeros(4, dtype=torch.float64)   # top1, top5, loss, count
        for out, y in self.eval_outputs(self.model):
            y = y.to(self.device, non_blocking=True)
            hit = out.topk(k, dim=1).indices == y[:, None]
            sums += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                  nn.functional.cross_entropy(out, y, reduction="sum").item(),
                                  y.numel()], dtype=torch.float64)
        sums = D.all_reduce_sum(sums, self.info)
        n = max(float(sums[3]), 1.0)
        return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n,
                "val_loss": float(sums[2]) / n, "val_images": int(sums[3])}

    def best_candidate(self, row: dict) -> dict | None:
        if "top1" not in row:
            return None
        return {"top1": row["top1"], "top5": row["top5"], "epoch": row["epoch"], "step": self.step}

    def epoch_message(self, row: dict) -> str:
        steady = row.get("images_per_s_steady")
        return (f"epoch {row['epoch']:.4g}/{self.cfg.epochs}  step {self.step}  loss "
                f"{row['train_loss']:.5g}  top1 {row.get('top1', float('nan')):.2f}  top5 "
                f"{row.get('top5', float('nan')):.2f}  {row['images_per_s']:.1f} img/s"
                + (f" ({steady:.1f} after warm-up)" if steady else "")
                + f"  peak mem {row['peak_memory_mb']:.0f} MiB/process  train "
                f"{row['train_s']:.1f}s val {row['val_s']:.1f}s")

    def checkpoint_metrics(self, row: dict) -> dict:
        return {k: row[k] for k in ("top1", "top5", "val_loss") if k in row}
