"""The op map (``mldecoder_fast/ops/__init__.py``'s docstring) names only paths that exist, and
the README links to it."""
from __future__ import annotations

import pathlib
import re

import mldecoder_fast.ops as ops

ROOT = pathlib.Path(ops.__file__).resolve().parents[2]
PATH = re.compile(r"\b((?:mldecoder_fast|csrc|tests|bench|docs)/[\w/.-]+\.(?:py|cpp|cu|h|md|sh))\b")


def test_every_path_in_the_op_map_exists():
    named = PATH.findall(ops.__doc__)
    assert len(named) >= 20, "the op map should name each op's files"
    missing = sorted({p for p in named if not (ROOT / p).is_file()})
    assert not missing, f"the op map in mldecoder_fast/ops/__init__.py names missing files: {missing}"


def test_the_readme_links_the_op_map():
    assert "mldecoder_fast/ops/__init__.py" in (ROOT / "README.md").read_text()
