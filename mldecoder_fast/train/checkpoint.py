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
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

FORMAT = "mldecoder-fast/1"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run or model it is loaded into."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """A checkpoint as ``{'model': state_dict, ...}``, read by ``mldecoder_fast.files.load_file``
    (tensors and plain Python values only, unless ``trust_pickle``)."""
    from ..files import FileReadError, load_file
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
        diff = next(i for i, (a, b) in enumerate(zip(saved, class_names)) if a != b)
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


def write_run_logs(out_dir: str, history: dict, indent: int | None = 1, **fields) -> None:
    """A run's logs in ``out_dir``: log.csv (one row per epoch) and log.json (``fields``, then
    the epoch rows and the per-step records of ``history``)."""
    import json
    rows = history["epochs"]
    write_csv_log(os.path.join(out_dir, "log.csv"), rows)
    with open(os.path.join(out_dir, "log.json"), "w") as f:
        json.dump({**fields, "epochs": rows, "steps": history["steps"]}, f, indent=indent)


def write_csv_log(path: str, rows) -> None:
    """One CSV row per dict; the columns are every key seen, in first-seen order."""
    if not rows:
        return
    keys: list = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    import csv
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
