"""``mldecoder-fast train singlelabel``: single-label training for any class count (ImageNet-1K,
ImageNet-21K), on one process or under ``torchrun`` (DDP).

The defaults are the seed's ImageNet A2 command (SPEC "Reproduction recipes"): ResNet-50, LAMB
lr 4e-3, weight decay 0.02, cosine schedule with 5 warm-up epochs over 300 epochs, batch 256 per
process, binary cross-entropy with target threshold 0.2, mixup 0.1, cutmix 1.0, RandAugment
rand-m7-mstd0.5-inc1, repeated augmentation x3, bicubic, mixed precision on GPU. The remaining
A2 settings follow timm's "ResNet strikes back" A2 (warm-up from lr 1e-4, final lr 1e-6,
drop-path 0.05, no label smoothing, validation crop 0.95).

Data, one of:

- ``--data DIR``: ImageFolder layout, ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>``
  (classes = the sorted folder names of ``train``).
- ``--train-list FILE --val-list FILE``: one ``path class_index`` per line (separated by spaces,
  a tab or a comma; blank lines and ``#`` comments skipped), paths relative to ``--images-root``
  (default: the list file's folder); the class count from ``--num-classes`` or ``--classes FILE``
  (one class name per line). An index outside [0, classes) fails with the file and line.

Outputs in ``--out``: ``log.csv`` (one row per epoch), ``log.json`` (configuration, epochs, every
step's loss and learning rate), ``summary.json``, ``last.pth`` (every epoch, and every
``--save-every`` steps) and ``best.pth``. The log reports global images/s and peak memory (CUDA
allocated memory on GPU; the process's peak resident set size on CPU), the max over ranks.

Resume (``--resume last.pth``) continues exactly where the checkpoint was written, mid-epoch
included: model, optimizer, schedule, scaler, step, every rank's generator states, and the data
order (see ``distributed.EpochSampler``). On a different number of processes the per-process batch
is chosen to keep the global batch (unless ``--batch-size`` is given), the data order continues
exactly, and the ranks' generators are reseeded (dropout and mixup draws then differ from the
uninterrupted run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._cli_types import SEED, float_range, int_range
from . import distributed as D
from .amp import AMP_CHOICES, autocast, resolve_amp_dtype
from .checkpoint import (CheckpointError, check_classes, load_checkpoint, restore_training_state,
                         rng_state, save_checkpoint, set_rng_state, write_run_logs)
from .data import BadImageError, DataError, Sample, image_path, load_rgb, open_text

A2_DEFAULTS = dict(model="resnet50", image_size=224, epochs=300, batch_size=256, lr=4e-3,
                   opt="lamb", weight_decay=0.02, warmup_epochs=5, warmup_lr=1e-4, min_lr=1e-6,
                   loss="bce", bce_target_thresh=0.2, smoothing=0.0, mixup=0.1, cutmix=1.0,
                   aa="rand-m7-mstd0.5-inc1", aug_repeats=3, interpolation="bicubic",
                   crop_pct=0.95, drop_path=0.05, workers=8)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# data --------------------------------------------------------------------------------------------
class SampleTable:
    """Image paths and class indices of a split, stored compactly (ImageNet-21K has 13M images:
    numpy arrays, not Python objects, so data-loader workers share them without copying).
    ``where(i)`` says where sample i came from (list file and line, or the folder)."""

    def __init__(self, root: str, paths, labels, lines, source: str):
        self.root = root  # paths are stored relative to it
        self.paths = np.asarray([p.encode("utf-8") for p in paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.source = source

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode("utf-8"))

    def where(self, i: int) -> str:
        line = int(self.lines[i])
        return f"{self.source} line {line}" if line > 0 else f"{self.source}: {self.path(i)}"

    def sample(self, i: int) -> Sample:
        return Sample(self.path(i), (int(self.labels[i]),), self.where(i))

    def check_files(self) -> None:
        missing = [i for i in range(len(self)) if not os.path.isfile(self.path(i))]
        if missing:
            shown = "\n".join(f"  {self.where(i)}: {self.path(i)}" for i in missing[:10])
            more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(f"{len(missing)} of {len(self)} image files listed in {self.source} are "
                            f"missing:\n{shown}{more}")


def read_class_names(path: str) -> list:
    """One class name per line (blank lines and ``#`` comments skipped); no name twice."""
    line_of = {}
    with open_text(path, "class list not found") as f:
        for lineno, line in enumerate(f, start=1):
            name = line.strip()
            if not name or line.startswith("#"):
                continue
            if name in line_of:
                raise DataError(f"{path} line {lineno}: class {name!r} is listed twice (first on "
                                f"line {line_of[name]})")
            line_of[name] = lineno
    if not line_of:
        raise DataError(f"{path}: the class list is empty")
    return list(line_of)


def read_list_file(path: str, num_classes: int, images_root: str | None = None) -> SampleTable:
    """A list file of ``path class_index`` lines (see the module docstring)."""
    root = images_root if images_root is not None else os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    paths, labels, lines = [], [], []
    with open_text(path, "list file not found") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
            if len(parts) != 2 or not parts[0].strip():
                raise DataError(f"{path} line {lineno}: expected 'image_path class_index', got {line!r}")
            img, idx = image_path(parts[0], f"{path} line {lineno}"), parts[1].strip()
            try:
                c = int(idx)
            except ValueError:
                if lineno == 1:
                    continue  # a header such as "path,label"
                raise DataError(f"{path} line {lineno}: class index {idx!r} is not an integer") from None
            if not 0 <= c < num_classes:
                raise DataError(f"{path} line {lineno}: class index {c} is out of range: the run has "
                                f"{num_classes} classes (indices 0..{num_classes - 1})")
            paths.append(img)
            labels.append(c)
            lines.append(lineno)
    if not paths:
        raise DataError(f"{path}: no samples")
    return SampleTable(root, paths, labels, lines, name if images_root is None else path)


def scan_image_folder(split_dir: str, class_names=None):
    """(SampleTable, class names) of ``split_dir/<class>/<image>``; ``class_names`` fixes the
    classes (the training set's) for a validation split."""
    if not os.path.isdir(split_dir):
        raise DataError(f"{split_dir}: folder not found (expected the ImageFolder layout "
                        "DIR/train/<class>/<image> and DIR/val/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if class_names is None:
        class_names = found
        if not class_names:
            raise DataError(f"{split_dir}: no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    unknown = [c for c in found if c not in index]
    if unknown:
        raise DataError(f"{split_dir}: class folder {unknown[0]!r} is not one of the "
                        f"{len(class_names)} training classes")
    paths, labels = [], []
    for c in found:
        for dirpath, _, files in os.walk(os.path.join(split_dir, c)):
            rel = os.path.relpath(dirpath, split_dir)
            for fn in sorted(files):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(rel, fn))
                    labels.append(index[c])
    if not paths:
        raise DataError(f"{split_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return SampleTable(split_dir, paths, labels, [0] * len(paths), split_dir), list(class_names)


class SingleLabelDataset(Dataset):
    """(image tensor, class index) pairs of a ``SampleTable``."""

    def __init__(self, table: SampleTable, class_names, transform=None):
        self.table = table
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        img = load_rgb(self.table.sample(i))
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.table.labels[i])


def build_transforms(cfg: "SingleLabelConfig", mean, std):
    """timm's ImageNet transforms: RandomResizedCrop + flip + RandAugment for training (as timm's
    train.py with ``--aa``), resize + center crop ``crop_pct`` for validation."""
    from timm.data import create_transform
    aa = cfg.aa if cfg.aa and cfg.aa.lower() not in ("none", "off", "") else None
    train = create_transform(cfg.image_size, is_training=True, auto_augment=aa,
                             interpolation=cfg.interpolation, mean=mean, std=std, re_prob=0.0)
    val = create_transform(cfg.image_size, is_training=False, interpolation=cfg.interpolation,
                           crop_pct=cfg.crop_pct, mean=mean, std=std)
    return train, val


# configuration -----------------------------------------------------------------------------------
@dataclass
class SingleLabelConfig:
    epochs: int = 300
    batch_size: int = 256            # per process
    lr: float = 4e-3
    opt: str = "lamb"                # any timm optimizer name (lamb, adamw, ...)
    weight_decay: float = 0.02
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
    amp: str = "auto"                # auto (fp16 + GradScaler on CUDA, off on CPU) | fp16 | bf16 | off
    clip_grad: float = 0.0
    workers: int = 8
    seed: int = 0
    val_batch_size: int = 0          # 0: batch_size
    val_every: int = 1               # epochs
    max_steps: int = 0               # stop after this many optimizer steps in all (0: the schedule)
    save_every: int = 0              # also write last.pth every N steps (0: per epoch only)
    log_every: int = 20
    out_dir: str = "runs/singlelabel"
    progress: bool = True
    save_checkpoints: bool = True
    extra: dict = field(default_factory=dict)


def build_criterion(cfg: SingleLabelConfig, mixing: bool) -> nn.Module:
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=cfg.smoothing, target_threshold=cfg.bce_target_thresh)
    if cfg.loss == "ce":
        return SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    raise ValueError(f"--loss must be bce or ce, got {cfg.loss!r}")


# the trainer -------------------------------------------------------------------------------------
class SingleLabelTrainer:
    """One run: the model (DDP-wrapped under several processes), optimizer, schedule, scaler,
    samplers and logs. Call ``resume(path)`` (optional), then ``fit()``."""

    def __init__(self, model: nn.Module, train_set, val_set, class_names, cfg: SingleLabelConfig,
                 model_args: dict, info: D.DistInfo | None = None, log=print):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler
        self.cfg = cfg
        self.info = info or D.DistInfo()
        self.device = self.info.device
        self._log = log
        self.class_names = list(class_names)
        self.model_args = dict(model_args)
        self.train_set, self.val_set = train_set, val_set
        self.amp_dtype = resolve_amp_dtype(cfg.amp, self.device)
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch size per process, got {cfg.batch_size}")

        self.model = model.to(self.device)
        self.optimizer = create_optimizer_v2(self.model, opt=cfg.opt, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay, filter_bias_and_bn=True)
        self.sampler = D.EpochSampler(train_set, cfg.batch_size, self.info.rank, self.info.world_size,
                                      cfg.seed, cfg.aug_repeats)
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr,
            warmup_t=int(round(cfg.warmup_epochs * self.steps_per_epoch)),
            warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=cfg.smoothing, num_classes=len(self.class_names))
        self.criterion = build_criterion(cfg, self.mixup is not None)
        self.epoch = 0           # completed epochs
        self.step = 0            # optimizer steps in all
        self.step_in_epoch = 0   # steps of the current (incomplete) epoch
        self.history = {"steps": [], "epochs": []}
        self.best = {"top1": -1.0}
        self.resumed_from = None
        self.ddp = None

    # logging ----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.info.world_size

    # checkpoints ------------------------------------------------------------------------------------
    def _run_state(self) -> dict:
        return {"step_in_epoch": self.step_in_epoch, "world_size": self.info.world_size,
                "batch_size": self.cfg.batch_size, "global_batch": self.global_batch,
                "steps_per_epoch": self.steps_per_epoch, "seed": self.cfg.seed,
                "rank_rng": D.all_gather_object(rng_state(), self.info)}

    def save(self, path: str, metrics=None) -> None:
        """Every rank must call it (the ranks' generator states are gathered); rank 0 writes."""
        run = self._run_state()
        if self.info.is_main:
            save_checkpoint(path, model=D.unwrap(self.model), class_names=self.class_names,
                            model_args=self.model_args, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch,
                            step=self.step, metrics=metrics,
                            history={**self.history, "best": self.best, "run": run,
                                     "config": asdict(self.cfg)})
        D.barrier(self.info)

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        check_classes(ckpt, self.class_names, "the training data")
        for key in ("optimizer", "scheduler", "rng"):
            if key not in ckpt:
                raise CheckpointError(f"{path}: not a training checkpoint (no '{key}' entry)")
        D.unwrap(self.model).load_state_dict(ckpt["model"])
        self.epoch, self.step, self.history, hist = restore_training_state(
            ckpt, self.optimizer, self.scheduler, self.scaler)
        run = hist.get("run") or {}
        self.best = dict(hist.get("best", self.best))
        old_batch = int(run.get("global_batch", self.global_batch))
        self.step_in_epoch = int(run.get("step_in_epoch", 0)) * old_batch // self.global_batch
        if old_batch != self.global_batch:
            self.log(f"note: the checkpoint was trained with a global batch of {old_batch}, this run "
                     f"uses {self.global_batch}: the schedule continues by step count")
        if int(run.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            self.log(f"note: {run.get('steps_per_epoch')} steps per epoch in the checkpoint, "
                     f"{self.steps_per_epoch} here (another process count or batch)")
        ranks = run.get("rank_rng") or []
        if int(run.get("world_size", -1)) == self.info.world_size and len(ranks) == self.info.world_size:
            set_rng_state(ranks[self.info.rank])
            how = "every rank's generator state restored"
        else:
            _seed_all(D.rank_seed(self.cfg.seed + 7 * self.step, self.info.rank))
            how = (f"written by {run.get('world_size', '?')} process(es), resumed on "
                   f"{self.info.world_size}: data order continues exactly, generators reseeded")
        self.scheduler.step_update(self.step)
        self.resumed_from = path
        self.log(f"resumed from {path}: epoch {self.epoch} + {self.step_in_epoch} steps "
                 f"(step {self.step}); {how}")

    # training ---------------------------------------------------------------------------------------
    def _train_loader(self):
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        return DataLoader(D.KeyedDataset(self.train_set, self.cfg.seed),
                          batch_size=self.cfg.batch_size, sampler=self.sampler,
                          num_workers=self.cfg.workers, drop_last=True,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=False, generator=_loader_generator(self.cfg.seed))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_one_epoch(self) -> dict:
        cfg, info = self.cfg, self.info
        model = self.ddp
        model.train()
        loader = self._train_loader()
        stop_at = cfg.max_steps if cfg.max_steps > 0 else None
        bar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
        pending, loss_sum, n_steps = [], 0.0, 0
        self._sync()
        t0 = t_window = time.perf_counter()
        steady_t0, steady_steps = None, 0
        window_steps = 0
        interrupted = False
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            with autocast(self.device.type, self.amp_dtype):
                out = model(x)
            loss = self.criterion(out.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.step_in_epoch += 1
            self.scheduler.step_update(self.step)
            pending.append(loss.detach())
            n_steps += 1
            window_steps += 1
            if n_steps == min(5, self.steps_per_epoch - 1):  # throughput after warm-up steps
                self._sync()
                steady_t0, steady_steps = time.perf_counter(), 0
            elif steady_t0 is not None:
                steady_steps += 1
            last = self.step_in_epoch >= self.steps_per_epoch or (stop_at and self.step >= stop_at)
            if len(pending) >= cfg.log_every or last:
                losses = torch.stack(pending).float().cpu()
                losses = D.all_reduce_sum(losses, info) / info.world_size
                lr = self.optimizer.param_groups[0]["lr"]
                first = self.step - len(pending) + 1
                self.history["steps"].extend([first + i, float(v), lr] for i, v in enumerate(losses))
                loss_sum += float(losses.sum())
                pending = []
                self._sync()
                now = time.perf_counter()
                ips = window_steps * self.global_batch / max(now - t_window, 1e-9)
                t_window, window_steps = now, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{float(losses[-1]):.4g}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                elif info.is_main and not cfg.progress:
                    self.log(f"step {self.step}/{self.total_steps}  loss {float(losses.mean()):.5g}  "
                             f"lr {lr:.3e}  {ips:.1f} img/s")
            if bar is not None:
                bar.update()
            if cfg.save_every and self.step % cfg.save_every == 0 and not last and cfg.save_checkpoints:
                self.save(os.path.join(cfg.out_dir, "last.pth"))
            if stop_at and self.step >= stop_at and self.step_in_epoch < self.steps_per_epoch:
                interrupted = True
                break
        if bar is not None:
            bar.close()
        self._sync()
        elapsed = time.perf_counter() - t0
        steady_s = time.perf_counter() - steady_t0 if steady_t0 is not None else 0.0
        mem = float(D.all_reduce_max([D.peak_memory_mb(self.device)], info)[0])
        mem_sum = float(D.all_reduce_sum([D.peak_memory_mb(self.device)], info)[0])
        return {"train_loss": loss_sum / max(n_steps, 1), "steps": n_steps, "train_s": elapsed,
                "images_per_s": n_steps * self.global_batch / max(elapsed, 1e-9),
                "images_per_s_steady": (steady_steps * self.global_batch / steady_s) if steady_steps else None,
                "peak_memory_mb": mem, "peak_memory_mb_all_ranks": mem_sum, "interrupted": interrupted}

    @torch.no_grad()
    def validate(self) -> dict:
        """Top-1 / top-5 accuracy (%) and mean cross-entropy on the validation set, each image
        counted once over all ranks."""
        cfg, info = self.cfg, self.info
        model = D.unwrap(self.model)
        model.eval()
        loader = DataLoader(self.val_set, batch_size=cfg.val_batch_size or cfg.batch_size,
                            sampler=D.EvalShardSampler(self.val_set, info.rank, info.world_size),
                            num_workers=cfg.workers, pin_memory=self.device.type == "cuda",
                            generator=_loader_generator(cfg.seed))
        k = min(5, len(self.class_names))
        sums = torch.zeros(4, dtype=torch.float64)   # top1, top5, loss, count
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast(self.device.type, self.amp_dtype):
                out = model(x)
            out = out.float()
            topk = out.topk(k, dim=1).indices
            hit = topk == y[:, None]
            sums += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(),
                                  nn.functional.cross_entropy(out, y, reduction="sum").item(),
                                  y.numel()], dtype=torch.float64)
        sums = D.all_reduce_sum(sums, info)
        n = max(float(sums[3]), 1.0)
        return {"top1": 100 * float(sums[0]) / n, "top5": 100 * float(sums[1]) / n,
                "val_loss": float(sums[2]) / n, "val_images": int(sums[3])}

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if self.ddp is None:
            self.ddp = D.wrap_ddp(self.model, info)
        self.scheduler.step_update(self.step)
        t_start = time.perf_counter()
        while self.epoch < cfg.epochs:
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
            stats = self.train_one_epoch()
            epoch_done = not stats.pop("interrupted")
            if epoch_done:
                self.epoch += 1
                self.step_in_epoch = 0
            row = {"epoch": self.epoch + (0 if epoch_done else self.step_in_epoch / self.steps_per_epoch),
                   "step": self.step, "lr": self.optimizer.param_groups[0]["lr"], **stats}
            t_val = time.perf_counter()
            if self.val_set is not None and (not epoch_done or self.epoch % cfg.val_every == 0
                                             or self.epoch == cfg.epochs):
                row.update(self.validate())
            row["val_s"] = time.perf_counter() - t_val
            self.history["epochs"].append(row)
            improved = row.get("top1", -1) > self.best["top1"]
            if improved:
                self.best = {"top1": row["top1"], "top5": row["top5"], "epoch": row["epoch"],
                             "step": self.step}
            steady = row.get("images_per_s_steady")
            self.log(f"epoch {row['epoch']:.4g}/{cfg.epochs}  step {self.step}  loss "
                     f"{row['train_loss']:.5g}  top1 {row.get('top1', float('nan')):.2f}  top5 "
                     f"{row.get('top5', float('nan')):.2f}  {row['images_per_s']:.1f} img/s"
                     + (f" ({steady:.1f} after warm-up)" if steady else "")
                     + f"  peak mem {row['peak_memory_mb']:.0f} MiB/process  train "
                     f"{row['train_s']:.1f}s val {row['val_s']:.1f}s")
            if info.is_main:
                self.write_logs()
            if cfg.save_checkpoints:
                metrics = {k: row[k] for k in ("top1", "top5", "val_loss") if k in row}
                self.save(os.path.join(cfg.out_dir, "last.pth"), metrics)
                if improved:
                    self.save(os.path.join(cfg.out_dir, "best.pth"), metrics)
            if not epoch_done:
                break
        wall = time.perf_counter() - t_start
        summary = self.summary(wall)
        if info.is_main:
            with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    def summary(self, wall_s: float) -> dict:
        rows = self.history["epochs"]
        steps = self.history["steps"]
        losses = [s[1] for s in steps]
        w = max(1, min(20, len(losses) // 4))
        train_s = sum(r["train_s"] for r in rows)
        imgs = sum(r["steps"] for r in rows) * self.global_batch
        head = getattr(D.unwrap(self.model), "ml_decoder_cfg", None)
        head = D.unwrap(self.model).get_submodule(head.path) if head is not None else None
        return {"steps": self.step, "epochs": self.epoch, "wall_s": wall_s,
                "world_size": self.info.world_size, "global_batch": self.global_batch,
                "device": str(self.device), "head": self.model_args.get("head"),
                "head_backend": getattr(head, "active_backend", None),
                "images_per_s": imgs / train_s if train_s else None,
                "images_per_s_steady": rows[-1].get("images_per_s_steady") if rows else None,
                "peak_memory_mb": max((r["peak_memory_mb"] for r in rows), default=None),
                "loss_first": float(np.mean(losses[:w])) if losses else None,
                "loss_last": float(np.mean(losses[-w:])) if losses else None,
                "loss_window": w, "best": self.best, "last": rows[-1] if rows else {},
                "resumed_from": self.resumed_from}

    def write_logs(self) -> None:
        # no indentation: a long run's per-step records would triple the file
        write_run_logs(self.cfg.out_dir, self.history, indent=None, config=asdict(self.cfg),
                       model_args=self.model_args, world_size=self.info.world_size,
                       global_batch=self.global_batch, num_classes=len(self.class_names), best=self.best)


def _loader_generator(seed: int) -> torch.Generator:
    # A DataLoader draws its workers' base seed from this generator when it starts an epoch; a
    # private one keeps the global generators (dropout, drop-path) independent of how many loaders
    # were started, so a resumed run draws what the uninterrupted one did. The augmentations do not
    # depend on it (KeyedDataset seeds every sample).
    return torch.Generator().manual_seed(int(seed))


def _seed_all(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# command line ------------------------------------------------------------------------------------
def register(recipes) -> None:
    p = recipes.add_parser(
        "singlelabel", help="single-label training (the ImageNet A2 recipe, any class count, torchrun)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Single-label training of a timm backbone with an ML-Decoder head: the seed's "
                    "ImageNet A2 recipe for any class count (ImageNet-1K, ImageNet-21K), on one "
                    "process or under torchrun --nproc_per_node=N (DDP: nccl on GPU, gloo on CPU). "
                    "--batch-size is per process.")
    d = p.add_argument_group("data (--data, or --train-list with --val-list)")
    d.add_argument("--data", help="ImageFolder root with train/<class>/ and val/<class>/")
    d.add_argument("--train-list", help="list file of 'path class_index' lines for training")
    d.add_argument("--val-list", help="list file for validation")
    d.add_argument("--images-root", help="root of the list files' relative paths (default: each list's folder)")
    d.add_argument("--num-classes", type=int_range(1), help="class count of list files")
    d.add_argument("--classes", help="class names, one per line (gives the class count of list files)")
    d.add_argument("--no-file-check", action="store_true",
                   help="do not check that every image exists before training (ImageNet-21K: saves minutes)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=A2_DEFAULTS["model"], help="timm model name")
    m.add_argument("--pretrained", action="store_true", help="timm's pretrained backbone weights")
    m.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model argument (JSON value)")
    m.add_argument("--head", choices=["fast", "reference"], default="fast",
                   help="MLDecoderFast or the reference MLDecoder")
    m.add_argument("--backend", default="auto", help="MLDecoderFast backend")
    m.add_argument("--num-of-groups", type=int_range(1, also=(-1,)), default=-1, help="queries K (-1: 100)")
    m.add_argument("--decoder-embedding", type=int_range(1), default=768)
    m.add_argument("--drop-path", type=float_range(ge=0, lt=1), default=A2_DEFAULTS["drop_path"],
                   help="backbone drop-path rate (0: not passed to the model)")
    t = p.add_argument_group("recipe")
    t.add_argument("--epochs", type=int_range(1), default=A2_DEFAULTS["epochs"])
    t.add_argument("--batch-size", type=int_range(1), default=None,
                   help=f"per process (default {A2_DEFAULTS['batch_size']}; on --resume: the "
                        "checkpoint's global batch / processes)")
    t.add_argument("--lr", type=float_range(gt=0), default=A2_DEFAULTS["lr"], help="peak learning rate (not scaled by batch)")
    t.add_argument("--opt", default=A2_DEFAULTS["opt"], help="timm optimizer: lamb, adamw, ...")
    t.add_argument("--weight-decay", type=float_range(ge=0), default=A2_DEFAULTS["weight_decay"])
    t.add_argument("--warmup-epochs", type=float_range(ge=0), default=A2_DEFAULTS["warmup_epochs"])
    t.add_argument("--warmup-lr", type=float_range(ge=0), default=A2_DEFAULTS["warmup_lr"])
    t.add_argument("--min-lr", type=float_range(ge=0), default=A2_DEFAULTS["min_lr"])
    t.add_argument("--loss", choices=["bce", "ce"], default=A2_DEFAULTS["loss"],
                   help="binary cross-entropy with target threshold, or softmax cross-entropy")
    t.add_argument("--bce-target-thresh", type=float_range(le=1), default=A2_DEFAULTS["bce_target_thresh"],
                   help="BCE targets above it become 1, the rest 0 (negative: off)")
    t.add_argument("--smoothing", type=float_range(ge=0, lt=1), default=A2_DEFAULTS["smoothing"])
    t.add_argument("--mixup", type=float_range(ge=0), default=A2_DEFAULTS["mixup"], help="mixup alpha (0: off)")
    t.add_argument("--cutmix", type=float_range(ge=0), default=A2_DEFAULTS["cutmix"], help="cutmix alpha (0: off)")
    t.add_argument("--aa", default=A2_DEFAULTS["aa"], help="timm RandAugment policy ('none': off)")
    t.add_argument("--aug-repeats", type=int_range(1), default=A2_DEFAULTS["aug_repeats"],
                   help="repeated augmentation (timm RepeatAugSampler); 1: off")
    t.add_argument("--image-size", type=int_range(1), default=A2_DEFAULTS["image_size"])
    t.add_argument("--interpolation", default=A2_DEFAULTS["interpolation"])
    t.add_argument("--crop-pct", type=float_range(gt=0), default=A2_DEFAULTS["crop_pct"], help="validation crop")
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto",
                   help="auto: fp16 autocast + GradScaler on CUDA, off on CPU")
    t.add_argument("--clip-grad", type=float_range(ge=0), default=0.0, help="max gradient norm (0: off; LAMB clips at 1 itself)")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int_range(0), default=A2_DEFAULTS["workers"], help="data-loader workers per process")
    r.add_argument("--seed", type=SEED, default=0)
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available); "
                   "under torchrun each process takes GPU LOCAL_RANK")
    r.add_argument("--val-batch-size", type=int_range(0), default=0,
                   help="0: --batch-size")
    r.add_argument("--val-every", type=int_range(1), default=1, help="validate every N epochs")
    r.add_argument("--max-steps", type=int_range(0), default=0,
                   help="stop after N optimizer steps in all, schedule unchanged (0: full schedule)")
    r.add_argument("--save-every", type=int_range(0), default=0, help="also checkpoint every N steps")
    r.add_argument("--log-every", type=int_range(1), default=20, help="steps between loss reductions/log lines")
    r.add_argument("--out", default="runs/singlelabel", help="output folder")
    r.add_argument("--resume", help="continue exactly from a last.pth of this run")
    r.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=run_singlelabel)


