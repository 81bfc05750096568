import os
import sys
from pathlib import Path

import pytest
import torch

# The shared helpers (helpers.py, heads.py, triton_helpers.py) are imported as top-level modules
# from every test directory (tests/, tests/ops/, tests/kernels/), under any --import-mode.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Triton kernels run in its CPU interpreter when there is no GPU. The variable must be set before
# any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rounding  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def op_by_op_eval(monkeypatch):
    """CPU eval without autograd runs op by op (with the GEMM provider's products, as the cpp
    backend and the fallback from the CPU eval path do), not paths/cpu_eval.py."""
    from mldecoder_fast.paths import CPU_EVAL, route
    monkeypatch.setattr(route, "PATHS", tuple(p for p in route.PATHS if p is not CPU_EVAL))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tests whose assertions hold only to within this machine's rounding carry the ``rounding`` mark
# (tests/rounding.py); every test runs under its checks.
_rounding_guard = pytest.fixture(autouse=True)(rounding.guard)
pytest_plugins = ["pytester"]   # tests/test_rounding_mark.py runs small suites of its own


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running (still run in CI unless deselected)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (bench/gpu_check.sh: test_triton stage)")
    config.addinivalue_line("markers", f"{rounding.MARK}: asserts numbers recorded on a machine, or float32 results "
                            "to under 1e-5 relative (tests/rounding.py); CI reruns these under other instruction sets")
