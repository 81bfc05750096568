"""What the benchmark runs side by side: the reference, the eager-expert, torch.compile of both, each
available MLDecoderFast backend, on CUDA their CUDA-graphed forms and torch.compile's GPU peers, and
ONNX Runtime on the exported head (``implementations``); each an ``Impl``: a name and how to build it."""
from __future__ import annotations

import fnmatch
import importlib.util
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..head.reference import MLDecoder
from ..serving.cuda_graphs import cuda_graphed
from .cases import MODES, Case, dropout_sites
from .configs import BenchConfig
from .expert import ExpertMLDecoder

REFERENCE = "reference"


EXPERT = "eager-expert"


ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"


GRAPHED = "graphed-"
# torch.compile modes of the GPU peers (compiled-expert-<mode>, compiled-fast-<backend>-<mode>):
# the eager rows' peer, and the graphed rows' peer (CUDA graphs through torch.compile).


# torch.compile modes of the GPU peers (compiled-expert-<mode>, compiled-fast-<backend>-<mode>):
# the eager rows' peer, and the graphed rows' peer (CUDA graphs through torch.compile).
MAX_AUTOTUNE = "max-autotune-no-cudagraphs"


REDUCE_OVERHEAD = "reduce-overhead"

# Relative RMS error vs the float64 reference that every implementation may have whatever the
# reference's own error, per run dtype: (outputs, gradients). fp32/fp64 rows: the reference's own
# error is far below, so these are the bounds. Low precision: about what rounding the inputs of
# the GEMMs to that dtype costs; the bound is usually 2x the reference's own error, above it.


@dataclass
class Impl:
    """One implementation to benchmark: a name and how to build the (untrained) head."""
    name: str
    build: Callable[[BenchConfig], nn.Module]
    compiled: bool = False
    backend: str | None = None  # MLDecoderFast backend, None for the baselines
    modes: tuple[str, ...] = MODES  # a case of another mode gets no row of this implementation
    memory: bool = True  # False: allocates outside PyTorch's allocator (no peak memory reported)
    # Called with the head once it holds the case's weights: what to time instead (e.g. an export).
    wrap: Callable[[nn.Module, Case], nn.Module] | None = None
    # A runtime with threads of its own (ONNX Runtime, OpenVINO): timed in blocks of calls with the
    # machine settled before and after (``timing.time_interleaved``), so that neither its threads
    # nor OpenMP's spinning ones take the cores from whatever runs next.
    isolated: bool = False

    def make(self, cfg: BenchConfig) -> nn.Module:
        return self.build(cfg)

    @property
    def must_keep_nan(self) -> bool:
        """Whether its logits from a NaN input must be non-finite exactly where the reference's are
        (``agreement.check_agreement``): MLDecoderFast rows, eager or graphed. A peer's (torch.compile,
        ONNX Runtime, OpenVINO) difference is reported in its row, not judged."""
        return self.backend is not None and not self.compiled


def _fast_class():
    try:
        from ..head.fast import MLDecoderFast
        return MLDecoderFast, ""
    except Exception as exc:  # the fast head is optional for the baselines
        return None, f"MLDecoderFast unavailable: {exc!r}"


def auto_backend(device) -> str | None:
    """The backend MLDecoderFast(backend="auto") runs on ``device`` (public API only: a tiny head
    runs one forward and reports ``active_backend``); None without the fast head."""
    fast, _ = _fast_class()
    if fast is None:
        return None
    import warnings
    try:
        # Small, but with every dimension >= 16 (GPU kernels tile by 16).
        head = fast(32, num_of_groups=16, decoder_embedding=64, initial_num_features=64).to(device).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head(torch.rand(2, 16, 64, device=device))
        return getattr(head, "active_backend", None)
    except Exception:
        return None


def _compiled(build, mode: str | None = None):
    """``torch.compile`` of what ``build`` makes. With a ``mode`` also ``dynamic=False``: one
    static graph per batch size, as a fixed serving or training shape gets (automatic dynamic
    shapes would switch to symbolic kernels at the second batch size of a run)."""
    def make(cfg):
        if mode is None:
            return torch.compile(build(cfg))
        model = torch.compile(build(cfg), mode=mode, dynamic=False)
        if mode == REDUCE_OVERHEAD:
            model.register_forward_pre_hook(_new_cudagraph_step)
        return model
    return make


def _new_cudagraph_step(module, args) -> None:
    """Each call of a reduce-overhead module starts a new step of torch.compile's CUDA graph
    trees, as a training loop or server marks them: the outputs of the previous call may then be
    overwritten (the benchmark's steps keep none)."""
    torch.compiler.cudagraph_mark_step_begin()


