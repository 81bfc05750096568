"""What the triton backend's ops and registrations share: whether Triton can run here
(``triton_status``), the dtypes its kernels take, launch helpers, and the dropout seeds
(``DropoutSeeds``) its kernels and the training step's Triton attention draw their masks from."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no")


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def triton_status() -> tuple[bool, str]:
    """(available, detail): can the Triton kernels run here? Never raises."""
    try:
        version = triton_version()
        if version is None:
            return False, "triton is not importable"
        if torch.cuda.is_available():
            return True, f"triton {version} on CUDA ({torch.cuda.get_device_name()})"
        if interpreting():
            return True, f"triton {version} in its CPU interpreter (TRITON_INTERPRET=1: slow, for tests)"
        return False, f"triton {version} installed, but no CUDA device (and TRITON_INTERPRET is not set)"
    except Exception as e:  # noqa: BLE001
        return False, f"triton status unknown: {type(e).__name__}: {e}"



def sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Gradient of a broadcast: sum ``grad`` down to ``like``'s shape, in ``like``'s dtype."""
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


def on_device(t: Tensor):
    """Launch on ``t``'s GPU (custom ops get no device guard; Triton uses the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rows_of(shape) -> int:
    n = 1
    for s in shape[:-1]:
        n = n * s
    return n


def _broadcast_shapes(a: tuple, b: tuple) -> tuple | None:
    """torch.broadcast_shapes(a, b); None when they do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


_broadcast_cached = functools.lru_cache(maxsize=256)(_broadcast_shapes)


def broadcast(a: tuple, b: tuple) -> tuple | None:
    """``_broadcast_shapes`` computed once per pair of shapes in eager mode; traced as is under
    torch.compile (which would bypass the cache anyway, with a warning)."""
    return _broadcast_shapes(a, b) if torch.compiler.is_compiling() else _broadcast_cached(a, b)


# dropout seeds ----------------------------------------------------------------------------------

def _philox_generator(device: torch.device):
    """``device``'s default PyTorch generator when it keeps a Philox offset (CUDA), else None."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DropoutSeeds:
    """(seed tensor, Philox offset) for one op's dropout; the kernels key Philox by the seed, read
    from device memory, and count from the offset (``kernels._common.dropout_keep``).

    Eager, on a device whose generator keeps a Philox offset (CUDA), as PyTorch's own dropout
    does: the seed is the generator's seed, held in device memory (one int64 tensor per device,
    written again only when the generator is reseeded), and each op reserves 4 offsets of that
    generator on the host (``get_offset``/``set_offset``): no launch, no synchronisation. So
    ``torch.manual_seed`` and generator states saved and restored (checkpoint resume, activation
    checkpointing) reproduce the masks, consecutive ops and steps get fresh ones, and PyTorch's
    random ops on the same generator stay independent of these.

    While a CUDA graph is captured, under torch.compile, or with a generator without Philox offsets
    (the CPU one, i.e. the interpreter), a fresh seed is drawn with ``torch.randint`` instead
    (offset 0): PyTorch makes that draw graph-safe (every replay draws a new seed, so new masks) and
    the compiler traces it as its own RNG. A graph replay runs no Python, so the draw costs host time
    only when captured.
    """

    def __init__(self):
        self._seeds = {}  # device -> (generator seed, int64 [1] tensor holding it)

    def __call__(self, p: float, like: Tensor) -> tuple[Tensor | None, int]:
        if p <= 0:
            return None, 0
        device = like.device
        gen = None
        if not (torch.compiler.is_compiling() or _capturing(device)):
            gen = _philox_generator(device)
        if gen is None:
            return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device), 0
        seed = gen.initial_seed()
        held = self._seeds.get(device)
        if held is None or held[0] != seed:
            signed = seed - 2 ** 64 if seed >= 2 ** 63 else seed
            held = self._seeds[device] = (seed, torch.tensor([signed], dtype=torch.int64,
                                                              device=device))
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return held[1], offset
