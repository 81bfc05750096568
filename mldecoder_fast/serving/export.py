"""Export an ML-Decoder head, or a whole model that holds one, to ONNX.

    from mldecoder_fast import export_onnx
    export_onnx(model.eval(), torch.randn(2, 3, 448, 448), "model.onnx")

    mldecoder-fast export --checkpoint CKPT --onnx model.onnx

The graph comes from ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath), with a
dynamic batch dimension by default; the other input dimensions are those of the example input.
MLDecoderFast heads are exported with their ``torch`` backend: the extension's and Triton's kernels
are custom ops that ONNX has no operator for, and the torch backend computes the same function
with standard ones. A zero-shot head's word vectors become constants of the graph. The file is
written next to its destination and moved there only once complete (and, with ``check``, once ONNX
Runtime has reproduced the module's output), so a failed export leaves no file behind.

Needs the ``onnx`` extra (``pip install 'mldecoder-fast[onnx]'``: onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# Relative RMS error allowed between ONNX Runtime and the eager module, by parameter dtype.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
_INSTALL_HINT = "pip install 'mldecoder-fast[onnx]'"


@dataclass
class ExportResult:
    path: Path
    checked_batches: tuple[int, ...] = ()   # batch sizes ONNX Runtime ran in the check
    check_error: float | None = None        # worst relative RMS error vs the eager module


def _require(*modules: str, why: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{why} needs {', '.join(missing)}: {_INSTALL_HINT}")


def _check_exportable(module: nn.Module) -> None:
    from ..head.reference import _HeadBase
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nn.Module to export, got {type(module).__name__}")
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(f"ONNX export writes the inference graph: expected a module in eval mode "
                         f"(call .eval() first), got {training[0]!r} in training mode")
    for name, m in module.named_modules():
        if isinstance(m, _HeadBase) and m.config.zsl and m.word_vectors is None:
            raise ValueError(f"{name or 'the head'} is a zero-shot (ZSL) head without word vectors: "
                             f"expected set_word_vectors(V), V of shape [n, 300], before export (the "
                             f"graph holds them as constants), got none")


def _check_writable(path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"expected a file path for the ONNX model, got the directory {path}")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write the ONNX model {path}: expected an existing directory "
                                f"{parent}, got {'a file' if parent.exists() else 'none'}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write the ONNX model {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def _torch_backend(module: nn.Module):
    """Run every MLDecoderFast inside ``module`` on its torch backend (standard ops only)."""
    from ..head.fast import MLDecoderFast
    heads = [m for m in module.modules() if isinstance(m, MLDecoderFast)]
    saved = [h.backend for h in heads]
    try:
        for h in heads:
            h.backend = "torch"
        yield
    finally:
        for h, b in zip(heads, saved, strict=True):
            h.backend = b


def export_onnx(module: nn.Module, example_input: torch.Tensor, path, dynamic_batch: bool = True,
                check: bool = True) -> ExportResult:
    """Write ``module`` (in eval mode) as an ONNX model to ``path``.

    ``example_input``: one input of the shape the model will see ([B, C, H, W] or [B, N, C] for a
    head, [B, 3, H, W] for a whole model); with ``dynamic_batch`` its first dimension is free in
    the exported graph (an example of batch 1 is traced at batch 2, since torch.export fixes size-1
    dimensions). ``check``: run the file in ONNX Runtime at the example's batch (and at one more
    sample with ``dynamic_batch``) and raise ``RuntimeError`` if it differs from ``module`` by more
    than ``CHECK_TOLERANCE``; nothing is written then.

    Raises ValueError (module in training mode, ZSL head without word vectors), OSError (``path``
    cannot be written), ImportError (onnx/onnxscript, or onnxruntime for ``check``, missing).
    """
    _require("onnx", "onnxscript", why="ONNX export")
    if check:
        _require("onnxruntime", why="checking the exported model (check=True)")
    _check_exportable(module)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError(f"expected an example input tensor with a batch dimension, got "
                         f"{type(example_input).__name__} of shape {getattr(example_input, 'shape', None)}")
    path = _check_writable(path)

    traced = example_input
    dynamic_shapes = None
    if dynamic_batch:
        if traced.shape[0] == 1:
            traced = traced.expand(2, *traced.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch")},)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _torch_backend(module), torch.no_grad():
            program = torch.onnx.export(module, (traced,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                        verbose=False)
        program.save(str(tmp), external_data=False)
        result = ExportResult(path)
        if check:
            result.checked_batches, result.check_error = _check_in_onnxruntime(module, example_input, tmp,
                                                                               dynamic_batch)
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _check_in_onnxruntime(module, example_input, path, dynamic_batch) -> tuple[tuple[int, ...], float]:
    from ..numerics import rel_rms
    session = OnnxRuntimeModule(path)
    inputs = [example_input]
    if dynamic_batch:
        inputs.append(torch.cat([example_input, example_input[:1]]))
    dtype = next((p.dtype for p in module.parameters()), example_input.dtype)
    tol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.float32])
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            want = module(x)
        got = session(x)
        if got.shape != want.shape:
            raise RuntimeError(f"ONNX Runtime returned shape {tuple(got.shape)} at input {tuple(x.shape)}, "
                               f"the module {tuple(want.shape)}")
        err = rel_rms(want, got)
        if not err <= tol:
            raise RuntimeError(f"ONNX Runtime differs from the module at input {tuple(x.shape)}: relative "
                               f"RMS error {err:.2e} > {tol:.0e}")
        worst = max(worst, err)
    return tuple(x.shape[0] for x in inputs), worst


def onnxruntime_session(path, threads: int | None = None):
    """An ONNX Runtime CPU session as the benchmark runs it: ``threads`` intra-op threads (default:
    torch's), one inter-op thread, sequential execution, no spinning threads between calls."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


class OnnxRuntimeModule(nn.Module):
    """An exported model run by ONNX Runtime, called like the module it came from (one tensor in,
    one tensor out; CPU tensors)."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        self.session = onnxruntime_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out)


class OpenVinoModule(nn.Module):
    """An exported model compiled by OpenVINO for the CPU, called like the module it came from (one
    tensor in, one tensor out; CPU tensors): ``threads`` inference threads (default: torch's), the
    latency hint, and ``precision`` "f32" or "bf16" (OpenVINO's inference precision hint: bf16 where
    the CPU has it, the weights and input staying fp32 in the file)."""

    def __init__(self, path, precision: str = "f32", threads: int | None = None):
        super().__init__()
        import openvino as ov
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
                  "INFERENCE_PRECISION_HINT": precision}
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()
        out = self.request.infer({0: x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())


# -- mldecoder-fast export ----------------------------------------------------------------------

def register(subparsers) -> None:
    from ..cli.types import int_list, int_range
    from .predict import add_checkpoint_options
    p = subparsers.add_parser(
        "export", help="write a checkpoint's model (or its ML-Decoder head alone) as ONNX",
        description="Export a checkpoint to ONNX with a dynamic batch dimension: the whole model when "
                    "the checkpoint says which backbone it has (model_args, written by mldecoder-fast "
                    "train) or --model names it, else its ML-Decoder head alone. The file is checked "
                    "in ONNX Runtime against the eager model unless --no-check.")
    p.add_argument("--checkpoint", required=True, help="a .pth checkpoint or state_dict (whole model or head)")
    p.add_argument("--onnx", required=True, metavar="PATH", help="the ONNX file to write")
    p.add_argument("--weights", choices=["auto", "model", "ema"], default="auto",
                   help="whole models: auto = the EMA weights when they validated better, else the model's")
    p.add_argument("--head", choices=["fast", "reference"], default="fast",
                   help="the head class to export (fast: MLDecoderFast, exported with its torch backend)")
    p.add_argument("--batch", type=int_range(1), default=2,
                   help="batch of the example input (the batch of the graph with --static-batch)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to --batch")
    p.add_argument("--feature-shape", type=int_list(1), default=None, metavar="C,H,W|N,C",
                   help="head alone: the input of one sample, a feature map C,H,W or tokens N,C "
                        "(default: C from the checkpoint, 7x7)")
    p.add_argument("--no-check", action="store_true", help="do not run the file in ONNX Runtime")
    add_checkpoint_options(p, "whole models from checkpoints without model_args (as mldecoder-fast predict)")
    p.set_defaults(func=run)


def head_from_checkpoint(ckpt: dict, head: str = "fast") -> nn.Module:
    """The ML-Decoder head of a loaded checkpoint (head or whole model, any layout), in eval mode."""
    from ..head.fast import MLDecoderFast
    from ..head.reference import MLDecoder
    from ..interop.convert import head_kwargs
    from ..interop.layouts import head_state_dict
    from ..train.checkpoint import CheckpointError
    try:
        sd = head_state_dict(ckpt["model"])
    except KeyError as exc:
        raise CheckpointError(f"{ckpt.get('path', 'checkpoint')}: {exc.args[0]}") from None
    model = (MLDecoderFast if head == "fast" else MLDecoder)(**head_kwargs(sd))
    model.load_state_dict(sd)
    return model.eval()


def run(args) -> int:
    from ..train.checkpoint import CheckpointError, load_checkpoint
    from .predict import checkpoint_overrides, load_predictor, set_word_vectors
    try:
        ckpt = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        if ckpt.get("model_args") or args.model:
            model, names, margs = load_predictor(
                args.checkpoint, args.head, "auto", args.weights, "cpu", overrides=checkpoint_overrides(args),
                ckpt=ckpt, trust_pickle=args.trust_pickle, word_vectors=args.word_vectors)
            side = int(margs["image_size"])
            shape = (3, side, side)
            what = f"{margs['model']} with its ML-Decoder head ({len(names)} classes)"
        else:
            model = head_from_checkpoint(ckpt, args.head)
            set_word_vectors(model, args.word_vectors, None, args.trust_pickle, ckpt.get("path", args.checkpoint))
            shape = tuple(args.feature_shape or (model.config.num_features, 7, 7))
            if len(shape) not in (2, 3):
                raise ValueError(f"--feature-shape: expected C,H,W or N,C, got {','.join(map(str, shape))}")
            what = f"the ML-Decoder head ({model.num_classes} classes, {model.config.num_queries} queries)"
        del ckpt
        example = torch.rand(args.batch, *shape)
        result = export_onnx(model, example, args.onnx, dynamic_batch=not args.static_batch,
                             check=not args.no_check)
    except (CheckpointError, FileNotFoundError, ImportError, ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    batch = "batch" if not args.static_batch else str(args.batch)
    print(f"wrote {result.path}: {what}, input [{batch}, {', '.join(map(str, shape))}]")
    if result.check_error is not None:
        print(f"checked in ONNX Runtime at batch {', '.join(map(str, result.checked_batches))}: "
              f"relative RMS error {result.check_error:.1e} vs the eager model")
    return 0