def _autocast_dtype(dtype: torch.dtype) -> torch.dtype | None:
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def graphed_head(head: nn.Module, case: Case):
    """``head`` replayed from CUDA graphs, the way a user would graph it (an ``Impl.wrap``).

    Eval: ``cuda_graphed`` with the case's batch as its one captured size; each call copies a
    fresh input into the graph's input buffer and returns a copy of the output
    (``copy_output=True``), which survives the next call. Training: ``GraphedTraining``."""
    if case.mode == "train":
        return GraphedTraining(head, case.inputs[0], _autocast_dtype(case.dtype))
    x = case.inputs[0]
    return cuda_graphed(head, batch_sizes=(case.batch,), sample_shape=tuple(x.shape[1:]), dtype=x.dtype,
                        autocast_dtype=_autocast_dtype(case.dtype))


class _Forward(nn.Module):
    """One more module around ``head`` (sharing its parameters) for make_graphed_callables,
    which replaces the forward of the module it graphs."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x)


class GraphedTraining(nn.Module):
    """A head's training forward and backward replayed from CUDA graphs captured by
    ``torch.cuda.make_graphed_callables``; the optimizer step stays eager and updates the
    parameters in place, where the graphs read them.

    A graph keeps the dropout rates it was captured with, so there is one per set of rates met:
    the timed steps' and the agreement check's (every dropout at p = 0). ``module`` is the head.
    Each is captured at its first call, under autocast without its weight-cast cache (a cast
    cached during a capture would be freed behind the graph's back)."""

    def __init__(self, head: nn.Module, example: torch.Tensor, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.module = head
        self._sample = example.detach().clone().requires_grad_(True)  # the steps' inputs require grad
        self._autocast_dtype = autocast_dtype
        self._graphed: dict = {}

    def forward(self, x):
        rates = tuple(getattr(m, attr) for m, attr in dropout_sites(self.module))
        graphed = self._graphed.get(rates)
        if graphed is None:
            with torch.autocast(x.device.type, dtype=self._autocast_dtype or torch.float32,
                                enabled=self._autocast_dtype is not None, cache_enabled=False):
                graphed = self._graphed[rates] = torch.cuda.make_graphed_callables(
                    _Forward(self.module), (self._sample,))
        return graphed(x)


def reference_impl() -> Impl:
    return Impl(REFERENCE, lambda c: c.make_head(MLDecoder))


def _exported(head: nn.Module, case: Case, tmp: str) -> Path:
    """``head`` exported by ``export_onnx`` (dynamic batch, as users get it), from an fp32 example
    (the file holds the head's fp32 weights whatever the row's dtype)."""
    from ..serving.export import export_onnx
    # The benchmark's own agreement check judges the file; export_onnx's check would repeat it.
    return export_onnx(head, case.inputs[0].float(), Path(tmp) / "head.onnx", check=False).path


def _onnxruntime(head: nn.Module, case: Case) -> nn.Module:
    """The exported head run by ONNX Runtime with the benchmark's threads (``onnxruntime_session``)."""
    from ..serving.export import OnnxRuntimeModule
    with tempfile.TemporaryDirectory() as tmp:
        return OnnxRuntimeModule(_exported(head, case, tmp))


def _openvino(head: nn.Module, case: Case) -> nn.Module:
    """The exported head compiled by OpenVINO with the benchmark's threads, the latency hint and the
    row's precision (f32, or bf16 for bf16 rows)."""
    from ..serving.export import OpenVinoModule
    with tempfile.TemporaryDirectory() as tmp:
        module = OpenVinoModule(_exported(head, case, tmp), "bf16" if case.dtype == torch.bfloat16 else "f32")
    return _Fp32InputOnce(module) if case.dtype != torch.float32 else module


class _Fp32InputOnce(nn.Module):
    """A runtime whose exported model takes fp32 features, given a low-precision row's input as an
    fp32 tensor converted once per input tensor (its best case: fed a fresh fp32 copy every call,
    OpenVINO took 3.3 ms instead of 2.0 at batch 1, COCO head, bf16 hint, on an Intel Xeon, where the
    conversion itself takes 20 us)."""

    def __init__(self, runtime: nn.Module):
        super().__init__()
        self.runtime = runtime
        self._converted: tuple = (None, None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source, version, converted = self._converted
        if source is not x or version != x._version:
            converted = x.float()
            self._converted = (x, x._version, converted)
        return self.runtime(converted)


def _runtime_unavailable(runtime: str, device: torch.device, dtype: torch.dtype | None, fast) -> str | None:
    module, extra = {ONNXRUNTIME: ("onnxruntime", "onnx"), OPENVINO: ("openvino", "openvino")}[runtime]
    missing = [m for m in ("onnx", "onnxscript", module) if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'mldecoder-fast[{extra}]')"
    if fast is None:
        return "needs MLDecoderFast (the exported head)"
    if device.type != "cpu":
        return f"{runtime} on the CPU: CPU rows only"
    if runtime == OPENVINO:
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
            return "float32 and bfloat16 rows only (OpenVINO's f32 and bf16 precision hints)"
    elif dtype is not None and dtype != torch.float32:
        return "float32 only (the exported graph runs in its weights' dtype, without autocast)"
    return None


def implementations(device, include_compiled: bool = True, names: list[str] | None = None,
                    allow_interpreted_triton: bool = False,
                    dtype: torch.dtype | None = None) -> tuple[list[Impl], dict[str, str]]:
    """Implementations runnable on ``device`` (in ``dtype``, when given), and {name or pattern:
    reason} for those that are not.

    On CUDA also: ``graphed-<impl>`` of the eager-expert and of each fast backend (``graphed_head``:
    CUDA graphs without torch.compile); and, when asked for by name, torch.compile's GPU peers
    ``compiled-expert-max-autotune-no-cudagraphs``, ``compiled-expert-reduce-overhead`` and
    ``compiled-fast-<backend>-reduce-overhead`` (each compiles for up to minutes per case)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    expert = Impl(EXPERT, lambda c: c.make_head(ExpertMLDecoder))
    impls = [reference_impl(), expert]
    graphable = [expert]
    skipped: dict[str, str] = {}
    # Peers with a compile mode: GPU only, and only when named. Reduce-overhead rows run in CUDA
    # graph trees' private memory pool, allocated at capture: no per-step peak to report.
    peers = cuda and include_compiled and bool(names)
    if peers:
        impls += [Impl(f"compiled-expert-{mode}", _compiled(lambda c: c.make_head(ExpertMLDecoder), mode),
                       compiled=True, memory=mode != REDUCE_OVERHEAD) for mode in (MAX_AUTOTUNE, REDUCE_OVERHEAD)]
    else:
        why_not = ("only when named (--impls): each compiles for up to minutes per case" if cuda
                   else "GPU peers of the eager and graphed rows: CUDA only")
        skipped[f"compiled-*-{MAX_AUTOTUNE}"] = skipped[f"compiled-*-{REDUCE_OVERHEAD}"] = why_not
    if include_compiled:
        impls += [Impl("compiled-reference", _compiled(lambda c: c.make_head(MLDecoder)), compiled=True),
                  Impl("compiled-expert", _compiled(lambda c: c.make_head(ExpertMLDecoder)), compiled=True)]
    else:
        skipped["compiled-*"] = "torch.compile not requested"
    fast, why = _fast_class()
    if fast is None:
        skipped["fast-*"] = why
    else:
        from .. import backends
        for name, info in backends().items():
            label = f"fast-{name}"
            if not info["available"] or device.type not in info["devices"]:
                skipped[label] = info["detail"] if not info["available"] else f"not on {device.type}"
                if cuda:  # (elsewhere the patterns above cover its variants)
                    skipped[GRAPHED + label] = skipped[f"compiled-{label}-{REDUCE_OVERHEAD}"] = \
                        f"as {label}: {skipped[label]}"
                continue
            if name == "triton" and device.type == "cpu" and not allow_interpreted_triton:
                skipped[label] = "Triton on the CPU is its interpreter (correct, far too slow to time)"
                continue
            impls.append(Impl(label, (lambda c, n=name: c.make_head(fast, backend=n)), backend=name))
            graphable.append(impls[-1])
            if peers:
                impls.append(Impl(f"compiled-{label}-{REDUCE_OVERHEAD}",
                                  _compiled(lambda c, n=name: c.make_head(fast, backend=n), REDUCE_OVERHEAD),
                                  compiled=True, backend=name, memory=False))
    if cuda:
        # The reference stays eager: it is the oracle every "x ref" divides by. No peak memory:
        # a graph's memory is its private pool, allocated at capture, not during a step.
        impls += [Impl(GRAPHED + ("expert" if i.name == EXPERT else i.name), i.build, backend=i.backend,
                       memory=False, wrap=graphed_head) for i in graphable]
    else:
        skipped[GRAPHED + "*"] = "CUDA graphs need a CUDA device"
    for runtime, wrap in ((ONNXRUNTIME, _onnxruntime), (OPENVINO, _openvino)):
        why_not = _runtime_unavailable(runtime, device, dtype, fast)
        if why_not:
            skipped[runtime] = why_not
        else:
            impls.append(Impl(runtime, lambda c: c.make_head(fast), modes=("eval",), memory=False, wrap=wrap,
                              isolated=True))
    if names:
        wanted = set(names)
        wanted |= {REFERENCE}  # the reference is needed for the agreement check and speedups
        unknown = {n for n in wanted - {i.name for i in impls}
                   if not any(fnmatch.fnmatchcase(n, pattern) for pattern in skipped)}
        if unknown:
            raise ValueError(f"unknown implementation(s) {sorted(unknown)}; available: "
                             f"{[i.name for i in impls]}")
        impls = [i for i in impls if i.name in wanted]
    return impls, skipped
