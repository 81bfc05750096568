"""setup.py builds the CUDA kernels only with a toolkit that can build for the installed torch (the
same major CUDA version: torch's build refuses another), and otherwise says why and builds the
CPU extension instead of failing the install."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_script():
    spec = importlib.util.spec_from_file_location("setup_script", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)      # defines the helpers; setup() runs only as __main__
    return module


def _toolkit(tmp_path, release: str) -> str:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(tmp_path)


def test_a_toolkit_of_another_major_version_builds_the_cpu_extension(setup_script, tmp_path):
    home = _toolkit(tmp_path, "12.4")
    assert setup_script.toolkit_cuda_version(home) == (12, 4)
    use, why = setup_script.cuda_build("13.0", home)
    assert not use
    assert "CUDA 12.4" in why and "CUDA 13.0" in why and "CUDA_HOME" in why
    assert setup_script.cuda_build("12.6", home) == (True, "")   # a minor difference builds


def test_no_cuda_torch_or_no_toolkit(setup_script, tmp_path):
    assert setup_script.cuda_build(None, _toolkit(tmp_path, "12.4")) == (False, "this torch is a CPU build")
    assert not setup_script.cuda_build("12.4", None)[0]
    use, why = setup_script.cuda_build("12.4", str(tmp_path / "missing"))
    assert not use and "no working nvcc" in why
