"""Run every implementation of the head on one configuration, side by side.

For one (configuration, mode, device, dtype, batch) all implementations get the same weights (one
seeded reference's state_dict), the same input and the same targets. Each implementation is first
checked (``check_agreement``): eval outputs; in training, with every dropout set to p = 0, the
logits, the input gradient and every parameter gradient; and the logits of an input with a NaN in one
sample (``nonfinite_logits``: an MLDecoderFast row must make non-finite exactly the reference's;
a peer's difference is reported). Each of these tensors is compared with the
reference run in float64 on the same weights and inputs (``set_expectations``); its relative RMS
error may be up to max(2x the reference's own error in the run's dtype, ``ERROR_FLOOR``). So a
bf16 implementation is held to what the reference achieves in bf16, tensor by tensor, and one
that is more accurate than the reference is never faulted for differing from it. Only then is it
timed (median after warm-up) and its peak memory measured (what one step allocates, plus what
the head holds between steps beyond its parameters: ``held_bytes``). A mismatch marks the row and, with
``strict=True``, raises ``AgreementError``: a fast wrong implementation never wins silently.

Modes: ``eval`` is a forward under ``torch.no_grad`` in eval mode; ``train`` is one training step:
forward, BCE-with-logits against fixed random targets, backward, an AdamW step, then zeroing the
gradients (the optimizer step is timed because it is part of every real step, and because a head
that keeps copies derived from its weights pays for refreshing them after it). The AdamW is
PyTorch's fused one, which updates in place without temporaries, and its state is allocated before
anything is measured: like the weights it is held between steps, so peak memory counts what one
step adds (activations, gradients), not the optimizer's own bookkeeping.
Low precision (float16 / bfloat16) means fp32 weights, input in that dtype, run under
``torch.autocast`` (mixed precision, as the head is trained); float32/float64 run plainly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import importlib.util
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..cuda_graphs import cuda_graphed
from ..numerics import rel_rms
from ..reference import MLDecoder
from .configs import BenchConfig
from .expert import ExpertMLDecoder
from .flops import step_bytes, step_flops
from .timing import matmul_probes, peak_memory_bytes, synchronize, time_interleaved

MODES = ("eval", "train")
_MATMUL = "__matmul__:"
REFERENCE = "reference"
EXPERT = "eager-expert"
ONNXRUNTIME = "onnxruntime"
GRAPHED = "graphed-"
# torch.compile modes of the GPU peers (compiled-expert-<mode>, compiled-fast-<backend>-<mode>):
# the eager rows' peer, and the graphed rows' peer (CUDA graphs through torch.compile).
MAX_AUTOTUNE = "max-autotune-no-cudagraphs"
REDUCE_OVERHEAD = "reduce-overhead"

# Relative RMS error vs the float64 reference that every implementation may have whatever the
# reference's own error, per run dtype: (outputs, gradients). fp32/fp64 rows: the reference's own
# error is far below, so these are the bounds. Low precision: about what rounding the inputs of
# the GEMMs to that dtype costs; the bound is usually 2x the reference's own error, above it.
ERROR_FLOOR = {
    torch.float64: (1e-9, 1e-8),
    torch.float32: (2e-4, 2e-3),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


class AgreementError(AssertionError):
    """An implementation's output or gradients differ from the reference's."""


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

    def make(self, cfg: BenchConfig) -> nn.Module:
        return self.build(cfg)


@dataclass
class Result:
    config: str
    mode: str
    impl: str
    device: str
    dtype: str
    batch: int
    classes: int | None = None   # output width in this mode
    median_ms: float | None = None
    min_ms: float | None = None
    times_ms: list = field(default_factory=list)
    peak_bytes: int | None = None
    flops: float = 0.0
    bytes: float = 0.0
    agree: bool | None = None
    error: float | None = None    # worst relative RMS error vs the float64 reference
    errors: dict = field(default_factory=dict)   # per tensor: relative RMS error vs float64
    allowed: dict = field(default_factory=dict)  # per tensor: the bound (see module docstring)
    detail: str = ""              # why skipped / what mismatched
    skipped: bool = False
    speedup_vs_reference: float | None = None
    speedup_vs_expert: float | None = None
    roofline: float | None = None
    matmul_rates: dict = field(default_factory=dict)  # FLOP/s of each GEMM probe timed in the same rounds
    matmul_flops_per_s: float | None = None  # the fastest of them: the roofline's rate

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# -- implementations -----------------------------------------------------------------------------

def _fast_class():
    try:
        from ..module import MLDecoderFast
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
        rates = tuple(getattr(m, attr) for m, attr in _dropout_sites(self.module))
        graphed = self._graphed.get(rates)
        if graphed is None:
            with torch.autocast(x.device.type, dtype=self._autocast_dtype or torch.float32,
                                enabled=self._autocast_dtype is not None, cache_enabled=False):
                graphed = self._graphed[rates] = torch.cuda.make_graphed_callables(
                    _Forward(self.module), (self._sample,))
        return graphed(x)


def reference_impl() -> Impl:
    return Impl(REFERENCE, lambda c: c.make_head(MLDecoder))


def _onnxruntime(head: nn.Module, case: Case) -> nn.Module:
    """``head`` exported by ``export_onnx`` (dynamic batch, as users get it) and run by ONNX Runtime
    with the benchmark's threads (``onnxruntime_session``)."""
    from ..export import OnnxRuntimeModule, export_onnx
    with tempfile.TemporaryDirectory() as tmp:
        # The benchmark's own agreement check judges the file; export_onnx's check would repeat it.
        path = export_onnx(head, case.inputs[0], Path(tmp) / "head.onnx", check=False).path
        return OnnxRuntimeModule(path)


