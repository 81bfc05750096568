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

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running (still run in CI unless deselected)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (bench/gpu_check.sh: test_triton stage)")
