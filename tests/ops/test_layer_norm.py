"""residual_dropout_layer_norm: LayerNorm(residual + dropout(x)), the Triton kernel
(mldecoder_fast/kernels/layer_norm.py, ``mldecoder_fast::triton_layer_norm[_backward]``) against
the torch path (TorchOps), forward and backward; the module-level checks are in tests/test_module.py
and tests/test_dropout.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from triton_helpers import (
    DEV,
    HIGH_OFFSET,
    OFFSET,
    TORCH,
    TRITON,
    TRITON_MARKS,
    assert_no_grad_direct_path,
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


def _ln_layout(layout, b, k, d):
    """(leaf tensors, function leaves -> (residual, x)) for the residual/x layouts the head uses."""
    if layout == "shared_residual":      # LN2 in eval: T1 [K, D] against O' [B, K, D]
        return [torch.randn(k, d), torch.randn(b, k, d)], lambda r, x: (r, x)
    if layout == "transposed_x":         # x a non-contiguous view
        return [torch.randn(b, k, d), torch.randn(k, b, d)], lambda r, x: (r, x.transpose(0, 1))
    # LN1 in training: T0 expanded (stride 0 on the batch) as both residual and x
    return [torch.randn(k, d)], lambda t0: (t0.unsqueeze(0).expand(b, k, d),) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["shared_residual", "transposed_x", "expanded_both"])
def test_layer_norm(dtype, layout, poison_empty):
    b, k, d = 3, 5, 40
    acts, arrange = _ln_layout(layout, b, k, d)
    acts = [leaf(t, dtype) for t in acts]
    w, bias = leaf(torch.randn(d)), leaf(torch.randn(d))
    out = TRITON.residual_dropout_layer_norm(*arrange(*acts), 0.0, w, bias, 1e-5)
    g = torch.randn(out.shape, device=DEV, dtype=out.dtype)
    grads = grads_of(out, acts + [w, bias], g)
    ref_inputs = ref_copies(*acts, w, bias)
    ref = TORCH.residual_dropout_layer_norm(*arrange(*ref_inputs[:-2]), 0.0, *ref_inputs[-2:], 1e-5)
    check(f"layer_norm[{layout}]", ref, grads_of(ref, ref_inputs, g.float()), out, grads, dtype)


def test_layer_norm_frozen_inputs():
    """LN1 over the frozen learned queries: only the affine gradients are computed."""
    b, k, d = 3, 4, 24
    t0 = torch.randn(k, d, device=DEV)
    w, bias = leaf(torch.randn(d)), leaf(torch.randn(d))
    t0e = t0.unsqueeze(0).expand(b, k, d)
    out = TRITON.residual_dropout_layer_norm(t0e, t0e, 0.0, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = grads_of(out, [w, bias], g)
    wr, br = ref_copies(w, bias)
    ref = TORCH.residual_dropout_layer_norm(t0e, t0e, 0.0, wr, br, 1e-5)
    for name, a, e in zip(("dw", "db"), grads, grads_of(ref, [wr, br], g), strict=True):
        assert_close(f"frozen LN {name}", e, a, 1e-5)


def test_layer_norm_dropout_matches_mask(poison_empty):
    """With a given seed the kernel drops exactly the elements of the mask it documents."""
    from mldecoder_fast.kernels._common import dropout_mask
    b, k, d, p = 4, 3, 24, 0.3
    r, x, w, bias = leaf(torch.randn(b, k, d)), leaf(torch.randn(b, k, d)), leaf(torch.randn(d)), leaf(torch.randn(d))
    s = seed(1234)
    out, _mean, _rstd = R.triton_layer_norm(r, x, s, HIGH_OFFSET, p, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = grads_of(out, [r, x, w, bias], g)
    keep = dropout_mask(s, b * k, d, p, HIGH_OFFSET).view(b, k, d)
    assert 0.5 < keep.float().mean() < 0.9
    rr, xr, wr, br = ref_copies(r, x, w, bias)
    ref = F.layer_norm(rr + xr * keep / (1 - p), (d,), wr, br, 1e-5)
    check("layer_norm dropout", ref, grads_of(ref, [rr, xr, wr, br], g), out, grads, torch.float32)


def test_no_grad_direct_path_matches_custom_op():
    b, k, d = 2, 5, 16
    t1, o = torch.randn(k, d, device=DEV), torch.randn(b, k, d, device=DEV)
    lw, lb = torch.randn(d, device=DEV), torch.randn(d, device=DEV)
    assert_no_grad_direct_path(lambda *a: TRITON.residual_dropout_layer_norm(a[0], a[1], 0.0, a[2], a[3], 1e-5),
                               [t1, o, lw, lb], "layer_norm")


def test_fp64_falls_back_to_torch():
    """fp64 takes the PyTorch path and still gives the right answer."""
    r, x = torch.randn(2, 3, 8, dtype=torch.float64, device=DEV), torch.randn(2, 3, 8, dtype=torch.float64, device=DEV)
    w, bias = torch.randn(8, dtype=torch.float64, device=DEV), torch.randn(8, dtype=torch.float64, device=DEV)
    assert_close("fp64 LN", TORCH.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5),
                 TRITON.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5), 1e-12)


def test_opcheck():
    b, k, d = 2, 3, 20
    args = (leaf(torch.randn(k, d)), leaf(torch.randn(b, k, d)), seed(3), OFFSET, 0.1,
            leaf(torch.randn(d)), leaf(torch.randn(d)), 1e-5)
    opcheck(R.triton_layer_norm, args)
    y, mean, rstd = R.triton_layer_norm(*[a.detach() if torch.is_tensor(a) else a for a in args])
    for input_grads in (True, False):
        opcheck(R.triton_layer_norm_backward,
                (torch.randn_like(y), args[0].detach(), args[1].detach(), args[2], OFFSET, 0.1,
                 args[5].detach(), mean, rstd, input_grads))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_norm_full_size_cuda(dtype):
    b, k, d = 256, 100, 768
    r, x = leaf(torch.randn(b, k, d), dtype), leaf(torch.randn(b, k, d), dtype)
    w, bias = leaf(1 + 0.1 * torch.randn(d)), leaf(0.1 * torch.randn(d))
    out = TRITON.residual_dropout_layer_norm(r, x, 0.0, w, bias, 1e-5)
    g = torch.randn_like(out)
    grads = grads_of(out, [r, x, w, bias], g)
    ref_inputs = ref_copies(r, x, w, bias)
    ref = TORCH.residual_dropout_layer_norm(*ref_inputs[:2], 0.0, *ref_inputs[2:], 1e-5)
    ref_grads = grads_of(ref, ref_inputs, g.float())
    assert_close("LN full", ref, out.float(), 1e-2)
    for rg, gg in zip(ref_grads, grads, strict=True):
        assert_close("LN full grad", rg, gg.float(), 2e-2)

