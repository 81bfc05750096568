"""The CPU eval forward: the head's computation (docs/design.md steps 1-7) in 15 dispatched ops,
every product one oneDNN call on weights packed once per version.

At batch 1 a CPU forward is bound by per-op overhead (dispatch, OpenMP fork/join, the pass over an
intermediate) and by reading the weights, not by FLOPs; this path keeps both down for eval without
autograd, backend torch, fp32 or bf16 (parameters, or bf16 autocast over fp32 parameters) where
oneDNN computes that dtype exactly and the CPU GEMM choice allows it (``ops/cpu_gemm.py``):

- the weights are the launch-lean forward's (``paths/lean_eval.py``: the key projection folded
  into the queries, the value and output biases and T1 folded into one addend r2, linear2's bias
  moved into LN2's), in the compute dtype, and the dense ones packed into oneDNN's blocked layout,
  all once per weight version (kept in the head's caches, one cache check per call);
- one copy reads the input in any layout into [B*N, C] rows of the compute dtype (none where it is
  such rows already), but for a [B, C, H, W] map with B > 1 in the compute dtype, whose B strided
  matrices the GEMM provider reads in place (``ops/cpu_gemm.py``: the library measured faster);
- the scores are one product of the folded queries against the memory, [H*K, B*N], so that the
  softmax runs over contiguous rows;
- additions ride in the products: biases, the output projection's addend r2 (batch 1), linear2's
  residual T2; relu too where a NaN it would hide (oneDNN's relu maps NaN to 0) reaches the output
  another way: linear1's, whose input row T2 is added back after it, with LN2's bias made NaN
  where linear1's weight or bias holds a non-finite value (as the reference's logits are then);
  the memory's relu is its own in-place op for that reason;
- the group FC reads its weight as [K, G, D] rows, in the one of two product forms measured faster
  for the shape, once per process (``group_fc``).

Dispatched ops at batch 1 (``tests/test_cpu_eval.py`` budgets them):
  1 the input, copied into rows of the compute dtype      2 input projection + bias
  3 relu, in place                                         4 values v = M W_vᵀ
  5 scores qk Mᵀ                                           6 softmax over the tokens
  7 attention output (batched over heads)                  8 its copy into [K, D] rows
  9 output projection + r2                                 10 LN2
  11 linear1 + bias + relu                                 12 linear2 + T2
  13 LN3                                                   14 group FC
  15 bias add into the [B, classes] logits
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..head.config import NUM_HEADS
from ..head.inputs import tokens_from_input
from ..ops import cpu_gemm
from ..ops.torch_ops import group_fc_padded_bias, logits_with_bias
from . import lean_eval

_linear = torch.ops.mkldnn._linear_pointwise.default
_linear_add = torch.ops.mkldnn._linear_pointwise.binary


class CpuEvalWeights(NamedTuple):
    """What the CPU eval forward reads: the launch-lean forward's folded weights, with the dense
    products' weights packed into oneDNN's blocked layout."""
    lean: lean_eval.LeanWeights   # folded, in the compute dtype (the rest read from here)
    w_e: torch.Tensor      # [D, C] input projection, packed
    w_v: torch.Tensor      # [D, D] value projection, packed
    w_o: torch.Tensor      # [D, D] output projection, packed
    w1: torch.Tensor       # [F, D] linear1, packed
    w2: torch.Tensor       # [D, F] linear2, packed
    ln2_b: torch.Tensor    # [D] lean.ln2_b; NaN where W1 or b1 is not finite
    p: torch.Tensor        # [K, G, D] group-FC weight as rows; ZSL: [D, 1]


class CpuEval:
    """The path object (``paths/__init__.py``)."""
    name = "cpu eval"

    def applies(self, head, x, facts) -> bool:
        return (facts.backend == "torch" and facts.device == "cpu" and not facts.training
                and not facts.needs_grad and not facts.empty and not facts.traced and facts.onednn
                and facts.compute in (torch.float32, torch.bfloat16)
                and facts.param_dtype in (torch.float32, torch.bfloat16))

    def derive(self, head, x, facts) -> CpuEvalWeights:
        dtypes = (facts.autocast, torch.float32) if facts.autocast else (facts.param_dtype,) * 2
        return head.caches.get_by_versions(("cpu_eval",) + dtypes, lambda: lean_eval.sources(head),
                                           lambda: derive(head, *dtypes), same=(head.decoder.query_embed,))

    def forward(self, head, x, derived: CpuEvalWeights) -> torch.Tensor:
        layer = head.decoder.layers[0]
        num_out = derived.lean.r2.shape[0] if head.config.zsl else head.config.num_classes
        try:
            return forward(x, derived, num_out, layer.norm2.eps, layer.norm3.eps)
        except RuntimeError as exc:   # (the input was checked: a oneDNN primitive failed)
            cpu_gemm.onednn_failed(exc)
        # oneDNN is off from now on: the facts choose another path
        from . import route
        facts = route.facts_of(head, x)
        path = route.choose(head, x, facts)
        return path.forward(head, x, path.derive(head, x, facts))


def derive(head, dtype: torch.dtype, out_dtype: torch.dtype) -> CpuEvalWeights:
    """``CpuEvalWeights`` for ``head`` in compute dtype ``dtype``, the logits in ``out_dtype``."""
    w = lean_eval.derive(head, dtype, out_dtype)
    layer = head.decoder.layers[0]
    with torch.no_grad():
        finite = torch.stack([layer.linear1.weight.isfinite().all(), layer.linear1.bias.isfinite().all()]).all()
        ln2_b = torch.where(finite, w.ln2_b, torch.full_like(w.ln2_b, float("nan")))
        p = w.p if head.config.zsl else w.p.transpose(1, 2).contiguous()
        return CpuEvalWeights(lean=w, w_e=_pack(w.w_e), w_v=_pack(w.w_v), w_o=_pack(w.w_o), w1=_pack(w.w1),
                              w2=_pack(w.w2), ln2_b=ln2_b, p=p)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's blocked layout; the dense weight if packing failed (which turned oneDNN
    off with a warning: the forward's first product fails too and it reruns on another path)."""
    packed = cpu_gemm.ONEDNN.pack(weight)
    return weight if packed is None else packed


