"""The head's training forward and backward as one autograd function with a hand-written backward.

Used by the ``torch`` and ``cpp`` backends for training steps on the CPU (fp32/fp64, and fp32
parameters under bf16 autocast). Every dense product goes through a GEMM provider passed in
``cfg`` (``cpu_gemm.py``: oneDNN or MKL on the CPU; the same function takes other providers), with
operands in the compute dtype (the autocast dtype, else the parameters') while activations,
elementwise steps, the attention's small batched products and the gradients stay in the
parameters' dtype. The rest is plain PyTorch, arranged so that a training step keeps little
memory and makes few passes:

- dropout masks are ``bool`` (a quarter of the float masks ``F.dropout`` keeps on the CPU), applied
  with ``masked_fill_``, and come from one 64-bit random draw per two elements (``random_`` on int64 words compared as two
  int32 lanes against ``p * 2**32``: the drop probability is ``p`` rounded to a multiple of 2**-32),
  about 4x cheaper than ``bernoulli_``;
- ReLU and its dropout keep only their output (``f1 > 0`` is exactly where the gradient passes);
- LayerNorm outputs, the queries' residual input and the dropped attention weights are
  recomputed in the backward from what must be kept anyway (cheap elementwise passes) instead of
  being stored;
- the backward frees each activation as soon as it has served, and computes the group-FC weight
  gradient ([K, D, G], by far the largest tensor of a step at many classes) last, once the
  activations are gone: peak memory is about the parameter gradients plus the activations,
  not their sum with a full set of intermediates.

Shapes: B batch, N tokens, C input features, K queries, D embedding, H heads (d = D / H),
F feed-forward width, G classes per group.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LANES = 2 ** 32


def drop_mask(shape, p: float, device) -> torch.Tensor:
    """A bool mask of the dropped elements, P(True) = p (p rounded to a multiple of 2**-32), from
    the default generator of ``device`` (so ``torch.manual_seed`` makes it reproducible)."""
    n = math.prod(shape)
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    threshold = -2 ** 31 + round(p * _LANES)
    return (words.view(torch.int32)[:n] < threshold).view(shape)


def _scale(p: float) -> float:
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _drop_(x: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """dropout(x) in place with the drop ``mask`` and keep scale (mask None: dropout off)."""
    if mask is not None:
        x.masked_fill_(mask, 0).mul_(scale)
    return x


def _drop(x: torch.Tensor, mask, scale: float) -> torch.Tensor:
    return x if mask is None else x.masked_fill(mask, 0).mul_(scale)


def _layer_norm(x, weight, bias, eps):
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(grad, x, mean, rstd, weight, bias, needs):
    return torch.ops.aten.native_layer_norm_backward(
        grad.contiguous(), x, (x.shape[-1],), mean, rstd, weight, bias, list(needs))


def _queries_input(t0, m1, s1):
    """u1 = t0 + dropout(t0): per sample [B, K, D] with a drop mask, else 2 * t0 [K, D]."""
    if m1 is None:
        return 2 * t0
    return torch.where(m1, t0, t0 * (1.0 + s1))


class _Products:
    """The step's dense products through ``gemm``: operands cast to ``compute``, results in ``acc``
    (both casts are no-ops when the two dtypes agree)."""

    def __init__(self, gemm, compute: torch.dtype, acc: torch.dtype):
        self.gemm, self.compute, self.acc = gemm, compute, acc

    def linear(self, x, w, b):
        """x w^T + b (w already in the compute dtype)."""
        return self.gemm.linear(x.to(self.compute), w, b.to(self.compute)).to(self.acc)

    def mm(self, a, b):
        return self.gemm.mm(a.to(self.compute), b.to(self.compute)).to(self.acc)

    def bmm(self, a, b):
        return self.gemm.bmm(a.to(self.compute), b.to(self.compute)).to(self.acc)


def _keep_graph() -> bool:
    """Whether the running backward retains the graph (then activations must stay); True where
    this PyTorch cannot tell."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


