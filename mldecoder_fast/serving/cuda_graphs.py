"""CUDA graphs for serving: ``cuda_graphed(head, batch_sizes=(1, 8, 32, 128))``.

A CUDA graph replays a captured sequence of kernels with one launch. At small batch the head is
bound by host work (eval B = 1 of the COCO head took 1.64 ms eager on an H100 at commit 1c31c6c,
for about 10 µs of GPU work; the launch-lean eval forward written since launches 12-13 kernels
and has not been timed on a GPU yet); replaying a graph leaves the host only the checks below, one
copy of the input into the graph's input buffer, the replay and one copy of the output.

A graph has static shapes and reads the tensors that existed when it was captured, at their
addresses. ``GraphedModule`` makes that safe:

- one graph per batch size, all in one memory pool, sharing one input buffer, laid out as the
  first input (a channels-last map stays channels-last; ``memory_format=`` sets it; an input of
  another layout is copied into it, no recapture); a batch runs in the
  smallest captured size that holds it, padded (the pad rows keep whatever the last call left
  there: rows are independent in eval, so they never reach the real rows' outputs);
- every call checks the input (rank, per-sample shape, dtype, device, batch size) against what
  was captured and fails naming both, never casting or moving silently;
- every call compares each parameter, buffer and tensor attribute of the module with what the
  graphs captured (same object in the same slot, same storage, same version counter, same
  shape: a few µs for the head's 19 tensors): an optimizer step, ``load_state_dict``, a replaced
  parameter, a dtype or device move or new ZSL word vectors all change it. Then the graphs are
  captured again (``on_change="recapture"``, the default) or the call fails
  (``on_change="error"``): stale weights are never served. In-place updates would in fact be read
  by the graph, but recapturing on them too keeps the rule simple and covers modules that derive
  tensors outside the graph;
- eval only: a module in training mode is refused (training steps:
  ``torch.cuda.make_graphed_callables``, see the README);
- off CUDA (the module on the CPU) it runs the module eagerly, with the same input checks and
  a one-time warning, so code written against the wrapper runs anywhere; eager calls read the
  current weights, so ``on_change="error"`` does not apply to them, and a module moved to a CUDA
  device is captured at its next call.

What ``MLDecoderFast`` adds to make capture work: what it derives from its weights (eval weights,
low-precision casts) is derived and cached by the warm-up runs before the capture, and the graph
reads those cached tensors, which the wrapper keeps alive with its graphs; nothing new is cached
during a capture (``caches.py``); the eval forward never synchronises the host.

The graph backend is a parameter so that the wrapper's logic can be tested without a GPU: an
object with ``capture(forward, module, static_input, own_output) -> (graph, static_output)``,
where ``graph.replay()`` recomputes ``static_output`` from ``static_input`` (``own_output``: in
memory no other graph writes).
"""
from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from ..head.caches import HeadCaches

DEFAULT_BATCH_SIZES = (1, 8, 32, 128)
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