def _onnxruntime_unavailable(device: torch.device, dtype: torch.dtype | None, fast) -> str | None:
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'mldecoder-fast[onnx]')"
    if fast is None:
        return "needs MLDecoderFast (the exported head)"
    if device.type != "cpu":
        return "ONNX Runtime's CPU execution provider: CPU rows only"
    if dtype is not None and dtype != torch.float32:
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
    why_not = _onnxruntime_unavailable(device, dtype, fast)
    if why_not:
        skipped[ONNXRUNTIME] = why_not
    else:
        impls.append(Impl(ONNXRUNTIME, lambda c: c.make_head(fast), modes=("eval",), memory=False,
                          wrap=_onnxruntime))
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


# -- one configuration --------------------------------------------------------------------------

def autocast_context(device: torch.device, dtype: torch.dtype):
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights stay fp32 under autocast; fp32/fp64 runs keep weights in the run's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dropout_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every dropout rate: nn.Dropout.p, nn.MultiheadAttention-style
    ``.dropout``."""
    return [(m, "p") if isinstance(m, nn.Dropout) else (m, "dropout") for m in model.modules()
            if isinstance(m, nn.Dropout) or isinstance(getattr(m, "dropout", None), float)]


@contextlib.contextmanager
def dropout_disabled(model: nn.Module):
    """Set p = 0 on every dropout site (``_dropout_sites``)."""
    saved = [(m, attr, getattr(m, attr)) for m, attr in _dropout_sites(model)]
    for m, attr, _ in saved:
        setattr(m, attr, 0.0)
    try:
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


@dataclass
class Case:
    """Everything shared by the implementations of one (config, mode, device, dtype, batch)."""
    cfg: BenchConfig
    mode: str
    device: torch.device
    dtype: torch.dtype
    batch: int
    state_dict: dict
    inputs: list            # one or more inputs (rotated on CUDA so L2 does not flatter)
    target: torch.Tensor | None
    word_vectors: torch.Tensor | None
    # Filled by set_expectations: per compared tensor (logits, grad:input, grad:<parameter>), the
    # float64 reference's value, the reference's own error in this case's dtype, and the bound.
    exact: dict | None = None
    reference_errors: dict | None = None
    allowed: dict | None = None
    # Filled by set_expectations: which logits the reference (in this case's dtype) makes
    # non-finite from ``nan_input`` (a NaN in one sample's features).
    nonfinite: torch.Tensor | None = None


def make_case(cfg: BenchConfig, mode: str, device, dtype: torch.dtype, batch: int,
              seed: int = 0) -> Case:
    device = torch.device(device)
    torch.manual_seed(seed)
    ref = cfg.make_head(MLDecoder)
    gen = torch.Generator().manual_seed(seed + 7)
    sd = {}
    for key, value in ref.state_dict().items():
        if value.is_floating_point() and (key.endswith("bias") or ".norm" in key):
            # Biases start at zero and LayerNorm affines at one/zero: perturb them so that a
            # misapplied bias or affine cannot hide behind the default initialisation.
            value = value + 0.1 * torch.randn(value.shape, generator=gen, dtype=value.dtype)
        sd[key] = value.to(device=device, dtype=param_dtype(dtype)) if value.is_floating_point() \
            else value.to(device)
    inputs = [cfg.make_input(batch, device, dtype, seed=seed)]
    if device.type == "cuda":
        # Rotate inputs whose total is about 2x an L2 cache, so each call reads from HBM.
        per = max(1, inputs[0].numel() * inputs[0].element_size())
        extra = min(7, math.ceil((100 << 20) / per) - 1)
        inputs += [cfg.make_input(batch, device, dtype, seed=seed + 1 + i) for i in range(extra)]
    g = torch.Generator().manual_seed(seed + 100)
    target = None
    if mode == "train":
        target = (torch.rand(batch, cfg.classes_for(mode), generator=g) < 0.1).float().to(device)
    wv = cfg.word_vectors(mode).to(device=device, dtype=param_dtype(dtype)) if cfg.zsl else None
    return Case(cfg, mode, device, dtype, batch, sd, inputs, target, wv)


def unwrapped(model: nn.Module) -> nn.Module:
    """The head inside torch.compile's wrapper (``_orig_mod``) or a graph wrapper (``module``)."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def held_bytes(model: nn.Module) -> int:
    """Bytes a head holds between steps beyond its parameters and buffers (``MLDecoderFast``'s
    caches: eval queries, weight copies, packed weights), which a step's peak, counted
    from what existed before it, would not show."""
    module = unwrapped(model)
    caches = getattr(module, "caches", None)
    return 0 if caches is None else caches.nbytes(exclude=[*module.parameters(), *module.buffers()])


