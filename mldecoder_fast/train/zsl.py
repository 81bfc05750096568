"""``mldecoder-fast train zsl``: zero-shot multi-label training (the NUS-WIDE recipe) with word
queries, on the official ML-Decoder file formats, plus the paper's query augmentations.

Files in ``--data`` (the formats the official ``train_zsl_nus.py`` reads):

- ``data.csv``: a header row, then ``image path, label list, split`` per image; the label list is
  written like a Python list (``['airport', 'sky']``; quotes optional), split is ``train`` or
  ``val``. The classes are the sorted set of every label in the file (both splits), which fixes
  the column order of the word vectors.
- ``benchmark_81_v0.json``: ``{"train class": [...], "test class": [...]}``, the seen (925) and
  unseen (81) class names; without ``train class`` every class that is not a test class is seen.
- ``wordvec_array.pth``: a tensor [300, C] (one 300-d word vector per column, columns in the
  sorted class order of data.csv; [C, 300] is accepted too), or the official file's pickled numpy
  array; ``wordvec_array.npy`` or ``wordvec_array.pt`` instead are read too. Nothing in it is
  executed: a file that would import anything beyond a numeric array is refused, with a message
  naming what it imports, unless ``--trust-pickle`` is given (only for files you trust).

Training sees the seen classes only: the head's queries are the seen classes' word vectors and the
targets are the seen columns. Evaluation swaps the queries: ZSL scores the unseen classes only
(queries = unseen word vectors, targets = unseen columns), GZSL scores seen and unseen together.
Reported: mAP (the official definition, over all validation images) and precision / recall / F1 of
the top-k predictions (k = 3 and 5 by default), micro-averaged over the validation images that have
at least one positive among the evaluated classes; for the model and its EMA.

Query augmentation (training only; evaluation always uses the clean word vectors):

- ``--query-noise S`` (default 0.1): every training step adds Gaussian noise to the word
  queries, with standard deviation S x the vector's RMS entry (scale-free). 0: off.
- ``--extra-queries N`` (default -1: 10% of the seen classes, rounded): every training step adds N
  random queries drawn from a Gaussian with the seen word vectors' per-dimension mean and standard
  deviation, trained as negatives (target 0). 0: off.

The rest of the recipe is the official script's: TResNet-L, batch 56, 40 epochs, Adam lr 1e-4 with
weight decay 1e-4 added to the gradient (``--weight-decay-mode l2``; no decay on biases and 1-D
parameters), OneCycleLR (pct_start 0.2), Asymmetric Loss (4, 0, 0.05), model EMA 0.9997, mixed
precision on GPU, cutout + RandAugment, no normalisation. The image size defaults to 224 (the
SPEC's zsl-nus-wide-224; the official script's default is 448). Runs under torchrun too (DDP).

``--make-miniature DIR`` writes a small dataset in these formats (coloured shapes; a class is a
(colour, shape) pair whose word vector is the sum of a colour and a shape vector; the unseen pairs
use only colours and shapes that the seen pairs show) and exits.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._cli_types import SEED, float_range, int_range
from . import distributed as D
from .amp import AMP_CHOICES, autocast, resolve_amp_dtype
from .checkpoint import (CheckpointError, check_classes, load_checkpoint, restore_training_state,
                         rng_state, save_checkpoint, set_rng_state, write_run_logs)
from .data import (BadImageError, DataError, MultiLabelDataset, Sample, build_transforms, check_image_files,
                   image_path, open_text, read_json)

WORDVEC_DIM = 300
CSV_NAME, SPLIT_NAME, WORDVEC_NAME = "data.csv", "benchmark_81_v0.json", "wordvec_array.pth"
# Read in this order when WORDVEC_NAME is not there.
WORDVEC_NAMES = (WORDVEC_NAME, "wordvec_array.npy", "wordvec_array.pt")

ZSL_DEFAULTS = dict(model="tresnet_l", image_size=224, epochs=40, batch_size=56, lr=1e-4,
                    weight_decay=1e-4, weight_decay_mode="l2", pct_start=0.2, ema_decay=0.9997,
                    decoder_embedding=768, workers=8, query_noise=0.1, extra_queries=-1)


# the official formats ----------------------------------------------------------------------------
@dataclass
class ZSLData:
    class_names: list          # every class of data.csv, sorted (the word vectors' order)
    seen: np.ndarray           # indices of the training classes
    unseen: np.ndarray         # indices of the test classes
    word_vectors: torch.Tensor  # [C, 300] float32
    train: list                # Samples (labels index class_names)
    val: list

    @property
    def gzsl(self) -> np.ndarray:
        return np.union1d(self.seen, self.unseen)


def _clean_label(text: str) -> str:
    return text.strip().strip("'\"").strip()


def parse_label_list(text: str) -> list:
    """``['a', 'b']`` / ``[a, b]`` / ``a, b`` -> ["a", "b"] (the official parser splits on ", "
    after removing the brackets; quotes and blanks are removed here too)."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    return [lab for lab in (_clean_label(t) for t in body.split(",")) if lab]


