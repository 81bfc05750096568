"""Short runs of the three training recipes, for the regression check of tests/test_recipe_losses.py.

Each run goes through the command line (``mldecoder-fast train multilabel|singlelabel|zsl``) on
data generated here, on the CPU with one thread, a fixed seed and the CPU GEMMs fixed to torch's
own (``set_cpu_gemm("mkl")``: the ``auto`` choice times each shape and could pick another library,
with other rounding, from one run to the next), and returns what its log.json recorded: every
step's loss and learning rate, and the validation metrics of every epoch. Each recipe runs in
float32 (as users train) and in float64 (the model built in float64; the same code path).

``python tests/recipe_runs.py record`` writes tests/data/recipe_losses.json (the reference the
test compares against; record it at a commit whose numbers are the ones to keep).
``python tests/recipe_runs.py spread`` runs every recipe again under other instruction sets and
GEMM libraries of this machine (``SETTINGS``, each in its own process: the libraries read them
when they load) and prints the largest relative difference of the per-step losses from the
record, per dtype: the spread that tests/test_recipe_losses.py's tolerances are derived from.
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


DTYPES = ("float32", "float64")

# Other instruction sets and GEMM libraries of this machine: the ways another x86-64 CPU computes
# the same products in another order (``spread``). The variables are read when ATen, MKL and
# oneDNN load, so each setting runs in a fresh process.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
AVX512_NO_AMX = {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                 "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
SETTINGS = {
    "native": {},
    "avx2": AVX2,
    "avx512-no-amx": AVX512_NO_AMX,
    "native, gemm auto": {"RECIPE_GEMM": "auto"},
    "avx2, gemm auto": {**AVX2, "RECIPE_GEMM": "auto"},
}


def run_recipe(name: str, dtype: str = "float32") -> dict:
    """{"steps": [[step, loss, lr], ...], "epochs": [{metric: value}, ...]} of one short run with
    the model in ``dtype``."""
    import torch

    from mldecoder_fast.cli import main
    from mldecoder_fast.ops.cpu_gemm import set_cpu_gemm
    threads = torch.get_num_threads()
    default_dtype = torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(getattr(torch, dtype))     # the model's parameters are made in it
    gemm = set_cpu_gemm(os.environ.get("RECIPE_GEMM", "mkl"))
    try:
        with tempfile.TemporaryDirectory() as root:
            out = os.path.join(root, "run")
            rc = main(RUNS[name](root) + ["--seed", "0", "--out", out])
            assert rc == 0, f"train {name}: exit code {rc}"
            with open(os.path.join(out, "log.json")) as f:
                log = json.load(f)
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(default_dtype)
        set_cpu_gemm(gemm)
    return {"steps": log["steps"],
            "epochs": [{k: row[k] for k in METRICS[name]} for row in log["epochs"]]}


def record() -> dict:
    return {dtype: {name: run_recipe(name, dtype) for name in RUNS} for dtype in DTYPES}


def max_relative_difference(got: dict, want: dict) -> float:
    """The largest relative difference of the per-step losses of two records of one run."""
    return max(abs(g[1] - w[1]) / abs(w[1]) for g, w in zip(got["steps"], want["steps"], strict=True))


def spread() -> int:
    import subprocess
    with open(REFERENCE) as f:
        recorded = json.load(f)
    for setting, env in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, "record", "-"], env={**os.environ, **env}, check=True,
                             capture_output=True, text=True).stdout
        got = json.loads(out.strip().splitlines()[-1])   # the last line (the runs print too)
        for dtype in DTYPES:
            worst = {name: max_relative_difference(got[dtype][name], recorded[dtype][name]) for name in RUNS}
            print(f"{setting:>22} {dtype}: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["spread"]:
        return spread()
    if argv[:1] != ["record"]:
        print(__doc__)
        return 2
    result = record()
    if argv[1:] == ["-"]:        # to stdout (for ``spread``)
        print(json.dumps(result))
        return 0
    os.makedirs(os.path.dirname(REFERENCE), exist_ok=True)
    with open(REFERENCE, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
