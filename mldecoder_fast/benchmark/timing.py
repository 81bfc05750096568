"""Timing and peak memory of one benchmark step.

Time: ``warmup`` untimed calls, then up to ``repeats`` timed calls; the result is their median
(noise on shared machines is one-sided, so the median is robust where the mean is not). A time
budget can stop the repetitions early, but never below ``min_repeats``. Implementations compared
with each other are timed in interleaved rounds (``time_interleaved``), so that load from other
processes hits them alike. On CUDA each call is
bracketed by CUDA events and the device is synchronised before the elapsed time is read; on the
CPU ``time.perf_counter`` brackets the call.

Peak memory: the most bytes the step holds at once *beyond what was allocated before it* (weights,
inputs, caches), i.e. activations saved for the backward, gradients, workspaces and outputs.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` before the step (bytes handed out by the caching allocator; blocks it
  keeps reserved are not counted).
- CPU: PyTorch has no allocator statistics on the CPU, and ``tracemalloc`` does not see tensor
  storage. The step runs once under ``torch.profiler`` with ``profile_memory=True``, which
  records every allocation and free of PyTorch's CPU allocator made during the step; the peak is
  the maximum of their running sum. Buffers that libraries allocate internally (oneDNN/MKL
  scratch space) are not seen.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    times_ms: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def repeats(self) -> int:
        return len(self.times_ms)

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "times_ms": self.times_ms,
                "repeats": self.repeats, "warmup": self.warmup}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn: Callable[[], object], device, warmup: int = 1, repeats: int = 5,
              min_repeats: int = 1, budget_s: float | None = None) -> Timing:
    """Median wall time of ``fn()`` in milliseconds (see module docstring)."""
    device = torch.device(device)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    for i in range(repeats):
        times.append(_timed_call(fn, device))
        if budget_s is not None and i + 1 >= min_repeats and time.perf_counter() - start_all > budget_s:
            break
    return Timing(median_ms=statistics.median(times), min_ms=min(times), times_ms=times,
                  warmup=max(0, warmup))


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


# Samples of one callable further apart than this ratio mean another process interfered: more
# rounds (within 3x the budget) let the median step over the disturbed ones.
NOISY_SPREAD = 1.3


ISOLATED_BLOCK = 3      # calls per round of an isolated callable, timed one by one
ISOLATED_WARMUP = 3     # untimed calls before them (after the idle, the first calls run slow)
SETTLE_S = 0.25         # idle before and after an isolated callable's block (OpenMP's spin is 0.2 s)


def time_interleaved(fns: dict[str, Callable[[], object]], device, warmup: int = 1, repeats: int = 5,
                     min_repeats: int = 1, budget_s: float | None = None,
                     isolated: frozenset = frozenset(), steady: bool = False) -> dict[str, Timing]:
    """Time several callables in rounds (one call of each per round), so that a change of load on
    a shared machine hits them all alike and their ratios stay meaningful.

    ``isolated``: callables with threads of their own (ONNX Runtime, OpenVINO): each round times a
    block of ``ISOLATED_BLOCK`` calls of one, with the machine idle for ``SETTLE_S`` before and
    after, so that neither its threads nor the OpenMP threads of the others, spinning after their
    last call, take the cores from whichever runs next. The block starts with ``ISOLATED_WARMUP``
    untimed calls: after the idle the first calls run slower (an Intel Xeon VM, OpenVINO at batch
    1: 4.2, 3.1, 2.3 ms, then 2.1-2.3), while the others are timed warm, one after another.

    ``steady``: the others are timed in such blocks too (untimed calls, then timed ones; no idle),
    so that every callable is timed in the steady state of a loop that calls it alone (a serving
    loop: its weights in the caches, not the previous callable's), as the isolated ones are.

    ``budget_s`` is per callable: no new round starts once the rounds took longer than
    ``budget_s * len(fns)`` and ``min_repeats`` rounds are done, or right after the first round
    if that one alone took 4x longer (a case of tens of seconds per call gets one timed round, so
    that the default run fits in minutes; its row then rests on one sample). When the samples of
    a callable spread by more than ``NOISY_SPREAD``, rounds continue up to 3x the budget.
    """
    device = torch.device(device)
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    names = list(fns)
    for i in range(repeats):
        # Alternate the order, so that no callable always runs right after the same neighbour.
        for name in (names if i % 2 == 0 else names[::-1]):
            if name in isolated:
                time.sleep(SETTLE_S)
            if name in isolated or steady:
                for _ in range(ISOLATED_WARMUP):
                    fns[name]()
                times[name] += [_timed_call(fns[name], device) for _ in range(ISOLATED_BLOCK)]
            else:
                times[name].append(_timed_call(fns[name], device))
            if name in isolated:
                time.sleep(SETTLE_S)
        if budget_s is None:
            continue
        elapsed, limit = time.perf_counter() - start, budget_s * len(fns)
        if i == 0 and elapsed > 4 * limit:
            break  # one round alone cost 4x the budget
        noisy = any(max(t) > NOISY_SPREAD * min(t) for t in times.values())
        if elapsed > limit and i + 1 >= min_repeats and not (noisy and elapsed < 3 * limit):
            break  # over budget with enough rounds (a noisy case may use up to 3x the budget)
    return {name: Timing(median_ms=statistics.median(t), min_ms=min(t), times_ms=t, warmup=max(0, warmup))
            for name, t in times.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines straight to file descriptor 2; hide them (only them)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def peak_memory_bytes(fn: Callable[[], object], device) -> int:
    """Peak bytes held by one call of ``fn`` above what was allocated before it."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return _cpu_peak_bytes(fn)


def memory_method(device) -> str:
    device = torch.device(device)
    held = " + bytes the head holds between steps beyond its parameters (cases.held_bytes)"
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated - memory_allocated before the step" + held
    return "torch.profiler CPU allocator events: max running sum during the step" + held


# GEMM probe shapes (M, K, N), [M, K] x [K, N]: a large square one, and on the CPU the head's input
# projection at batch 16 (16 x 196 tokens of 2048 features to 768: COCO's [3136, 2048] x [2048, 768]),
# where oneDNN's bf16 kernels reach the AMX peak (~2,400 GFLOP/s on 2 threads of an Intel Xeon with
# AMX) that a square 1536 product does not (~700).
CPU_PROBE_SHAPES = ((1536, 1536, 1536), (3136, 2048, 768))
CUDA_PROBE_SHAPES = ((8192, 8192, 8192),)


def matmul_probes(device, dtype: torch.dtype, shapes=None) -> dict[str, tuple[Callable[[], object], float]]:
    """GEMMs in ``dtype`` on ``device`` of each of ``shapes`` (default ``CPU_PROBE_SHAPES`` /
    ``CUDA_PROBE_SHAPES``), {"<library> MxKxN": (callable, FLOPs)}: timed beside the
    implementations (one call of each per round) they give the GEMM rates under the same load; the
    fastest is the roofline's (docs/benchmarks.md: the fastest rate the device offers, not the rate
    of whichever GEMM an implementation calls).

    - ``torch.mm`` (cuBLAS on CUDA; MKL on the CPU);
    - CPU: ``onednn``, oneDNN's inner product through PyTorch on dense tensors
      (``torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")``, ``x @ w.T``), about 2x
      ``torch.mm`` in fp32 on AVX-512 AMD machines, level on Intel; left out where oneDNN has no
      kernel for ``dtype`` (float16 and float64 on such machines) or PyTorch was built without it.
    """
    device = torch.device(device)
    if shapes is None:
        shapes = CUDA_PROBE_SHAPES if device.type == "cuda" else CPU_PROBE_SHAPES
    g = torch.Generator(device="cpu").manual_seed(0)
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
    if onednn:
        linear = torch.ops.mkldnn._linear_pointwise
        try:
            linear(torch.ones(16, 16, dtype=dtype), torch.ones(16, 16, dtype=dtype), None, "none", [], "")
        except RuntimeError:
            onednn = False   # no oneDNN kernel for this dtype
    probes = {}
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
        flops = 2.0 * m * k * n
        probes[f"torch.mm {m}x{k}x{n}"] = ((lambda a=a, b=b: torch.mm(a, b)), flops)
        if onednn:
            w = b.t().contiguous()                       # [N, K]: the weight layout of x @ w.T
            probes[f"onednn {m}x{k}x{n}"] = ((lambda a=a, w=w: linear(a, w, None, "none", [], "")), flops)
    return probes


def matmul_rates(device, dtype: torch.dtype, shapes=None, repeats: int = 3) -> dict[str, float]:
    """FLOP/s of each of ``matmul_probes`` (median of ``repeats`` interleaved rounds)."""
    probes = matmul_probes(device, dtype, shapes)
    timings = time_interleaved({name: fn for name, (fn, _) in probes.items()}, device, warmup=1, repeats=repeats)
    return {name: flops / (timings[name].median_ms * 1e-3) for name, (_, flops) in probes.items()}


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 3) -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_step(lambda: dst.copy_(src), device, warmup=1, repeats=repeats)
    return 2.0 * nbytes / (t.median_ms * 1e-3)