def read_data_csv(path: str, images_root: str):
    """(rows [(line, path, labels, split)], sorted class names)."""
    name = os.path.basename(path)
    with open_text(path, f"not found (the NUS-WIDE ZSL folder needs {CSV_NAME}, {SPLIT_NAME} and "
                         f"{WORDVEC_NAME})", newline="") as f:
        reader = csv.reader(f)
        try:
            rows = _data_csv_rows(path, reader, images_root)
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
            raise DataError(f"{path} line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: no rows after the header")
    names = sorted({lab for _, _, labs, _ in rows for lab in labs})
    if not names:
        raise DataError(f"{path}: no labels at all")
    return rows, names, name


def _data_csv_rows(path: str, reader, images_root: str) -> list:
    header = next(reader, None)
    if header is None:
        raise DataError(f"{path}: empty file")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) > 3 and row[1].lstrip().startswith("["):
            # an unquoted list: its commas split it over several cells
            end = next((j for j in range(1, len(row)) if row[j].rstrip().endswith("]")), None)
            if end is None:
                raise DataError(f"{path} line {lineno}: the label list has no closing ']'")
            row = [row[0], ",".join(row[1:end + 1])] + row[end + 1:]
        if len(row) < 3:
            raise DataError(f"{path} line {lineno}: expected 'image, labels, split' (3 columns), "
                            f"got {len(row)}: {row!r}"[:400])
        split = row[2].strip()
        if split not in ("train", "val"):
            raise DataError(f"{path} line {lineno}: split {split!r} is neither 'train' nor 'val'"[:400])
        image = image_path(row[0], f"{path} line {lineno}")
        rows.append((lineno, os.path.join(images_root, image), parse_label_list(row[1]), split))
    return rows


def read_split_json(path: str, class_names):
    """(seen indices, unseen indices) from benchmark_81_v0.json."""
    split = read_json(path)
    if not isinstance(split, dict) or not isinstance(split.get("test class"), list):
        raise DataError(f"{path}: expected an object with a 'test class' list (and optionally "
                        "'train class')")
    for key in ("test class", "train class"):
        names = split.get(key, [])
        if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
            raise DataError(f"{path}: '{key}' must be a list of class names (strings)")
    index = {c: i for i, c in enumerate(class_names)}
    test = [_clean_label(c) for c in split["test class"]]
    missing = [c for c in test if c not in index]
    if missing:
        raise DataError(f"{path}: test class {missing[0]!r} does not occur in {CSV_NAME} "
                        f"({len(missing)} of {len(test)} test classes are missing)")
    unseen = np.array(sorted({index[c] for c in test}), dtype=np.int64)
    if "train class" in split:
        train = [_clean_label(c) for c in split["train class"]]
        missing = [c for c in train if c not in index]
        if missing:
            raise DataError(f"{path}: train class {missing[0]!r} does not occur in {CSV_NAME}")
        seen = np.array(sorted({index[c] for c in train}), dtype=np.int64)
    else:
        seen = np.setdiff1d(np.arange(len(class_names)), unseen)
    overlap = np.intersect1d(seen, unseen)
    if len(overlap):
        raise DataError(f"{path}: class {class_names[overlap[0]]!r} is both a train and a test class")
    if not len(seen) or not len(unseen):
        raise DataError(f"{path}: needs at least one train and one test class")
    return seen, unseen


