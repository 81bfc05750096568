"""The training loop of every recipe (docs/design.md, Training recipes): ``Trainer`` owns the model
(DDP-wrapped under several processes), optimizer, schedule, GradScaler, EMA, data order, logs and
checkpoints; a recipe subclasses it with its optimizer, schedule, criterion, targets and metrics.

One optimizer step: the next batch of this rank's share of the epoch (``samplers.EpochSampler``,
augmentation seeded per sample by ``samplers.KeyedDataset``), the recipe's ``prepare_batch``
(mixup, ZSL query augmentation), forward under autocast, the criterion on logits of at least
float32, scaled backward, optional gradient clipping, optimizer step, schedule step (a timm
schedule is set by step count, a torch one stepped), EMA update. Losses are averaged over the ranks
(summed for a criterion that sums over the batch, which then also scales the backward by the
process count, so that the gradients are those of one process on the global batch) every
``log_every`` steps, which updates the progress bar or prints a line; every step's loss and
learning rate go to ``log.json``. After every ``val_every`` epochs (and when a run stops early):
the recipe's ``validate``, a row in ``log.csv``, ``last.pth`` and, when the recipe's score
improved, ``best.pth``.

Runs repeat exactly: the data order and augmentations depend only on the seed, the epoch and the
position in it; dropout, drop-path and mixup use the global generators, whose states (every
rank's) the checkpoint saves. ``resume`` continues where the checkpoint was written, mid-epoch
included; on another number of processes with the same global batch the data order continues
exactly and the generators are reseeded.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import distributed as D
from .amp import autocast, resolve_amp_dtype
from .checkpoint import check_classes, resume_run, save_run
from .logs import run_summary, write_run_logs
from .samplers import EpochSampler, EvalShardSampler, KeyedDataset


@dataclass
class TrainerConfig:
    epochs: int = 1
    batch_size: int = 1              # per process
    lr: float = 1e-3
    weight_decay: float = 0.0
    amp: str = "auto"                # auto (fp16 + GradScaler on CUDA, off on CPU) | fp16 | bf16 | off
    clip_grad: float = 0.0           # max gradient norm (0: off)
    workers: int = 0
    seed: int = 0
    val_batch_size: int = 0          # 0: batch_size
    val_every: int = 1               # epochs
    max_steps_per_epoch: int = 0     # shorter epochs (0: every full batch)
    max_steps: int = 0               # stop after this many optimizer steps in all (0: the schedule)
    save_every: int = 0              # also write last.pth every N steps (0: per epoch only)
    log_every: int = 20              # steps between loss reductions / log lines
    out_dir: str = "runs/train"
    progress: bool = True
    save_checkpoints: bool = True


def loss_precision(out: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 for the criterion (an fp16/bf16 autocast output is upcast)."""
    return out if out.dtype == torch.float64 else out.float()


