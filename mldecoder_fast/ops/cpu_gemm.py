"""The matrix products of the head, and which library runs them on the CPU.

A *GEMM provider* computes ``linear(x, w, b, relu=False)`` (x W^T + b over the last axis of x, then
relu when asked; a NaN stays NaN, as in the reference, unless ``nan_carried`` says the caller's NaN
rows reach its output another way), ``mm(a, b)`` and ``addmm(c, a, b)`` (c + a b); operands may be
transposed views (batched products, such as the group FC's, are ``torch.bmm`` everywhere). The eval
forward and the fused training step (``ops/step/function.py``) run every dense product through one;
providers differ only in the library:

- ``TorchGemm``: torch.addmm / mm. MKL on the CPU (cuBLAS on CUDA), every dtype, autograd
  and tracing. The fallback everywhere. Its relu linear on a 2-d x is ``torch._addmm_activation``
  (on CUDA bias and relu in cuBLASLt's epilogue: one kernel; on the CPU addmm, then relu).
- ``OneDnnGemm``: oneDNN through PyTorch's ``mkldnn::_linear_pointwise`` op on dense tensors, or on
  weights packed once into oneDNN's blocked layout (``pack``, cached by the head). fp32 and bf16 on
  the CPU; about 2x torch.mm's fp32 rate on an AMD EPYC, level on an Intel Xeon. Batched products (the group FC)
  stay with torch.bmm: one oneDNN call per group measured several times slower than one bmm.
  ReLU runs after the product, not as oneDNN's post-op, which maps NaN to 0, except where the
  caller passes ``nan_carried=True``: the eval forward's feed-forward, whose input row T2 is all NaN
  wherever relu(T2 W1ᵀ + b1) has a NaN and is added back after it (T2 + W2 f + b2), and which
  makes b2 NaN where W1 or b1 holds a non-finite value, so the logits' NaN are the reference's
  either way (a separate relu pass cost the bf16 eval rows at B = 16 7-8%).
- ``AutoGemm``: per product shape, times both once per process (outside tracing) and keeps oneDNN
  where it is more than 10% faster, MKL otherwise.

``provider(dtype, device)`` picks one. ``MLDECODER_FAST_CPU_GEMM`` = ``auto`` (default),
``onednn`` or ``mkl`` forces the choice, as does ``set_cpu_gemm``. oneDNN is used only where it
computes exactly what the fallback does: fp32 products with oneDNN's fp32 math mode at its IEEE
default (``torch.backends.mkldnn.matmul.fp32_precision``), bf16 products where the CPU has
native bf16. If a oneDNN call fails at run time, the product is recomputed with torch, a warning is
issued once, and torch runs every product from then on.
"""
from __future__ import annotations

import functools
import os
import time
import warnings

import torch
import torch.nn.functional as F

ENV_VAR = "MLDECODER_FAST_CPU_GEMM"
MODES = ("auto", "onednn", "mkl")
SWITCH_MARGIN = 1.10   # a library replaces the default only when this much faster

_state = {"mode": None, "onednn_error": None}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mldecoder_fast: CPU GEMM choice must be one of {MODES}, got {mode!r} "
                         f"(from {ENV_VAR} or set_cpu_gemm)")
    return mode


