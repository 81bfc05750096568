"""The head's training forward and backward (docs/design.md steps 1-7) as one autograd function with
a hand-written backward, for the CPU and for CUDA.

``HeadTrainStep`` is one sequence of steps; a ``StepKit`` (in its ``StepConfig``; the records are in
``records.py``) says how each kind of work runs, so the CPU and the launch-lean CUDA step are
the same code:

- ``gemm``: the GEMM provider of the dense products (``cpu_gemm.py``: oneDNN or MKL on the CPU,
  ``TorchGemm`` = cuBLAS on CUDA);
- ``compute``: the dtype of the products' operands and of every activation (the autocast dtype,
  else the parameters'), so that every LayerNorm, on copies of its parameters in that dtype,
  writes what the next GEMM reads and no activation is cast (on the CPU under bf16 autocast, fp32
  activations cast around each bf16 product cost 21K B=16 about 10 ms a step);
- ``attention`` (``attention.py``): ``"explicit"`` (score, softmax and value products, the attention dropout mask
  from ``dropout_masks.py``) or ``"fused"`` (one SDPA op forward and one backward: CUDA's
  memory-efficient attention, whose dropout mask is regenerated in its backward from the
  philox seed/offset it returns, where ``efficient_attention_takes`` the heads; on the CPU the
  flash kernel, without attention dropout) or
  ``"triton"`` (the triton backend's kernels, ``kernels/attention.py``: forward and two-pass
  backward, the dropout mask drawn in-kernel from a seed and Philox offset and regenerated in the
  backward);
- ``layer_norm``: ``"aten"`` (``native_layer_norm`` and its backward) or ``"triton"`` (the
  LayerNorm kernels of ``kernels/layer_norm.py``; the step's own masks have been applied to the
  LayerNorm's input already, so the kernels run without their dropout);
- ``regenerate``: the dropout masks redrawn in the backward from the generator state saved by the
  forward (``dropout_masks.RegeneratedMasks``), or stored (``StoredMasks``); ``mask_dtype``: bool,
  or the compute dtype (the CPU under bf16 autocast, where a bool operand costs a cast per use);
- ``keep_ln_outputs``: keep T1, T2, T3 for the backward (fewer launches) or recompute them there
  from what is kept anyway (less memory, the CPU's choice);
- ``in_place_outputs``: products write fp32 results and row slices of the gradients themselves
  (``out_dtype``/``out=``), no cast or copy after them, and with them go the choices that save
  launches where products can do that (W2's dropout scale folded into a copy of it, bias gradients
  summed over one shared buffer): the CUDA kit's (its tests also run it on the CPU).

The weights arrive as ``StepWeights``: copies in the compute dtype, made by the caller once per
parameter version (``MLDecoderFast`` keeps them in its caches, so an optimizer step refreshes them
once, in their own memory); the fp32 parameters are inputs only so that autograd hands the
backward's fp32 gradients to them (and to DDP/FSDP hooks). The rest, arranged for few passes and
launches:

- every bias and ReLU rides in its GEMM (``linear(..., relu=True)``); a residual and its dropout are
  one ``addcmul`` (u = t + s·x·keep); the feed-forward's dropout scale is folded into a copy of W2
  for the backward on CUDA (on the CPU the gradient is scaled in place: no copy held), and its
  mask needs no redraw there (the ReLU's dropped output is zero exactly where the gradient stops);
- K and V are one GEMM on the memory; the residual gradients of steps 5 and 6 are the addends of
  the GEMMs that make the other path's gradient (LayerNorm backward gets their sum); both row
  blocks of ``in_proj_weight``'s gradient are written into one tensor (no slice backward);
- the input gradient is written in the input's layout (a [B, C, H, W] map's gradient by one
  batched GEMM on CUDA, on the CPU by one GEMM and a copy of whole rows);
- the backward frees each activation once used, and computes the group-FC weight gradient
  ([K, D, G], the largest tensor of a step at many classes) last.

Shapes: B batch, N tokens, C input features, K queries, D embedding, H heads (d = D / H),
F feed-forward width, G classes per group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..torch_ops import group_fc_padded_bias
from ..triton_support import on_device
from .attention import attention_backward, attention_forward
from .dropout_masks import RegeneratedMasks, StoredMasks, dropout_scale, dropped
from .records import StepKit, StepParameters, StepWeights


def _residual(res, x, keep, s: float):
    """res + dropout(x) in one op."""
    return torch.add(res, x) if keep is None else torch.addcmul(res, x, keep, value=s)


def _layer_norm(kit, x, weight, bias, eps, zero):
    """(LN(x), mean, rstd). The Triton kernel normalises residual + x: x is its residual, a 0-d
    ``zero`` its other addend."""
    if kit.layer_norm == "triton":
        from ...kernels import layer_norm
        with on_device(x):
            return layer_norm.ln_forward(x, zero, None, 0, 0.0, weight, bias, eps)
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(kit, grad, x, mean, rstd, weight, bias, needs, zero):
    """(grad of x, of weight, of bias), each None where ``needs`` says so. In fp16 the weight and
    bias gradients, sums over every row of (loss-scaled) gradients, are accumulated and returned
    in fp32: written in fp16 they overflow at a GradScaler's initial 2^16 scale."""
    if grad.dtype == torch.float16 and (needs[1] or needs[2]):
        g_x = _layer_norm_backward(kit, grad, x, mean, rstd, weight, bias, (needs[0], False, False), zero)[0]
        rows = grad.reshape(-1, grad.shape[-1]).float()
        x_hat = (x.reshape(rows.shape).float() - mean.reshape(-1, 1).float()) * rstd.reshape(-1, 1).float()
        return g_x, (rows * x_hat).sum(0) if needs[1] else None, rows.sum(0) if needs[2] else None
    if kit.layer_norm == "triton":
        from ...kernels import layer_norm
        with on_device(x):
            g_x, _, g_w, g_b = layer_norm.ln_backward(grad, x, zero, None, 0, 0.0, weight, mean, rstd,
                                                      grad.dtype, needs[0])
        return g_x, g_w if needs[1] else None, g_b if needs[2] else None
    return torch.ops.aten.native_layer_norm_backward(
        grad, x, (x.shape[-1],), mean, rstd, weight, bias, list(needs))


