"""Run every implementation of the head on one configuration, side by side (the implementations:
``contenders.py``; the case: ``cases.py``; the checks: ``agreement.py``).

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

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .agreement import AgreementError, check_agreement, judge, set_expectations
from .cases import MODES, Case, held_bytes, make_case, make_step, param_dtype, prepare
from .configs import BenchConfig
from .contenders import EXPERT, REFERENCE, Impl, implementations
from .flops import step_bytes, step_flops
from .timing import matmul_probes, peak_memory_bytes, synchronize, time_interleaved

_MATMUL = "__matmul__:"


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
                    verdict = check_agreement(model, case, nonfinite_must_match=impl.must_keep_nan)
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
                                   warmup=0, repeats=repeats, min_repeats=min_repeats, budget_s=budget_s,
                                   isolated=frozenset(i.name for i in ordered if i.isolated),
                                   steady=case.mode == "eval" and case.device.type == "cpu")
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
