"""The ``rounding`` mark is enforced (tests/rounding.py): a test without it fails when it compares
float32 values with a relative tolerance under 1e-5 (through helpers.assert_close, torch.allclose,
torch.testing.assert_close or np.testing.assert_allclose) or reads recorded numbers; with it, or
with a looser or a float64 comparison, it passes. And every file of recorded numbers is read
through the check."""
from __future__ import annotations

import pathlib
import re

import rounding

TESTS = pathlib.Path(__file__).resolve().parent

INNER = '''
import json
import numpy as np
import pytest
import torch
from helpers import assert_close
from rounding import read_recorded

a = torch.ones(4)
b = a.clone()   # equal: only the rounding check can fail a test

def test_helper_tight_fp32():
    assert_close("x", a, b, 1e-6)

def test_allclose_tight_fp32():
    assert torch.allclose(a, b, rtol=1e-6)

def test_testing_default_fp32():
    torch.testing.assert_close(a, b)

def test_numpy_default_fp32():
    np.testing.assert_allclose(a.numpy(), b.numpy())

def test_recorded(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([1.0]))
    assert read_recorded(str(path)) == [1.0]

@pytest.mark.rounding
def test_marked_tight_fp32():
    assert_close("x", a, b, 1e-6)
    assert torch.allclose(a, b, rtol=1e-6)

def test_loose_fp32_and_tight_fp64():
    assert_close("x", a, b, 1e-5)
    assert torch.allclose(a.double(), b.double(), rtol=1e-6)
    torch.testing.assert_close(a.double(), b.double())
'''


def test_unmarked_tight_or_recorded_assertions_fail(pytester):
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                          "import pytest, rounding\n"
                          "_guard = pytest.fixture(autouse=True)(rounding.guard)\n"
                          f"def pytest_configure(config):\n"
                          f"    config.addinivalue_line('markers', '{rounding.MARK}: test')\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=5)
    result.stdout.fnmatch_lines(["*test_helper_tight_fp32 compares float32 values with a relative tolerance of 1e-06*",
                                 "*test_recorded reads numbers recorded on a machine (r.json)*"])


def test_recorded_files_are_read_through_the_check():
    """A test module that names a file of tests/data, or imports the path of one (recipe_runs'
    ``REFERENCE``), reads it with ``read_recorded`` and never by itself."""
    names = [p.name for p in (TESTS / "data").iterdir()]
    readers = 0
    for p in TESTS.rglob("test_*.py"):
        text = p.read_text()
        if any(n in text for n in names) or re.search(r"from recipe_runs import[^\n]*\bREFERENCE\b", text):
            readers += 1
            assert "read_recorded(" in text and "json.load" not in text and "open(" not in text, (
                f"{p.name} reads recorded numbers without the rounding check")
    assert readers > 0