class Trainer:
    """One run; call ``resume(path)`` (optional), then ``fit()``. Subclasses give ``build_optimizer``,
    ``build_scheduler``, ``build_criterion``, ``validate``, ``epoch_message`` and may override the
    other hooks (``build_ema``, ``prepare_batch``, ``end_training_epoch``, ``best_candidate``, ...)."""

    order = "sampler"                # EpochSampler order: "sampler" or "dataloader"
    repeats = 1                      # repeated augmentation
    best_key = "mAP"                 # the score that decides best.pth
    loss_sums_over_batch = False     # the criterion sums (not averages) over the batch
    stop_on_nonfinite = True         # a NaN or infinite loss stops the run

    def __init__(self, model: nn.Module, train_set, val_set, class_names, cfg: TrainerConfig,
                 model_args: dict, info: D.DistInfo | None = None, log=print):
        self.cfg = cfg
        self.info = info or D.DistInfo()
        self.device = self.info.device
        self._log = log
        self.class_names = list(class_names)
        self.model_args = dict(model_args)
        self.train_set, self.val_set = train_set, val_set
        self.amp_dtype = resolve_amp_dtype(cfg.amp, self.device)
        self.model = model.to(self.device)
        self.sampler = EpochSampler(train_set, cfg.batch_size, self.info.rank, self.info.world_size,
                                    cfg.seed, self.repeats, order=self.order,
                                    max_steps=cfg.max_steps_per_epoch)
        self.steps_per_epoch = self.sampler.steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.optimizer = self.build_optimizer()
        self.scheduler = self.build_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = self.build_ema()
        self.criterion = self.build_criterion()
        self.epoch = 0           # completed epochs
        self.step = 0            # optimizer steps in all
        self.step_in_epoch = 0   # steps of the current (incomplete) epoch
        self.history = {"steps": [], "epochs": []}
        self.best = {self.best_key: -1.0}
        self.resumed_from = None
        self.ddp = None

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the model's floating dtype (a model built in float64
        takes float64 images; under autocast the model's fp32)."""
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), x.dtype)
        return x.to(self.device, dtype=dtype if x.is_floating_point() else x.dtype, non_blocking=True)

    # the recipe's part ----------------------------------------------------------------------------
    def build_optimizer(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    def build_scheduler(self):
        raise NotImplementedError

    def build_criterion(self) -> nn.Module:
        raise NotImplementedError

    def build_ema(self):
        """A ``ModelEma`` of ``self.model``, or None (no EMA)."""
        return None

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor):
        """The (input, target) of one training step from a batch already on the device."""
        return x, y

    def end_training_epoch(self) -> None:
        """Called after the last training step of an epoch, before validation."""

    def validate(self) -> dict:
        """Validation metrics of the model (and its EMA), the same on every rank."""
        raise NotImplementedError

    def best_candidate(self, row: dict) -> dict | None:
        """The record ``self.best`` would become if ``row[best_key]`` beats it (None: not scored)."""
        if self.best_key not in row:
            return None
        return {self.best_key: row[self.best_key], "epoch": row["epoch"], "step": self.step}

    def epoch_message(self, row: dict) -> str:
        raise NotImplementedError

    def checkpoint_metrics(self, row: dict) -> dict:
        return {self.best_key: row[self.best_key]} if self.best_key in row else {}

    def log_fields(self) -> dict:
        """Entries of log.json beyond the configuration, model arguments and best score."""
        return {}

    def summary_fields(self) -> dict:
        """Entries of summary.json beyond the common ones."""
        return {}

    def check_checkpoint(self, ckpt: dict) -> None:
        """Fail when a checkpoint to resume from does not fit this run's classes."""
        check_classes(ckpt, self.class_names, "the training data")

    # helpers ----------------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.info.world_size

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_schedule(self, advance: bool) -> None:
        """A timm scheduler is set to the step count; a torch LRScheduler advances one step."""
        if hasattr(self.scheduler, "step_update"):
            self.scheduler.step_update(self.step)
        elif advance:
            self.scheduler.step()

    def _loader_generator(self) -> torch.Generator:
        # A DataLoader draws its workers' base seed from this generator when it starts an epoch; a
        # private one keeps the global generators (dropout, drop-path) independent of how many
        # loaders were started, so a resumed run draws what the uninterrupted one did. The
        # augmentations do not depend on it (KeyedDataset seeds every sample).
        return torch.Generator().manual_seed(int(self.cfg.seed))

    # checkpoints ------------------------------------------------------------------------------------
    def save(self, path: str, metrics=None) -> None:
        """Every rank must call it (the ranks' generator states are gathered); rank 0 writes."""
        save_run(self, path, metrics)

    def resume(self, path: str) -> None:
        resume_run(self, path)

    # training ---------------------------------------------------------------------------------------
    def _train_loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        return DataLoader(KeyedDataset(self.train_set, self.cfg.seed), batch_size=self.cfg.batch_size,
                          sampler=self.sampler, num_workers=self.cfg.workers, drop_last=True,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          generator=self._loader_generator())

    def _record_losses(self, pending: list) -> torch.Tensor:
        """Reduce the pending (loss, lr) pairs' losses over the ranks, check them, and log them
        with their steps and learning rates."""
        # (in at least fp32: a float64 run's losses are recorded in full)
        losses = torch.stack([loss for loss, _ in pending])
        losses = D.all_reduce_sum(losses.to(torch.promote_types(losses.dtype, torch.float32)).cpu(), self.info)
        if not self.loss_sums_over_batch:
            losses = losses / self.info.world_size
        first = self.step - len(pending) + 1
        bad = (~torch.isfinite(losses)).nonzero()
        if self.stop_on_nonfinite and len(bad):
            i = int(bad[0])
            raise FloatingPointError(f"epoch {self.epoch + 1} step {first + i}: the loss is {float(losses[i])}")
        self.history["steps"].extend([first + i, float(v), lr]
                                     for i, (v, (_, lr)) in enumerate(zip(losses, pending, strict=True)))
        return losses

    def train_one_epoch(self) -> dict:
        cfg, info = self.cfg, self.info
        model = self.ddp
        model.train()
        loader = self._train_loader()
        stop_at = cfg.max_steps if cfg.max_steps > 0 else None
        backward_scale = info.world_size if self.loss_sums_over_batch else 1
        bar = None
        if cfg.progress and info.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch,
                       desc=f"epoch {self.epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
        pending, loss_sum, n_steps, window_steps = [], 0.0, 0, 0
        self._sync()
        t0 = t_window = time.perf_counter()
        steady_t0, steady_steps = None, 0
        interrupted = False
        for x, y in loader:
            x, y = self.prepare_batch(self.model_input(x), y.to(self.device, non_blocking=True))
            with autocast(self.device.type, self.amp_dtype):
                out = model(x)
            loss = self.criterion(loss_precision(out), y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss * backward_scale if backward_scale != 1 else loss).backward()
            if cfg.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.step_in_epoch += 1
            self.step_schedule(advance=True)
            if self.ema is not None:
                self.ema.update(self.model)
            pending.append((loss.detach(), self.optimizer.param_groups[0]["lr"]))
            n_steps += 1
            window_steps += 1
            if n_steps == min(5, self.steps_per_epoch - 1):  # throughput after warm-up steps
                self._sync()
                steady_t0, steady_steps = time.perf_counter(), 0
            elif steady_t0 is not None:
                steady_steps += 1
            last = self.step_in_epoch >= self.steps_per_epoch or (stop_at and self.step >= stop_at)
            if len(pending) >= cfg.log_every or last:
                losses = self._record_losses(pending)
                loss_sum += float(losses.sum())
                pending = []
                self._sync()
                now = time.perf_counter()
                ips = window_steps * self.global_batch / max(now - t_window, 1e-9)
                t_window, window_steps = now, 0
                lr = self.optimizer.param_groups[0]["lr"]
                if bar is not None:
                    bar.set_postfix(loss=f"{float(losses[-1]):.4g}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
                elif not cfg.progress:
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
        self.end_training_epoch()
        self._sync()
        elapsed = time.perf_counter() - t0
        steady_s = time.perf_counter() - steady_t0 if steady_t0 is not None else 0.0
        mem = D.peak_memory_mb(self.device)
        return {"train_loss": loss_sum / max(n_steps, 1), "steps": n_steps, "train_s": elapsed,
                "images_per_s": n_steps * self.global_batch / max(elapsed, 1e-9),
                "images_per_s_steady": (steady_steps * self.global_batch / steady_s) if steady_steps else None,
                "peak_memory_mb": float(D.all_reduce_max([mem], info)[0]),
                "peak_memory_mb_all_ranks": float(D.all_reduce_sum([mem], info)[0]),
                "interrupted": interrupted}

    # validation helpers -----------------------------------------------------------------------------
    def eval_loader(self) -> DataLoader:
        """This rank's share of the validation set (positions rank, rank + W, ...), in order."""
        return DataLoader(self.val_set, batch_size=self.cfg.val_batch_size or self.cfg.batch_size,
                          sampler=EvalShardSampler(self.val_set, self.info.rank, self.info.world_size),
                          num_workers=self.cfg.workers, pin_memory=self.device.type == "cuda",
                          generator=self._loader_generator())

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module):
        """(logits of at least float32, targets on the CPU) of each validation batch of this rank,
        ``model`` unwrapped and in eval mode (DDP's forward would sync buffers across ranks that run
        different numbers of batches)."""
        model = D.unwrap(model)
        model.eval()
        for x, y in self.eval_loader():
            with autocast(self.device.type, self.amp_dtype):
                out = model(self.model_input(x))
            yield loss_precision(out), y

    def gather_scores(self, model: nn.Module, columns=None):
        """(sigmoid scores, targets) of the whole validation set as numpy arrays in dataset order,
        gathered from every rank; ``columns`` selects target columns."""
        scores, targets = [], []
        for out, y in self.eval_outputs(model):
            scores.append(torch.sigmoid(out).cpu())
            targets.append(y if columns is None else y[:, columns])
        parts = D.all_gather_object((torch.cat(scores), torch.cat(targets)), self.info)
        world, n = self.info.world_size, sum(len(p[0]) for p in parts)
        s = parts[0][0].new_empty((n, *parts[0][0].shape[1:]))
        t = parts[0][1].new_empty((n, *parts[0][1].shape[1:]))
        for r, (ps, pt) in enumerate(parts):   # rank r holds positions r, r + W, ...
            s[r::world], t[r::world] = ps, pt
        return s.numpy(), t.numpy()

    # the run ----------------------------------------------------------------------------------------
    def fit(self, stop_after_epochs: int | None = None) -> dict:
        """Train to ``cfg.epochs`` (or ``stop_after_epochs`` more epochs, or ``cfg.max_steps``);
        returns the summary, which rank 0 also writes to summary.json."""
        cfg, info = self.cfg, self.info
        if info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if self.ddp is None:
            self.ddp = D.wrap_ddp(self.model, info)
        self.step_schedule(advance=False)
        end = min(cfg.epochs, self.epoch + stop_after_epochs) if stop_after_epochs else cfg.epochs
        if self.epoch >= end:
            self.log(f"nothing to train: {self.epoch} of {cfg.epochs} epochs are done")
        t_start = time.perf_counter()
        while self.epoch < end:
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
            stats = self.train_one_epoch()
            epoch_done = not stats.pop("interrupted")
            if epoch_done:
                self.epoch += 1
                self.step_in_epoch = 0
            row = {"epoch": self.epoch + (0 if epoch_done else self.step_in_epoch / self.steps_per_epoch),
                   "step": self.step, "train_loss": stats.pop("train_loss"),
                   "lr": self.optimizer.param_groups[0]["lr"]}
            t_val = time.perf_counter()
            if self.val_set is not None and (not epoch_done or self.epoch % cfg.val_every == 0
                                             or self.epoch == cfg.epochs):
                row.update(self.validate())
            row.update(stats, val_s=time.perf_counter() - t_val)
            self.history["epochs"].append(row)
            candidate = self.best_candidate(row)
            improved = candidate is not None and candidate[self.best_key] > self.best[self.best_key]
            if improved:
                self.best = candidate
            self.log(self.epoch_message(row))
            if info.is_main:
                self.write_logs()
            if cfg.save_checkpoints:
                metrics = self.checkpoint_metrics(row)
                self.save(os.path.join(cfg.out_dir, "last.pth"), metrics)
                if improved:
                    self.save(os.path.join(cfg.out_dir, "best.pth"), metrics)
            if not epoch_done:
                break
        summary = run_summary(self, time.perf_counter() - t_start)
        if info.is_main:
            with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        return summary

    def write_logs(self) -> None:
        write_run_logs(self.cfg.out_dir, self.history, config=asdict(self.cfg), model_args=self.model_args,
                       world_size=self.info.world_size, global_batch=self.global_batch,
                       num_classes=len(self.class_names), best=self.best, **self.log_fields())