def read_word_vectors(path: str, num_classes: int, trust_pickle: bool = False) -> torch.Tensor:
    """[C, 300] float32 from wordvec_array.pth ([300, C] officially): a tensor, a pickled numeric
    numpy array (the official file) or a ``.npy``, read by ``mldecoder_fast.files.load_file``
    (no code runs unless ``trust_pickle``)."""
    from ..files import FileReadError, load_file
    try:
        wv = load_file(path, what="word vectors", allow_numpy=True, trust_pickle=trust_pickle)
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except FileReadError as exc:
        raise DataError(str(exc)) from None
    if isinstance(wv, dict) and len(wv) == 1:
        wv = next(iter(wv.values()))
    try:
        wv = torch.as_tensor(np.asarray(wv) if not isinstance(wv, torch.Tensor) else wv)
    except Exception:  # noqa: BLE001
        raise DataError(f"{path}: expected a tensor of word vectors, got {type(wv).__name__}") from None
    wv = wv.squeeze()
    shape = tuple(wv.shape)
    if wv.dim() == 2 and shape == (WORDVEC_DIM, num_classes):
        wv = wv.t()
    elif not (wv.dim() == 2 and shape == (num_classes, WORDVEC_DIM)):
        raise DataError(f"{path}: word vectors of shape {list(shape)}, expected [{WORDVEC_DIM}, "
                        f"{num_classes}]: {WORDVEC_DIM}-d vectors, one column per class of "
                        f"{CSV_NAME} ({num_classes} classes)")
    if not wv.is_floating_point():
        raise DataError(f"{path}: word vectors must be floating point, got {wv.dtype}")
    wv = wv.float().contiguous()
    if not torch.isfinite(wv).all():
        raise DataError(f"{path}: word vectors contain NaN or infinity")
    return wv


def word_vector_path(root: str) -> str:
    """The word-vector file of ``root``: the first of ``WORDVEC_NAMES`` that exists."""
    for name in WORDVEC_NAMES:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    return os.path.join(root, WORDVEC_NAME)  # reported as not found


def load_zsl_data(root: str, images_root: str | None = None, check_files: bool = True,
                  trust_pickle: bool = False) -> ZSLData:
    """The data set in ``root``. ``trust_pickle`` lets the word-vector file unpickle anything
    (it can run code: only for files you trust)."""
    images_root = images_root if images_root is not None else root
    rows, names, csv_name = read_data_csv(os.path.join(root, CSV_NAME), images_root)
    seen, unseen = read_split_json(os.path.join(root, SPLIT_NAME), names)
    wv = read_word_vectors(word_vector_path(root), len(names), trust_pickle=trust_pickle)
    index = {c: i for i, c in enumerate(names)}
    samples = {"train": [], "val": []}
    for lineno, path, labels, split in rows:
        samples[split].append(Sample(path, tuple(sorted({index[c] for c in labels})),
                                     f"{csv_name} line {lineno}"))
    for split in ("train", "val"):
        if not samples[split]:
            raise DataError(f"{os.path.join(root, CSV_NAME)}: no '{split}' rows")
        if check_files:
            check_image_files(samples[split])
    return ZSLData(names, seen, unseen, wv, samples["train"], samples["val"])


# query augmentation ------------------------------------------------------------------------------
@dataclass
class QueryAugment:
    """Training-time word-query augmentation (see the module docstring for the defaults)."""
    noise: float = 0.1
    extra: int = 0

    def __call__(self, word_vectors: torch.Tensor, generator: torch.Generator | None = None):
        """(augmented queries [n + extra, 300], number of extra queries appended)."""
        v = word_vectors
        if self.noise > 0:
            rms = v.pow(2).mean(dim=1, keepdim=True).sqrt()
            v = v + self.noise * rms * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        if self.extra > 0:
            mean, std = word_vectors.mean(0), word_vectors.std(0, unbiased=False)
            extra = torch.randn((self.extra, v.shape[1]), generator=generator, dtype=v.dtype).to(v.device)
            v = torch.cat([v, mean + std * extra])
        return v, max(self.extra, 0)


# metrics -----------------------------------------------------------------------------------------
def topk_prf(targets, scores, k: int) -> dict:
    """Precision, recall and F1 (x100) of the top-k scored classes of every image, micro-averaged
    over the images with at least one positive: P = hits / (k x images), R = hits / positives."""
    t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
    s = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    if t.shape != s.shape:
        raise ValueError(f"targets {tuple(t.shape)} and scores {tuple(s.shape)} differ in shape")
    keep = (t == 1).any(dim=1)
    t, s = t[keep], s[keep]
    if t.shape[0] == 0:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "images": 0}
    k = min(k, t.shape[1])
    top = s.topk(k, dim=1).indices
    hits = float((t.gather(1, top) == 1).sum())
    p = hits / (k * t.shape[0])
    r = hits / float((t == 1).sum())
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f1, "images": int(t.shape[0])}


def zsl_metrics(targets, scores, ks=(3, 5)) -> dict:
    """mAP (official definition, all images) and top-k precision/recall/F1 for one evaluation."""
    from .metrics import mean_average_precision
    t, s = np.asarray(targets), np.asarray(scores)
    out = {"mAP": mean_average_precision(t, s)}
    for k in ks:
        prf = topk_prf(t, s, k)
        out.update({f"P@{k}": prf["precision"], f"R@{k}": prf["recall"], f"F1@{k}": prf["f1"]})
    return out


