"""The JSON record of a benchmark run: ``meta`` (device, versions, commit, date, dtype, batches, the
measured GEMM rates and copy bandwidth, the command), ``results`` (one row per configuration,
mode, batch and implementation: times, memory, the GEMM rates of its rounds, and per compared
tensor the error vs the float64 reference and the bound allowed), ``skipped`` (implementations
not run, and why) and optionally ``scaling``. Tables and BENCHMARKS.md are generated from it,
never typed."""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .runner import Result

# The instruction sets the CPU claims depend on (the names of /proc/cpuinfo's flags).
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_info() -> dict:
    """The host CPU: its model, which of ``CPU_ISA_FLAGS`` it has, and the instruction set ATen
    dispatches to (``torch.backends.cpu.get_cpu_capability``)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in (platform.processor(), platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in CPU_ISA_FLAGS if f in flags],
            "aten_capability": torch.backends.cpu.get_cpu_capability()}


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_info()['model']} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def module_version(name: str) -> str | None:
    """``name.__version__`` when the module imports, else None."""
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def triton_version() -> str | None:
    return module_version("triton")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def collect_meta(device, dtype: torch.dtype, batches, mm_rates: dict | None, bandwidth: float | None,
                 **extra) -> dict:
    """``mm_rates``: FLOP/s of each GEMM probe (``timing.matmul_rates``); the fastest is recorded
    as ``matmul_tflops``."""
    device = torch.device(device)
    mm_rate = max(mm_rates.values()) if mm_rates else None
    meta = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "onnx": module_version("onnx"),
        "onnxruntime": module_version("onnxruntime"),
        "openvino": module_version("openvino"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": str(dtype).replace("torch.", ""),
        "batches": list(batches),
        "matmul_tflops": None if mm_rate is None else mm_rate / 1e12,
        "matmul_gflops": {k: v / 1e9 for k, v in (mm_rates or {}).items()},
        "copy_gbps": None if bandwidth is None else bandwidth / 1e9,
        "load_average": load_average(),
        "command": ("mldecoder-fast " + " ".join(sys.argv[1:])) if sys.argv[1:2] == ["bench"] else None,
    }
    try:
        from .. import backends
        meta["backends"] = {k: {"available": v["available"], "devices": v["devices"], "detail": v["detail"]}
                            for k, v in backends().items()}
    except Exception as exc:  # the fast head is optional here
        meta["backends"] = {"error": repr(exc)}
    from .contenders import auto_backend
    meta["auto_backend"] = auto_backend(device)
    meta.update(extra)
    return meta


def write_json(path, meta: dict, results: list[Result], skipped: dict | None = None,
               scaling: list | None = None) -> dict:
    data = {"meta": meta, "results": [r.as_dict() if isinstance(r, Result) else r for r in results],
            "skipped": skipped or {}}
    if scaling is not None:
        data["scaling"] = [r.as_dict() if isinstance(r, Result) else r for r in scaling]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return data


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())
