"""bench/e2e_train.py (the end-to-end training step, ResNet-50 + 21,843-class head on a GPU) in its
CPU smoke size: a tiny timm ResNet, the three heads, the table and the JSON."""
from __future__ import annotations

import json

import pytest
from helpers import load_bench_script

pytest.importorskip("timm")

SMOKE = ["--model", "test_resnet", "--batch", "2", "--steps", "2", "--warmup", "1", "--image-size", "64",
         "--classes", "50", "--decoder-embedding", "64", "--groups", "10", "--device", "cpu"]


@pytest.fixture(scope="module")
def e2e():
    return load_bench_script("e2e_train")


def test_smoke_run_writes_table_and_json(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e.main(SMOKE + ["--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["head"]: r for r in data["rows"]}
    assert list(rows) == ["plain", "reference", "fast"]
    meta = data["meta"]
    assert (meta["model"], meta["classes"], meta["batch"], meta["dtype"]) == ("test_resnet", 50, 2, "bf16")
    for r in rows.values():
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
        assert r["peak_step_bytes"] > 0 and r["last_loss"] > 0
        assert r["vs_plain"] == pytest.approx(r["median_ms"] / rows["plain"]["median_ms"])
    # Both ML-Decoder heads are the same head (same parameters), larger than the linear classifier.
    assert rows["reference"]["params"] == rows["fast"]["params"] > rows["plain"]["params"]
    assert rows["fast"]["backend"] in {"torch", "cpp"}
    table = capsys.readouterr().out
    assert "images/s" in table and "vs plain" in table and f"fast ({rows['fast']['backend']})" in table


def test_rejects_unknown_heads(e2e):
    with pytest.raises(SystemExit) as exc:
        e2e.parse_args(["--heads", "plain,linear"])
    assert exc.value.code == 2