def cuda_graphed(module: nn.Module, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 sample_shape: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                 autocast_dtype: torch.dtype | None = None, *, copy_output: bool = True,
                 on_change: str = "recapture", warmup_iters: int = 3,
                 memory_format: torch.memory_format | None = None, graph_backend=None) -> GraphedModule:
    """``module``'s eval forward captured as one CUDA graph per batch size.

    Args:
        module: an ``nn.Module`` in eval mode taking one tensor ``[B, *sample_shape]`` and returning
            one tensor ``[B, ...]`` whose rows depend only on the same input rows (the head, or a
            backbone + head in eval mode).
        batch_sizes: the sizes captured; a call with batch B runs in the smallest size >= B.
        sample_shape: the input's shape without the batch, e.g. ``(2048, 14, 14)`` or
            ``(196, 768)``. Given, the graphs are captured now; None: at the first call, from its
            input.
        dtype: the input dtype; default: the module's (first floating-point) parameter dtype.
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` to run the forward under autocast.
        copy_output: True (default): each call returns a new tensor. False: a view of the graph's
            output buffer (each size's own, outside the graphs' shared pool), overwritten by the
            next call that runs the same captured size.
        on_change: ``"recapture"`` (default) or ``"error"`` when the module's tensors changed
            since capture (see the module docstring).
        warmup_iters: eager runs per batch size before its capture (lazy initialisation, Triton
            compilation and autotuning must not happen inside a capture).
        memory_format: the layout of the captured input buffer, ``torch.contiguous_format`` or
            ``torch.channels_last`` (4-d inputs; the faster one for the head's input projection).
            None: the first call's input's (channels-last if it is), contiguous when captured
            from ``sample_shape``. An input in another layout is copied into it (no recapture).
        graph_backend: for tests; default: ``torch.cuda.CUDAGraph`` on CUDA, eager elsewhere.

    ``.captures`` counts the captures made so far (recaptures included).
    Not thread-safe: the graphs share input and output buffers; give each serving thread its
    own wrapper.
    """
    return GraphedModule(module, batch_sizes, sample_shape, dtype, autocast_dtype, copy_output,
                         on_change, warmup_iters, memory_format, graph_backend)


class _Slot(NamedTuple):
    name: str          # for messages: "decoder.embed_standart.weight"
    owner: dict        # the module dict holding it: _parameters, _buffers or the __dict__
    key: str
    tensor: torch.Tensor


def _tensor_slots(module: nn.Module) -> list:
    """Every parameter, buffer and plain tensor attribute (ZSL word vectors) of ``module``."""
    slots = []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for owner in (m._parameters, m._buffers, vars(m)):
            for key, t in owner.items():
                if isinstance(t, torch.Tensor):
                    slots.append(_Slot(f"{prefix}.{key}" if prefix else key, owner, key, t))
    return slots


def _slots_state(slots) -> list:
    # What a graph depends on, cheaply: which tensor sits in each slot (``id`` is safe: the slot
    # list keeps the captured tensors alive), and that tensor's storage, version and shape
    # (``p.data = ...`` and dtype/device moves keep the object but not the storage).
    # ``caches.tensor_key`` says the same with more fields, at twice the cost per call.
    return [(id(s.owner.get(s.key)), s.tensor._version, s.tensor.data_ptr(), s.tensor.shape)
            for s in slots]


def _changed_slot(slots, state) -> str:
    for s, (ident, version, ptr, shape) in zip(slots, state, strict=True):
        now = s.owner.get(s.key)
        if id(now) != ident:
            return f"{s.name} was replaced or removed"
        if s.tensor.data_ptr() != ptr or s.tensor.shape != shape:
            return f"{s.name} has new storage (p.data assignment, or a dtype or device move)"
        if s.tensor._version != version:
            return f"{s.name} was modified in place (optimizer step, load_state_dict, ...)"
    return "a tensor changed"


class _CUDAGraphs:
    """The production graph backend: ``torch.cuda.CUDAGraph``s sharing one memory pool and one
    capture stream (one instance per capture round)."""

    def __init__(self, device: torch.device, warmup_iters: int):
        self.device = device
        self.warmup_iters = warmup_iters
        with torch.cuda.device(device):
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream()

    def capture(self, forward, module, static_input, own_output=False):
        """(graph, static output). ``own_output``: the output is a buffer allocated outside the
        shared pool before the capture, which the graph copies its result into (one small
        kernel): the graphs captured later in the pool may reuse this one's freed scratch, and
        this one's may hold an earlier graph's, but no graph writes another's own output."""
        with torch.cuda.device(self.device):
            self.stream.wait_stream(torch.cuda.current_stream())
            warm = None
            with torch.cuda.stream(self.stream):   # warm up on the capture stream
                for _ in range(max(self.warmup_iters, 1 if own_output else 0)):
                    warm = forward(module, static_input)
                own = torch.empty_like(warm) if own_output else None
            torch.cuda.current_stream().wait_stream(self.stream)
            del warm
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads of a server may allocate while this one captures.
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                                  capture_error_mode="thread_local"):
                out = forward(module, static_input)
                if own is not None:
                    out = own.copy_(out)
        return graph, out


