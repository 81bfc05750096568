"""The compiled extension's group fully-connected op (docs/design.md step 7): loading and registration.

The kernels live in ``csrc/group_fc.cpp`` (op schemas + CPU) and ``csrc/group_fc_cuda.cu``
(CUDA); the plain-PyTorch reference is ``torch_ops.group_fc_torch``. This file loads the
extension lazily (importing the package never fails because of it), registers the fake
(meta) kernels and the autograd formula of the ``mldecoder_fast::group_fc`` op, and exposes
``group_fc``.

Ops (namespace ``mldecoder_fast``); h and weight share the product's dtype:
  group_fc(h, weight, bias, num_classes)        -> logits [B, C] (ZSL: [B, K]), dtype promote(h, bias)
  group_fc_grad_h(grad, h, weight, num_classes) -> [B, K, D] laid out like h, weight.dtype
  group_fc_grad_weight(grad, h, weight, num_classes) -> weight.shape, weight.dtype
  group_fc_grad_bias(grad, bias)                -> bias.shape, bias.dtype
"""
from __future__ import annotations

import importlib
import threading

import torch

__all__ = ["group_fc", "extension_status", "cuda_kernels_available", "supports", "product_dtype"]

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_state: dict = {"loaded": None, "detail": "not loaded yet"}


