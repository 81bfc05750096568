"""Helpers shared by the Triton kernels: in-kernel dropout, block sizes, autotuning, dtypes."""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRET = interpreting()


@triton.jit
def dropout_keep(seed, rows, col_start, p, BLOCK_C: tl.constexpr):
    """Keep mask [rows, BLOCK_C] of an independent Bernoulli(1 - p) dropout for the elements
    (row, col_start + j), j < BLOCK_C; ``col_start`` must be a multiple of 4.

    Element (row, col) is decided by Philox keyed by the 64-bit ``seed`` with counters
    (col // 4, row): one Philox call gives the four columns 4i .. 4i+3 of a row (four 32-bit
    outputs), a quarter of the integer work of one call per element. The bits of an element never
    depend on the tile shape, so any kernel regenerates the same mask. 24 random bits per element:
    P(keep) = 1 - p to within 2^-24.
    """
    BLOCK_R: tl.constexpr = rows.shape[0]
    quad = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    zero = (rows[:, None] * 0 + quad[None, :] * 0).to(tl.uint32)
    c0 = quad[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    # join/join/reshape lays the four outputs of each counter side by side: columns 4i + (0, 1, 2, 3)
    # take r0, r2, r1, r3 (any fixed order works; this is the one the reshape gives).
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_R, BLOCK_C))
    u = (r >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return u >= p


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


@functools.lru_cache(maxsize=None)
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


def tensor_3d(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` broadcast to ``shape`` ([..., R, D]) and seen as [L, R, D] (a view where possible,
    stride 0 along broadcast dimensions)."""
    t = t.expand(shape)
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 3:
        return t
    return t.reshape(-1, shape[-2], shape[-1])


def seed_arg(seed: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    """The tensor to pass as the kernel's seed pointer (never read when there is no dropout)."""
    return seed if seed is not None else fallback


@triton.jit
def _dropout_mask_kernel(SEED, OUT, R, C, p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    keep = dropout_keep(tl.load(SEED), rows, col0, p, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    tl.store(OUT + rows.to(tl.int64)[:, None] * C + cols[None, :], keep.to(tl.int8), mask=mask)


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The keep mask [rows, cols] (bool) that the kernels draw for ``seed``: for tests and debugging.

    Row ids: LayerNorm kernels use the flattened output row; attention uses (b * H + h) * K + query
    with the key index as column."""
    out = torch.empty(rows, cols, dtype=torch.int8, device=seed.device)
    if rows and cols:
        grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 64))
        _dropout_mask_kernel[grid](seed, out, rows, cols, float(p), BLOCK_R=16, BLOCK_C=64)
    return out.bool()