def cpu_gemm_mode() -> str:
    """The configured choice: ``set_cpu_gemm``'s, else ``$MLDECODER_FAST_CPU_GEMM``, else auto."""
    if _state["mode"] is None:
        _state["mode"] = _check_mode(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")
    return _state["mode"]


def set_cpu_gemm(mode: str | None) -> str | None:
    """Force ``"onednn"``, ``"mkl"`` or ``"auto"`` (None: back to the environment variable).
    Returns the previous setting."""
    previous = _state["mode"]
    _state["mode"] = None if mode is None else _check_mode(mode)
    return previous


def onednn_fp32_precision() -> str:
    """oneDNN's fp32 math mode: ``torch.backends.mkldnn.matmul.fp32_precision`` (PyTorch >= 2.9);
    before that, the global ``torch.get_float32_matmul_precision()`` also set oneDNN's ("highest":
    IEEE fp32, "medium": bf16 inside fp32 products)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is not None and hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision
    precision = torch.get_float32_matmul_precision()
    return "ieee" if precision == "highest" else precision


@functools.cache
def _native_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 natively (asked once: an op call per forward otherwise)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_status(dtype: torch.dtype = torch.float32) -> tuple[bool, str]:
    """(usable, why not): whether oneDNN products can run for ``dtype`` here."""
    if _state["onednn_error"] is not None:
        return False, f"a oneDNN product failed in this process: {_state['onednn_error']}"
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch was built without oneDNN (mkldnn)"
    if dtype == torch.float32:
        precision = onednn_fp32_precision()
        if precision not in ("none", "ieee"):
            return False, f"oneDNN's fp32 math mode is {precision!r} (reduced precision), not IEEE"
        return True, "oneDNN fp32"
    if dtype == torch.bfloat16:
        if not _native_bf16():
            return False, "this CPU has no native bf16 for oneDNN"
        return True, "oneDNN bf16"
    return False, f"oneDNN does not compute {dtype}"


class TorchGemm:
    """Products through torch's own ops (MKL on the CPU, cuBLAS on CUDA); the ``mkl`` choice."""

    def linear(self, x, w, b=None, packed=None, relu=False, nan_carried=False):
        if not relu:
            return F.linear(x, w, b)
        if x.dim() == 2 and b is not None:
            return torch._addmm_activation(b, x, w.t())
        return F.linear(x, w, b).clamp_min_(0)

    def mm(self, a, b):
        return torch.mm(a, b)

    def addmm(self, c, a, b):
        return torch.addmm(c, a, b)

    def pack(self, w):
        return None


class OneDnnGemm(TorchGemm):
    """Products through oneDNN (``mkldnn::_linear_pointwise``); batched products through torch."""


    def linear(self, x, w, b=None, packed=None, relu=False, nan_carried=False):
        """x wᵀ + b, then relu in place: oneDNN's relu post-op maps NaN to 0 (so does its
        leaky_relu), which would hide a NaN input in the logits and stop a NaN gradient at the
        ReLU's backward; torch's relu keeps NaN, as the reference's does. With ``nan_carried``
        the post-op runs (see the module docstring)."""
        post_op = "relu" if relu and nan_carried else "none"
        if _state["onednn_error"] is None:
            try:
                y = torch.ops.mkldnn._linear_pointwise(x, w if packed is None else packed, b, post_op, [], "")
                return y.relu_() if relu and not nan_carried else y
            except RuntimeError as exc:
                onednn_failed(exc)
        return TORCH.linear(x, w, b, relu=relu)

    def mm(self, a, b):
        """a b, as ``linear(a, bᵀ)``, or as ``linear(bᵀ, a)ᵀ`` and one copy of the result when
        that copies under half as many elements: oneDNN copies a strided input (into fresh
        memory, page faults included) and reorders a strided weight itself (in its own scratch
        memory, about twice as fast). So a weight gradient gᵀ x whose g is much wider than x
        copies x and the result instead of g: ZSL B=16, W1's gradient 52 MB copied instead of
        121 (148 ms against 219, MKL 224); at equal widths the extra result copy is not won back
        (COCO, 21K: within 1%)."""
        m, k = a.shape
        n = b.shape[1]
        direct = 0 if a.is_contiguous() else m * k
        swapped = (0 if b.t().is_contiguous() else n * k) + m * n
        if 2 * swapped < direct:
            return self.linear(b.t(), a).t().contiguous()
        return self.linear(a, b.t())

    def addmm(self, c, a, b):
        return self.mm(a, b).add_(c)

    def pack(self, w):
        """w in oneDNN's blocked layout (an opaque tensor that only ``linear`` reads)."""
        if _state["onednn_error"] is None:
            try:
                return torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
            except RuntimeError as exc:
                onednn_failed(exc)
        return None


def onednn_failed(exc: Exception) -> None:
    """Turn oneDNN off for the rest of the process after ``exc``, with a warning."""
    _state["onednn_error"] = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"mldecoder_fast: a oneDNN matrix product failed ({_state['onednn_error']}); "
                  f"recomputed with torch.mm, which runs every CPU product from now on.",
                  RuntimeWarning, stacklevel=3)