def forward(x: torch.Tensor, w: CpuEvalWeights, num_out: int, eps2: float, eps3: float) -> torch.Tensor:
    """Logits [B, num_out] of input x ([B, C, H, W] or [B, N, C]) from derived weights ``w``."""
    lean = w.lean
    dtype = lean.b_e.dtype
    with torch.autocast("cpu", enabled=False):   # every dtype below is chosen here
        tokens = tokens_from_input(x)                                              # [B, N, C] view
        b, n, c = tokens.shape
        k, d_model = lean.r2.shape
        hd = d_model // NUM_HEADS
        if b > 1 and tokens.dtype == dtype and not tokens.is_contiguous():
            # B strided [N, C] matrices (a [B, C, H, W] map) in the compute dtype: read in place by
            # whichever library the GEMM provider measured faster for them (a copy into rows cost
            # 9 of 98 ms, COCO fp32 B = 16; where a cast is due anyway, the copy is that cast);
            # relu after the product (NaN kept)
            gemm = cpu_gemm.provider(dtype, x.device)
            memory = gemm.linear(tokens, lean.w_e, lean.b_e, w.w_e, relu=True).view(b * n, d_model)
        else:
            rows = tokens.view(b * n, c) if tokens.dtype == dtype and tokens.is_contiguous() else \
                torch.empty((b, n, c), dtype=dtype).copy_(tokens).view(b * n, c)
            memory = _linear(rows, w.w_e, lean.b_e, "none", [], "").relu_()             # M [B*N, D]
        v = _linear(memory, w.w_v, None, "none", [], "")                            # [B*N, D]
        scores = _linear(lean.qk, memory, None, "none", [], "")                        # [H*K, B*N]
        attn = torch.softmax(scores.view(NUM_HEADS, k, b, n), dim=-1)
        o = torch.matmul(attn.permute(2, 0, 1, 3), v.view(b, n, NUM_HEADS, hd).transpose(1, 2))  # [B, H, K, d]
        o = o.transpose(1, 2).reshape(b * k, d_model)
        if b == 1:
            x2 = _linear_add(o, lean.r2, w.w_o, None, "add")                          # T1 + O' [K, D]
        else:
            x2 = _linear(o, w.w_o, None, "none", [], "").view(b, k, d_model).add_(lean.r2).view(b * k, d_model)
        t2 = F.layer_norm(x2, (d_model,), lean.ln2_w, w.ln2_b, eps2)                  # T2 + b2
        hidden = _linear(t2, w.w1, lean.b1, "relu", [], "")                            # relu(W1 T2 + b1)
        x3 = _linear_add(hidden, t2, w.w2, None, "add")                             # T2 + W2 h + b2
        t3 = F.layer_norm(x3, (d_model,), lean.ln3_w, lean.ln3_b, eps3).view(b, k, d_model)
        if w.p.dim() == 2:   # ZSL
            return group_fc_padded_bias(t3, w.p, lean.bias, num_out)
        return group_fc(t3, w.p, lean.bias, num_out)


def group_fc(h: torch.Tensor, weight_rows: torch.Tensor, bias: torch.Tensor, num_classes: int) -> torch.Tensor:
    """docs/design.md step 7 from the weight as rows [K, G, D]: logits [B, num_classes] of
    h [B, K, D], the bias [K, G] added while writing them in class order (in the bias's dtype).

    Two product forms read that layout without a copy, the weight as the left operand
    ([K, G, D] x [K, D, B], batched matrix-vector products at B = 1) or as the right one
    ([K, B, D] x [K, D, G]); which is faster depends on the dtype, B and G (on an Intel Xeon, 2
    threads: rows 1.7x faster at B = 1 in bf16 for 219 classes per group, 2.3x slower in fp32), so
    the first call of each shape times both and keeps the faster (``_FORMS``)."""
    b, k, d_model = h.shape
    g = weight_rows.shape[1]
    key = (h.dtype, b, k, g, d_model)
    form = _FORMS.get(key)
    if form is None:
        seconds = cpu_gemm.time_candidates({name: (lambda f=f: f(h, weight_rows)) for name, f in _PRODUCTS.items()})
        form = _FORMS[key] = min(seconds, key=seconds.get)
    return logits_with_bias(_PRODUCTS[form](h, weight_rows), bias, num_classes)


_PRODUCTS = {
    "weight left": lambda h, rows: torch.bmm(rows, h.permute(1, 2, 0)).permute(2, 0, 1),
    "weight right": lambda h, rows: torch.bmm(h.transpose(0, 1), rows.transpose(1, 2)).transpose(0, 1),
}
_FORMS: dict = {}   # (dtype, B, K, G, D) -> the faster of _PRODUCTS, measured in this process


CPU_EVAL = CpuEval()
