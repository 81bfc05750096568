"""One comparison helper for every test: relative RMS error with a message that says what differed."""
from __future__ import annotations

import importlib.util
import os
import pathlib

import torch
from rounding import check_tolerance

from mldecoder_fast.numerics import rel_rms

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
# MLDECODER_FAST_NO_EXT=1 (any value but "" and "0") says the install is pure Python on purpose:
# the compiled extension's tests skip; otherwise a missing extension fails them.
NO_EXT = os.environ.get("MLDECODER_FAST_NO_EXT", "") not in ("", "0")
CPU_BACKENDS = ["torch"] + ([] if NO_EXT else ["cpp"])


def load_bench_script(name: str):
    """The module of the script ``bench/<name>.py`` (the GPU check's helpers are scripts, not
    package modules)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float,
                 atol: float = 0.0) -> None:
    """Fail unless ``out`` matches ``ref`` in shape and to a relative RMS error <= ratio
    (or every element within ``atol``), with no NaN where ``ref`` has none. A float32 comparison
    with ``ratio`` under 1e-5 needs the test's ``rounding`` mark (tests/rounding.py)."""
    check_tolerance(ratio, ref, out)
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    ref, out = ref.detach(), out.detach()
    nan_ref, nan_out = torch.isnan(ref), torch.isnan(out)
    assert torch.equal(nan_ref, nan_out), f"{name}: NaN pattern differs ({int(nan_out.sum())} vs {int(nan_ref.sum())})"
    ref = torch.where(nan_ref, torch.zeros_like(ref), ref)
    out = torch.where(nan_out, torch.zeros_like(out), out)
    err = rel_rms(ref, out)
    maxabs = float((ref.double() - out.double()).abs().max())
    if atol and maxabs <= atol:
        return
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e} (max abs diff {maxabs:.3e})"
