"""bench/same_numbers.py (the proof that a move changed no number) compares bit for bit: a sign of
zero, a NaN payload, a dtype or an op sequence that differs is reported."""
from __future__ import annotations

import torch
from helpers import load_bench_script

same_numbers = load_bench_script("same_numbers")


def test_records_compare_bit_for_bit(tmp_path, capsys):
    base = {"source": "a", "t": torch.tensor([0.0, 1.5, float("nan")]), "ops": [("aten.mm.default", ((2, 2),))]}
    torch.save(base, tmp_path / "a.pt")
    torch.save({**base, "source": "b"}, tmp_path / "b.pt")
    assert same_numbers.compare(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")) == 0
    assert "bit-identical" in capsys.readouterr().out
    for changed in (torch.tensor([-0.0, 1.5, float("nan")]), torch.tensor([0.0, 1.5, float("nan")]).double(),
                    torch.tensor([0.0, 1.5000001, float("nan")])):
        torch.save({**base, "source": "b", "t": changed}, tmp_path / "b.pt")
        assert same_numbers.compare(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")) == 1
        assert "differs: t" in capsys.readouterr().out
    torch.save({**base, "source": "b", "ops": [("aten.addmm.default", ((2, 2),))], "extra": 1}, tmp_path / "b.pt")
    assert same_numbers.compare(str(tmp_path / "a.pt"), str(tmp_path / "b.pt")) == 1
    out = capsys.readouterr().out
    assert "differs: ops" in out and "only in B: extra" in out
