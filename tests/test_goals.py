"""mldecoder_fast/benchmark/goals.py's GPU targets: the GPU check's eval-latency and training-step
tables and target verdicts, on made-up records."""
from __future__ import annotations

import json
import re

import pytest

from mldecoder_fast.benchmark import goals


@pytest.fixture(scope="module")
def tables():
    return goals


def _row(config, mode, batch, impl, ms, **extra):
    return {"config": config, "mode": mode, "batch": batch, "impl": impl, "median_ms": ms, **extra}


def _write(out, name, rows):
    (out / f"{name}.json").write_text(json.dumps({"meta": {}, "results": rows}))


def _line(text, what):
    hits = [ln for ln in text.splitlines() if what in ln]
    assert len(hits) == 1, (what, hits)
    return hits[0]


def test_targets_and_same_run_ratios(tables, tmp_path, capsys):
    coco, k21 = "coco-tresnet_l-448", "imagenet21k-resnet50-224"
    _write(tmp_path, "eval_latency-eager", [
        _row(coco, "eval", 1, "reference", 1.0), _row(coco, "eval", 1, "fast-torch", 0.4, speedup_vs_reference=2.5),
        _row(coco, "eval", 1, "fast-triton", 0.6), _row(coco, "eval", 1, "graphed-fast-triton", 0.08,
                                                         speedup_vs_reference=12.5),
        _row(coco, "eval", 256, "fast-triton", 0.9, roofline=0.6), _row(k21, "eval", 256, "fast-torch", 0.8)])
    _write(tmp_path, "eval_latency-vs_max_autotune", [       # timed again in its own run
        _row(coco, "eval", 1, "fast-torch", 0.5), _row(coco, "eval", 1, "fast-triton", 0.55),
        _row(coco, "eval", 1, tables.EXPERT_MAX_AUTOTUNE, 0.5),
        _row(coco, "eval", 32, "fast-triton", 1.0), _row(coco, "eval", 32, tables.EXPERT_MAX_AUTOTUNE, 1.2)])
    _write(tmp_path, "train_step-eager", [
        _row(coco, "train", 256, "fast-torch", 10.0, peak_bytes=2**20), _row(coco, "train", 256, "fast-triton", 8.0),
        _row(coco, "train", 256, "graphed-fast-triton", 4.0)])
    assert tables.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"met  COCO eval B=1 graphed .* 0\.080 ms .*graphed-fast-triton; x ref 12\.5", text)
    assert _line(text, "B=1 eager fast-torch ").startswith("  met ")
    assert _line(text, "B=1 eager fast-triton").startswith("  MISS")
    assert re.search(r"met  COCO eval B=256 \(best eager backend\) .* 0\.900 ms .*floor 0\.540 ms", text)
    assert _line(text, "ImageNet-21K eval B=256").startswith("  MISS")
    # The pair is judged within one run: 0.5 / 0.5 there, not 0.5 / 0.4 across runs.
    assert re.search(r"MISS COCO eval B=1 eager vs .* 1\.00x  \(fast-torch, same run\)", text)
    assert re.search(r"met  COCO eval B=32 eager vs .* 1\.20x  \(fast-triton, same run\)", text)
    assert _line(text, "B=256 graphed vs").startswith("  n/a ")
    assert "graphed-fast-triton 2.00x faster" in _line(text, "coco B=256: graphed-expert")
    assert "train: coco B=256: triton (1.25x)" in text
    assert "eval: coco B=1: torch (1.50x)" in text
    # auto switches only at a margin over torch in every case of the mode
    assert "auto for train: triton (at least 1.25x torch in every case)" in text
    assert "auto for eval: torch (no backend 1.10x faster in every case)" in text


def test_nothing_measured_is_not_a_pass(tables, tmp_path, capsys):
    assert tables.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    targets = [ln for ln in text.splitlines() if "<=" in ln or ">=" in ln]
    assert targets and all(ln.lstrip().startswith("n/a") for ln in targets)
