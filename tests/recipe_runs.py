"""Short runs of the three training recipes, for the regression check of tests/test_recipe_losses.py.

Each run goes through the command line (``mldecoder-fast train multilabel|singlelabel|zsl``) on
data generated here, on the CPU with one thread, a fixed seed and the CPU GEMMs fixed to torch's
own (``set_cpu_gemm("mkl")``: the ``auto`` choice times each shape and could pick another library,
with other rounding, from one run to the next), and returns what its log.json recorded: every
step's loss and learning rate, and the validation metrics of every epoch.

``python tests/recipe_runs.py`` writes tests/data/recipe_losses.json (the reference the test
compares against; record it at a commit whose numbers are the ones to keep).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "data", "recipe_losses.json")

# Validation numbers kept per epoch (the ones each recipe reports).
METRICS = {"multilabel": ("mAP", "mAP_ema", "mAP_chance"),
           "singlelabel": ("top1", "top5", "val_loss"),
           "zsl": ("zsl_mAP", "ema_zsl_mAP", "gzsl_mAP", "ema_gzsl_mAP", "zsl_F1@3", "gzsl_P@5")}

TINY = ["--model", "test_resnet", "--image-size", "32", "--decoder-embedding", "32", "--workers", "0",
        "--no-progress"]


def _multilabel(root: str) -> list:
    return ["train", "multilabel", "--demo", "--epochs", "2", "--train-size", "64", "--val-size", "32",
            "--batch-size", "16", "--grid", "2", "--max-steps-per-epoch", "3", "--threads", "1",
            "--no-plot", *TINY]


def _singlelabel(root: str) -> list:
    from mldecoder_fast.train.synthetic.imagenet21k import generate_imagenet21k
    meta = generate_imagenet21k(os.path.join(root, "data"), 10, train_images=40, val_images=8,
                                image_size=32, seed=1)
    return ["train", "singlelabel", "--train-list", meta["train_list"], "--val-list", meta["val_list"],
            "--classes", meta["classes"], "--num-of-groups", "5", "--batch-size", "4", "--epochs", "2",
            "--max-steps", "6", "--log-every", "1", "--warmup-epochs", "0.5", *TINY]


def _zsl(root: str) -> list:
    from mldecoder_fast.cli import main
    data = os.path.join(root, "nus")
    assert main(["train", "zsl", "--make-miniature", data]) == 0
    return ["train", "zsl", "--data", data, "--batch-size", "8", "--lr", "1e-3", "--epochs", "2",
            "--max-steps-per-epoch", "3", "--ema-decay", "0.9", *TINY]


RUNS = {"multilabel": _multilabel, "singlelabel": _singlelabel, "zsl": _zsl}


def run_recipe(name: str) -> dict:
    """{"steps": [[step, loss, lr], ...], "epochs": [{metric: value}, ...]} of one short run."""
    import torch

    from mldecoder_fast.cli import main
    from mldecoder_fast.ops.cpu_gemm import set_cpu_gemm
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gemm = set_cpu_gemm("mkl")
    try:
        with tempfile.TemporaryDirectory() as root:
            out = os.path.join(root, "run")
            rc = main(RUNS[name](root) + ["--seed", "0", "--out", out])
            assert rc == 0, f"train {name}: exit code {rc}"
            with open(os.path.join(out, "log.json")) as f:
                log = json.load(f)
    finally:
        torch.set_num_threads(threads)
        set_cpu_gemm(gemm)
    return {"steps": log["steps"],
            "epochs": [{k: row[k] for k in METRICS[name]} for row in log["epochs"]]}


def main() -> int:
    result = {name: run_recipe(name) for name in RUNS}
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {REFERENCE}: " + ", ".join(f"{k} {len(v['steps'])} steps" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