class HeadTrainStep(torch.autograd.Function):
    """Inputs: ``cfg`` (num_heads, (eps1, eps2, eps3), (p_query, p_attn, p_out, p_ff, p_res),
    num_out, zsl, ext: the compiled extension's group-FC ops instead of bmm, gemm: the GEMM provider,
    compute: the products' operand dtype), tokens [B, N, C], T0 [K, D] (the learned queries or
    relu(wordvec_proj(V))), then the head's parameters in the order of
    ``MLDecoderFast._fused_parameters``. Output: logits [B, num_out] in the parameters' dtype."""

    @staticmethod
    def forward(ctx, cfg, tokens, t0, We, be, ln1w, ln1b, Win, bin_, Wo, bo, ln2w, ln2b,
                W1, b1, W2, b2, ln3w, ln3b, Wg, bg):
        with torch.autocast(tokens.device.type, enabled=False):  # casts are explicit here
            return HeadTrainStep._forward(ctx, cfg, tokens, t0, We, be, ln1w, ln1b, Win, bin_, Wo, bo,
                                          ln2w, ln2b, W1, b1, W2, b2, ln3w, ln3b, Wg, bg)

    @staticmethod
    def _forward(ctx, cfg, tokens, t0, We, be, ln1w, ln1b, Win, bin_, Wo, bo, ln2w, ln2b,
                 W1, b1, W2, b2, ln3w, ln3b, Wg, bg):
        num_heads, (eps1, eps2, eps3), (p_q, p_a, p_o, p_f, p_r), num_out, zsl, ext, gemm, compute = cfg
        P = _Products(gemm, compute, tokens.dtype)
        t0 = t0.to(tokens.dtype)  # ZSL queries made under autocast arrive in its dtype
        # the weights as the products take them (kept for the backward's input gradients)
        We_c, Win_c, Wo_c, W1_c, W2_c, Wg_c = (w.to(compute) for w in (We, Win, Wo, W1, W2, Wg))
        B, N, C = tokens.shape
        K, D = t0.shape
        H, d = num_heads, D // num_heads
        dev = tokens.device
        masks = {name: (drop_mask(shape, p, dev) if p > 0 else None) for name, shape, p in (
            ("q", (B, K, D), p_q), ("a", (B, H, K, N), p_a), ("o", (B, K, D), p_o),
            ("f", (B * K, W1.shape[0]), p_f), ("r", (B, K, D), p_r))}
        s_q, s_a, s_o, s_f, s_r = (_scale(p) for p in (p_q, p_a, p_o, p_f, p_r))

        # input projection and keys/values
        rows = tokens.reshape(B * N, C)          # a copy for [B, C, H, W] maps, kept for dW_e
        mem = P.linear(rows, We_c, be).clamp_min_(0)                               # [BN, D]
        kv = P.linear(mem, Win_c[D:], bin_[D:])                                   # [BN, 2D]
        # queries: per sample with query dropout, else shared by the batch
        u1 = _queries_input(t0, masks["q"], s_q)
        t1, mean1, rstd1 = _layer_norm(u1, ln1w, ln1b, eps1)
        del u1
        q = P.linear(t1, Win_c[:D], bin_[:D])                                     # [(B,) K, D]
        # cross-attention
        kv5 = kv.view(B, N, 2, H, d)
        qh = q.view(*q.shape[:-1], H, d).transpose(-3, -2)                       # [(B,) H, K, d]
        scores = torch.matmul(qh * (1.0 / math.sqrt(d)), kv5[:, :, 0].permute(0, 2, 3, 1))  # [B,H,K,N]
        attn = torch.softmax(scores, dim=-1)
        del scores
        o = torch.matmul(_drop(attn, masks["a"], s_a), kv5[:, :, 1].transpose(1, 2))  # [B,H,K,d]
        o = o.transpose(1, 2).reshape(B * K, D)
        # output projection, residual + dropout + LN2
        u2 = _drop_(P.linear(o, Wo_c, bo).view(B, K, D), masks["o"], s_o).add_(t1)
        t2, mean2, rstd2 = _layer_norm(u2, ln2w, ln2b, eps2)
        # feed-forward: relu + dropout in place, only f1 kept
        f1 = _drop_(P.linear(t2.view(B * K, D), W1_c, b1).clamp_min_(0), masks["f"], s_f)
        u3 = _drop_(P.linear(f1, W2_c, b2).view(B, K, D), masks["r"], s_r).add_(t2)
        del t2
        h, mean3, rstd3 = _layer_norm(u3, ln3w, ln3b, eps3)
        # group FC (ZSL: one projection shared by the queries)
        if ext:
            logits = torch.ops.mldecoder_fast.group_fc(h.to(compute), Wg_c, bg, num_out)
        elif zsl:
            logits = P.mm(h.view(B * K, D), Wg_c).view(B, K) + bg
        else:
            k, _, G = Wg.shape
            logits = P.bmm(h.transpose(0, 1), Wg_c).transpose(0, 1).reshape(B, k * G)  # [B, K*G]
            logits = (logits if k * G == num_out else logits[:, :num_out]) + bg
        del h

        ctx.cfg = cfg
        ctx.save_for_backward(tokens, t0, ln1w, ln1b, ln2w, ln2b, ln3w, ln3b,
                              We_c, Win_c, Wo_c, W1_c, W2_c, Wg_c)
        # Intermediates live on ctx (not save_for_backward) so that the backward can free each
        # one as soon as it has been used.
        ctx.acts = dict(rows=rows, mem=mem, kv=kv, mean1=mean1, rstd1=rstd1, q=q, attn=attn, o=o, u2=u2,
                        mean2=mean2, rstd2=rstd2, f1=f1, u3=u3, mean3=mean3, rstd3=rstd3)
        ctx.masks = masks
        ctx.scales = (s_q, s_a, s_o, s_f, s_r)
        return logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logits):
        with torch.autocast(g_logits.device.type, enabled=False):
            return HeadTrainStep._backward(ctx, g_logits)

    @staticmethod
    def _backward(ctx, g_logits):
        # the weights in the compute dtype (the parameters themselves when it is theirs)
        (tokens, t0, ln1w, ln1b, ln2w, ln2b, ln3w, ln3b, We, Win, Wo, W1, W2, Wg) = ctx.saved_tensors
        num_heads, (eps1, eps2, eps3), _, num_out, zsl, ext, gemm, compute = ctx.cfg
        a, m = ctx.acts, ctx.masks
        if a is None:
            raise RuntimeError("mldecoder_fast: this training step's graph was already used by a backward "
                               "(pass retain_graph=True to the first one to backpropagate twice)")
        keep_graph = _keep_graph()
        if keep_graph:  # retain_graph / create_graph: leave the activations for the next backward
            a, m = dict(a), dict(m)
        s_q, s_a, s_o, s_f, s_r = ctx.scales
        needs = ctx.needs_input_grad
        need_tokens, need_t0 = needs[1], needs[2]
        B, N, C = tokens.shape
        K, D = t0.shape
        H, d = num_heads, D // num_heads
        shared = m["q"] is None
        g = g_logits.contiguous().to(tokens.dtype)
        P = _Products(gemm, compute, tokens.dtype)

        pop = a.pop

        # ---- group FC: input gradient now, weight gradient at the very end -----------------------
        u3, mean3, rstd3 = pop("u3"), pop("mean3"), pop("rstd3")
        h = None
        if zsl:
            g_h = g.unsqueeze(-1) * Wg[:, 0].to(g.dtype)                             # [B, K, D]
            g_bg = g.sum().reshape(1) if needs[20] else None
            g_pad = None
        elif ext:
            h = _layer_norm(u3, ln3w, ln3b, eps3)[0].to(compute)                       # recomputed
            g_h = torch.ops.mldecoder_fast.group_fc_grad_h(g, h, Wg, num_out).to(g.dtype)
            g_bg = g.sum(0) if needs[20] else None
        else:
            k, _, G = Wg.shape
            g_pad = g if k * G == num_out else F.pad(g, (0, k * G - num_out))
            g_pad = g_pad.view(B, k, G).transpose(0, 1)                               # [K, B, G]
            g_h = P.bmm(g_pad, Wg.transpose(1, 2)).transpose(0, 1)                    # [B, K, D]
            g_bg = g.sum(0) if needs[20] else None
        # ---- LN3 and the residual dropout ---------------------------------------------------------
        g_u3, g_ln3w, g_ln3b = _layer_norm_backward(g_h, u3, mean3, rstd3, ln3w, ln3b,
                                                    (True, needs[17], needs[18]))
        del g_h
        del mean3, rstd3                  # u3 stays: h is recomputed for the group-FC weight gradient
        g_f2 = _drop(g_u3, m.pop("r"), s_r).view(B * K, D)
        # ---- feed-forward -------------------------------------------------------------------------
        f1 = pop("f1")
        g_W2 = P.mm(g_f2.t(), f1) if needs[15] else None
        g_b2 = g_f2.sum(0) if needs[16] else None
        g_f1 = P.mm(g_f2, W2)
        del g_f2
        g_a = torch.ops.aten.threshold_backward(g_f1, f1, 0)
        del g_f1, f1
        m.pop("f")
        if s_f != 1.0:
            g_a.mul_(s_f)
        u2, mean2, rstd2 = pop("u2"), pop("mean2"), pop("rstd2")
        t2 = _layer_norm(u2, ln2w, ln2b, eps2)[0]                                     # recomputed
        g_W1 = P.mm(g_a.t(), t2.view(B * K, D)) if needs[13] else None
        del t2
        g_b1 = g_a.sum(0) if needs[14] else None
        g_t2 = P.mm(g_a, W1).add_(g_u3.view(B * K, D))                                # FFN + residual
        del g_a, g_u3
        # ---- LN2 and the output dropout -------------------------------------------------------------
        g_u2, g_ln2w, g_ln2b = _layer_norm_backward(g_t2, u2, mean2, rstd2, ln2w, ln2b,
                                                    (True, needs[11], needs[12]))
        del g_t2, u2
        g_u2 = g_u2.view(B, K, D)
        g_t1 = g_u2.sum(0) if shared else g_u2      # the residual; g_op is used up before g_t1 changes
        g_op = _drop(g_u2, m.pop("o"), s_o).reshape(B * K, D)
        del g_u2
        o = pop("o")
        g_Wo = P.mm(g_op.t(), o) if needs[9] else None
        g_bo = g_op.sum(0) if needs[10] else None
        del o
        g_o = P.mm(g_op, Wo).view(B, K, H, d).transpose(1, 2)                         # [B, H, K, d]
        del g_op
        # ---- attention ------------------------------------------------------------------------------
        kv = pop("kv")
        kv5 = kv.view(B, N, 2, H, d)
        k_h = kv5[:, :, 0].transpose(1, 2)                                            # [B, H, N, d]
        v_h = kv5[:, :, 1].transpose(1, 2)
        attn, ma = pop("attn"), m.pop("a")
        g_kv = torch.empty(B, N, 2, H, d, dtype=kv.dtype, device=kv.device)
        g_kv[:, :, 1] = torch.matmul(_drop(attn, ma, s_a).transpose(-1, -2), g_o).transpose(1, 2)
        g_attn = _drop(torch.matmul(g_o, v_h.transpose(-1, -2)), ma, s_a)             # [B,H,K,N]
        del g_o, ma
        g_scores = torch._softmax_backward_data(g_attn, attn, -1, attn.dtype).mul_(1.0 / math.sqrt(d))
        del g_attn, attn
        q = pop("q")
        qh = q.view(*q.shape[:-1], H, d).transpose(-3, -2)                            # [(B,) H, K, d]
        g_kv[:, :, 0] = torch.matmul(g_scores.transpose(-1, -2), qh).transpose(1, 2)
        g_qh = torch.matmul(g_scores, k_h)                                            # [B, H, K, d]
        del g_scores, q, qh, k_h, v_h, kv5, kv
        if shared:
            g_qh = g_qh.sum(0)
        g_q = g_qh.transpose(-3, -2).reshape(*g_qh.shape[:-3], K, D)                  # [(B,) K, D]
        del g_qh
        g_kv = g_kv.view(B * N, 2 * D)
        mem = pop("mem")
        g_Win = g_bin = None
        if needs[7]:
            g_Win = torch.empty(3 * D, D, dtype=g_kv.dtype, device=g_kv.device)
            g_Win[D:] = P.mm(g_kv.t(), mem)
        if needs[8]:
            g_bin = torch.empty(3 * D, dtype=g_kv.dtype, device=g_kv.device)
            torch.sum(g_kv, 0, out=g_bin[D:])
        g_mem = P.mm(g_kv, Win[D:])                                                    # [BN, D]
        del g_kv
        # ---- queries: q projection, LN1, the query dropout ----------------------------------------
        mean1, rstd1 = pop("mean1"), pop("rstd1")
        mq = m.pop("q")
        u1 = _queries_input(t0, mq, s_q)
        t1 = _layer_norm(u1, ln1w, ln1b, eps1)[0]                                     # recomputed
        if needs[7]:
            g_Win[:D] = P.mm(g_q.reshape(-1, D).t(), t1.reshape(-1, D))
        del t1
        if needs[8]:
            torch.sum(g_q.reshape(-1, D), 0, out=g_bin[:D])
        g_t1.view(-1, D).add_(P.mm(g_q.reshape(-1, D), Win[:D]))
        del g_q
        g_t0 = g_ln1w = g_ln1b = None
        if need_t0 or needs[5] or needs[6]:
            g_u1, g_ln1w, g_ln1b = _layer_norm_backward(g_t1, u1, mean1, rstd1, ln1w, ln1b,
                                                        (True, needs[5], needs[6]))
            if need_t0:
                g_t0 = 2 * g_u1 if shared else torch.where(mq, g_u1, g_u1 * (1.0 + s_q)).sum(0)
            del g_u1
        del g_t1, u1
        # ---- input projection -----------------------------------------------------------------------
        g_pre = torch.ops.aten.threshold_backward(g_mem, mem, 0)
        del g_mem, mem
        rows = pop("rows")
        g_We = P.mm(g_pre.t(), rows) if needs[3] else None
        del rows
        g_be = g_pre.sum(0) if needs[4] else None
        g_tokens = P.mm(g_pre, We).view(B, N, C) if need_tokens else None
        del g_pre
        # ---- the group-FC weight gradient, last ---------------------------------------------------
        g_Wg = None
        if needs[19]:
            if h is None:
                h = _layer_norm(u3, ln3w, ln3b, eps3)[0]                               # recomputed
            del u3
            if ext:
                g_Wg = torch.ops.mldecoder_fast.group_fc_grad_weight(g, h.to(compute), Wg, num_out)
                g_Wg = g_Wg.to(g.dtype)
            elif zsl:
                g_Wg = P.mm(g.reshape(1, B * K), h.reshape(B * K, D)).t()               # [D, 1]
            else:
                g_Wg = P.bmm(h.transpose(0, 1).transpose(1, 2), g_pad)                 # [K, D, G]
        if not keep_graph:
            ctx.acts = ctx.masks = None
        return (None, g_tokens, g_t0, g_We, g_be, g_ln1w, g_ln1b, g_Win, g_bin, g_Wo, g_bo,
                g_ln2w, g_ln2b, g_W1, g_b1, g_W2, g_b2, g_ln3w, g_ln3b, g_Wg, g_bg)
