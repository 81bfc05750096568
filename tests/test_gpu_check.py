"""bench/gpu_check.sh without a GPU (GPU_CHECK_DEVICE=cpu, quick sizes): stage selection, a stage's
run and its table, and the time budget that skips a stage."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(out: Path, **env):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_DEVICE": "cpu",
           "GPU_CHECK_QUICK": "1", "GPU_CHECK_SKIP_BUILD": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_test_paths_it_names_exist():
    """The test stages name test files and directories (tests/README.md); a moved one must not leave
    a stage running nothing."""
    named = set(re.findall(r"\btests/[\w/.]*", SCRIPT.read_text()))
    assert {"tests/ops", "tests/kernels", "tests/test_triton_module.py", "tests/test_cuda_graphs.py"} <= named
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"bench/gpu_check.sh names missing test paths: {missing}"


def test_selected_stage_runs_alone_and_prints_its_table(tmp_path):
    pytest.importorskip("timm")
    done = _run(tmp_path, GPU_CHECK_STAGES="e2e")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ran = sorted(p.stem for p in tmp_path.glob("*.log") if p.stem != "gpu_check")
    assert ran == ["e2e"]
    assert (tmp_path / "e2e_train.json").exists()
    summary = (tmp_path / "targets.txt").read_text()
    assert "e2e training step: test_resnet" in summary and "images/s" in done.stdout


def test_stage_past_the_budget_is_skipped(tmp_path):
    done = _run(tmp_path, GPU_CHECK_STAGES="eval_latency-eager", GPU_CHECK_BUDGET_S="5")
    assert done.returncode == 1
    assert "SKIP  eval_latency-eager: only" in done.stdout
    assert not list(tmp_path.glob("eval_latency-*.json"))


def _plan(tmp_path, **env) -> list[tuple[str, int]]:
    done = _run(tmp_path, GPU_CHECK_DRY_RUN="1", **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return [(m[1], int(m[2])) for m in re.finditer(r"PLAN  (\S+) (\d+)", done.stdout)]


def test_default_run_is_the_check_list_within_400_seconds(tmp_path):
    """One command: build, then the correctness of what auto runs, the Triton tests and the target
    rows, in that order, with stage caps summing to at most 400 s (the run within ~7 minutes)."""
    plan = _plan(tmp_path)
    assert [name for name, _ in plan] == ["build", "correct_auto_paths", "triton_tests", "target_rows-eval_b1",
                                          "target_rows-b256"]
    assert sum(cap for _, cap in plan) <= 400
    assert not list(tmp_path.glob("*.json")), "a dry run measures nothing"


def test_second_list_holds_the_compile_peers(tmp_path):
    plan = dict(_plan(tmp_path, GPU_CHECK_STAGES="more"))
    assert {"eval_latency-vs_max_autotune", "eval_latency-vs_reduce_overhead", "train_step-compiled",
            "bench_bf16_compiled"} <= set(plan)
    assert not {"build", "correct_auto_paths", "triton_tests"} & set(plan)