def _model_kwargs(args) -> dict:
    from .cli import _model_kwargs as parse_model_args
    out = parse_model_args(args.model_arg)
    if args.drop_path and "drop_path_rate" not in out:
        out["drop_path_rate"] = args.drop_path
    return out


def load_tables(args, check_files: bool):
    """(train SampleTable, val SampleTable or None, class names) from the arguments."""
    if bool(args.data) == bool(args.train_list):
        raise DataError("give the data one way: --data DIR (ImageFolder) or --train-list FILE "
                        "--val-list FILE (with --num-classes N or --classes FILE)")
    if args.data:
        train, names = scan_image_folder(os.path.join(args.data, "train"))
        val_dir = os.path.join(args.data, "val")
        val = scan_image_folder(val_dir, names)[0] if os.path.isdir(val_dir) else None
    else:
        if args.classes:
            names = read_class_names(args.classes)
            if args.num_classes is not None and args.num_classes != len(names):
                raise DataError(f"--num-classes {args.num_classes} but {args.classes} lists "
                                f"{len(names)} classes")
        elif args.num_classes is not None:
            names = [str(i) for i in range(args.num_classes)]
        else:
            raise DataError("a list file needs the class count: --num-classes N or --classes FILE")
        train = read_list_file(args.train_list, len(names), args.images_root)
        val = read_list_file(args.val_list, len(names), args.images_root) if args.val_list else None
    if check_files:
        train.check_files()
        if val is not None:
            val.check_files()
    return train, val, names