def _queries_input(t0, keep, s, zero):
    """u1 = t0 + dropout(t0): per sample [B, K, D] with a mask, else 2 * t0 [K, D]."""
    if keep is None:
        return 2 * t0
    return torch.addcmul(t0, t0, keep, value=s)


def _token_rows(tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tokens [B, N, C] as one [B*N, C] matrix in ``dtype``: a view where the layout allows (a
    channels-last map, [B, N, C] tokens, B = 1), else one copy that also casts. On the CPU the
    [B, N, C] view of a [B, C, H, W] map is copied as whole [N] rows into [C, B*N] (several times
    cheaper than an element-wise transpose: COCO B=16 0.8 ms against 3.5) and the result is its
    transposed view."""
    B, N, C = tokens.shape
    if tokens.stride(2) == 1 and (B == 1 or tokens.stride(0) == N * tokens.stride(1)):
        return tokens.reshape(B * N, C).to(dtype)
    if tokens.device.type == "cpu" and tokens.stride(1) == 1 and tokens.stride(2) == N:
        cols = torch.empty(C, B, N, dtype=dtype, device=tokens.device)
        return cols.copy_(tokens.permute(2, 0, 1)).view(C, B * N).t()
    rows = torch.empty(B, N, C, dtype=dtype, device=tokens.device)
    return rows.copy_(tokens).view(B * N, C)


def _memory(P, rows, We, be):
    """relu(rows Weᵀ + be) [B*N, D]. Rows stored column by column (``_token_rows``' CPU copy of a
    map) are the weight operand of We rowsᵀ [D, B*N] (oneDNN reads a strided weight in place, a
    strided input only after a copy); the bias and relu then take one pass each, the first writing
    the [B*N, D] layout."""
    if rows.stride(1) == 1:
        return P.linear(rows, We, be, relu=True)
    mem_t = P.linear(We, rows, None)                                                  # [D, BN]
    mem = torch.empty(rows.shape[0], We.shape[0], dtype=mem_t.dtype, device=mem_t.device)
    return torch.add(mem_t.t(), be, out=mem).clamp_min_(0)


class _Products:
    """The step's dense products, operands and results in ``compute``; gradients of the
    parameters in ``out``."""

    def __init__(self, kit: StepKit, out: torch.dtype):
        self.kit, self.gemm, self.compute, self.out = kit, kit.gemm, kit.compute, out

    def linear(self, x, w, b, relu=False):
        return self.gemm.linear(x, w, b, relu=relu)

    def mm(self, a, b, add=None):
        """a b (+ add)."""
        return self.gemm.mm(a, b) if add is None else self.gemm.addmm(add, a, b)

    def grad_weight(self, g, x, out=None):
        """gᵀ x in the parameters' dtype (into ``out`` when given)."""
        a, b = g.t().to(self.compute), x.to(self.compute)
        if self.kit.in_place_outputs:
            kwargs = {} if self.compute == self.out else {"out_dtype": self.out}
            return torch.mm(a, b, **kwargs) if out is None else torch.mm(a, b, **kwargs, out=out)
        r = self.gemm.mm(a, b).to(self.out)
        return r if out is None else out.copy_(r)

    def grad_bias(self, g, out=None):
        """The column sums of g in the parameters' dtype. CUDA sums a low-precision g straight
        into fp32; the CPU casts all of g first for that (21K B=16, [1600, 2048] bf16: 1.27 ms
        against 0.19), so there the sum (accumulated in fp32) is rounded to g's dtype, as the
        bias gradient of a bf16 linear layer under autocast is; an fp16 sum would overflow at a
        GradScaler's scale, so fp16 is summed into fp32 everywhere."""
        if not self.kit.in_place_outputs and g.dtype not in (self.out, torch.float16):
            r = g.sum(0)
            return r.to(self.out) if out is None else out.copy_(r)
        return g.sum(0, dtype=self.out) if out is None else torch.sum(g, 0, dtype=self.out, out=out)

    def group_weight_grad(self, h, g):
        """hᵀ g per query: the group-FC weight gradient [K, D, G] (h [B, K, D], g [K, B, G]) in the
        parameters' dtype. cuBLAS computes it from compute-dtype operands and writes fp32 itself;
        elsewhere g comes in the parameters' dtype and so does the product (on the CPU a bf16
        product and its cast to fp32 took longer than the fp32 product)."""
        h = h.transpose(0, 1).transpose(1, 2)                                           # [K, D, B]
        if self.kit.in_place_outputs:
            kwargs = {} if self.compute == self.out else {"out_dtype": self.out}
            return torch.bmm(h.to(self.compute), g, **kwargs)
        return torch.bmm(h.to(self.out), g)


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (then activations must stay); True where
    this PyTorch cannot tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


class HeadTrainStep(torch.autograd.Function):
    """Inputs: ``StepConfig``, tokens [B, N, C], T0 [K, D] (the learned queries or
    relu(wordvec_proj(V))), then the head's parameters as ``StepParameters`` (read through the
    config's weights; inputs for their gradients).
    Output: logits [B, num_out] in the parameters' dtype."""

    @staticmethod
    def forward(ctx, config, tokens, t0, *params):
        with torch.autocast(tokens.device.type, enabled=False):  # casts are explicit here
            return HeadTrainStep._forward(ctx, config, tokens, t0, params)

    @staticmethod
    def _forward(ctx, config, tokens, t0, params):
        num_heads, (eps1, eps2, eps3), (p_q, p_a, p_o, p_f, p_r), num_out = (
            config.num_heads, config.eps, config.dropout, config.num_out)
        ext, kit, w = config.extension_group_fc, config.kit, config.weights
        out_dtype = params[0].dtype
        P = _Products(kit, out_dtype)
        t0a = w.t0 if w.t0 is not None else t0.to(kit.compute)
        B, N, C = tokens.shape
        K, D = t0.shape
        H = num_heads
        dev = tokens.device
        own_attn_mask = kit.attention == "explicit"   # the others draw theirs in the kernel
        sites = [(name, shape, p) for name, shape, p in (
            ("q", (B, K, D), p_q), ("a", (B, H, K, N), p_a if own_attn_mask else 0.0), ("o", (B, K, D), p_o),
            ("f", (B * K, w.W1.shape[0]), p_f), ("r", (B, K, D), p_r)) if p > 0]
        draw = (RegeneratedMasks if kit.regenerate else StoredMasks)(sites, dev, kit.mask_dtype)
        m = draw.masks
        s_q, s_a, s_o, s_f, s_r = (dropout_scale(p) for p in (p_q, p_a, p_o, p_f, p_r))

        # step 1: memory, then keys and values in one GEMM
        rows = _token_rows(tokens, kit.compute)
        mem = _memory(P, rows, w.We, w.be)                                            # [BN, D]
        kv = P.linear(mem, w.Wkv, w.bkv)                                              # [BN, 2D]
        # steps 2-3: queries, per sample with query dropout, else shared by the batch
        u1 = _queries_input(t0a, m.get("q"), s_q, w.zero)
        t1, mean1, rstd1 = _layer_norm(kit, u1, w.ln1w, w.ln1b, eps1, w.zero)
        q = P.linear(t1.view(-1, D), w.Wq, w.bq).view(t1.shape)                       # [(B,) K, D]
        # step 4: cross-attention and the output projection
        o, attn_saved = attention_forward(kit, q, kv, B, N, H, p_a, m.get("a"), s_a, w.zero)
        # step 5: residual + dropout, LN2
        u2 = _residual(t1, P.linear(o, w.Wo, w.bo).view(B, K, D), m.get("o"), s_o)
        t2, mean2, rstd2 = _layer_norm(kit, u2, w.ln2w, w.ln2b, eps2, w.zero)
        # step 6: feed-forward (relu in the GEMM, dropout in place: only f1 is kept), residual, LN3
        f1 = P.linear(t2.view(B * K, D), w.W1, w.b1, relu=True)
        f1 = dropped(f1, m.get("f"), s_f, w.zero, out=f1)
        u3 = _residual(t2, P.linear(f1, w.W2, w.b2).view(B, K, D), m.get("r"), s_r)
        h, mean3, rstd3 = _layer_norm(kit, u3, w.ln3w, w.ln3b, eps3, w.zero)
        # step 7: group FC (ZSL: one projection shared by the queries)
        if ext:
            logits = torch.ops.mldecoder_fast.group_fc(h.to(kit.compute), w.Wg, params[-1], num_out)
        else:
            logits = group_fc_padded_bias(h.to(kit.compute), w.Wg, w.bias, num_out)

        keep_ln = kit.keep_ln_outputs
        ctx.config = config
        ctx.save_for_backward(tokens, t0, *[x for x in w if x is not None])
        ctx.has_t0 = w.t0 is not None
        # Intermediates live on ctx (not save_for_backward) so that the backward can free each
        # one as soon as it has been used.
        ctx.acts = dict(rows=rows, mem=mem, kv=kv, u1=u1 if keep_ln else None, mean1=mean1, rstd1=rstd1,
                        t1=t1 if keep_ln else None, q=q, attn=attn_saved, o=o, u2=u2, mean2=mean2,
                        rstd2=rstd2, t2=t2 if keep_ln else None, f1=f1, u3=u3, mean3=mean3, rstd3=rstd3,
                        h=h if keep_ln else None)
        if kit.regenerate:
            draw.release()
        ctx.draw = draw
        ctx.scales = (s_q, s_a, s_o, s_f, s_r)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logits):
        with torch.autocast(g_logits.device.type, enabled=False):
            return HeadTrainStep._backward(ctx, g_logits)

    @staticmethod
    def _backward(ctx, g_logits):
        config = ctx.config
        num_heads, (eps1, eps2, eps3), num_out, zsl, kit = (config.num_heads, config.eps, config.num_out,
                                                           config.zsl, config.kit)
        ext, p_q, p_a = config.extension_group_fc, config.dropout.query, config.dropout.attention
        saved = ctx.saved_tensors
        tokens, t0 = saved[:2]
        w = StepWeights(*saved[2:4], None, *saved[4:]) if not ctx.has_t0 else StepWeights(*saved[2:])
        a = ctx.acts
        if a is None:
            raise RuntimeError("mldecoder_fast: this training step's graph was already used by a backward "
                               "(pass retain_graph=True to the first one to backpropagate twice)")
        keep_graph = _keep_graph()
        if keep_graph:  # retain_graph / create_graph: leave the activations for the next backward
            a = dict(a)
        m = ctx.draw.redraw()
        if not keep_graph:  # the last backward: each mask is freed once used (``m.pop``)
            ctx.draw.release()
        s_q, s_a, s_o, s_f, s_r = ctx.scales
        needs = ctx.needs_input_grad      # (config, tokens, t0, *StepParameters)
        need_tokens, need_t0, need = needs[1], needs[2], StepParameters(*needs[3:])
        B, N, C = tokens.shape
        K, D = t0.shape
        H = num_heads
        shared = p_q <= 0
        out_dtype = w.bias.dtype
        P = _Products(kit, out_dtype)
        cd = kit.compute
        pop = a.pop

        def ln_out(name, u, ln_w, ln_b, eps):   # a LayerNorm's output: kept, or recomputed
            kept = pop(name)
            return kept if kept is not None else _layer_norm(kit, u, ln_w, ln_b, eps, w.zero)[0]

        # ---- group FC: input gradient now, weight gradient at the very end -----------------------
        u3, mean3, rstd3 = pop("u3"), pop("mean3"), pop("rstd3")
        g = g_logits.contiguous() if ext else g_logits
        h = pop("h")
        g_pad = g_pad_wg = None
        if zsl:
            g_h = (g.unsqueeze(-1) * w.Wg[:, 0]).to(cd)                                  # [B, K, D]
        elif ext:
            h = (h if h is not None else _layer_norm(kit, u3, w.ln3w, w.ln3b, eps3, w.zero)[0]).to(cd)
            g_h = torch.ops.mldecoder_fast.group_fc_grad_h(g.to(out_dtype), h, w.Wg, num_out).to(cd)
        else:
            k, _, G = w.Wg.shape
            if kit.in_place_outputs and k * G != num_out:   # cast and zero tail in one op (cat into cd)
                g_full = torch.cat([g, w.zero.expand(B, k * G - num_out)], 1,
                                   out=torch.empty(B, k * G, dtype=cd, device=g.device))
            else:
                g_full = g if k * G == num_out else F.pad(g, (0, k * G - num_out))       # [B, K*G]
            g_pad = g_full.to(cd).reshape(B, k, G).transpose(0, 1)                       # [K, B, G]
            # the weight gradient's operand: compute-dtype for cuBLAS, else the parameters' dtype
            g_pad_wg = g_pad if kit.in_place_outputs else g_full.reshape(B, k, G).transpose(0, 1)
            del g_full
            if kit.in_place_outputs:   # cuBLAS writes the [B, K, D] layout itself
                g_h = torch.empty(B, K, D, dtype=cd, device=g.device)
                torch.bmm(g_pad, w.Wg.transpose(1, 2), out=g_h.transpose(0, 1))
            else:   # the CPU: a contiguous product and a copy (21K B=16: 4.8 ms, 6.3 into the view)
                g_h = torch.bmm(g_pad, w.Wg.transpose(1, 2)).transpose(0, 1).contiguous()  # [B, K, D]
        g_bg = None
        if need.bg:
            g_bg = g.sum().reshape(1) if zsl else g.sum(0)
        # ---- LN3 and the residual dropout ---------------------------------------------------------
        g_u3, g_ln3w, g_ln3b = _layer_norm_backward(kit, g_h, u3, mean3, rstd3, w.ln3w, w.ln3b,
                                                    (True, need.ln3w, need.ln3b), w.zero)
        del g_h, mean3, rstd3
        # (in_place_outputs: the gradients of b2 and b1 as one sum over one buffer holding both addends)
        ff_sum = kit.in_place_outputs and need.b2 and need.b1 and "r" in m
        width = w.W1.shape[0]
        ff_grads = torch.empty(B * K, D + width, dtype=cd, device=g.device) if ff_sum else None
        keep_r = m.pop("r", None)
        own_f2 = keep_r is not None   # g_f2 is then the dropout's output, else a view of g_u3
        g_f2 = dropped(g_u3.view(B * K, D), None if keep_r is None else keep_r.reshape(B * K, D), s_r,
                        w.zero, out=None if ff_grads is None else ff_grads[:, :D])
        del keep_r
        # ---- feed-forward -------------------------------------------------------------------------
        f1 = pop("f1")
        g_W2 = P.grad_weight(g_f2, f1) if need.W2 else None
        g_b2 = P.grad_bias(g_f2) if need.b2 and not ff_sum else None
        if not kit.in_place_outputs and s_f != 1.0:   # the CPU's W2s is W2: it scales g_f2 instead
            g_f2 = g_f2.mul_(s_f) if own_f2 else g_f2 * s_f                          # (g_u3 is read below)
        g_f1 = P.mm(g_f2, w.W2s)                                                       # W2s: dropout scale
        # (without the buffer: in place, g_f1 is used up here)
        g_a = torch.ops.aten.threshold_backward.grad_input(g_f1, f1, 0, grad_input=g_f1 if ff_grads is None
                                                           else ff_grads[:, D:])
        if ff_sum:
            sums = ff_grads.sum(0, dtype=out_dtype)
            g_b2, g_b1 = sums[:D], sums[D:]
        del g_f2, g_f1, f1, ff_grads
        m.pop("f", None)
        u2, mean2, rstd2 = pop("u2"), pop("mean2"), pop("rstd2")
        t2 = ln_out("t2", u2, w.ln2w, w.ln2b, eps2)
        g_W1 = P.grad_weight(g_a, t2.view(B * K, D)) if need.W1 else None
        del t2
        if not ff_sum:
            g_b1 = P.grad_bias(g_a) if need.b1 else None
        g_t2 = P.mm(g_a, w.W1, add=g_u3.view(B * K, D))                              # FFN + residual
        del g_a, g_u3
        # ---- LN2 and the output dropout -----------------------------------------------------------
        g_u2, g_ln2w, g_ln2b = _layer_norm_backward(kit, g_t2.view(B, K, D), u2, mean2, rstd2, w.ln2w,
                                                    w.ln2b, (True, need.ln2w, need.ln2b), w.zero)
        del g_t2, u2
        g_op = dropped(g_u2, m.pop("o", None), s_o, w.zero).reshape(B * K, D)
        o = pop("o")
        g_Wo = P.grad_weight(g_op, o) if need.Wo else None
        g_bo = P.grad_bias(g_op) if need.bo else None
        del o
        g_o = P.mm(g_op, w.Wo)                                                         # [BK, D]
        del g_op
        # ---- attention ------------------------------------------------------------------------------
        # (in_place_outputs: the gradients of b_k, b_v and b_e as one sum over one buffer holding g_kv
        # and the input projection's pre-activation gradient)
        proj_sum = kit.in_place_outputs and kit.attention != "triton" and need.bin and need.be
        proj_grads = torch.empty(B * N, 3 * D, dtype=cd, device=g.device) if proj_sum else None
        kv, q = pop("kv"), pop("q")
        g_q, g_kv = attention_backward(kit, g_o, q, kv, pop("attn"), B, N, H, p_a, m.pop("a", None),
                                        s_a, w.zero, None if proj_grads is None else proj_grads[:, :2 * D])
        del g_o, q, kv
        mem = pop("mem")
        g_Win = torch.empty(3 * D, D, dtype=out_dtype, device=g.device) if need.Win else None
        biases = torch.empty(4 * D, dtype=out_dtype, device=g.device) if need.bin else None  # b_in, b_e
        g_bin = None if biases is None else biases[:3 * D]
        if need.Win:
            P.grad_weight(g_kv, mem, out=g_Win[D:])
        if need.bin and not proj_sum:
            P.grad_bias(g_kv, out=g_bin[D:])
        g_mem = P.mm(g_kv, w.Wkv)                                                      # [BN, D]
        del g_kv
        g_pre = torch.ops.aten.threshold_backward.grad_input(g_mem, mem, 0, grad_input=g_mem if proj_grads is None
                                                             else proj_grads[:, 2 * D:])
        del g_mem, mem
        if proj_sum:
            torch.sum(proj_grads, 0, dtype=out_dtype, out=biases[D:])
        del proj_grads
        # ---- queries: q projection, LN1, the query dropout ----------------------------------------
        mean1, rstd1 = pop("mean1"), pop("rstd1")
        mq = m.pop("q", None)
        u1 = pop("u1")
        if u1 is None:
            u1 = _queries_input(w.t0 if w.t0 is not None else t0.to(cd), mq, s_q, w.zero)
        t1 = ln_out("t1", u1, w.ln1w, w.ln1b, eps1)
        g_q2 = g_q.reshape(-1, D)
        if need.Win:
            P.grad_weight(g_q2, t1.reshape(-1, D), out=g_Win[:D])
        del t1
        if need.bin:
            P.grad_bias(g_q2, out=g_bin[:D])
        g_t1 = P.mm(g_q2, w.Wq, add=(g_u2.sum(0) if shared else g_u2).reshape(-1, D))  # q + residual
        del g_q, g_q2, g_u2
        g_t0 = g_ln1w = g_ln1b = None
        if need_t0 or need.ln1w or need.ln1b:
            g_u1, g_ln1w, g_ln1b = _layer_norm_backward(kit, g_t1.view(u1.shape), u1, mean1, rstd1, w.ln1w,
                                                        w.ln1b, (need_t0, need.ln1w, need.ln1b), w.zero)
            if need_t0:
                g_t0 = (2 * g_u1 if shared else torch.addcmul(g_u1, g_u1, mq, value=s_q).sum(0)).to(t0.dtype)
            del g_u1
        del g_t1, u1
        # ---- input projection -----------------------------------------------------------------------
        rows = pop("rows")
        g_We = P.grad_weight(g_pre, rows) if need.We else None
        del rows
        g_be = (biases[3 * D:] if proj_sum else P.grad_bias(g_pre)) if need.be else None
        g_tokens = _input_grad(P, g_pre, w.We, tokens) if need_tokens else None
        del g_pre
        # ---- the group-FC weight gradient, last ---------------------------------------------------
        g_Wg = None
        if need.Wg:
            if h is None:
                h = _layer_norm(kit, u3, w.ln3w, w.ln3b, eps3, w.zero)[0]                  # recomputed
            del u3
            if ext:
                g_Wg = torch.ops.mldecoder_fast.group_fc_grad_weight(g.to(out_dtype), h.to(cd), w.Wg, num_out)
                g_Wg = g_Wg.to(out_dtype)
            elif zsl:
                g_Wg = P.grad_weight(h.reshape(B * K, D), g.reshape(B * K, 1))             # [D, 1]
            else:
                g_Wg = P.group_weight_grad(h, g_pad_wg)                                    # [K, D, G]
        g_ln = _ln_grads_in(out_dtype, (g_ln1w, g_ln1b, g_ln2w, g_ln2b, g_ln3w, g_ln3b))
        if not keep_graph:
            ctx.acts = None
        return (None, g_tokens, g_t0, *StepParameters(
            We=g_We, be=g_be, ln1w=g_ln[0], ln1b=g_ln[1], Win=g_Win, bin=g_bin, Wo=g_Wo, bo=g_bo,
            ln2w=g_ln[2], ln2b=g_ln[3], W1=g_W1, b1=g_b1, W2=g_W2, b2=g_b2, ln3w=g_ln[4], ln3b=g_ln[5],
            Wg=g_Wg, bg=g_bg))