def _load() -> bool:
    """Import ``mldecoder_fast._C`` once and register the Python side of its ops."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            importlib.import_module("mldecoder_fast._C")  # registers the ops with the dispatcher
            _register_python_side()
        except Exception as e:  # ImportError, OSError (undefined symbol: built for another torch), ...
            _state["detail"] = f"mldecoder_fast._C failed to load: {type(e).__name__}: {e}"
            _state["loaded"] = False
            return False
        cuda = _has_kernel("CUDA")
        _state["cuda"] = cuda
        _state["detail"] = ("CPU and CUDA kernels" if cuda
                            else "CPU kernels only (built without CUDA)")
        _state["loaded"] = True
        return True


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("mldecoder_fast::group_fc",
                                                              dispatch_key)
    except Exception:
        return False


def extension_status() -> tuple[bool, str]:
    """(available, detail): whether the compiled group FC can be used, and why not if not."""
    try:
        ok = _load()
        return ok, _state["detail"]
    except Exception as e:  # never raise from a status query
        return False, f"{type(e).__name__}: {e}"


def cuda_kernels_available() -> bool:
    """True when the extension is loaded and was built with its CUDA kernels.
    (Whether a GPU is present is ``torch.cuda.is_available()``'s question.)"""
    return extension_status()[0] and bool(_state.get("cuda", False))


def supports(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the compiled op takes these inputs: kernels for h's device in this build,
    supported dtypes, all on one device."""
    if not extension_status()[0]:
        return False
    if h.device.type == "cuda":
        if not _state.get("cuda", False):
            return False
    elif h.device.type != "cpu":
        return False
    return (h.dtype in _SUPPORTED_DTYPES and weight.dtype in _SUPPORTED_DTYPES
            and bias.dtype in _SUPPORTED_DTYPES
            and weight.device == h.device and bias.device == h.device)


def group_fc(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             num_classes: int) -> torch.Tensor:
    """logits[b, k*G + g] = h[b, k, :] . weight[k, :, g] + bias[k*G + g] for k*G + g < num_classes.

    h [B, K, D] (any strides), weight [K, D, G], bias [num_classes] -> [B, num_classes];
    ZSL form: weight [D, 1], bias [1] -> [B, K]. Dtypes as in ``group_fc_torch`` (a bmm, then
    ``+ bias``): the product runs in the autocast dtype when autocast is on for h's device,
    else in promote(h, weight); the logits have dtype promote(product, bias), so fp32 under
    autocast with fp32 biases. Products accumulate in fp32 (fp64 for double) and the bias is
    added before the single rounding to the output dtype.
    """
    if not _load():
        raise RuntimeError(f"mldecoder_fast: the compiled group FC is unavailable: {_state['detail']}")
    dtype = product_dtype(h, weight)
    if h.dtype != dtype:
        h = h.to(dtype)
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    return torch.ops.mldecoder_fast.group_fc(h, weight, bias, num_classes)


def product_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype torch.bmm(h, weight) runs in: autocast's when it is on, else the promotion."""
    if torch.is_autocast_enabled(h.device.type) and h.is_floating_point():
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


# ---------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes for torch.compile / FakeTensor) and autograd.


def _check_weight(weight: torch.Tensor, num_classes: int) -> tuple[bool, int, int, int]:
    torch._check(weight.dim() in (2, 3),
                 lambda: f"group_fc: weight must be [K, D, G] (or [D, 1] for ZSL), got {tuple(weight.shape)}")
    torch._check(weight.dtype in _SUPPORTED_DTYPES,
                 lambda: f"group_fc: weight must be float64/32/16 or bfloat16, got {weight.dtype}")
    if weight.dim() == 2:
        torch._check(weight.shape[1] == 1,
                     lambda: f"group_fc: a 2-d (ZSL) weight must be [D, 1], got {tuple(weight.shape)}")
        return True, -1, weight.shape[0], 1
    k, d, g = weight.shape
    torch._check(g >= 1, lambda: f"group_fc: weight [K, D, G] needs G >= 1, got {tuple(weight.shape)}")
    torch._check(1 <= num_classes <= k * g,
                 lambda: f"group_fc: num_classes must be in [1, K*G] = [1, {k * g}], got {num_classes}")
    return False, k, d, g


def _check_h(h: torch.Tensor, weight: torch.Tensor, k: int, d: int) -> None:
    torch._check(h.dim() == 3, lambda: f"group_fc: h must be [B, K, D], got {tuple(h.shape)}")
    torch._check(h.dtype == weight.dtype,
                 lambda: f"group_fc: h and weight must have the same dtype, got {h.dtype} and {weight.dtype}")
    torch._check(h.device == weight.device,
                 lambda: f"group_fc: h is on {h.device} but weight is on {weight.device}")
    if k >= 0:
        torch._check(h.shape[1] == k, lambda: f"group_fc: h {tuple(h.shape)} does not match weight K = {k}")
    torch._check(h.shape[2] == d, lambda: f"group_fc: h {tuple(h.shape)} does not match weight D = {d}")


def _fake_group_fc(h, weight, bias, num_classes):
    zsl, k, d, _ = _check_weight(weight, num_classes)
    _check_h(h, weight, k, d)
    torch._check(bias.dtype in _SUPPORTED_DTYPES, lambda: f"group_fc: bias dtype {bias.dtype}")
    torch._check(bias.device == h.device,
                 lambda: f"group_fc: h is on {h.device} but bias is on {bias.device}")
    n_out = 1 if zsl else num_classes
    torch._check(bias.dim() == 1 and bias.shape[0] == n_out,
                 lambda: f"group_fc: bias must be [{n_out}], got {tuple(bias.shape)}")
    return h.new_empty((h.shape[0], h.shape[1] if zsl else num_classes),
                       dtype=torch.promote_types(h.dtype, bias.dtype))


def _check_grad(grad, weight, num_classes):
    zsl, k, d, _ = _check_weight(weight, num_classes)
    torch._check(grad.dim() == 2, lambda: f"group_fc backward: grad must be 2-d, got {tuple(grad.shape)}")
    torch._check(grad.dtype in _SUPPORTED_DTYPES,
                 lambda: f"group_fc backward: grad must be float64/32/16 or bfloat16, got {grad.dtype}")
    if not zsl:
        torch._check(grad.shape[1] == num_classes,
                     lambda: f"group_fc backward: grad {tuple(grad.shape)} vs num_classes {num_classes}")
    return zsl, k, d


def _fake_grad_h(grad, h, weight, num_classes):
    zsl, k, d = _check_grad(grad, weight, num_classes)
    _check_h(h, weight, k, d)
    torch._check(h.shape[0] == grad.shape[0], lambda: "group_fc backward: h and grad batch sizes differ")
    return torch.empty_like(h, dtype=weight.dtype)


def _fake_grad_weight(grad, h, weight, num_classes):
    zsl, k, d = _check_grad(grad, weight, num_classes)
    _check_h(h, weight, k, d)
    torch._check(h.shape[0] == grad.shape[0], lambda: "group_fc backward: h and grad batch sizes differ")
    return h.new_empty(weight.shape)


def _fake_grad_bias(grad, bias):
    torch._check(grad.dim() == 2 and bias.dim() == 1,
                 lambda: f"group_fc_grad_bias: grad {tuple(grad.shape)}, bias {tuple(bias.shape)}")
    torch._check(bias.shape[0] == 1 or bias.shape[0] == grad.shape[1],
                 lambda: f"group_fc_grad_bias: grad {tuple(grad.shape)} vs bias {tuple(bias.shape)}")
    return bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    h, weight, bias, num_classes = inputs
    ctx.num_classes = num_classes
    ctx.save_for_backward(h, weight, bias)


def _backward(ctx, grad):
    h, weight, bias = ctx.saved_tensors
    ops = torch.ops.mldecoder_fast
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = ops.group_fc_grad_h(grad, h, weight, ctx.num_classes) if need_h else None
    grad_w = ops.group_fc_grad_weight(grad, h, weight, ctx.num_classes) if need_w else None
    grad_b = ops.group_fc_grad_bias(grad, bias) if need_b else None
    return grad_h, grad_w, grad_b, None


_registered = False


def _register_python_side() -> None:
    global _registered
    if _registered:  # once per process, even if the load state is reset
        return
    lib = "mldecoder_fast::"
    torch.library.register_fake(lib + "group_fc", _fake_group_fc)
    torch.library.register_fake(lib + "group_fc_grad_h", _fake_grad_h)
    torch.library.register_fake(lib + "group_fc_grad_weight", _fake_grad_weight)
    torch.library.register_fake(lib + "group_fc_grad_bias", _fake_grad_bias)
    torch.library.register_autograd(lib + "group_fc", _backward, setup_context=_setup_context)
    _registered = True
