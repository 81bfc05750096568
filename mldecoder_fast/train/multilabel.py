"""The multi-label training loop (the ML-Decoder MS-COCO recipe) and its model factory.

One optimizer step: forward under autocast (fp16 on CUDA by default), Asymmetric Loss on float32
logits, scaled backward, optimizer step, OneCycleLR step, EMA update. After every epoch: mAP of the
model and of its EMA on the validation set, a row in ``log.csv`` / ``log.json``, the curves in
``curves.png``, and ``last.pth`` (plus ``best.pth`` when the better of the two mAPs improves).

Runs repeat exactly: the data order and augmentations of epoch e come from a generator seeded with
``seed + e``; dropout and drop-path use the global generators, whose states the checkpoint saves,
so a run resumed from ``last.pth`` continues as the uninterrupted run would have.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from .amp import autocast, resolve_amp_dtype
from .checkpoint import (CheckpointError, check_classes, load_checkpoint, restore_training_state,
                         save_checkpoint, set_rng_state, write_run_logs)
from .ema import ModelEma
from .losses import AsymmetricLoss
from .metrics import chance_map, mean_average_precision
from .optim import build_optimizer, build_scheduler


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 56
    lr: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_mode: str = "decoupled"
    pct_start: float = 0.2
    ema_decay: float = 0.9997
    ema_warmup: bool = False
    amp: str = "auto"                 # auto (fp16 on CUDA, off on CPU) | fp16 | bf16 | off
    gamma_neg: float = 4
    gamma_pos: float = 0
    clip: float = 0.05
    workers: int = 8
    seed: int = 0
    max_steps_per_epoch: int = 0      # 0: the whole loader (>0: shorter epochs, for smoke runs)
    val_batch_size: int = 0           # 0: batch_size
    out_dir: str = "runs/multilabel"
    progress: bool = True
    plot: bool = True
    save_checkpoints: bool = True
    extra: dict = field(default_factory=dict)


# model -----------------------------------------------------------------------------------------
def build_model(model_name: str, num_classes: int, head: str = "fast", num_of_groups: int = -1,
                decoder_embedding: int = 768, pretrained: bool = False, model_kwargs=None,
                backend: str = "auto"):
    """A timm backbone with an ML-Decoder head (``head``: "fast" or "reference")."""
    try:
        import timm
    except ImportError:
        raise ImportError("training needs timm: pip install 'mldecoder-fast[timm]'") from None
    from ..timm_head import add_ml_decoder_head
    if head not in ("fast", "reference"):
        raise ValueError(f"head must be 'fast' or 'reference', got {head!r}")
    model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
    return add_ml_decoder_head(model, num_classes=num_classes, num_of_groups=num_of_groups,
                               decoder_embedding=decoder_embedding, fast=(head == "fast"),
                               backend=backend)


def model_from_args(model_args: dict, head=None, backend: str = "auto"):
    """Rebuild the model a checkpoint describes (random weights; load the state_dict after)."""
    return build_model(model_args["model"], model_args["num_classes"],
                       head=head or model_args.get("head", "fast"),
                       num_of_groups=model_args.get("num_of_groups", -1),
                       decoder_embedding=model_args.get("decoder_embedding", 768),
                       model_kwargs=model_args.get("model_kwargs") or {}, backend=backend)


def data_config(model) -> dict:
    """mean/std/interpolation the backbone expects (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


# helpers ---------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _seed_worker(worker_id):
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, shuffle, workers, seed=0, epoch=0, drop_last=False):
    g = torch.Generator()
    g.manual_seed(seed * 100003 + epoch)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=g, worker_init_fn=_seed_worker, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


@torch.no_grad()
def predict_scores(model, loader, device, amp_dtype=None):
    """Sigmoid scores and targets of a whole loader (model in eval mode)."""
    model.eval()
    scores, targets = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device.type, amp_dtype):
            out = model(x)
        scores.append(torch.sigmoid(out.float()).cpu())
        targets.append(y.cpu())
    return torch.cat(scores), torch.cat(targets)