def _input_grad(P: _Products, g_pre, We, tokens):
    """The gradient of tokens [B, N, C] in their own layout. For the [B, N, C] view of a
    [B, C, H, W] map: on CUDA one batched GEMM writes it as [B, C, N] (Weᵀ g_preᵀ per sample); on
    the CPU one GEMM through the fast provider makes it as [C, B*N] (Weᵀ g_preᵀ over all rows) and
    a copy moves its [N] rows into [B, C, N]. A batched product with a broadcast weight runs at
    MKL's batched rate (21K B=16: 22 ms); the GEMM over [B*N, C] rows needs an element-wise
    transposing copy, which the row copy replaces (COCO B=16: 28 -> 24 ms, 21K: 7.2 either way)."""
    B, N, C = tokens.shape
    if B > 1 and tokens.stride(1) == 1 and tokens.stride(2) == N:
        if g_pre.device.type != "cpu":
            g = torch.bmm(We.t().expand(B, C, We.shape[0]), g_pre.view(B, N, -1).transpose(1, 2).to(P.compute))
            return g.to(tokens.dtype).transpose(1, 2)
        cols = P.linear(We.t().contiguous(), g_pre.to(P.compute), None).view(C, B, N)
        g = torch.empty(B, C, N, dtype=tokens.dtype, device=tokens.device)
        return g.copy_(cols.transpose(0, 1)).transpose(1, 2)
    return P.mm(g_pre, We).view(B, N, C).to(tokens.dtype)


def _ln_grads_in(dtype, grads):
    """The LayerNorm parameters' gradients in the parameters' dtype: as they are, or (when the
    copies had another dtype) cast together by one ``_foreach_copy_`` into the rows of one
    tensor (one multi-tensor kernel on CUDA)."""
    present = [i for i, x in enumerate(grads) if x is not None]
    if not present or grads[present[0]].dtype == dtype:
        return grads
    first = grads[present[0]]
    cast = torch.empty(len(present), first.shape[0], dtype=dtype, device=first.device)
    rows = list(cast.unbind(0))
    torch._foreach_copy_(rows, [grads[i] for i in present])
    out = [None] * len(grads)
    for j, i in enumerate(present):
        out[i] = rows[j]
    return out