class _Captured(NamedTuple):
    sample_shape: tuple
    memory_format: torch.memory_format
    dtype: torch.dtype
    device: torch.device
    sizes: tuple
    static_input: torch.Tensor | None     # [max size, *sample_shape]; None when eager
    graphs: dict | None                    # size -> (graph, static output); None when eager
    slots: list
    state: list
    kept: list       # what the modules' caches held at capture: tensors the graphs may read


class GraphedModule:
    """See ``cuda_graphed``."""

    def __init__(self, module, batch_sizes, sample_shape, dtype, autocast_dtype, copy_output,
                 on_change, warmup_iters, memory_format, graph_backend):
        if not isinstance(module, nn.Module):
            raise TypeError(f"cuda_graphed expects an nn.Module, got {type(module).__name__}")
        sizes = tuple(sorted({int(b) for b in batch_sizes}))
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {tuple(batch_sizes)}")
        if on_change not in ("recapture", "error"):
            raise ValueError(f"on_change must be 'recapture' or 'error', got {on_change!r}")
        if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got "
                             f"{autocast_dtype}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        if int(warmup_iters) < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        if memory_format not in (None, torch.contiguous_format, torch.channels_last):
            raise ValueError(f"memory_format must be None, torch.contiguous_format or torch.channels_last, "
                             f"got {memory_format}")
        if memory_format is torch.channels_last and sample_shape is not None and len(sample_shape) != 3:
            raise ValueError(f"memory_format=torch.channels_last needs a [C, H, W] sample_shape, got "
                             f"{tuple(sample_shape)}")
        self.module = module
        self.batch_sizes = sizes
        self.dtype = dtype
        self.autocast_dtype = autocast_dtype
        self.copy_output = copy_output
        self.on_change = on_change
        self.warmup_iters = int(warmup_iters)
        self.captures = 0
        self._graph_backend = graph_backend
        self._warned_eager = False
        self._captured = None
        if sample_shape is not None:
            self._captured = self._capture(tuple(int(s) for s in sample_shape),
                                           memory_format or torch.contiguous_format)
        self._memory_format = memory_format

    # capture ---------------------------------------------------------------------------------
    def _run(self, module, x):
        with torch.no_grad():
            if self.autocast_dtype is None:
                return module(x)
            # Autocast's weight-cast cache would keep casts made during a capture outside the graph.
            with torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=False):
                return module(x)

    def _capture(self, sample_shape: tuple, memory_format: torch.memory_format) -> _Captured:
        module = self.module
        training = [name or "the module" for name, m in module.named_modules() if m.training]
        if training:
            raise RuntimeError(f"cuda_graphed captures the eval forward, but {training[0]} is in "
                               "training mode: call module.eval() first (training steps: "
                               "torch.cuda.make_graphed_callables, see the README)")
        tensors = [t for t in module.parameters()] + [t for t in module.buffers()]
        if not tensors:
            raise ValueError("cuda_graphed needs a module with parameters or buffers (they say "
                             "which device and dtype to capture for)")
        device = tensors[0].device
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        dtype = self.dtype
        if dtype is None:
            dtype = floating[0] if floating else torch.float32
        graphs = static_input = None
        if self._graph_backend is None and device.type != "cuda":
            if not self._warned_eager:
                self._warned_eager = True
                warnings.warn(f"cuda_graphed: the module is on {device}, and CUDA graphs need a "
                              "CUDA device: running it eagerly (same input checks)",
                              RuntimeWarning, stacklevel=3)
        else:
            backend = self._graph_backend or _CUDAGraphs(device, self.warmup_iters)
            static_input = torch.zeros((self.batch_sizes[-1], *sample_shape), dtype=dtype,
                                       device=device).contiguous(memory_format=memory_format)
            graphs = {}
            # Largest first: the smaller graphs reuse the pool blocks the larger one freed.
            for size in reversed(self.batch_sizes):
                graph, out = backend.capture(self._run, module, static_input[:size],
                                             own_output=not self.copy_output)
                if not (isinstance(out, torch.Tensor) and out.dim() >= 1 and out.shape[0] == size):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise TypeError(f"cuda_graphed serves modules returning one tensor [B, ...]; "
                                    f"for an input batch of {size} the module returned {got}")
                graphs[size] = (graph, out)
            self.captures += 1
        slots = _tensor_slots(module)
        # The graphs read what the warm-up derived and cached (eval weights, casts): keep it alive
        # with them, so that clear_caches(), a train()/eval() switch or a cache refresh by an eager
        # call frees nothing a replay reads (new weights mean a recapture anyway).
        kept = [v for m in module.modules() if isinstance(getattr(m, "caches", None), HeadCaches)
                for v in m.caches.values()] if graphs is not None else []
        return _Captured(sample_shape, memory_format, dtype, device, self.batch_sizes, static_input, graphs,
                         slots, _slots_state(slots), kept)

    # call ------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The top module's flag only (``module.train()``/``eval()`` set every submodule's); the
        # capture checked every submodule, and walking them per call would cost host time.
        if self.module.training:
            raise RuntimeError("cuda_graphed serves the eval forward, but the module is in "
                               "training mode: call module.eval() (training steps: "
                               "torch.cuda.make_graphed_callables, see the README)")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"cuda_graphed expects a torch.Tensor, got {type(x).__name__}")
        cap = self._captured
        if cap is None:
            if x.dim() < 1:
                raise ValueError("cuda_graphed expects a batch [B, ...], got a 0-d tensor")
            layout = self._memory_format or (
                torch.channels_last if x.dim() == 4 and not x.is_contiguous()
                and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
            cap = self._captured = self._capture(tuple(x.shape[1:]), layout)
        elif _slots_state(cap.slots) != cap.state:
            if self.on_change == "error" and cap.graphs is not None:
                what = _changed_slot(cap.slots, cap.state)
                raise RuntimeError(f"cuda_graphed: the module changed since capture ({what}); "
                                   "its graphs would serve the old weights. Wrap it again, or "
                                   "use on_change='recapture'")
            self._captured = None        # free the old graphs before capturing new ones
            cap = self._captured = self._capture(cap.sample_shape, cap.memory_format)
        batch = self._check(cap, x)
        if cap.graphs is None:
            return self._run(self.module, x)
        size = cap.sizes[bisect.bisect_left(cap.sizes, batch)]
        graph, out = cap.graphs[size]
        cap.static_input[:batch].copy_(x)
        graph.replay()
        out = out[:batch]
        return out.clone() if self.copy_output else out

    @staticmethod
    def _check(cap: _Captured, x: torch.Tensor) -> int:
        if x.dim() != 1 + len(cap.sample_shape) or tuple(x.shape[1:]) != cap.sample_shape:
            want = ", ".join(["B", *map(str, cap.sample_shape)])
            raise ValueError(f"cuda_graphed: expected an input of shape [{want}] (the per-sample "
                             f"shape captured), got {tuple(x.shape)}")
        if x.dtype != cap.dtype:
            raise TypeError(f"cuda_graphed: input dtype {x.dtype} does not match the captured "
                            f"input dtype {cap.dtype}: convert it (x.to({cap.dtype})) or wrap "
                            f"the module with dtype={x.dtype}")
        if x.device != cap.device:
            raise ValueError(f"cuda_graphed: input is on {x.device} but the module was captured "
                             f"on {cap.device}: move the input (x.to('{cap.device}'))")
        batch = x.shape[0]
        if batch > cap.sizes[-1]:
            raise ValueError(f"cuda_graphed: batch of {batch} is larger than the largest captured "
                             f"batch size {cap.sizes[-1]} (captured: {cap.sizes}): split the "
                             f"batch, or wrap with batch_sizes including {batch}")
        return batch