def prepare(impl: Impl, case: Case) -> nn.Module:
    """Build ``impl`` with the case's weights, device, mode and word vectors."""
    torch.manual_seed(0)
    model = impl.make(case.cfg)
    target_module = unwrapped(model)
    target_module.to(device=case.device, dtype=param_dtype(case.dtype))
    target_module.load_state_dict(case.state_dict)
    if case.word_vectors is not None:
        target_module.set_word_vectors(case.word_vectors)
    model.train(case.mode == "train")
    return impl.wrap(model, case) if impl.wrap is not None else model


def fp64_case(case: Case) -> Case:
    """The same case in float64 without autocast: weights, inputs and word vectors upcast (exactly)."""
    def up(t):
        return t.double() if t is not None and t.is_floating_point() else t
    return dataclasses.replace(case, dtype=torch.float64, state_dict={k: up(v) for k, v in case.state_dict.items()},
                               inputs=[up(case.inputs[0])], word_vectors=up(case.word_vectors),
                               exact=None, reference_errors=None, allowed=None)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (low-precision results are compared in fp32, float64 ones stay float64)."""
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE in fp32 (fp64 for a float64 run, so that the fp64 reference is exact throughout)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))


def training_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The timed steps' AdamW, its state already allocated.

    A small learning rate: the weights move (so every copy derived from them must be refreshed)
    but stay in range over hundreds of timed steps. ``fused=True`` where this PyTorch has the
    fused kernel for the parameters' device and dtype (one pass, no temporaries), else the
    default implementation. The state is made by one step at learning rate 0 on zero gradients,
    which leaves the weights as they are."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer = torch.optim.AdamW(params, lr=0.0, fused=True)
        optimizer.step()
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        optimizer = torch.optim.AdamW(params, lr=0.0)
        optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 1e-6
    optimizer.zero_grad(set_to_none=True)
    return optimizer


def make_step(model: nn.Module, case: Case) -> Callable[[], None]:
    """The timed callable: an eval forward, or a full training step (see module docstring)."""
    inputs = case.inputs
    counter = [0]
    ctx = lambda: autocast_context(case.device, case.dtype)  # noqa: E731
    if case.mode == "eval":
        def step():
            x = inputs[counter[0] % len(inputs)]
            counter[0] += 1
            with torch.no_grad(), ctx():
                model(x)
        return step
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    target = case.target
    optimizer = training_optimizer(model)

    def step():
        x = xs[counter[0] % len(xs)]
        counter[0] += 1
        with ctx():
            logits = model(x)
        _loss(logits, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
    return step


def comparison_outputs(model: nn.Module, case: Case) -> dict:
    """Outputs to compare: eval logits; in training (dropout off) logits and every gradient."""
    x = case.inputs[0]
    ctx = autocast_context(case.device, case.dtype)
    if case.mode == "eval":
        with torch.no_grad(), ctx:
            return {"logits": _wide(model(x))}
    x = x.detach().clone().requires_grad_(True)
    inner = unwrapped(model)
    with dropout_disabled(inner):
        with ctx:
            logits = model(x)
        _loss(logits, case.target).backward()
    out = {"logits": _wide(logits), "grad:input": _wide(x.grad)}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            out[f"grad:{name}"] = None if p.grad is None else _wide(p.grad).clone()
    model.zero_grad(set_to_none=True)
    return out


def nan_input(case: Case) -> torch.Tensor:
    """The case's input with one feature of its first sample set to NaN."""
    x = case.inputs[0].detach().clone()
    x.view(x.shape[0], -1)[0, x[0].numel() // 2] = float("nan")
    return x


def nonfinite_logits(model: nn.Module, case: Case) -> torch.Tensor:
    """Which logits ``model`` makes non-finite from ``nan_input`` (eval: a forward without autograd;
    train: a training-mode forward with autograd, every dropout at p = 0, no backward)."""
    x = nan_input(case)
    with dropout_disabled(unwrapped(model)), autocast_context(case.device, case.dtype), \
            torch.set_grad_enabled(case.mode == "train"):
        logits = model(x.requires_grad_(case.mode == "train"))
    return ~torch.isfinite(logits.detach())


def set_expectations(case: Case, reference: nn.Module) -> dict:
    """Run the float64 reference on ``case``'s weights and inputs and set, per compared tensor,
    ``case.exact`` (its value), ``case.reference_errors`` (the error of ``reference``, the reference
    in the case's dtype) and ``case.allowed`` = max(2 x that error, ``ERROR_FLOOR``). Returns the
    outputs of ``reference``."""
    own = comparison_outputs(reference, case)
    if case.dtype == torch.float64:
        exact = own
    else:
        case64 = fp64_case(case)
        exact = comparison_outputs(prepare(reference_impl(), case64), case64)
    case.exact = exact
    case.reference_errors, case.allowed = error_bounds(exact, own, case.dtype)
    case.nonfinite = nonfinite_logits(reference, case)
    return own


def error_bounds(exact: dict, reference: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    """Per tensor of ``exact`` (float64 values): the error of ``reference`` (the reference's values
    in ``dtype``) and the bound max(2 x that error, ``ERROR_FLOOR[dtype]``); a tensor the
    reference got non-finite or missing is bound by the floor alone."""
    floor_out, floor_grad = ERROR_FLOOR.get(dtype, ERROR_FLOOR[torch.float32])
    errors, allowed = {}, {}
    for key, want in exact.items():
        if want is None:
            continue
        floor = floor_out if key == "logits" else floor_grad
        err = errors[key] = rel_rms(want, reference[key]) if reference.get(key) is not None else math.nan
        allowed[key] = max(2 * err, floor) if math.isfinite(err) else floor
    return errors, allowed


@dataclass
class Agreement:
    ok: bool
    error: float   # worst relative RMS error vs the float64 reference over the compared tensors
    errors: dict   # per tensor: relative RMS error vs the float64 reference
    detail: str    # what is out of bounds, and by how much


def judge(case: Case, got: dict) -> Agreement:
    """Judge outputs ``got`` (as ``comparison_outputs`` returns them) against ``case``'s bounds."""
    assert case.exact is not None, "set_expectations(case, reference) first"
    errors, problems = {}, []
    for key, want in case.exact.items():
        if want is None:
            continue
        out = got.get(key)
        if out is None:
            problems.append(f"{key} missing")
            continue
        if out.shape != want.shape:
            problems.append(f"{key} shape {tuple(out.shape)} != {tuple(want.shape)}")
            continue
        if not torch.isfinite(out).all() and torch.isfinite(want).all():
            problems.append(f"{key} has NaN/Inf")
            continue
        err = errors[key] = rel_rms(want, out)
        if not err <= case.allowed[key]:
            problems.append(f"{key} rel. RMS error vs fp64 {err:.1e} > allowed {case.allowed[key]:.1e} "
                            f"(reference's {case.reference_errors[key]:.1e})")
    return Agreement(not problems, max(errors.values(), default=0.0), errors, "; ".join(problems))


def check_agreement(model: nn.Module, case: Case, nonfinite_must_match: bool = True) -> Agreement:
    """Judge ``model`` on ``case`` (see ``judge``), then feed it ``nan_input``: its non-finite
    logits must be the reference's (a NaN in a sample's features must reach that sample's logits,
    and only those). With ``nonfinite_must_match`` False (a peer runtime) a difference is only
    reported in the detail."""
    verdict = judge(case, comparison_outputs(model, case))
    got = nonfinite_logits(model, case)
    if case.nonfinite is None or torch.equal(got, case.nonfinite):
        return verdict
    problem = (f"a NaN in sample 0's features: {int(got.sum())} non-finite logits in samples "
               f"{sorted(set(got.nonzero()[:, 0].tolist()))}, the reference's {int(case.nonfinite.sum())} in "
               f"{sorted(set(case.nonfinite.nonzero()[:, 0].tolist()))}")
    if not nonfinite_must_match:
        problem += " (reported, not judged: a peer runtime)"
    detail = "; ".join(d for d in (verdict.detail, problem) if d)
    return dataclasses.replace(verdict, ok=verdict.ok and not nonfinite_must_match, detail=detail)


def run_case(case: Case, impls: list[Impl], warmup: int = 1, repeats: int = 5,
             budget_s: float | None = None, min_repeats: int = 1, measure_memory: bool = True,
             strict: bool = False, on_result: Callable[[Result], None] | None = None,
             probes: dict[str, tuple[Callable[[], object], float]] | None = None) -> list[Result]:
    """Check, time and measure every implementation on one case.

    The reference runs first and sets the expectations (``set_expectations``: the float64
    reference and the bounds). Each implementation is built, checked and warmed up (the check's
    own call already warms the kernels); then the peak memory of one step of each is measured on
    its own; then all are timed in interleaved rounds (``time_interleaved``), together with large
    GEMMs (``probes``: {name: (callable, FLOPs)}, by default ``matmul_probes`` in the case's dtype) whose
    fastest rate, measured under the same load, is the roofline's. Implementations without this
    case's mode get no row. An implementation that fails to build or run (e.g. torch.compile
    errors) gets a skipped row with the reason; a reference failure propagates.
    """
    cfg = case.cfg
    flops = step_flops(cfg, case.batch, case.mode)
    nbytes = step_bytes(cfg, case.batch, case.mode, itemsize=case.inputs[0].element_size(),
                        param_itemsize=torch.empty((), dtype=param_dtype(case.dtype)).element_size())
    ordered = sorted((i for i in impls if case.mode in i.modes), key=lambda i: i.name != REFERENCE)
    if any(i.compiled for i in ordered):
        # A fresh start for this case's compiles: a run's cases would otherwise pile up entries
        # on the same code objects until torch.compile's recompile limit falls back to eager.
        torch._dynamo.reset()
    results: dict[str, Result] = {}
    steps: dict[str, Callable[[], None]] = {}
    models: dict[str, nn.Module] = {}

    def fail(impl: Impl, exc: BaseException) -> None:
        if impl.name == REFERENCE:
            raise exc
        res = results[impl.name]
        res.skipped = True
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        res.detail = ("torch.compile failed: " if impl.compiled else "") + f"{type(exc).__name__}: {msg}"
        steps.pop(impl.name, None)
        models.pop(impl.name, None)

    try:
        for impl in ordered:
            results[impl.name] = Result(cfg.name, case.mode, impl.name, str(case.device),
                                        str(case.dtype).replace("torch.", ""), case.batch,
                                        classes=cfg.classes_for(case.mode), flops=flops, bytes=nbytes)
            res = results[impl.name]
            try:
                model = prepare(impl, case)
                if impl.name == REFERENCE:
                    verdict = judge(case, set_expectations(case, model))
                else:   # MLDecoderFast rows (eager or graphed) must keep NaN as the reference
                    verdict = check_agreement(model, case, nonfinite_must_match=impl.backend is not None
                                              and not impl.compiled)
                res.agree, res.error, res.errors, res.detail = (verdict.ok, verdict.error, verdict.errors,
                                                                verdict.detail)
                res.allowed = dict(case.allowed)
                if not res.agree and strict:
                    raise AgreementError(f"{impl.name} disagrees with the float64 reference on {cfg.name} "
                                         f"{case.mode} (batch {case.batch}): {res.detail}")
                models[impl.name] = model
                steps[impl.name] = make_step(model, case)
                # Warm up alone, so a failing compile is caught here (and compiles untimed).
                for _ in range(max(1 if impl.compiled else 0, warmup)):
                    steps[impl.name]()
                synchronize(case.device)
            except AgreementError:
                raise
            except Exception as exc:
                fail(impl, exc)

        if measure_memory:
            # One step of each alone under the memory measurement; it also serves as (one more)
            # warm-up before the timed rounds.
            measured = {i.name for i in ordered if i.memory}
            for name, step in list(steps.items()):
                if name not in measured:
                    continue
                try:
                    results[name].peak_bytes = peak_memory_bytes(step, case.device) + held_bytes(models[name])
                except Exception as exc:
                    fail(next(i for i in ordered if i.name == name), exc)

        if probes is None:
            probes = matmul_probes(case.device, case.dtype)
        for fn, _ in probes.values():
            fn()
        timings = time_interleaved({**steps, **{_MATMUL + n: fn for n, (fn, _) in probes.items()}}, case.device,
                                   warmup=0, repeats=repeats, min_repeats=min_repeats, budget_s=budget_s)
        rates = {n: f / (timings.pop(_MATMUL + n).median_ms * 1e-3) for n, (_, f) in probes.items()}
        for name, t in timings.items():
            res = results[name]
            res.median_ms, res.min_ms, res.times_ms = t.median_ms, t.min_ms, t.times_ms
            res.matmul_rates = dict(rates)

    finally:
        steps.clear()
        models.clear()
        gc.collect()
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    out = [results[i.name] for i in ordered if i.name in results]
    fill_ratios(out)
    if on_result is not None:
        for r in out:
            on_result(r)
    return out


def fill_ratios(results: list[Result], mm_rate: float | None = None, bandwidth: float | None = None) -> None:
    """Speedups vs reference and eager-expert within each case; the roofline fraction from the
    fastest GEMM rate measured with the case (``matmul_rates``; else ``mm_rate``), which is also
    recorded as the row's ``matmul_flops_per_s``."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r.config, r.mode, r.device, r.dtype, r.batch), []).append(r)
    for rows in groups.values():
        by = {r.impl: r for r in rows}
        ref, exp = by.get(REFERENCE), by.get(EXPERT)
        for r in rows:
            if r.median_ms is None:
                continue
            if ref is not None and ref.median_ms:
                r.speedup_vs_reference = ref.median_ms / r.median_ms
            if exp is not None and exp.median_ms:
                r.speedup_vs_expert = exp.median_ms / r.median_ms
            rate = max(r.matmul_rates.values(), default=None) or mm_rate
            r.matmul_flops_per_s = rate
            if rate:
                # The floor is FLOPs over the matmul rate; on a GPU also bytes over copy bandwidth
                # (small batches there are bound by bytes and launches). CPU caches hold most of
                # the head's weights at small sizes, so a byte floor would not be one there.
                floor_s = r.flops / rate
                if bandwidth and r.device.startswith("cuda"):
                    floor_s = max(floor_s, r.bytes / bandwidth)
                r.roofline = floor_s / (r.median_ms * 1e-3)


def run_suite(configs: list[BenchConfig], device, dtype: torch.dtype, batches: list[int],
              modes=MODES, impls: list[Impl] | None = None, progress=None,
              on_case: Callable[[list[Result]], None] | None = None, **kwargs) -> list[Result]:
    """Every configuration x mode x batch; ``progress`` (a tqdm-like object) advances per row;
    ``on_case`` gets each case's rows as soon as they are measured (a run cut short keeps them)."""
    device = torch.device(device)
    if impls is None:
        impls, _ = implementations(device, dtype=dtype)
    out: list[Result] = []
    for cfg in configs:
        for batch in batches:
            for mode in modes:
                if progress is not None:
                    progress.set_description(f"{cfg.name} {mode} b{batch}")
                case = make_case(cfg, mode, device, dtype, batch)

                def tick(res, _p=progress):
                    if _p is not None:
                        _p.update(1)
                rows = run_case(case, impls, on_result=tick, **kwargs)
                out += rows
                if on_case is not None:
                    on_case(rows)
                del case
    return out
