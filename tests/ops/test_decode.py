"""decode: LayerNorm-3 of the residual, then group_fc; the Triton kernel
(mldecoder_fast/kernels/group_fc_decode.py, ``mldecoder_fast::triton_decode[_backward]``) against
the torch path (TorchOps), forward and backward. The group FC alone: tests/ops/test_group_fc.py;
the module-level checks: tests/test_triton_module.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from triton_helpers import (
    AUTOCAST_DTYPE,
    DEV,
    HIGH_OFFSET,
    OFFSET,
    TORCH,
    TRITON,
    TRITON_MARKS,
    assert_autocast_dtype_matches_torch,
    assert_no_grad_direct_path,
    bf16_close,
    check,
    grads_of,
    leaf,
    needs_cuda,
    opcheck,
    ref_copies,
    seed,
)

from mldecoder_fast.ops import triton_registrations as R

pytestmark = TRITON_MARKS

# (B, K, D, G, classes): G = 7 with a padded tail of 2; G = 1 (K = classes, as COCO); G = 35 spans
# three 16-wide tiles; B = 19 spans two batch tiles. (tests/ops/test_group_fc.py uses the first two.)
GFC_SHAPES = [(19, 5, 40, 7, 33), (3, 9, 24, 1, 9), (2, 3, 20, 35, 101)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", GFC_SHAPES)
def test_decode(dtype, shape, poison_empty):
    b, k, d, gs, c = shape
    r, x = leaf(torch.randn(b, k, d), dtype), leaf(torch.randn(b, k, d), dtype)
    lw, lb = leaf(torch.randn(d)), leaf(torch.randn(d))
    w, bias = leaf(torch.randn(k, d, gs) / d ** 0.5), leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = grads_of(out, inputs, g)
    ref_inputs = ref_copies(*inputs)
    ref = TORCH.decode(ref_inputs[0], ref_inputs[1], 0.0, *ref_inputs[2:4], 1e-5, *ref_inputs[4:], c)
    check(f"decode{shape}", ref, grads_of(ref, ref_inputs, g.float()), out, grads, dtype,
          out_dtype=torch.float32)


def test_decode_dropout_matches_mask(poison_empty):
    from mldecoder_fast.kernels._common import dropout_mask
    b, k, d, gs, c, p = 5, 4, 24, 3, 11, 0.3
    r, x = leaf(torch.randn(b, k, d)), leaf(torch.randn(b, k, d))
    lw, lb = leaf(torch.randn(d)), leaf(torch.randn(d))
    w, bias = leaf(torch.randn(k, d, gs) / d ** 0.5), leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    s = seed(5)
    out, _m, _s = R.triton_decode(r, x, s, HIGH_OFFSET, p, lw, lb, 1e-5, w, bias, c,
                                  torch.float32)
    g = torch.randn_like(out)
    grads = grads_of(out, inputs, g)
    keep = dropout_mask(s, b * k, d, p, HIGH_OFFSET).view(b, k, d)
    rr, xr, lwr, lbr, wr, br = ref_inputs = ref_copies(*inputs)
    hn = F.layer_norm(rr + xr * keep / (1 - p), (d,), lwr, lbr, 1e-5)
    ref = TORCH.group_fc(hn, wr, br, c)
    check("decode dropout", ref, grads_of(ref, ref_inputs, g), out, grads, torch.float32)


def test_no_grad_direct_path_matches_custom_op():
    b, k, d, gs, c = 2, 5, 16, 3, 14
    o = torch.randn(b, k, d, device=DEV)
    lw, lb = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV), torch.randn(c, device=DEV)
    assert_no_grad_direct_path(lambda o, lw, lb, w, bias: TRITON.decode(o, o, 0.0, lw, lb, 1e-5, w, bias, c),
                               [o, lw, lb, w, bias], "decode")


def test_autocast_dtype_matches_torch():
    b, k, d, gs, c = 2, 5, 16, 3, 14
    r, x = torch.randn(b, k, d, device=DEV), torch.randn(b, k, d, device=DEV)
    lw, lb = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    w, bias = torch.randn(k, d, gs, device=DEV) / 4, torch.randn(c, device=DEV)
    assert_autocast_dtype_matches_torch(
        "decode", lambda ops: ops.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c), AUTOCAST_DTYPE)


def test_zsl_decode_falls_back():
    b, k, d = 2, 6, 16
    r, x, lw, lb = torch.randn(b, k, d), torch.randn(b, k, d), torch.randn(d), torch.randn(d)
    w, bias = torch.randn(d, 1), torch.randn(1)
    r, x, lw, lb, w, bias = (t.to(DEV) for t in (r, x, lw, lb, w, bias))
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, k)
    assert_close("zsl decode", TORCH.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, k), out, 1e-5)


def test_opcheck_decode():
    b, k, d, gs, c = 3, 4, 20, 3, 10
    w, bias = leaf(torch.randn(k, d, gs)), leaf(torch.randn(c))
    r, x, lw, lb = leaf(torch.randn(b, k, d)), leaf(torch.randn(b, k, d)), leaf(torch.randn(d)), leaf(torch.randn(d))
    s = seed(4)
    opcheck(R.triton_decode, (r, x, s, OFFSET, 0.1, lw, lb, 1e-5, w, bias, c, torch.float32))
    _out, mean, rstd = R.triton_decode(r.detach(), x.detach(), s, OFFSET, 0.1, lw.detach(), lb.detach(),
                                       1e-5, w.detach(), bias.detach(), c, torch.float32)
    opcheck(R.triton_decode_backward, (torch.randn(b, c, device=DEV), r.detach(), x.detach(), s,
                                       OFFSET, 0.1, lw.detach(), lb.detach(), mean, rstd, w.detach(),
                                       torch.float32))


@needs_cuda
@pytest.mark.parametrize("dtype,b,k,gs,c", [
    (torch.bfloat16, 64, 100, 219, 21843), (torch.bfloat16, 32, 80, 1, 80),
    (torch.bfloat16, 16, 200, 49, 9605), (torch.float16, 64, 100, 219, 21843)])
def test_decode_full_size_cuda(dtype, b, k, gs, c):
    d = 768
    r, x = leaf(torch.randn(b, k, d), dtype), leaf(torch.randn(b, k, d), dtype)
    lw, lb = leaf(1 + 0.1 * torch.randn(d)), leaf(0.1 * torch.randn(d))
    w, bias = leaf(torch.randn(k, d, gs) / d ** 0.5), leaf(torch.randn(c))
    inputs = [r, x, lw, lb, w, bias]
    out = TRITON.decode(r, x, 0.0, lw, lb, 1e-5, w, bias, c)
    g = torch.randn_like(out)
    grads = grads_of(out, inputs, g)
    ref_inputs = ref_copies(*inputs)
    ref = TORCH.decode(ref_inputs[0], ref_inputs[1], 0.0, *ref_inputs[2:4], 1e-5, *ref_inputs[4:], c)
    ref_grads = grads_of(ref, ref_inputs, g.float())
    t_inputs = [leaf(t.detach()) for t in inputs]
    with torch.autocast("cuda", dtype=dtype):  # PyTorch's own mixed-precision version
        tout = TORCH.decode(t_inputs[0], t_inputs[1], 0.0, *t_inputs[2:4], 1e-5, *t_inputs[4:], c)
    tgrads = grads_of(tout, t_inputs, g.to(tout.dtype))
    bf16_close(f"decode {dtype}", ref, out, tout)
    for i, (rg, gg, tg) in enumerate(zip(ref_grads, grads, tgrads, strict=True)):
        bf16_close(f"decode {dtype} grad {i}", rg, gg, tg)
