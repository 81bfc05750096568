"""Training checkpoints: everything an exact resume needs, in a file the official tools can read.

A checkpoint is a dict whose ``model`` entry is the model's state_dict, so the ML-Decoder keys
sit under the model's head prefix in the official layout (``head.decoder.*`` for TResNet,
``fc.decoder.*`` for ResNet), as in the released ML-Decoder files; ``idx_to_class`` is there
too, as the official ``infer.py`` reads it. The other entries:

    ema, optimizer, scheduler, scaler     state_dicts
    epoch, step                           completed epochs and optimizer steps
    rng                                   python / numpy / torch / cuda generator states
    class_names, model_args, metrics, history, format

Every entry is a tensor or plain Python data, so ``torch.load(..., weights_only=True)`` reads it.
``save_run`` / ``resume_run`` write and restore a ``Trainer``'s whole state; ``history["run"]``
holds the position in the epoch, the batch and process count and every rank's generator states.
"""
from __future__ import annotations

import os
from dataclasses import asdict

import torch

from .distributed import all_gather_object, barrier, unwrap
from .seeding import rank_seed, rng_state, seed_everything, set_rng_state

FORMAT = "mldecoder-fast/1"
# The (model's, EMA's) validation scores a recipe records in a checkpoint's metrics (multi-label,
# zero-shot): which weights validated better, for predict/export --weights auto.
MULTILABEL_SCORES = ("mAP", "mAP_ema")
ZSL_SCORES = ("zsl_mAP", "ema_zsl_mAP")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run or model it is loaded into."""


def save_checkpoint(path: str, *, model, class_names, model_args: dict, ema=None, optimizer=None,
                    scheduler=None, scaler=None, epoch: int = 0, step: int = 0, metrics=None,
                    history=None) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    ckpt = {
        "format": FORMAT,
        "model": model.state_dict(),
        "class_names": list(class_names),
        "idx_to_class": {i: c for i, c in enumerate(class_names)},
        "model_args": dict(model_args),
        "epoch": int(epoch),
        "step": int(step),
        "rng": rng_state(),
        "metrics": dict(metrics or {}),
        "history": history or {},
    }
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, map_location="cpu", trust_pickle: bool = False) -> dict:
    """A checkpoint as ``{'model': state_dict, ...}``, read by ``mldecoder_fast.safe_load.load_file``
    (tensors and plain Python values only, unless ``trust_pickle``)."""
    from ..safe_load import FileReadError, load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = load_file(path, what="checkpoint", map_location=map_location, trust_pickle=trust_pickle)
    except FileReadError as exc:
        raise CheckpointError(str(exc)) from None
    if isinstance(ckpt, dict) and "model" not in ckpt and "state_dict" in ckpt:
        ckpt = dict(ckpt, model=ckpt["state_dict"])
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        # a bare state_dict
        ckpt = {"model": ckpt}
    state = ckpt["model"]
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in state.items())):
        raise CheckpointError(f"{path}: expected a checkpoint with a state_dict (a mapping of "
                              f"parameter names to tensors), got {type(state).__name__}"
                              + ("" if not isinstance(state, dict) else " with other values"))
    ckpt.setdefault("path", path)
    return ckpt


def head_num_classes(state_dict) -> tuple:
    """(key, class count) of the ML-Decoder head in a model state_dict, or (None, None)."""
    for key, value in state_dict.items():
        if key.endswith("duplicate_pooling_bias") and "decoder" in key:
            return key, int(value.shape[0])
    return None, None


def check_classes(ckpt: dict, class_names, what: str = "the data") -> None:
    """Fail clearly when the checkpoint's head or class list does not fit ``class_names``."""
    path = ckpt.get("path", "checkpoint")
    key, n = head_num_classes(ckpt["model"])
    if n is not None and n != len(class_names):
        raise CheckpointError(f"{path}: the checkpoint's head has {n} classes ({key} has shape [{n}]) "
                              f"but {what} has {len(class_names)} classes")
    saved = ckpt.get("class_names")
    if saved is not None and list(saved) != list(class_names):
        if len(saved) != len(class_names):
            raise CheckpointError(f"{path}: the checkpoint has {len(saved)} classes but {what} has "
                                  f"{len(class_names)} classes")
        diff = next(i for i, (a, b) in enumerate(zip(saved, class_names, strict=True)) if a != b)
        raise CheckpointError(f"{path}: class {diff} is {saved[diff]!r} in the checkpoint but "
                              f"{class_names[diff]!r} in {what}: the class lists differ")


