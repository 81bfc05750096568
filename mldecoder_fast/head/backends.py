"""Which implementations of the head's operations exist here, and which one a head runs.

``backends()`` reports every backend with whether it is usable and why not; ``select_ops``
resolves a head's ``backend`` argument for a device, warning once when a backend named by the
head cannot run there (it then runs the ``torch`` backend), so that nothing is silently other
than asked.
"""
from __future__ import annotations

import warnings

import torch

from ..ops import cpu_gemm, triton_support
from ..ops.torch_ops import TorchOps

BACKENDS = ("torch", "cpp", "cuda", "triton")
# What "auto" runs, per (device type, mode): the fastest measured (BENCHMARKS.md), torch everywhere
# today. Another backend replaces an entry only when it measured at least AUTO_MARGIN times faster
# than torch in every case of that device and mode of one run (``benchmark.goals.auto_choice``
# prints the verdict of a GPU check). CPU: the extension's group FC measured level with torch's bmm
# at batch 16 and slower at batch 1, so torch runs; backend="cpp" selects the extension. CUDA: the
# one GPU measurement (an H100, bf16 autocast, commit 1c31c6c, BENCHMARKS.md "GPU") predates the
# current CUDA paths of every backend (launch-lean eval, hand-written training step); then torch was
# the fastest or level in most rows (training steps at B = 256: 7.8 ms COCO, 6.4 ms 21K, against
# 10.5 / 9.5 ms for the Triton kernels and 8.0 ms for the extension's group FC; Triton won only eval
# at B = 256, by less than the margin at other batches). So auto runs torch until bench/gpu_check.sh
# measures the current paths; "triton"/"cuda" are opt-in. torch runs everywhere, so "auto" never
# falls back and never warns.
AUTO = {("cpu", "eval"): "torch", ("cpu", "train"): "torch",
        ("cuda", "eval"): "torch", ("cuda", "train"): "torch"}
AUTO_MARGIN = 1.10

_warned: set = set()
_ops_cache: dict = {}
_selected: dict = {}


def _extension_status():
    try:
        from ..ops import group_fc_extension as ext
    except Exception as exc:  # the module itself failing to import is a packaging bug; report it
        return False, False, f"mldecoder_fast.ops.group_fc_extension failed to import: {exc!r}"
    ok, detail = ext.extension_status()
    return ok, bool(ok and ext.cuda_kernels_available()), detail


def _triton_status():
    try:
        from ..ops import triton_ops  # noqa: F401  (what the backend runs: its import must work)
    except Exception as exc:
        return False, f"mldecoder_fast.ops.triton_ops failed to import: {exc!r}"
    return triton_support.triton_status()


def _cpu_eval() -> str:
    """Which dtypes the CPU eval path (paths/cpu_eval.py) runs here; the rest runs op by op."""
    dtypes = [name for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
              if cpu_gemm.runs_onednn(dtype)]
    if not dtypes:
        return "op by op (no dtype that oneDNN computes exactly under the CPU GEMM choice)"
    return f"few-ops oneDNN path in {' and '.join(dtypes)}, op by op otherwise"


def backends() -> dict:
    """Every backend: ``{"available": bool, "devices": [...], "detail": str}``."""
    cuda = torch.cuda.is_available()
    gemm = cpu_gemm.describe()
    out = {"torch": {"available": True, "devices": ["cpu"] + (["cuda"] if cuda else []),
                     "detail": f"PyTorch {torch.__version__}'s own ops (no compiled code of this package); {gemm}; "
                               f"group FC: torch.bmm; CPU eval without autograd: {_cpu_eval()}"}}
    ext_ok, ext_cuda, ext_detail = _extension_status()
    out["cpp"] = {"available": ext_ok, "devices": ["cpu"] if ext_ok else [],
                  "detail": f"{ext_detail}; {gemm}" if ext_ok else ext_detail}
    if not ext_ok:
        cuda_detail = ext_detail
    elif not ext_cuda:
        cuda_detail = "the extension was built without CUDA kernels"
    elif not cuda:
        cuda_detail = "no CUDA device visible to torch"
    else:
        cuda_detail = "CUDA kernels of the compiled extension"
    out["cuda"] = {"available": ext_cuda and cuda, "devices": ["cuda"] if ext_cuda and cuda else [],
                   "detail": cuda_detail}
    tr_ok, tr_detail = _triton_status()
    devices = []
    if tr_ok:
        devices = ["cuda"] if cuda else []
        if triton_support.interpreting():
            devices.append("cpu")
    out["triton"] = {"available": tr_ok and bool(devices), "devices": devices, "detail": tr_detail}
    return out


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)


def ops_for(name: str):
    """The ops object of backend ``name`` (made once)."""
    if name not in _ops_cache:
        if name == "torch":
            _ops_cache[name] = TorchOps()
        elif name in ("cpp", "cuda"):
            from ..ops.extension_ops import ExtensionOps
            ops = ExtensionOps()
            ops.name = name
            _ops_cache[name] = ops
        elif name == "triton":
            from ..ops.triton_ops import TritonOps
            _ops_cache[name] = TritonOps()
        else:
            raise ValueError(f"no backend named {name!r}: one of {BACKENDS}")
    return _ops_cache[name]


def check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def select_ops(backend: str, device: torch.device, training: bool = False):
    """Resolve ``backend`` for ``device`` and the mode (training or eval): returns (name, ops).
    Warns once per fallback."""
    name = _resolve(backend, device.type, "train" if training else "eval")
    return name, _ops_cache[name]


@torch.compiler.assume_constant_result
def _resolve(backend: str, device_type: str, mode: str) -> str:
    """The backend that runs ``backend`` on ``device_type`` in ``mode``, its ops object made.

    Resolution loads the compiled extension (behind a lock) and warns: work that torch.compile
    cannot trace. Marked as a constant result, it runs eagerly once when a traced forward meets it
    and the graph keeps only the name; the ops object is then read from ``_ops_cache``."""
    key = (backend, device_type, mode)
    if key not in _selected:
        _selected[key] = _select(backend, device_type, mode)[0]
    return _selected[key]


def _select(backend: str, dev: str, mode: str):
    if backend == "auto":
        name = AUTO.get((dev, mode), "torch")
        return name, ops_for(name)
    info = backends()
    if backend == "torch" or (info[backend]["available"] and dev in info[backend]["devices"]):
        return backend, ops_for(backend)
    _warn_once((backend, dev),
               f"mldecoder_fast: backend {backend!r} cannot run on {dev} ({info[backend]['detail']}); "
               f"falling back to the 'torch' backend. See mldecoder_fast.backends().")
    return "torch", ops_for("torch")
