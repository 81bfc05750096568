"""What a run writes besides checkpoints: ``log.csv`` (a row per epoch), ``log.json`` (the run's
settings, the epoch rows and every step's loss and learning rate), ``summary.json`` and, for the
multi-label recipe, ``curves.png``."""
from __future__ import annotations

import csv
import json
import os

import numpy as np

from .distributed import unwrap


def write_run_logs(out_dir: str, history: dict, **fields) -> None:
    """A run's logs in ``out_dir``: log.csv (one row per epoch) and log.json (``fields``, then
    the epoch rows and the per-step records of ``history``; not indented: a long run's per-step
    records would triple the file)."""
    rows = history["epochs"]
    write_csv_log(os.path.join(out_dir, "log.csv"), rows)
    with open(os.path.join(out_dir, "log.json"), "w") as f:
        json.dump({**fields, "epochs": rows, "steps": history["steps"]}, f)


def write_csv_log(path: str, rows) -> None:
    """One CSV row per dict; the columns are every key seen, in first-seen order."""
    if not rows:
        return
    keys: list = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


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


def run_summary(trainer, wall_s: float) -> dict:
    """summary.json of a run: steps, time, throughput, peak memory, first/last losses, best and last
    epoch rows, and the recipe's ``summary_fields()``."""
    rows = trainer.history["epochs"]
    losses = [s[1] for s in trainer.history["steps"]]
    w = max(1, min(20, len(losses) // 4))
    counted = [r for r in rows if "steps" in r]   # rows of runs before this loop lack the counts
    train_s = sum(r["train_s"] for r in counted)
    imgs = sum(r["steps"] for r in counted) * trainer.global_batch
    head = getattr(unwrap(trainer.model), "ml_decoder_cfg", None)
    head = unwrap(trainer.model).get_submodule(head.path) if head is not None else None
    return {"steps": trainer.step, "epochs": trainer.epoch, "wall_s": wall_s,
            "world_size": trainer.info.world_size, "global_batch": trainer.global_batch,
            "device": str(trainer.device), "head": trainer.model_args.get("head"),
            "head_backend": getattr(head, "active_backend", None),
            "images_per_s": imgs / train_s if train_s else None,
            "images_per_s_steady": rows[-1].get("images_per_s_steady") if rows else None,
            "peak_memory_mb": max((r["peak_memory_mb"] for r in rows if "peak_memory_mb" in r), default=None),
            "loss_first": float(np.mean(losses[:w])) if losses else None,
            "loss_last": float(np.mean(losses[-w:])) if losses else None,
            "loss_window": w, "best": trainer.best, "last": rows[-1] if rows else {},
            "resumed_from": trainer.resumed_from, **trainer.summary_fields()}
