"""Helpers shared by the Triton kernels: in-kernel dropout, block sizes, autotuning, dtypes,
launch plans cached per shape (``Launch``, ``PlanCache``)."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRET = interpreting()


# Philox key salt: keeps the kernels' streams apart from PyTorch's own (curand) streams drawn from
# the same generator seed at nearby offsets.
_KEY_SALT = tl.constexpr(0x2545F4914F6CDD1D)


@triton.jit
def dropout_keep(seed, offset, rows, col_start, p, BLOCK_C: tl.constexpr):
    """Keep mask [rows, BLOCK_C] of an independent Bernoulli(1 - p) dropout for the elements
    (row, col_start + j), j < BLOCK_C; ``col_start`` must be a multiple of 4.

    Element (row, col) of one op is decided by Philox keyed by the 64-bit ``seed`` (read from
    device memory) with counters (col // 4, row, offset low, offset high), ``offset`` the op's
    64-bit Philox offset (a scalar: ops sharing a seed differ by offset, see
    ``ops/triton_support.DropoutSeeds``). One Philox call gives the four columns 4i .. 4i+3 of a row
    (four 32-bit outputs), a quarter of the integer work of one call per element. The bits of an
    element never depend on the tile shape, so any kernel regenerates the same mask. 24 random
    bits per element: P(keep) = 1 - p to within 2^-24.
    """
    BLOCK_R: tl.constexpr = rows.shape[0]
    quad = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    zero = (rows[:, None] * 0 + quad[None, :] * 0).to(tl.uint32)
    c0 = quad[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    off = offset.to(tl.int64)
    c2 = (off & 0xFFFFFFFF).to(tl.uint32) + zero
    c3 = (off >> 32).to(tl.uint32) + zero
    r0, r1, r2, r3 = tl.philox(seed ^ _KEY_SALT, c0, c1, c2, c3)
    # join/join/reshape lays the four outputs of each counter side by side: columns 4i + (0, 1, 2, 3)
    # take r0, r2, r1, r3 (any fixed order works; this is the one the reshape gives).
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_R, BLOCK_C))
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= p


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant when interpreting on the CPU)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def size_class(n: int) -> int:
    """Coarse bucket of a batch-like size, used as an autotuning key (few buckets: cheap tuning)."""
    return 0 if n <= 16 else (1 if n <= 128 else 2)


def _quick_bench(fn, quantiles):
    # Short timing per config: tuning happens in the first (warm-up) call of each shape bucket.
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def prune_by_size(sizes: dict):
    """An ``early_config_prune`` dropping configs whose block ``BLOCK_X`` exceeds its problem
    size (``sizes`` maps block name -> argument name), e.g. 128-wide class tiles when G = 1: they
    cost compile and tuning time and cannot win. Keeps the smallest config if none is left."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}

        def fits(cfg):
            return all(cfg.kwargs.get(blk, 16) <= max(16, next_pow2(int(args[arg])))
                       for blk, arg in sizes.items() if arg in args)

        kept = [c for c in configs if fits(c)]
        if kept:
            return kept
        return [min(configs, key=lambda c: sum(c.kwargs.get(b, 0) for b in sizes))]
    return prune


# MLDECODER_FAST_AUTOTUNE=0: no timing, each kernel runs its last (small, safe) config: one compile
# per kernel variant instead of one per config (the GPU check's test stage uses it; slower kernels).
AUTOTUNE = os.environ.get("MLDECODER_FAST_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no")


def _safe_only(prune):
    def safe(configs, named_args, **kwargs):
        return prune(configs, named_args, **kwargs)[-1:]
    return safe


def autotune(gpu_configs, interp_config, key, sizes=None, **kwargs):
    """``triton.autotune`` over ``gpu_configs`` on a GPU; the one ``interp_config`` when interpreting
    (the interpreter cannot time configs). Configs that fail to compile for lack of resources are
    skipped by the autotuner, so each list ends with a small, safe config. ``sizes``: see
    ``prune_by_size``."""
    if INTERPRET:
        return triton.autotune([interp_config], key=key, **kwargs)
    prune = prune_by_size(sizes or {})
    kwargs["prune_configs_by"] = {"early_config_prune": prune if AUTOTUNE else _safe_only(prune)}
    try:
        return triton.autotune(gpu_configs, key=key, do_bench=_quick_bench, **kwargs)
    except TypeError:  # Triton before 3.2: no do_bench argument
        return triton.autotune(gpu_configs, key=key, warmup=5, rep=20, **kwargs)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for float32 operands: IEEE unless PyTorch allows TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tl_dtype(dtype: torch.dtype):
    """Triton's dtype for a torch floating dtype (a constexpr argument of the kernels)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def strides_3d(t: torch.Tensor, shape: tuple) -> tuple[int, int, int]:
    """Strides of ``t`` broadcast to ``shape`` ([D], [R, D] or [L, R, D]) and seen as [L, R, D]:
    0 along broadcast dimensions. The kernels read ``t`` itself through them (no view made)."""
    pad = 3 - len(shape)
    out = [0] * 3
    for i, size in enumerate(shape):
        j = i - (len(shape) - t.dim())        # t's dimension aligned with shape's dimension i
        if j >= 0 and t.shape[j] == size and size != 1:
            out[pad + i] = t.stride(j)
    return tuple(out)


class Launch:
    """One kernel launch with everything but its tensors fixed: grid, scalar arguments after the
    tensors, constexprs. The host functions build one per shape key (``PlanCache``), so a repeated
    call only passes its tensors (and, for dropout, its Philox offset first among the scalars:
    ``lead``). An autotuned kernel's first launch goes through its autotuner (which picks the
    config for this shape); later launches call that config directly, without the autotuner's
    per-call key building."""

    def __init__(self, kernel, grid, args=(), consts=None):
        self.kernel, self.grid, self.args, self.consts = kernel, grid, tuple(args), consts or {}
        self._direct = None  # (kernel function, concrete grid, constexprs incl. the chosen config)

    def __call__(self, *tensors, lead=()):
        if self._direct is not None:
            fn, grid, consts = self._direct
            fn[grid](*tensors, *lead, *self.args, **consts)
            return
        self.kernel[self.grid](*tensors, *lead, *self.args, **self.consts)
        if isinstance(self.kernel, Autotuner):
            consts = {**self.consts, **self.kernel.best_config.all_kwargs()}
            grid = self.grid(consts) if callable(self.grid) else self.grid
            self._direct = (self.kernel.fn, grid, consts)
        elif not callable(self.grid):
            self._direct = (self.kernel, self.grid, self.consts)


class PlanCache:
    """Launch plans built by ``build(*args)`` and kept under a key of everything they depend on
    (shapes, strides, dtypes, device, flags): a repeated call costs one dict lookup. Cleared when
    it holds ``max_size`` keys (new keys come only from new shapes, e.g. varying batch sizes)."""

    def __init__(self, build, max_size: int = 512):
        self._build, self._max_size, self._plans = build, max_size, {}

    def __call__(self, key, *args):
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self._max_size:
                self._plans.clear()
            plan = self._plans[key] = self._build(*args)
        return plan


@triton.jit(do_not_specialize=["seed_offset"])
def _dropout_mask_kernel(SEED, OUT, seed_offset, R, C, p,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    keep = dropout_keep(tl.load(SEED), seed_offset, rows, col0, p, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * C + cols[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float, offset: int = 0) -> torch.Tensor:
    """The keep mask [rows, cols] (bool) that the kernels draw for (``seed``, ``offset``): for tests
    and debugging.

    Row ids: LayerNorm kernels use the flattened output row; attention uses (b * H + h) * K + query
    with the key index as column."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=seed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 64))
        _dropout_mask_kernel[grid](seed, out, offset, rows, cols, float(p), BLOCK_R=16, BLOCK_C=64)
    return out.bool()
