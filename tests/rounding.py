"""The ``rounding`` mark: tests whose assertions hold only to within the machine's rounding.

Two kinds of assertion depend on how this CPU rounds (MKL, oneDNN and ATen pick kernels by
instruction set, so another CPU sums the same products in another order):

- comparing with numbers recorded on some machine (``read_recorded``: tests/data/);
- comparing float32 results with a relative tolerance under ``TIGHT_FP32`` (1e-5).

A test that makes either must carry ``@pytest.mark.rounding``, and fails otherwise: the check
runs inside ``helpers.assert_close``, ``read_recorded`` and, for assertions written in test files,
``torch.allclose``, ``torch.testing.assert_close`` and ``np.testing.assert_allclose`` (wrapped by
``guard_comparisons`` for the duration of each test). CI runs the marked tests again under other
instruction sets (``.ci/run``: AVX2, and AVX-512 without AMX), so an assertion that only this
machine's rounding satisfies is caught before a user on another CPU meets it.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

MARK = "rounding"
TIGHT_FP32 = 1e-5
_ROOTS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
               for d in ("tests", "bench"))
_running: dict = {"item": None}


def guard(request, monkeypatch):
    """The body of conftest's autouse fixture: makes the running test known to the checks and
    wraps the comparison functions for it."""
    _running["item"] = request.node
    guard_comparisons(monkeypatch)
    yield
    _running["item"] = None


def require_mark(what: str) -> None:
    """Fail the running test unless it carries the rounding mark."""
    item = _running["item"]
    if item is not None and item.get_closest_marker(MARK) is None:
        raise AssertionError(f"{item.nodeid} {what}, which holds only to within this machine's rounding: "
                             f"mark it @pytest.mark.{MARK} (tests/rounding.py says why)")


def check_tolerance(rtol: float, *values) -> None:
    """``rtol`` of a comparison of ``values``: below ``TIGHT_FP32`` with a float32 operand needs the mark."""
    if rtol < TIGHT_FP32 and any(_is_float32(v) for v in values):
        require_mark(f"compares float32 values with a relative tolerance of {rtol:g}")


def read_recorded(path: str):
    """The JSON file of recorded numbers at ``path`` (tests/data/), for a test with the mark."""
    require_mark(f"reads numbers recorded on a machine ({os.path.basename(path)})")
    with open(path) as f:
        return json.load(f)


def _is_float32(v) -> bool:
    dtype = getattr(v, "dtype", None)
    return dtype in (torch.float32, np.float32)


def _from_test_file() -> bool:
    """Whether the comparison was called from a test module or the tests' helpers (library code
    the test runs is not checked)."""
    caller = sys._getframe(2).f_code.co_filename
    return caller.startswith(_ROOTS) or os.path.basename(caller).startswith("test_")


def _wrap(fn, rtol_of):
    def guarded(actual, expected, *args, **kwargs):
        if _from_test_file():
            check_tolerance(rtol_of(actual, expected, args, kwargs), actual, expected)
        return fn(actual, expected, *args, **kwargs)
    guarded.__wrapped__ = fn
    return guarded


def _torch_allclose_rtol(actual, expected, args, kwargs):
    return kwargs.get("rtol", args[0] if args else 1e-5)


def _numpy_rtol(actual, expected, args, kwargs):
    return kwargs.get("rtol", args[0] if args else 1e-7)


def _testing_rtol(actual, expected, args, kwargs):
    rtol = kwargs.get("rtol")
    if rtol is not None:
        return rtol
    # torch.testing's defaults per dtype: 1.3e-6 for float32
    return 1.3e-6 if _is_float32(actual) or _is_float32(expected) else 1.0


def guard_comparisons(monkeypatch) -> None:
    """Wrap the comparison functions test files call, for one test (``monkeypatch`` undoes it)."""
    monkeypatch.setattr(torch, "allclose", _wrap(torch.allclose, _torch_allclose_rtol))
    monkeypatch.setattr(torch.testing, "assert_close", _wrap(torch.testing.assert_close, _testing_rtol))
    monkeypatch.setattr(np.testing, "assert_allclose", _wrap(np.testing.assert_allclose, _numpy_rtol))
