"""The zero-shot recipe (NUS-WIDE, docs/design.md, Training recipes) on the ``ASLTrainer``, with
word queries and the paper's query augmentation; the data files are ``formats/nus_wide.py``'s.

Training sees the seen classes only: the head's queries are the seen classes' word vectors
(augmented, ``query_augment.py``) and the targets are the seen columns, plus a zero column per
extra query. Evaluation swaps the queries: ZSL scores the unseen classes only (queries = unseen
word vectors, targets = unseen columns), GZSL scores seen and unseen together. Reported: mAP (the
official definition, over all validation images) and precision / recall / F1 of the top-k
predictions (k = 3 and 5 by default), micro-averaged over the validation images that have at least
one positive among the evaluated classes; for the model and its EMA.

The rest of the recipe is the official script's: TResNet-L, batch 56, 40 epochs, Adam lr 1e-4 with
weight decay 1e-4 added to the gradient (``weight_decay_mode="l2"``), OneCycleLR (pct_start 0.2),
Asymmetric Loss (4, 0, 0.05), model EMA 0.9997, mixed precision on GPU, cutout + RandAugment, no
normalisation. The image size defaults to 224 (the zsl-nus-wide-224 configuration of
docs/design.md; the official script's default is 448). Runs under torchrun too (DDP).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from . import distributed as D
from .asl_trainer import ASLConfig, ASLTrainer
from .checkpoint import ZSL_SCORES, check_classes
from .formats.nus_wide import ZSLData
from .metrics import zsl_metrics
from .models import zsl_head
from .query_augment import QueryAugment

ZSL_DEFAULTS = dict(model="tresnet_l", image_size=224, epochs=40, batch_size=56, lr=1e-4,
                    weight_decay=1e-4, weight_decay_mode="l2", pct_start=0.2, ema_decay=0.9997,
                    decoder_embedding=768, workers=8, query_noise=0.1, extra_queries=-1)


@dataclass
class ZSLConfig(ASLConfig):
    out_dir: str = "runs/zsl"
    weight_decay_mode: str = "l2"
    query_noise: float = 0.1
    extra_queries: int = -1          # -1: 10% of the seen classes
    top_k: tuple = (3, 5)
    gzsl: bool = True


class ZSLTrainer(ASLTrainer):
    score_keys = ZSL_SCORES

    def __init__(self, model, data: ZSLData, train_set, val_set, cfg: ZSLConfig, model_args: dict,
                 info: D.DistInfo | None = None, log=print):
        info = info or D.DistInfo()
        self.data = data
        self.wv = data.word_vectors.to(info.device)
        self.seen_t = torch.as_tensor(data.seen, device=info.device)
        n_extra = cfg.extra_queries if cfg.extra_queries >= 0 else int(round(0.1 * len(data.seen)))
        self.augment = QueryAugment(cfg.query_noise, n_extra)
        super().__init__(model, train_set, val_set, data.class_names, cfg, model_args, info, log)

    def build_ema(self):
        self.set_queries(self.model, "train")          # the EMA copy starts with the same queries
        return super().build_ema()

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

    # the recipe's hooks ---------------------------------------------------------------------------
    def prepare_batch(self, x, y):
        y = y[:, self.seen_t]
        queries, n_extra = self.training_queries()
        zsl_head(self.model).set_word_vectors(queries)
        if n_extra:
            y = torch.cat([y, y.new_zeros(y.shape[0], n_extra)], dim=1)   # extra queries: negatives
        return x, y

    def end_training_epoch(self) -> None:
        self.set_queries(self.model, "train")

    def evaluate(self, model, phase: str) -> dict:
        """Metrics of ``model`` with the clean ``phase`` queries ("zsl" or "gzsl"), all ranks."""
        ids = torch.as_tensor({"zsl": self.data.unseen, "gzsl": self.data.gzsl}[phase])
        self.set_queries(model, phase)
        scores, targets = self.gather_scores(model, columns=ids)
        self.set_queries(model, "train")
        return zsl_metrics(targets, scores, self.cfg.top_k)

    def validate(self) -> dict:
        row = {}
        for phase in ["zsl"] + (["gzsl"] if self.cfg.gzsl else []):
            for which, model in (("", self.model), ("ema_", self.ema.module)):
                for k, v in self.evaluate(model, phase).items():
                    row[f"{which}{phase}_{k}"] = v
        return row

    def epoch_message(self, row: dict) -> str:
        k = self.cfg.top_k[0]
        if "zsl_mAP" not in row:
            return f"epoch {row['epoch']:.4g}/{self.cfg.epochs}  loss {row['train_loss']:.2f}"
        return (f"epoch {row['epoch']:.4g}/{self.cfg.epochs}  loss {row['train_loss']:.2f}  ZSL mAP "
                f"{row['zsl_mAP']:.2f} (EMA {row['ema_zsl_mAP']:.2f})  ZSL F1@{k} {row[f'zsl_F1@{k}']:.2f}"
                + (f"  GZSL mAP {row['gzsl_mAP']:.2f}  GZSL F1@{k} {row[f'gzsl_F1@{k}']:.2f}"
                   if self.cfg.gzsl else "")
                + f"  {row['images_per_s']:.1f} img/s")

    def check_checkpoint(self, ckpt: dict) -> None:
        # the head has one output per query, not per class: only the class list is compared
        check_classes({**ckpt, "model": {}}, self.class_names, "the NUS-WIDE data")

    def log_fields(self) -> dict:
        return {"seen": len(self.data.seen), "unseen": len(self.data.unseen),
                "query_augment": asdict(self.augment)}