def restore_training_state(ckpt: dict, optimizer, scheduler, scaler):
    """Load the optimizer, scheduler and (when saved) grad-scaler state of a training checkpoint.

    Returns ``(epoch, step, history, saved_history)``: ``history`` holds fresh ``steps``/``epochs``
    lists, ``saved_history`` is the checkpoint's whole history dict (best, run, ...)."""
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    saved = ckpt.get("history") or {}
    history = {"steps": list(saved.get("steps", [])), "epochs": list(saved.get("epochs", []))}
    return int(ckpt["epoch"]), int(ckpt["step"]), history, saved


def save_run(trainer, path: str, metrics=None) -> None:
    """Write ``trainer``'s state to ``path``: every rank must call it (the ranks' generator states
    are gathered into ``history["run"]``, with the position in the epoch); rank 0 writes."""
    run = {"step_in_epoch": trainer.step_in_epoch, "world_size": trainer.info.world_size,
           "batch_size": trainer.cfg.batch_size, "global_batch": trainer.global_batch,
           "steps_per_epoch": trainer.steps_per_epoch, "seed": trainer.cfg.seed,
           "rank_rng": all_gather_object(rng_state(), trainer.info)}
    if trainer.info.is_main:
        save_checkpoint(path, model=unwrap(trainer.model), class_names=trainer.class_names,
                        model_args=trainer.model_args, ema=trainer.ema, optimizer=trainer.optimizer,
                        scheduler=trainer.scheduler, scaler=trainer.scaler, epoch=trainer.epoch,
                        step=trainer.step, metrics=metrics,
                        history={**trainer.history, "best": trainer.best, "run": run,
                                 "config": asdict(trainer.cfg)})
    barrier(trainer.info)


def resume_run(trainer, path: str) -> None:
    """Continue ``trainer`` where the checkpoint ``path`` was written (see ``trainer.py``):
    weights, EMA, optimizer, schedule, scaler, step and position in the epoch, generator states
    (reseeded when the process count changed). A checkpoint that is not a training checkpoint of
    this run (other classes, no optimizer state, another one-cycle length) is a CheckpointError."""
    ckpt = load_checkpoint(path, map_location="cpu")
    trainer.check_checkpoint(ckpt)
    for key in ("optimizer", "scheduler", "rng") + (("ema",) if trainer.ema is not None else ()):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not a training checkpoint (no '{key}' entry)")
    saved_total, total = ckpt["scheduler"].get("total_steps"), getattr(trainer.scheduler, "total_steps", None)
    if saved_total is not None and total is not None and saved_total != total:
        raise CheckpointError(f"{path}: its one-cycle schedule has {saved_total} steps, this run "
                              f"{total} ({trainer.cfg.epochs} epochs x {trainer.steps_per_epoch} steps): "
                              "resume with the run's --epochs, --batch-size, data and "
                              "--max-steps-per-epoch")
    unwrap(trainer.model).load_state_dict(ckpt["model"])
    if trainer.ema is not None:
        trainer.ema.load_state_dict(ckpt["ema"])
    trainer.epoch, trainer.step, trainer.history, hist = restore_training_state(
        ckpt, trainer.optimizer, trainer.scheduler, trainer.scaler)
    trainer.best = dict(hist.get("best", trainer.best))
    run = hist.get("run") or {}
    old_batch = int(run.get("global_batch", trainer.global_batch))
    trainer.step_in_epoch = int(run.get("step_in_epoch", 0)) * old_batch // trainer.global_batch
    if old_batch != trainer.global_batch:
        trainer.log(f"note: the checkpoint was trained with a global batch of {old_batch}, this run "
                    f"uses {trainer.global_batch}: the schedule continues by step count")
    if int(run.get("steps_per_epoch", trainer.steps_per_epoch)) != trainer.steps_per_epoch:
        trainer.log(f"note: {run.get('steps_per_epoch')} steps per epoch in the checkpoint, "
                    f"{trainer.steps_per_epoch} here (another process count or batch)")
    ranks = run.get("rank_rng") or [ckpt["rng"]]   # a single-process checkpoint has "rng" only
    if int(run.get("world_size", 1)) == trainer.info.world_size and len(ranks) == trainer.info.world_size:
        set_rng_state(ranks[trainer.info.rank])
        how = "every rank's generator state restored"
    else:
        seed_everything(rank_seed(trainer.cfg.seed + 7 * trainer.step, trainer.info.rank))
        how = (f"written by {run.get('world_size', '?')} process(es), resumed on "
               f"{trainer.info.world_size}: data order continues exactly, generators reseeded")
    trainer.step_schedule(advance=False)
    trainer.resumed_from = path
    trainer.log(f"resumed from {path}: epoch {trainer.epoch} + {trainer.step_in_epoch} steps "
                f"(step {trainer.step}); {how}")
