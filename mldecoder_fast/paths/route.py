"""The choice of path for one forward: the facts it depends on, and the path they pick.

``facts_of(head, x)`` gathers everything any path's ``applies`` reads that can change between
forwards of one head (the resolved backend, device type, mode, dtypes, settings, the ambient grad
mode and tracing); ``choose(head, facts)`` returns the first path of ``PATHS`` that applies, kept
on the head per distinct ``Facts``. What the choice reads of the head itself is fixed by its
construction (zsl, sizes).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..head.backends import select_ops
from ..head.config import DropoutRates
from ..ops import cpu_gemm
from .cpu_eval import CPU_EVAL
from .lean_eval import LEAN_EVAL
from .op_by_op import OP_BY_OP
from .train_step import CPU_STEP, CUDA_STEP, TRITON_STEP

PATHS = (LEAN_EVAL, CPU_EVAL, TRITON_STEP, CUDA_STEP, CPU_STEP, OP_BY_OP)

_NO_DROPOUT = DropoutRates(0.0, 0.0, 0.0, 0.0, 0.0)


class Facts(NamedTuple):
    """What the choice of path depends on, per forward."""
    backend: str                   # the backend that runs here (``head.backends.select_ops``)
    device: str                    # the input's device type
    training: bool
    grad_mode: bool                # torch.is_grad_enabled()
    needs_grad: bool               # grad mode on and the input or a parameter requires grad
    autocast: torch.dtype | None   # the autocast dtype on this device, None without autocast
    param_dtype: torch.dtype       # the input projection's weight's
    mixed_dtypes: bool             # training with grad mode on, and parameters of several dtypes
    input_dtype: torch.dtype
    fused_training: bool           # head.fused_training
    dropout: DropoutRates          # the training rates; zero in eval
    empty: bool                    # a batch of zero samples
    traced: bool                   # torch.compile tracing, or torch.func transforms active
    lean_eval_device: bool         # the device is in head.lean_eval_devices
    lean_train_device: bool        # the device is in head.lean_train_devices
    mem_efficient_sdp: bool        # torch.backends.cuda.mem_efficient_sdp_enabled()
    onednn: bool                   # on the CPU, the CPU GEMM choice runs the compute dtype in oneDNN

    @property
    def compute(self) -> torch.dtype:
        """The dtype of the products: the autocast dtype, else the parameters'."""
        return self.autocast or self.param_dtype


def facts_of(head, x: torch.Tensor) -> Facts:
    dev = x.device.type
    autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    grad_mode = torch.is_grad_enabled()
    training = head.training
    compiling = torch.compiler.is_compiling()
    param_dtype = head.decoder.embed_standart.weight.dtype
    return Facts(
        backend=select_ops(head.backend, x.device, training)[0], device=dev, training=training, grad_mode=grad_mode,
        needs_grad=grad_mode and (x.requires_grad or any(p.requires_grad for p in head.parameters())),
        autocast=autocast,
        param_dtype=param_dtype, input_dtype=x.dtype,
        # (read per forward: a submodule's .to() or .double() does not reach the head's _apply)
        mixed_dtypes=training and grad_mode and any(p.dtype != param_dtype for p in head.parameters()),
        fused_training=head.fused_training, dropout=head.dropout_rates() if training else _NO_DROPOUT,
        empty=x.shape[0] == 0,
        traced=compiling or torch._C._are_functorch_transforms_active(),
        lean_eval_device=dev in head.lean_eval_devices, lean_train_device=dev in head.lean_train_devices,
        # (read by the training steps only, which torch.compile's tracing never takes; it cannot
        # trace this read either)
        mem_efficient_sdp=not compiling and torch.backends.cuda.mem_efficient_sdp_enabled(),
        onednn=dev == "cpu" and not compiling and cpu_gemm.runs_onednn(autocast or param_dtype))


def choose(head, x: torch.Tensor, facts: Facts):
    """The path that runs this forward (kept per ``facts`` on the head; chosen afresh while
    torch.compile traces, whose graph keeps only the result)."""
    if facts.traced:
        return _first(head, x, facts)
    path = head.chosen_paths.get(facts)
    if path is None:
        path = head.chosen_paths[facts] = _first(head, x, facts)
    return path


def _first(head, x, facts):
    return next(path for path in PATHS if path.applies(head, x, facts))
