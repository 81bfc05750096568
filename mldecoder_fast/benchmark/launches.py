"""Counting the kernels a forward or a training step launches, with or without a GPU.

At small batch a GPU forward of the head is bound by the host: every kernel launch costs a few
microseconds of Python, dispatcher and driver time whatever its size. This module counts them:

- ``count_launches(fn)`` runs ``fn`` inside a dispatch mode that records every ATen op that reaches
  a device kernel (views, allocations and metadata queries launch nothing and are skipped: see
  ``launches_kernel``). Each record names the op and how many kernels it launches on CUDA
  (``kernels``: 1 for almost every op; ``MULTI_KERNEL`` lists those known to launch more).
- ``fake_cuda(dtype)`` makes that possible without a GPU: tensors created inside it are fake CUDA
  tensors (``FakeTensorMode``: shapes, dtypes and strides only, nothing computed) and CUDA autocast
  is forced on in ``dtype`` (``torch.autocast("cuda")`` disables itself when no device exists).
- ``run_backward(output)`` runs the backward by calling the autograd nodes directly, in
  topological order (the autograd engine itself needs a real CUDA context), summing the gradients
  that reach one node input from several places with one ``add`` each, as the engine does.
- ``forbid_host_sync()`` fails on any op that makes the host wait for the device (reading a
  value back, data-dependent shapes): one such op stalls the launch queue every call.

On a GPU the same counters run on real tensors, and ``bench/launch_counts.py`` prints them beside
the number of CUDA kernels the profiler saw for the same forward.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that launch no kernel (besides views, ``func.is_view``): allocations without
# initialisation, metadata and shape queries, aliasing.
_NO_KERNEL = {
    aten.detach, aten.alias, aten._unsafe_view, aten.lift_fresh, aten.empty, aten.empty_like,
    aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.resize_, aten.set_,
    aten.sym_size, aten.sym_stride, aten.sym_numel, aten.sym_storage_offset, aten.is_same_size,
    aten._has_compatible_shallow_copy_type, aten.result_type, aten.promote_types,
    aten.is_contiguous,
}


def launches_kernel(func) -> bool:
    """Whether an ATen op, as dispatched, launches device work: not a view, an allocation without
    initialisation, a metadata query, or a ``prim`` op (``prim.device``, ``prim.layout``...)."""
    if func.is_view or func.namespace == "prim":
        return False
    return func.overloadpacket not in _NO_KERNEL


def _in_place(func) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _beta(args, kwargs) -> float:
    return float(kwargs.get("beta", args[3] if len(args) > 3 else 1))


def _lt_epilogue(func, args, kwargs) -> bool:
    """Whether CUDA's addmm runs as one cuBLASLt GEMM with the bias in its epilogue
    (``addmm_out_cuda_impl``'s conditions): a contiguous 1-d bias, beta 1, mat2 larger than 1x1."""
    self_, _, mat2 = args[:3]
    return (self_.dim() == 1 and self_.is_contiguous() and _beta(args, kwargs) == 1
            and mat2.shape[0] > 1 and mat2.shape[1] > 1)


def _kernels(func, args, kwargs) -> tuple[int, str]:
    """How many CUDA kernels one dispatched op launches, and what they are when more than one."""
    packet = func.overloadpacket
    if packet in (aten.baddbmm, aten.addmm, aten._addmm_activation) and not _in_place(func) \
            and _beta(args, kwargs) != 0:
        if packet is not aten.baddbmm and _lt_epilogue(func, args, kwargs):
            return 1, ""
        # The added tensor is copied into the output, then the GEMM accumulates onto it.
        if packet is aten._addmm_activation:
            return 3, "copy of the bias into the output, the GEMM, the activation"
        return 2, "copy of the added tensor into the output, then the GEMM"
    if packet in (aten._softmax, aten.native_layer_norm) and not args[0].is_contiguous():
        return 2, "contiguous copy of the input, then the kernel"
    if packet is aten.cat and "out" in kwargs and len(args[0]) > 1 and any(
            t.dtype != kwargs["out"].dtype or not t.is_contiguous() for t in args[0]):
        return len(args[0]), "a copy per input (inputs of another dtype or strided)"
    if packet is aten.native_layer_norm_backward and not kwargs.get("output_mask", args[-1])[0]:
        return 1, ""   # no input gradient asked: the weight/bias reduction alone
    if packet in MULTI_KERNEL:
        return MULTI_KERNEL[packet]
    return 1, ""


# Ops known to launch several kernels on CUDA (whatever their arguments), with what they are.
MULTI_KERNEL = {
    aten.native_layer_norm_backward: (
        2, "LayerNorm backward: input gradient, then the weight/bias gradient reduction"),
    aten._softmax_backward_data: (2, "softmax backward: grad * output, then the row reduction"),
    aten.constant_pad_nd: (2, "constant pad: a fill of the output, then a copy of the input into it"),
    aten._scaled_dot_product_efficient_attention_backward: (
        2, "attention backward (memory-efficient): preprocessing, then the fused backward"),
    aten._scaled_dot_product_flash_attention_backward: (
        3, "attention backward (flash): dO.O preprocessing, the fused backward, dQ conversion"),
    aten._scaled_dot_product_cudnn_attention_backward: (2, "attention backward (cuDNN)"),
}


@dataclass(frozen=True)
class Launch:
    """One dispatched op that launches device work."""
    op: str              # e.g. "aten.addmm.default"
    kernels: int         # CUDA kernels it launches (1 for almost every op)
    why: str             # what the kernels are, when more than one
    shapes: tuple        # output shapes
    dtypes: tuple        # output dtypes

    @property
    def name(self) -> str:
        """The op without overload: "aten.addmm"."""
        return self.op.rsplit(".", 1)[0] if self.op.count(".") >= 2 else self.op


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if launches_kernel(func):
            n, why = _kernels(func, args, kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            tensors = [t for t in outs if isinstance(t, torch.Tensor)]
            self.launches.append(Launch(str(func), n, why, tuple(tuple(t.shape) for t in tensors),
                                        tuple(t.dtype for t in tensors)))
        return out


def count_launches(fn: Callable[[], object], warmup: int = 1) -> list[Launch]:
    """The launches of one call of ``fn`` after ``warmup`` uncounted calls (which fill caches).

    The counted call starts with autocast's weight-cast cache empty, as every call made in its
    own ``with torch.autocast(...)`` region does (the region clears the cache on exit)."""
    for _ in range(warmup):
        fn()
    torch.clear_autocast_cache()
    with _Recorder() as rec:
        fn()
    return rec.launches


def total_kernels(launches: list[Launch]) -> int:
    return sum(x.kernels for x in launches)


def describe(launches: list[Launch]) -> str:
    """One line per launch: index, op, output shape and dtype, and the kernels when several."""
    lines = []
    for i, x in enumerate(launches):
        shape = x.shapes[0] if x.shapes else ()
        dtype = str(x.dtypes[0]).replace("torch.", "") if x.dtypes else ""
        extra = f"  [{x.kernels} kernels: {x.why}]" if x.kernels > 1 else ""
        lines.append(f"{i + 1:3d} {x.op:<48} {list(shape)!s:<22} {dtype}{extra}")
    return "\n".join(lines)


@contextlib.contextmanager
def fake_cuda(autocast_dtype: torch.dtype | None = torch.bfloat16) -> Iterator[None]:
    """Fake CUDA tensors by default and, unless ``autocast_dtype`` is None, CUDA autocast forced on
    in that dtype (restored afterwards). Create the head and its inputs inside."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    was_enabled = torch.is_autocast_enabled("cuda")
    was_dtype = torch.get_autocast_dtype("cuda")
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=False), torch.device("cuda"):
            # The head's caches key tensors on their data pointers, which fake tensors lack.
            warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")
            if autocast_dtype is not None:
                torch.set_autocast_enabled("cuda", True)
                torch.set_autocast_dtype("cuda", autocast_dtype)
            yield
    finally:
        torch.set_autocast_enabled("cuda", was_enabled)
        torch.set_autocast_dtype("cuda", was_dtype)


# Ops whose result the host needs before it can go on: each one waits for the device.
SYNCING_OPS = {aten._local_scalar_dense, aten.item, aten.nonzero, aten.is_nonzero, aten.equal,
               aten.masked_select}


class HostSyncError(RuntimeError):
    pass


class forbid_host_sync(TorchDispatchMode):
    """Within it, an op that synchronises the host with the device raises ``HostSyncError``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in SYNCING_OPS:
            raise HostSyncError(f"{func} makes the host wait for the device")
        return func(*args, **(kwargs or {}))


def run_backward(output: torch.Tensor, grad: torch.Tensor | None = None) -> dict:
    """Backpropagate ``grad`` (ones by default) from ``output`` by calling its autograd nodes in
    topological order; returns {leaf tensor: gradient}. Works on fake CUDA tensors, where
    ``Tensor.backward`` fails for want of a CUDA context.

    Does what the engine does between nodes, with the same ops: a gradient of another shape or
    dtype than the input it flows to is summed down to its shape and cast (the engine's
    ``validate_outputs``), and gradients reaching one input from several places are added.
    Gradients reaching a leaf are returned, not accumulated: the engine hands a leaf its first
    gradient without a kernel."""
    root = output.grad_fn
    if root is None:
        raise ValueError("output does not require grad")
    if grad is None:
        grad = torch.ones_like(output)
    deps: dict = {}  # how many edges point at each node
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            deps[nxt] = deps.get(nxt, 0) + 1
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    buffers: dict = {root: {0: grad}}
    leaves: dict = {}
    ready = [root]
    while ready:
        node = ready.pop()
        inputs = buffers.pop(node, {})
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            leaves[node.variable] = inputs.get(0)
            continue
        if inputs:
            call = node if callable(node) else node.apply   # a custom autograd.Function's node
            grads = call(*[inputs.get(i) for i in range(len(node._input_metadata))])
            if isinstance(grads, torch.Tensor) or grads is None:
                grads = (grads,)
            grads = _tensor_input_grads(node, tuple(grads))
        else:  # no gradient reached this node: nothing flows on
            grads = (None,) * len(node.next_functions)
        for (nxt, nr), g in zip(node.next_functions, grads, strict=True):
            if nxt is None:
                continue
            if g is not None:
                g = _as_input(g, nxt._input_metadata[nr])
                slot = buffers.setdefault(nxt, {})
                slot[nr] = g if nr not in slot else slot[nr] + g
            deps[nxt] -= 1
            if deps[nxt] == 0:
                ready.append(nxt)
    return leaves


def _tensor_input_grads(node, grads: tuple) -> tuple:
    """A custom ``autograd.Function``'s backward returns one gradient per forward argument; the
    engine drops those of non-tensor arguments. Here they must lead the argument list (as
    ``HeadTrainStep``'s ``cfg`` does) and their gradients be None."""
    extra = len(grads) - len(node.next_functions)
    if extra > 0:
        if any(g is not None for g in grads[:extra]):
            raise ValueError(f"{node.name()}: gradients for its leading non-tensor arguments")
        grads = grads[extra:]
    return grads


def _as_input(grad: torch.Tensor, meta) -> torch.Tensor:
    """The engine's ``validate_outputs``: reduce a broadcast gradient, cast to the input's dtype."""
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    if grad.dtype != meta.dtype:
        grad = grad.to(meta.dtype)
    return grad
