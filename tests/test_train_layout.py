"""The training package stays split by job: no module of mldecoder_fast/train/ over 400 lines."""
from __future__ import annotations

import pathlib

import mldecoder_fast

TRAIN = pathlib.Path(mldecoder_fast.__file__).parent / "train"
MAX_LINES = 400


def test_no_training_module_over_400_lines():
    sizes = {str(p.relative_to(TRAIN)): len(p.read_text().splitlines()) for p in TRAIN.rglob("*.py")}
    assert sizes, TRAIN
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these by job (at most {MAX_LINES} lines each): {too_long}"
