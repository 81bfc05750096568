"""The multi-label demo (``mldecoder-fast train multilabel --demo``, docs/training.md): its settings,
and the fast-vs-reference comparison of ``--head both`` (mAP, training time, and the time of one
training step of each model and of its head alone, timed in turns on the same batch)."""
from __future__ import annotations

import json
import os

import torch

# The demo's defaults: a small timm backbone and a head small enough for a CPU.
# test_resnet is timm's smallest ResNet (4 basic blocks, 0.37M parameters): a real architecture
# at a size a CPU trains in minutes. 48 px mosaics give it a 2 x 2 feature map (4 tokens).
DEMO_DEFAULTS = dict(model="test_resnet", image_size=48, grid=3, epochs=5, batch_size=64, lr=3e-3,
                     weight_decay=1e-4, ema_decay=0.99, ema_warmup=True, decoder_embedding=256,
                     num_of_groups=-1, workers=0, train_size=2048, val_size=512)


def time_training_steps(models: dict, batch: torch.Tensor, reps: int = 7, amp_dtype=None) -> dict:
    """Median milliseconds of one training-mode forward + backward, for each model and for its
    ML-Decoder head alone (on the head's real input), timed in interleaved rounds by
    ``mldecoder_fast.benchmark.timing.time_interleaved`` so that a busy machine slows every
    candidate alike; under ``torch.autocast(amp_dtype)`` when given (as the trainer runs).
    Returns {name: {"model_ms": ..., "head_ms": ...}}."""
    from ..benchmark.timing import time_interleaved
    from ..interop.timm_head import ml_decoder_of
    from .amp import autocast
    dev = batch.device

    def step(module, x):
        def run():
            module.zero_grad(set_to_none=True)
            with autocast(dev.type, amp_dtype):
                y = module(x)
            y.float().sum().backward()
        return run

    fns = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad(), autocast(dev.type, amp_dtype):
            feats = model.forward_head(model.forward_features(batch), pre_logits=True)
        model.train()
        fns[(name, "head_ms")] = step(ml_decoder_of(model), feats.detach().requires_grad_(True))
        fns[(name, "model_ms")] = step(model, batch)
    timings = time_interleaved(fns, dev, warmup=1, repeats=reps)
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {name: {key: timings[(name, key)].median_ms for key in ("model_ms", "head_ms")}
            for name in models}


def compare_heads(results: dict, out: str) -> None:
    """Fast vs reference after ``--head both``: print and write ``comparison.json``."""
    f, r = results["fast"], results["reference"]
    trainer = f["trainer"]
    x, _ = next(iter(torch.utils.data.DataLoader(trainer.val_set, batch_size=trainer.cfg.batch_size)))
    t = time_training_steps({"fast": f["trainer"].model, "reference": r["trainer"].model},
                            x.to(trainer.device), amp_dtype=trainer.amp_dtype)
    print("\nhead        best mAP   last mAP   last EMA   train s   step ms (fwd+bwd)   head ms (fwd+bwd)")
    for name, s in (("fast", f), ("reference", r)):
        print(f"{name:10s} {s['best_mAP']:9.2f} {s['last']['mAP']:10.2f} {s['last']['mAP_ema']:10.2f} "
              f"{s['wall_s']:9.1f} {t[name]['model_ms']:19.1f} {t[name]['head_ms']:19.1f}")
    report = {"best_mAP": {k: v["best_mAP"] for k, v in results.items()},
              "best_mAP_difference": f["best_mAP"] - r["best_mAP"],
              "train_s": {k: v["wall_s"] for k, v in results.items()}, "step_timing_ms": t,
              "step_speedup": t["reference"]["model_ms"] / t["fast"]["model_ms"],
              "head_speedup": t["reference"]["head_ms"] / t["fast"]["head_ms"]}
    print(f"best mAP difference (fast - reference): {report['best_mAP_difference']:+.2f}; "
          f"training step {report['step_speedup']:.2f}x and head {report['head_speedup']:.2f}x faster "
          f"with MLDecoderFast (median of turns on one batch of {x.shape[0]})")
    with open(os.path.join(out, "comparison.json"), "w") as fh:
        json.dump(report, fh, indent=1)