# the loop --------------------------------------------------------------------------------------
class MultiLabelTrainer:
    """Owns the model, EMA, optimizer, schedule, scaler and history of one run."""

    def __init__(self, model, train_set, val_set, class_names, cfg: TrainConfig, model_args: dict,
                 device=None, log=print):
        self.cfg = cfg
        self.log = log
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)
        self.train_set, self.val_set = train_set, val_set
        self.class_names = list(class_names)
        self.model_args = dict(model_args)
        self.amp_dtype = resolve_amp_dtype(cfg.amp, self.device)
        self.criterion = AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.weight_decay_mode)
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = build_scheduler(self.optimizer, cfg.lr, cfg.epochs, self.steps_per_epoch, cfg.pct_start)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEma(self.model, cfg.ema_decay, cfg.ema_warmup)
        self.epoch = 0
        self.step = 0
        self.history = {"steps": [], "epochs": []}
        self.best = {"mAP": -1.0}

    def _steps_per_epoch(self) -> int:
        n = len(self.train_set) // self.cfg.batch_size  # drop_last: every step sees a full batch
        if n == 0:
            raise ValueError(f"the training set has {len(self.train_set)} images, fewer than one "
                             f"batch of {self.cfg.batch_size}")
        if self.cfg.max_steps_per_epoch > 0:
            n = min(n, self.cfg.max_steps_per_epoch)
        return n

    # checkpoints ----------------------------------------------------------------------------------
    def save(self, path, metrics=None) -> None:
        save_checkpoint(path, model=self.model, class_names=self.class_names, model_args=self.model_args,
                        ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler,
                        scaler=self.scaler, epoch=self.epoch, step=self.step, metrics=metrics,
                        history={**self.history, "best": self.best, "config": asdict(self.cfg)})

    def resume(self, path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        check_classes(ckpt, self.class_names, "the training data")
        for key in ("ema", "optimizer", "scheduler", "rng"):
            if key not in ckpt:
                raise ValueError(f"{path}: not a training checkpoint (no '{key}' entry): use it as "
                                 "initial weights instead of resuming from it")
        saved_total = ckpt["scheduler"].get("total_steps")
        if saved_total is not None and saved_total != self.scheduler.total_steps:
            saved_cfg = (ckpt.get("history") or {}).get("config", {})
            raise CheckpointError(
                f"{path}: its OneCycle schedule has {saved_total} steps ({saved_cfg.get('epochs', '?')} "
                f"epochs), this run's has {self.scheduler.total_steps} ({self.cfg.epochs} epochs of "
                f"{self.steps_per_epoch} steps): an exact resume needs the same epochs, batch size and "
                "data; to train on from these weights, start a new run with --init-checkpoint")
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step, self.history, hist = restore_training_state(
            ckpt, self.optimizer, self.scheduler, self.scaler)
        self.best = dict(hist.get("best", self.best))
        set_rng_state(ckpt["rng"])
        self.log(f"resumed from {path} after epoch {self.epoch} (step {self.step})")

    # one epoch ------------------------------------------------------------------------------------
    def train_one_epoch(self):
        cfg = self.cfg
        self.model.train()
        loader = make_loader(self.train_set, cfg.batch_size, True, cfg.workers, cfg.seed, self.epoch,
                             drop_last=True)
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        losses, seen, t0 = [], 0, time.perf_counter()
        for i, (x, y) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with autocast(self.device.type, self.amp_dtype):
                out = self.model(x)
            loss = self.criterion(out.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {self.epoch + 1} step {i + 1}: the loss is {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.ema.update(self.model)
            self.step += 1
            seen += x.shape[0]
            lv = loss.item()
            losses.append(lv)
            lr = self.optimizer.param_groups[0]["lr"]
            self.history["steps"].append([self.step, lv, lr])
            if bar is not None:
                bar.set_postfix(loss=f"{lv:.2f}", lr=f"{lr:.2e}",
                                img_s=f"{seen / (time.perf_counter() - t0):.1f}")
                bar.update()
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - t0
        return float(np.mean(losses)), seen / elapsed, elapsed

    def validate(self):
        cfg = self.cfg
        loader = make_loader(self.val_set, cfg.val_batch_size or cfg.batch_size, False, cfg.workers)
        scores, targets = predict_scores(self.model, loader, self.device, self.amp_dtype)
        scores_ema, _ = predict_scores(self.ema.module, loader, self.device, self.amp_dtype)
        return (mean_average_precision(targets.numpy(), scores.numpy()),
                mean_average_precision(targets.numpy(), scores_ema.numpy()),
                chance_map(targets.numpy()))

    def fit(self, stop_after_epochs: int | None = None) -> dict:
        """Train up to ``cfg.epochs`` (or ``stop_after_epochs`` more epochs); returns the summary."""
        cfg = self.cfg
        out = cfg.out_dir
        os.makedirs(out, exist_ok=True)
        end = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, self.epoch + stop_after_epochs)
        t_start = time.perf_counter()
        if self.epoch >= end:
            self.log(f"nothing to train: {self.epoch} of {cfg.epochs} epochs are done")
        while self.epoch < end:
            loss, ips, train_s = self.train_one_epoch()
            self.epoch += 1
            t_val = time.perf_counter()
            m, m_ema, chance = self.validate()
            val_s = time.perf_counter() - t_val
            row = {"epoch": self.epoch, "step": self.step, "train_loss": loss,
                   "lr": self.optimizer.param_groups[0]["lr"], "mAP": m, "mAP_ema": m_ema,
                   "mAP_chance": chance, "train_s": train_s, "val_s": val_s, "images_per_s": ips}
            self.history["epochs"].append(row)
            improved = max(m, m_ema) > self.best["mAP"]
            if improved:
                self.best = {"mAP": max(m, m_ema), "which": "ema" if m_ema > m else "model",
                             "epoch": self.epoch}
            self.log(f"epoch {self.epoch}/{cfg.epochs}  loss {loss:.3f}  mAP {m:.2f}  "
                     f"mAP(EMA) {m_ema:.2f}  (chance {chance:.1f})  {ips:.1f} img/s  "
                     f"train {train_s:.1f}s val {val_s:.1f}s")
            self.write_logs()
            if cfg.save_checkpoints:
                metrics = {"mAP": m, "mAP_ema": m_ema}
                self.save(os.path.join(out, "last.pth"), metrics)
                if improved:
                    self.save(os.path.join(out, "best.pth"), metrics)
        wall = time.perf_counter() - t_start
        last = self.history["epochs"][-1] if self.history["epochs"] else {}
        return {"best_mAP": self.best["mAP"], "best": self.best, "last": last,
                "wall_s": wall, "epochs": self.epoch, "steps": self.step}

    # logs -----------------------------------------------------------------------------------------
    def write_logs(self) -> None:
        write_run_logs(self.cfg.out_dir, self.history, config=asdict(self.cfg), model_args=self.model_args,
                       class_names=self.class_names, best=self.best)
        if self.cfg.plot:
            plot_curves(self.history, os.path.join(self.cfg.out_dir, "curves.png"), self.log)


def plot_curves(history: dict, path: str, log=print) -> bool:
    """Loss per step (and per epoch) and the mAP of the model and its EMA per epoch, in one PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no curves.png (pip install 'mldecoder-fast[plot]')")
        return False
    steps = np.asarray(history["steps"], dtype=float).reshape(-1, 3)
    rows = history["epochs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if len(steps):
        ax1.plot(steps[:, 0], steps[:, 1], lw=0.6, alpha=0.4, label="step")
        k = max(1, len(steps) // 50)
        if len(steps) >= 2 * k and k > 1:
            smooth = np.convolve(steps[:, 1], np.ones(k) / k, mode="valid")
            ax1.plot(steps[k - 1:, 0], smooth, lw=1.5, label=f"mean of {k} steps")
    if rows:
        ax1.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], "o-", label="epoch mean")
    ax1.set_xlabel("step")
    ax1.set_ylabel("Asymmetric Loss (sum over batch)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("training loss")
    if rows:
        ep = [r["epoch"] for r in rows]
        ax2.plot(ep, [r["mAP"] for r in rows], "o-", label="model")
        ax2.plot(ep, [r["mAP_ema"] for r in rows], "s-", label="EMA")
        ax2.axhline(rows[-1]["mAP_chance"], color="gray", ls="--", lw=1, label="chance")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation mAP (%)")
    ax2.legend()
    ax2.set_title("validation mAP")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def init_from_checkpoint(model, path: str, class_names, log=print, trust_pickle: bool = False) -> None:
    """Load weights (not training state) from ``path``; the head must have as many classes.
    ``trust_pickle``: see ``mldecoder_fast.files.load_file``."""
    ckpt = load_checkpoint(path, trust_pickle=trust_pickle)
    check_classes(ckpt, class_names, "the training data")
    own = model.state_dict()
    usable = {k: v for k, v in ckpt["model"].items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(ckpt["model"]) - set(usable))
    missing = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log(f"initial weights from {path}: {len(usable)} tensors loaded, {len(skipped)} skipped, "
        f"{len(missing)} left at their initial values")
    if not usable:
        raise ValueError(f"{path}: no tensor of this checkpoint fits the model")

