"""Shared by the tests of the Triton ops (tests/ops/, tests/kernels/): inputs on the kernels'
device, the fp32 reference copies, the comparison with its tolerances, seeds and markers.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET):
shapes are tiny but odd, and the kernels' interpreter configs use 16-wide tiles so every loop and
mask runs. bf16 and full-size shapes need the GPU and are skipped here.
"""
from __future__ import annotations

import pytest
import torch
from helpers import assert_close, rel_rms

from mldecoder_fast.ops import triton_ops as T
from mldecoder_fast.ops import triton_support as S
from mldecoder_fast.ops.torch_ops import TorchOps

AVAILABLE, DETAIL = S.triton_status()
# Every Triton test carries the "triton" mark (bench/gpu_check.sh runs them in its test_triton stage
# with `-k triton`, and leaves them out of test_cuda_other with `-m "not triton"`).
TRITON_MARKS = [pytest.mark.triton,
                pytest.mark.skipif(not AVAILABLE, reason=f"Triton kernels cannot run here: {DETAIL}")]

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (bf16 and full sizes; "
                                                 "the CPU interpreter gets bf16 wrong)")
# Relative RMS error allowed: fp32 (the interpreter computes dots in fp32; on a GPU fp32 dots are
# IEEE unless TF32 is enabled) and fp16 (operands rounded to fp16, fp32 accumulation).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}

TORCH = TorchOps()
TRITON = T.TritonOps()

# Philox offsets the ops get next to their seed (ops/triton_support.DropoutSeeds); one past 2^32 so
# the offset's high word reaches the kernels too.
OFFSET, HIGH_OFFSET = 12, 2 ** 33 + 8


def leaf(t, dtype=None):
    t = t.to(device=DEV, dtype=dtype or t.dtype)
    return t.detach().requires_grad_(True)


def grads_of(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=False)


def ref_copies(*ts):
    """fp32 leaf copies of the (already rounded) test inputs, for the reference computation."""
    return [leaf(t.detach().float()) for t in ts]


def check(name, ref_out, ref_grads, out, grads, dtype, out_dtype=None):
    """out_dtype: the output's expected dtype when it is not ``dtype`` (logits promote with an
    fp32 bias)."""
    assert out.dtype == (out_dtype or dtype), f"{name}: output dtype {out.dtype}"
    assert_close(f"{name} output", ref_out, out.float(), TOL[dtype])
    for i, (rg, g) in enumerate(zip(ref_grads, grads, strict=True)):
        assert_close(f"{name} grad {i}", rg, g.float(), GRAD_TOL[dtype])


def seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEV)


def bf16_close(name, ref32, out, torch_bf16):
    """FlashAttention's rule: the kernel's bf16 error vs fp32 is at most ~2x PyTorch's own bf16 error."""
    err, base = rel_rms(ref32, out.float()), rel_rms(ref32, torch_bf16.float())
    assert err <= 2 * base + 2e-3, f"{name}: bf16 error {err:.2e} vs PyTorch bf16 {base:.2e}"


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor", "test_aot_dispatch_dynamic"))


def assert_no_grad_direct_path(fn, args, name):
    """Eager no-grad calls skip the custom-op dispatch; they must compute exactly what the custom op
    (called with inputs that require grad) computes."""
    with torch.no_grad():
        direct = fn(*args)
    via_op = fn(*[a.detach().requires_grad_(True) for a in args])
    assert torch.equal(direct, via_op.detach()), f"{name}: direct path differs"


def assert_autocast_dtype_matches_torch(name, fn, dt):
    """Under autocast the fused op returns what the PyTorch op returns (attention in the autocast
    dtype, logits promoted to fp32 by the fp32 bias) and close to its values."""
    with torch.autocast(DEV, dtype=dt):
        want, got = fn(TORCH), fn(TRITON)
        assert got.dtype == want.dtype, f"{name}: {got.dtype} vs PyTorch's {want.dtype}"
        assert_close(f"{name} under autocast", want.float(), got.float(), 1e-2)


# the interpreter cannot run bf16
AUTOCAST_DTYPE = torch.bfloat16 if CUDA else torch.float16


def count_kernel_calls(monkeypatch, functions) -> dict:
    """Counts the calls of the Triton kernels' host functions ``functions`` ({module name in
    mldecoder_fast.kernels: [function names]}), to prove the kernels, not a fallback, ran."""
    import importlib
    # every module imported before any is patched: a module that imports a host function of
    # another by name must keep the real one (its calls are not the op's own)
    modules = {m: importlib.import_module(f"mldecoder_fast.kernels.{m}") for m in functions}
    calls = {}
    for module_name, names in functions.items():
        module = modules[module_name]
        for name in names:
            real = getattr(module, name)

            def counted(*args, _real=real, _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, name, counted)
    return calls
