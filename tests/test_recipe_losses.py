"""Every recipe computes what it computed when tests/data/recipe_losses.json was recorded: the
per-step losses and learning rates and the per-epoch validation metrics of a short CPU run of each,
in float32 and in float64 (``python tests/recipe_runs.py record`` records them; see that file).

The tolerances hold on any x86-64 CPU. Another CPU sums the same products in another order (MKL
and oneDNN pick kernels by instruction set), and six training steps carry that into the losses.
``python tests/recipe_runs.py spread`` measures it on one machine under other instruction sets and
GEMM libraries; on an Intel Xeon (AVX-512, AMX) against the float32 record of an AMD EPYC, the
largest relative difference of any step's loss was 4.9e-6 in float32 (zsl; 2.8e-7 and 1.0e-7
for the other recipes) and 5.5e-16 in float64. The bounds are 10x the float32 spread and ~2000x
the float64 one: the float64 run stays a sharp regression guard (a change to what a step computes
moves its losses by far more than 1e-12), the float32 run checks what users run.

Validation metrics rank scores: a near-tie flips with the last bit of a float32 kernel and moves a
mAP by ~1% (it once did, 21.11 -> 21.32), so they are compared on the float64 run, whose scores
would need to tie within ~1e-16 to flip; the float32 run's metrics are checked for presence and
range only.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("timm")
pytest.importorskip("sklearn")

from recipe_runs import METRICS, REFERENCE, run_recipe  # noqa: E402
from rounding import read_recorded  # noqa: E402

LOSS_RTOL = {"float32": 5e-5, "float64": 1e-12}   # the measured spread times the margin above
LR_RTOL = 1e-12          # the schedule is a few float64 operations per step, the same on every CPU
METRIC_RTOL = 1e-9       # float64 run only


@pytest.mark.rounding
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("recipe", list(METRICS))
def test_recipe_computes_the_recorded_numbers(recipe, dtype):
    expected = read_recorded(REFERENCE)[dtype][recipe]
    got = run_recipe(recipe, dtype)
    assert [s[0] for s in got["steps"]] == [s[0] for s in expected["steps"]]
    np.testing.assert_allclose([s[1] for s in got["steps"]], [s[1] for s in expected["steps"]],
                               rtol=LOSS_RTOL[dtype], err_msg=f"{recipe} {dtype}: per-step loss")
    np.testing.assert_allclose([s[2] for s in got["steps"]], [s[2] for s in expected["steps"]],
                               rtol=LR_RTOL, err_msg=f"{recipe} {dtype}: per-step learning rate")
    assert len(got["epochs"]) == len(expected["epochs"])
    for i, (g, e) in enumerate(zip(got["epochs"], expected["epochs"], strict=True)):
        assert list(g) == list(e)
        if dtype == "float64":
            np.testing.assert_allclose(list(g.values()), list(e.values()), rtol=METRIC_RTOL,
                                       err_msg=f"{recipe}: validation metrics of epoch {i + 1}")
        else:
            for name, value in g.items():
                ok = value > 0 if name == "val_loss" else 0 <= value <= 100
                assert math.isfinite(value) and ok, f"{recipe} epoch {i + 1}: {name} = {value}"