def time_candidates(calls: dict, rounds: int = 3) -> dict:
    """Seconds per call of each candidate: the best of ``rounds`` interleaved runs after a warm-up."""
    best = {}
    for name, call in calls.items():
        call()
        best[name] = float("inf")
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def choose(seconds: dict) -> str:
    """``"onednn"`` when it took less than the MKL time / SWITCH_MARGIN, else ``"mkl"``."""
    return "onednn" if seconds["onednn"] * SWITCH_MARGIN < seconds["mkl"] else "mkl"


class AutoGemm(TorchGemm):
    """Per product shape, the faster of MKL and oneDNN, timed once per process on the first call.

    ``timer`` (default ``time_candidates``) maps ``{name: call}`` to ``{name: seconds}``."""


    def __init__(self, timer=time_candidates):
        self.timer = timer
        self.decisions: dict = {}

    def _run(self, key, run):
        choice = self.decisions.get(key)
        if choice is None:
            seconds = self.timer({name: (lambda p=p: run(p)) for name, p in _BY_NAME.items()})
            choice = self.decisions[key] = choose(seconds)
        return run(_BY_NAME[choice])

    def linear(self, x, w, b=None, packed=None, relu=False, nan_carried=False):
        key = ("linear", x.dtype, tuple(x.shape), tuple(x.stride()), tuple(w.shape), tuple(w.stride()),
               b is not None, packed is not None, relu, nan_carried)
        return self._run(key, lambda p: p.linear(x, w, b, packed, relu, nan_carried))

    def mm(self, a, b):
        key = ("mm", a.dtype, tuple(a.shape), tuple(a.stride()), tuple(b.shape), tuple(b.stride()))
        return self._run(key, lambda p: p.mm(a, b))

    def addmm(self, c, a, b):
        return self.mm(a, b).add_(c)

    def pack(self, w):
        return ONEDNN.pack(w)


TORCH = TorchGemm()
ONEDNN = OneDnnGemm()
AUTO = AutoGemm()
_BY_NAME = {"mkl": TORCH, "onednn": ONEDNN}


def provider(dtype: torch.dtype, device: torch.device):
    """The provider for products in ``dtype`` on ``device``: torch's ops off the CPU, while
    torch.compile traces (the compiler picks its own kernels), and where oneDNN cannot compute
    ``dtype`` exactly; otherwise the configured choice."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return TORCH
    mode = cpu_gemm_mode()
    if mode == "mkl" or not onednn_status(dtype)[0]:
        return TORCH
    return ONEDNN if mode == "onednn" else AUTO


def runs_onednn(dtype: torch.dtype) -> bool:
    """Whether the configured choice lets oneDNN run CPU products in ``dtype`` (not forced to
    MKL, and oneDNN computes ``dtype`` exactly here)."""
    return cpu_gemm_mode() != "mkl" and onednn_status(dtype)[0]


def describe() -> str:
    """What runs the CPU head's products, for ``mldecoder_fast.backends()``."""
    mode = cpu_gemm_mode()
    fp32_ok, fp32_detail = onednn_status(torch.float32)
    bf16_ok, bf16_detail = onednn_status(torch.bfloat16)
    if mode == "mkl":
        return f"CPU GEMMs: torch.mm (MKL), forced by {ENV_VAR}/set_cpu_gemm"
    parts = [f"fp32 {'oneDNN' if fp32_ok else 'torch.mm (MKL): ' + fp32_detail}",
             f"bf16 {'oneDNN' if bf16_ok else 'torch.mm: ' + bf16_detail}"]
    how = ("per shape, whichever measured faster (MKL unless oneDNN is >10% faster)" if mode == "auto"
           else f"forced by {ENV_VAR}/set_cpu_gemm")
    return f"CPU GEMMs: {', '.join(parts)}; {how}"