def run_singlelabel(args) -> int:
    info = D.init_distributed(args.device)
    try:
        return _run(args, info)
    except (DataError, BadImageError, CheckpointError, FileNotFoundError) as exc:
        print(f"error (rank {info.rank}): {exc}" if info.distributed else f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.destroy_distributed(info)


def _run(args, info: D.DistInfo) -> int:
    from .multilabel import build_model, data_config
    # Rank 0 checks the image files; the others wait for its verdict rather than hang.
    error = None
    try:
        train_table, val_table, names = load_tables(args, check_files=info.is_main and not args.no_file_check)
    except DataError as exc:
        error = str(exc)
    error = D.broadcast_object(error, info)
    if error:
        raise DataError(error)

    batch = args.batch_size
    if batch is None:
        batch = A2_DEFAULTS["batch_size"]
        if args.resume:
            run = (load_checkpoint(args.resume).get("history") or {}).get("run") or {}
            if "global_batch" in run:
                if run["global_batch"] % info.world_size:
                    raise CheckpointError(f"{args.resume}: its global batch {run['global_batch']} does "
                                          f"not split over {info.world_size} processes: pass --batch-size")
                batch = run["global_batch"] // info.world_size
    cfg = SingleLabelConfig(
        epochs=args.epochs, batch_size=batch, lr=args.lr, opt=args.opt, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr, loss=args.loss,
        bce_target_thresh=args.bce_target_thresh if args.bce_target_thresh >= 0 else None,
        smoothing=args.smoothing, mixup=args.mixup, cutmix=args.cutmix, aa=args.aa,
        aug_repeats=args.aug_repeats, image_size=args.image_size, interpolation=args.interpolation,
        crop_pct=args.crop_pct, amp=args.amp, clip_grad=args.clip_grad, workers=args.workers,
        seed=args.seed, val_batch_size=args.val_batch_size, val_every=args.val_every,
        max_steps=args.max_steps, save_every=args.save_every, log_every=args.log_every,
        out_dir=args.out, progress=not args.no_progress and sys.stderr.isatty())

    _seed_all(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model_kwargs = _model_kwargs(args)
    model = build_model(args.model, len(names), head=args.head, num_of_groups=args.num_of_groups,
                        decoder_embedding=args.decoder_embedding, pretrained=args.pretrained,
                        model_kwargs=model_kwargs, backend=args.backend)
    dc = data_config(model)
    t_train, t_val = build_transforms(cfg, dc["mean"], dc["std"])
    train_set = SingleLabelDataset(train_table, names, t_train)
    val_set = SingleLabelDataset(val_table, names, t_val) if val_table is not None else None
    model_args = {"model": args.model, "num_classes": len(names), "head": args.head,
                  "num_of_groups": args.num_of_groups, "decoder_embedding": args.decoder_embedding,
                  "model_kwargs": model_kwargs, "image_size": cfg.image_size,
                  "mean": list(dc["mean"]), "std": list(dc["std"]), "recipe": "singlelabel"}
    _seed_all(D.rank_seed(args.seed, info.rank))
    trainer = SingleLabelTrainer(model, train_set, val_set, names, cfg, model_args, info)
    n_params = sum(p.numel() for p in model.parameters())
    trainer.log(f"{args.model} + {'MLDecoderFast' if args.head == 'fast' else 'MLDecoder (reference)'}: "
                f"{n_params / 1e6:.2f}M parameters, {len(names)} classes, {len(train_set)} training / "
                f"{len(val_set) if val_set is not None else 0} validation images; {info.world_size} "
                f"process(es) on {info.device} ({info.backend or 'no process group'}), batch "
                f"{cfg.batch_size} per process = {trainer.global_batch} global, "
                f"{trainer.steps_per_epoch} steps per epoch")
    if args.resume:
        trainer.resume(args.resume)
    s = trainer.fit()
    trainer.log(f"done ({args.head} head" + (f", {s['head_backend']} backend" if s["head_backend"] else "")
                + f"): {s['steps']} steps, loss {s['loss_first']:.5g} -> {s['loss_last']:.5g} (means "
                f"of the first/last {s['loss_window']} steps), {s['images_per_s'] or 0:.1f} img/s, "
                f"peak memory {s['peak_memory_mb']:.0f} MiB per process; outputs in {cfg.out_dir}")
    return 0