# model -------------------------------------------------------------------------------------------
def build_zsl_model(model_name: str, head: str = "fast", decoder_embedding: int = 768,
                    pretrained: bool = False, model_kwargs=None, backend: str = "auto"):
    import timm

    from ..timm_head import add_ml_decoder_head
    model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
    return add_ml_decoder_head(model, num_classes=1, decoder_embedding=decoder_embedding, zsl=1,
                               fast=(head == "fast"), backend=backend)


def zsl_head(model: nn.Module) -> nn.Module:
    from ..timm_head import ml_decoder_of
    return ml_decoder_of(D.unwrap(model))


# the trainer -------------------------------------------------------------------------------------
@dataclass
class ZSLConfig:
    epochs: int = 40
    batch_size: int = 56             # per process
    lr: float = 1e-4
    weight_decay: float = 1e-4
    weight_decay_mode: str = "l2"
    pct_start: float = 0.2
    ema_decay: float = 0.9997
    gamma_neg: float = 4
    gamma_pos: float = 0
    clip: float = 0.05
    query_noise: float = 0.1
    extra_queries: int = -1          # -1: 10% of the seen classes
    top_k: tuple = (3, 5)
    gzsl: bool = True
    amp: str = "auto"
    workers: int = 8
    seed: int = 0
    max_steps_per_epoch: int = 0
    out_dir: str = "runs/zsl"
    progress: bool = True
    save_checkpoints: bool = True


class ZSLTrainer:
    def __init__(self, model, data: ZSLData, train_set, val_set, cfg: ZSLConfig, model_args: dict,
                 info: D.DistInfo | None = None, log=print):
        from .ema import ModelEma
        from .losses import AsymmetricLoss
        from .optim import build_optimizer, build_scheduler
        self.cfg, self.data, self.info = cfg, data, info or D.DistInfo()
        self.device = self.info.device
        self._log = log
        self.train_set, self.val_set = train_set, val_set
        self.model_args = dict(model_args)
        self.model = model.to(self.device)
        self.amp_dtype = resolve_amp_dtype(cfg.amp, self.device)
        self.wv = data.word_vectors.to(self.device)
        n_extra = cfg.extra_queries if cfg.extra_queries >= 0 else int(round(0.1 * len(data.seen)))
        self.augment = QueryAugment(cfg.query_noise, n_extra)
        self.set_queries(self.model, "train")          # the EMA copy starts with the same queries
        self.ema = ModelEma(self.model, cfg.ema_decay)
        self.criterion = AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, cfg.weight_decay_mode)
        self.sampler = D.EpochSampler(train_set, cfg.batch_size, self.info.rank, self.info.world_size,
                                      cfg.seed, repeats=1)
        self.steps_per_epoch = self.sampler.steps
        if cfg.max_steps_per_epoch > 0:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.lr, cfg.epochs, self.steps_per_epoch,
                                         cfg.pct_start)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.epoch = self.step = 0
        self.history = {"steps": [], "epochs": []}
        self.best = {"mAP": -1.0}
        self.ddp = None
        self.seen_t = torch.as_tensor(data.seen, device=self.device)

    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    # the query swap -------------------------------------------------------------------------------
    def queries(self, phase: str) -> torch.Tensor:
        """Clean word vectors of a phase: "train" (seen), "zsl" (unseen), "gzsl" (both)."""
        ids = {"train": self.data.seen, "zsl": self.data.unseen, "gzsl": self.data.gzsl}[phase]
        return self.wv[torch.as_tensor(ids, device=self.device)]

    def set_queries(self, model, phase: str) -> torch.Tensor:
        v = self.queries(phase)
        zsl_head(model).set_word_vectors(v)
        return v

    def training_queries(self):
        """The queries of one training step: the seen word vectors, augmented."""
        return self.augment(self.queries("train"))

    # checkpoints ----------------------------------------------------------------------------------
    def save(self, path: str, metrics=None) -> None:
        rngs = D.all_gather_object(rng_state(), self.info)
        if self.info.is_main:
            save_checkpoint(path, model=D.unwrap(self.model), class_names=self.data.class_names,
                            model_args=self.model_args, ema=self.ema, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch,
                            step=self.step, metrics=metrics,
                            history={**self.history, "best": self.best, "config": asdict(self.cfg),
                                     "run": {"world_size": self.info.world_size, "rank_rng": rngs}})
        D.barrier(self.info)

    def resume(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        check_classes({**ckpt, "model": {}}, self.data.class_names, "the NUS-WIDE data")
        for key in ("ema", "optimizer", "scheduler"):
            if key not in ckpt:
                raise CheckpointError(f"{path}: not a training checkpoint (no '{key}' entry)")
        saved_total = ckpt["scheduler"].get("total_steps")
        if saved_total is not None and saved_total != self.scheduler.total_steps:
            raise CheckpointError(f"{path}: its one-cycle schedule has {saved_total} steps, this run "
                                  f"{self.scheduler.total_steps} ({self.cfg.epochs} epochs x "
                                  f"{self.steps_per_epoch} steps): resume with the run's --epochs, "
                                  "--batch-size and --max-steps-per-epoch")
        D.unwrap(self.model).load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.epoch, self.step, self.history, hist = restore_training_state(
            ckpt, self.optimizer, self.scheduler, self.scaler)
        self.best = dict(hist.get("best", self.best))
        run = hist.get("run") or {}
        if run.get("world_size") == self.info.world_size and len(run.get("rank_rng", [])) == self.info.world_size:
            set_rng_state(run["rank_rng"][self.info.rank])
        else:
            torch.manual_seed(D.rank_seed(self.cfg.seed + 7 * self.step, self.info.rank))
        self.log(f"resumed from {path} after epoch {self.epoch} (step {self.step})")

    # training -------------------------------------------------------------------------------------
    def train_one_epoch(self) -> dict:
        cfg = self.cfg
        model = self.ddp
        model.train()
        self.sampler.set_epoch(self.epoch)
        loader = DataLoader(D.KeyedDataset(self.train_set, cfg.seed), batch_size=cfg.batch_size,
                            sampler=self.sampler, num_workers=cfg.workers, drop_last=True,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed))
        bar = None
        if cfg.progress and self.info.is_main:
            from tqdm import tqdm
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                       dynamic_ncols=True, leave=False)
        losses, t0, n = [], time.perf_counter(), 0
        for i, (x, y) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)[:, self.seen_t]
            queries, n_extra = self.training_queries()
            zsl_head(model).set_word_vectors(queries)
            if n_extra:
                y = torch.cat([y, y.new_zeros(y.shape[0], n_extra)], dim=1)   # extra queries: negatives
            with autocast(self.device.type, self.amp_dtype):
                out = model(x)
            loss = self.criterion(out.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {self.epoch + 1} step {i + 1}: the loss is {loss.item()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.ema.update(D.unwrap(model))
            self.step += 1
            n += x.shape[0]
            lv = float(D.all_reduce_sum([loss.item()], self.info)[0]) / self.info.world_size
            losses.append(lv)
            self.history["steps"].append([self.step, lv, self.optimizer.param_groups[0]["lr"]])
            if bar is not None:
                bar.set_postfix(loss=f"{lv:.2f}")
                bar.update()
        if bar is not None:
            bar.close()
        self.set_queries(model, "train")
        elapsed = time.perf_counter() - t0
        return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "train_s": elapsed,
                "images_per_s": n * self.info.world_size / max(elapsed, 1e-9)}

    @torch.no_grad()
    def evaluate(self, model, phase: str) -> dict:
        """Metrics of ``model`` with the clean ``phase`` queries ("zsl" or "gzsl"), all ranks."""
        model = D.unwrap(model)
        model.eval()
        ids = torch.as_tensor({"zsl": self.data.unseen, "gzsl": self.data.gzsl}[phase])
        self.set_queries(model, phase)
        loader = DataLoader(self.val_set, batch_size=self.cfg.batch_size,
                            sampler=D.EvalShardSampler(self.val_set, self.info.rank, self.info.world_size),
                            num_workers=self.cfg.workers, generator=torch.Generator())
        scores, targets = [], []
        for x, y in loader:
            with autocast(self.device.type, self.amp_dtype):
                out = model(x.to(self.device, non_blocking=True))
            scores.append(torch.sigmoid(out.float()).cpu())
            targets.append(y[:, ids])
        parts = D.all_gather_object((torch.cat(scores), torch.cat(targets)), self.info)
        s = torch.cat([p[0] for p in parts]).numpy()
        t = torch.cat([p[1] for p in parts]).numpy()
        self.set_queries(model, "train")
        return zsl_metrics(t, s, self.cfg.top_k)

    def validate(self) -> dict:
        row = {}
        phases = ["zsl"] + (["gzsl"] if self.cfg.gzsl else [])
        for phase in phases:
            for which, model in (("", self.model), ("ema_", self.ema.module)):
                for k, v in self.evaluate(model, phase).items():
                    row[f"{which}{phase}_{k}"] = v
        return row

    def fit(self, stop_after_epochs: int | None = None) -> dict:
        """Train to ``cfg.epochs`` (or ``stop_after_epochs`` more epochs); returns a summary."""
        cfg = self.cfg
        if self.info.is_main:
            os.makedirs(cfg.out_dir, exist_ok=True)
        if self.ddp is None:
            self.ddp = D.wrap_ddp(self.model, self.info)
        t_start = time.perf_counter()
        end = cfg.epochs if not stop_after_epochs else min(cfg.epochs, self.epoch + stop_after_epochs)
        while self.epoch < end:
            stats = self.train_one_epoch()
            self.epoch += 1
            t_val = time.perf_counter()
            row = {"epoch": self.epoch, "step": self.step, **stats, **self.validate(),
                   "val_s": time.perf_counter() - t_val,
                   "peak_memory_mb": float(D.all_reduce_max([D.peak_memory_mb(self.device)], self.info)[0])}
            self.history["epochs"].append(row)
            score = max(row["zsl_mAP"], row["ema_zsl_mAP"])
            improved = score > self.best["mAP"]
            if improved:
                self.best = {"mAP": score, "which": "ema" if row["ema_zsl_mAP"] > row["zsl_mAP"] else "model",
                             "epoch": self.epoch}
            k = cfg.top_k[0]
            self.log(f"epoch {self.epoch}/{cfg.epochs}  loss {row['train_loss']:.2f}  ZSL mAP "
                     f"{row['zsl_mAP']:.2f} (EMA {row['ema_zsl_mAP']:.2f})  ZSL F1@{k} {row[f'zsl_F1@{k}']:.2f}"
                     + (f"  GZSL mAP {row['gzsl_mAP']:.2f}  GZSL F1@{k} {row[f'gzsl_F1@{k}']:.2f}"
                        if cfg.gzsl else "")
                     + f"  {row['images_per_s']:.1f} img/s")
            if self.info.is_main:
                self.write_logs()
            if cfg.save_checkpoints:
                self.save(os.path.join(cfg.out_dir, "last.pth"), {"zsl_mAP": row["zsl_mAP"]})
                if improved:
                    self.save(os.path.join(cfg.out_dir, "best.pth"), {"zsl_mAP": row["zsl_mAP"]})
        last = self.history["epochs"][-1] if self.history["epochs"] else {}
        return {"best": self.best, "last": last, "epochs": self.epoch, "steps": self.step,
                "wall_s": time.perf_counter() - t_start}

    def write_logs(self) -> None:
        write_run_logs(self.cfg.out_dir, self.history, config=asdict(self.cfg), model_args=self.model_args,
                       seen=len(self.data.seen), unseen=len(self.data.unseen),
                       query_augment=asdict(self.augment), best=self.best)


# the miniature -----------------------------------------------------------------------------------
_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "purple": (150, 50, 190), "cyan": (40, 200, 210)}
_SHAPES = ("square", "circle", "triangle", "cross")


def _draw(draw, shape, box, color):
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        w = max((x1 - x0) // 4, 1)
        draw.rectangle([(x0 + x1) // 2 - w, y0, (x0 + x1) // 2 + w, y1], fill=color)
        draw.rectangle([x0, (y0 + y1) // 2 - w, x1, (y0 + y1) // 2 + w], fill=color)


def make_miniature(out_dir: str, train_images: int = 96, val_images: int = 32, image_size: int = 48,
                   seed: int = 0, max_objects: int = 3) -> dict:
    """Write data.csv, benchmark_81_v0.json, wordvec_array.pth and images/ (see the module
    docstring); returns a description."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    colors, shapes = list(_COLORS), list(_SHAPES)
    classes = sorted(f"{c}_{s}" for c in colors for s in shapes)
    unseen = sorted(f"{c}_{shapes[i % len(shapes)]}" for i, c in enumerate(colors))
    seen = [c for c in classes if c not in unseen]
    color_vec = {c: rng.normal(0, 1, WORDVEC_DIM) for c in colors}
    shape_vec = {s: rng.normal(0, 1, WORDVEC_DIM) for s in shapes}
    wv = np.stack([color_vec[c.split("_")[0]] + shape_vec[c.split("_")[1]] + rng.normal(0, 0.1, WORDVEC_DIM)
                   for c in classes], axis=1).astype(np.float32)            # [300, C], official layout
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rows = []
    if train_images < len(classes) or val_images < len(unseen):
        raise ValueError(f"the miniature needs >= {len(classes)} training and >= {len(unseen)} "
                         "validation images (every class must occur in data.csv)")
    for split, n in (("train", train_images), ("val", val_images)):
        # every class occurs in training, every unseen class in validation
        cycle = classes if split == "train" else unseen
        for i in range(n):
            k = int(rng.integers(1, max_objects + 1))
            labels = rng.choice(classes, size=k, replace=True).tolist()
            if i < len(cycle):
                labels[0] = cycle[i]
            labels = sorted(set(labels))
            img = Image.new("RGB", (image_size, image_size), (128, 128, 128))
            draw = ImageDraw.Draw(img)
            side = image_size // 3
            for lab in labels:
                c, s = lab.split("_")
                x0, y0 = (int(v) for v in rng.integers(0, image_size - side, size=2))
                _draw(draw, s, [x0, y0, x0 + side, y0 + side], _COLORS[c])
            rel = f"images/{split}_{i:05d}.png"
            img.save(os.path.join(out_dir, rel))
            rows.append((rel, str(labels), split))
    with open(os.path.join(out_dir, CSV_NAME), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "label", "split"])
        w.writerows(rows)
    with open(os.path.join(out_dir, SPLIT_NAME), "w") as f:
        json.dump({"train class": seen, "test class": unseen}, f, indent=1)
    torch.save(torch.from_numpy(wv), os.path.join(out_dir, WORDVEC_NAME))
    return {"classes": len(classes), "seen": len(seen), "unseen": len(unseen),
            "train_images": train_images, "val_images": val_images, "dir": out_dir}


# command line ------------------------------------------------------------------------------------
def register(recipes) -> None:
    p = recipes.add_parser(
        "zsl", help="zero-shot training with word queries (the NUS-WIDE recipe)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Zero-shot multi-label training on the official NUS-WIDE ZSL files (data.csv, "
                    "benchmark_81_v0.json, wordvec_array.pth): seen word vectors as queries in "
                    "training, unseen (ZSL) and all (GZSL) in evaluation, with query augmentation. "
                    "Runs under torchrun too.")
    d = p.add_argument_group("data")
    d.add_argument("--data", help=f"folder with {CSV_NAME}, {SPLIT_NAME}, {WORDVEC_NAME}")
    d.add_argument("--images-root", help="root of data.csv's image paths (default: --data)")
    d.add_argument("--make-miniature", metavar="DIR", help="write a miniature dataset in these formats to DIR and exit")
    d.add_argument("--no-file-check", action="store_true", help="do not check every image exists first")
    d.add_argument("--trust-pickle", action="store_true",
                   help="read a word-vector file that needs full unpickling (it can run any code: "
                        "only for a file from a source you trust); without it such a file is refused")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=ZSL_DEFAULTS["model"])
    m.add_argument("--pretrained", action="store_true")
    m.add_argument("--head", choices=["fast", "reference"], default="fast")
    m.add_argument("--backend", default="auto")
    m.add_argument("--decoder-embedding", type=int_range(1), default=ZSL_DEFAULTS["decoder_embedding"])
    t = p.add_argument_group("recipe")
    t.add_argument("--image-size", type=int_range(1), default=ZSL_DEFAULTS["image_size"])
    t.add_argument("--epochs", type=int_range(1), default=ZSL_DEFAULTS["epochs"])
    t.add_argument("--batch-size", type=int_range(1), default=ZSL_DEFAULTS["batch_size"], help="per process")
    t.add_argument("--lr", type=float_range(gt=0), default=ZSL_DEFAULTS["lr"])
    t.add_argument("--weight-decay", type=float_range(ge=0), default=ZSL_DEFAULTS["weight_decay"])
    t.add_argument("--weight-decay-mode", choices=["l2", "decoupled"], default=ZSL_DEFAULTS["weight_decay_mode"])
    t.add_argument("--pct-start", type=float_range(ge=0, lt=1), default=ZSL_DEFAULTS["pct_start"])
    t.add_argument("--ema-decay", type=float_range(ge=0, le=1), default=ZSL_DEFAULTS["ema_decay"])
    t.add_argument("--amp", choices=AMP_CHOICES, default="auto")
    t.add_argument("--no-randaugment", action="store_true")
    t.add_argument("--cutout", type=float_range(ge=0, le=1), default=0.5)
    q = p.add_argument_group("query augmentation (training only)")
    q.add_argument("--query-noise", type=float_range(ge=0), default=ZSL_DEFAULTS["query_noise"],
                   help="std of the Gaussian noise added to the word queries, relative to each "
                        "vector's RMS entry (0: off)")
    q.add_argument("--extra-queries", type=int_range(0, also=(-1,)), default=ZSL_DEFAULTS["extra_queries"],
                   help="random extra queries per step, trained as negatives (-1: 10%% of the seen "
                        "classes; 0: off)")
    q.add_argument("--no-query-augment", action="store_true", help="both off")
    e = p.add_argument_group("evaluation")
    e.add_argument("--top-k", type=int_range(1), nargs="+", default=[3, 5])
    e.add_argument("--no-gzsl", action="store_true", help="ZSL metrics only")
    r = p.add_argument_group("run")
    r.add_argument("--workers", type=int_range(0), default=ZSL_DEFAULTS["workers"])
    r.add_argument("--seed", type=SEED, default=0)
    r.add_argument("--device", default=None)
    r.add_argument("--max-steps-per-epoch", type=int_range(0), default=0)
    r.add_argument("--out", default="runs/zsl")
    r.add_argument("--resume", help="continue from a last.pth of this run")
    r.add_argument("--stop-after-epochs", type=int_range(0), default=0,
                   help="stop after N epochs of this invocation (the schedule still spans --epochs)")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_zsl)


def run_zsl(args) -> int:
    if args.make_miniature:
        desc = make_miniature(args.make_miniature)
        print(f"wrote a miniature NUS-WIDE ZSL dataset: {desc}")
        return 0
    if not args.data:
        print("error: --data DIR (or --make-miniature DIR)", file=sys.stderr)
        return 2
    info = D.init_distributed(args.device)
    try:
        return _run(args, info)
    except (DataError, BadImageError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        D.destroy_distributed(info)


def _run(args, info: D.DistInfo) -> int:
    error, data = None, None
    try:
        data = load_zsl_data(args.data, args.images_root, check_files=info.is_main and not args.no_file_check,
                             trust_pickle=args.trust_pickle)
    except DataError as exc:
        error = str(exc)
    error = D.broadcast_object(error, info)
    if error:
        raise DataError(error)
    torch.manual_seed(args.seed)
    model = build_zsl_model(args.model, args.head, args.decoder_embedding, args.pretrained,
                            backend=args.backend)
    t_train = build_transforms(args.image_size, train=True, randaugment=not args.no_randaugment,
                               cutout=args.cutout)
    t_val = build_transforms(args.image_size, train=False)
    train_set = MultiLabelDataset(data.train, data.class_names, t_train)
    val_set = MultiLabelDataset(data.val, data.class_names, t_val)
    cfg = ZSLConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    weight_decay=args.weight_decay, weight_decay_mode=args.weight_decay_mode,
                    pct_start=args.pct_start, ema_decay=args.ema_decay,
                    query_noise=0.0 if args.no_query_augment else args.query_noise,
                    extra_queries=0 if args.no_query_augment else args.extra_queries,
                    top_k=tuple(args.top_k), gzsl=not args.no_gzsl, amp=args.amp, workers=args.workers,
                    seed=args.seed, max_steps_per_epoch=args.max_steps_per_epoch, out_dir=args.out,
                    progress=not args.no_progress and sys.stderr.isatty())
    model_args = {"model": args.model, "zsl": 1, "head": args.head, "decoder_embedding": args.decoder_embedding,
                  "image_size": args.image_size, "num_classes": len(data.class_names), "recipe": "zsl",
                  "seen": [data.class_names[i] for i in data.seen],
                  "unseen": [data.class_names[i] for i in data.unseen]}
    torch.manual_seed(D.rank_seed(args.seed, info.rank))
    trainer = ZSLTrainer(model, data, train_set, val_set, cfg, model_args, info)
    trainer.log(f"{args.model} + {'MLDecoderFast' if args.head == 'fast' else 'MLDecoder (reference)'} "
                f"(ZSL): {len(data.seen)} seen / {len(data.unseen)} unseen classes, {len(train_set)} "
                f"training / {len(val_set)} validation images, {trainer.steps_per_epoch} steps per "
                f"epoch; query noise {trainer.augment.noise}, {trainer.augment.extra} extra queries")
    if args.resume:
        trainer.resume(args.resume)
    s = trainer.fit(args.stop_after_epochs or None)
    trainer.log(f"best ZSL mAP {s['best']['mAP']:.2f} ({s['best'].get('which')}, epoch "
                f"{s['best'].get('epoch')}); outputs in {cfg.out_dir}")
    return 0
