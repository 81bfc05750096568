"""The training step's cross-attention (docs/design.md step 4), forward and backward, three ways
(the kit's ``attention``): ``"explicit"`` (score, softmax and value products, the step's own dropout
mask), ``"fused"`` (one SDPA op each way: CUDA's memory-efficient attention, whose dropout mask is
regenerated from the philox seed and offset it returns, where ``efficient_attention_takes`` the
heads; on the CPU the flash kernel, without attention dropout) or ``"triton"`` (the triton
backend's kernels, ``kernels/attention.py``, the mask drawn in-kernel from a seed and offset)."""
from __future__ import annotations

import math

import torch

from ..triton_support import DropoutSeeds, on_device
from .dropout_masks import dropped


def efficient_attention_takes(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether CUDA's memory-efficient attention kernel (``"fused"`` attention, called directly,
    so without SDPA's checks) takes the step's heads: the kernel enabled
    (``torch.backends.cuda.enable_mem_efficient_sdp``), fp32/fp16/bf16, and a head dim that is a
    positive multiple of its GEMM alignment: 128 bits with tensor cores, 8 elements in 16-bit, 4
    in fp32 (sm80 and newer; PyTorch's ``minimum_gemm_alignment``). The heads are views of
    [B, K, D] and [B, N, 2D] rows, so their last-dim stride is 1 and their other strides and
    offsets are multiples of the head dim. Elsewhere the step takes the explicit attention."""
    align = {torch.float16: 8, torch.bfloat16: 8, torch.float32: 4}.get(dtype)
    return (align is not None and head_dim > 0 and head_dim % align == 0
            and torch.backends.cuda.mem_efficient_sdp_enabled())


def _heads(q, kv, B, N, H, d):
    """[B, H, K, d] queries (per sample), keys and values [B, H, N, d]: views."""
    K = q.shape[-2]
    kv5 = kv.view(B, N, 2, H, d)
    return (q.view(B, K, H, d).transpose(1, 2), kv5[:, :, 0].transpose(1, 2),
            kv5[:, :, 1].transpose(1, 2))


# the Triton attention's dropout: a seed and a Philox offset per step (ops/triton_ops.py)
_ATTENTION_SEEDS = DropoutSeeds()


def attention_forward(kit, q, kv, B, N, H, p, keep, s, zero):
    """O [B*K, D] and what the backward needs."""
    K, D = q.shape[-2], q.shape[-1]
    d = D // H
    if kit.attention == "triton":
        from ...kernels import attention
        seed, offset = _ATTENTION_SEEDS(p, kv)
        with on_device(kv):
            out, lse = attention.attention_forward(q, kv.view(B, N, 2 * D), seed, offset, H, p, kv.dtype)
        return out.view(B * K, D), (out, lse, seed, offset)
    if kit.attention == "fused":
        qb = q if q.dim() == 3 else q.expand(B, K, D).contiguous()   # per-sample queries
        qh, kh, vh = _heads(qb, kv, B, N, H, d)
        if qh.is_cuda:
            out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
                qh, kh, vh, None, True, p)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0)
            seed = offset = None
        return out.transpose(1, 2).reshape(B * K, D), (out, lse, seed, offset)
    kv5 = kv.view(B, N, 2, H, d)
    qh = q.view(*q.shape[:-1], H, d).transpose(-3, -2)                        # [(B,) H, K, d]
    scores = torch.matmul(qh * (1.0 / math.sqrt(d)), kv5[:, :, 0].permute(0, 2, 3, 1))  # [B,H,K,N]
    attn = torch.softmax(scores, dim=-1)
    del scores
    o = torch.matmul(dropped(attn, keep, s, zero), kv5[:, :, 1].transpose(1, 2))  # [B,H,K,d]
    return o.transpose(1, 2).reshape(B * K, D), attn


def attention_backward(kit, g_o, q, kv, saved, B, N, H, p, keep, s, zero, g_kv_out=None):
    """(g_q [(B,) K, D] summed over the batch for shared queries, g_kv [B*N, 2D]); g_kv written
    into ``g_kv_out`` (a [B*N, 2D] view with unit column stride) when given, except by the Triton
    kernel."""
    K, D = q.shape[-2], q.shape[-1]
    d = D // H
    shared = q.dim() == 2
    if kit.attention == "triton":   # the kernel sums a shared q's gradient over the batch
        from ...kernels import attention
        out, lse, seed, offset = saved
        with on_device(kv):
            g_q, g_kv = attention.attention_backward(g_o.view(B, K, D), q, kv.view(B, N, 2 * D), out, lse,
                                                     seed, offset, H, p)
        return g_q, g_kv.view(B * N, 2 * D)
    if kit.attention == "fused":
        out, lse, seed, offset = saved
        qh, kh, vh = _heads(q if not shared else q.expand(B, K, D), kv, B, N, H, d)
        g_oh = g_o.view(B, K, H, d).transpose(1, 2)
        if qh.is_cuda:
            g_qh, g_kh, g_vh, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
                g_oh, qh, kh, vh, None, out, lse, seed, offset, p, [True, True, True, False])
        else:
            g_qh, g_kh, g_vh = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g_oh, qh, kh, vh, out, lse, 0.0, False)
        g_q = g_qh.transpose(1, 2).reshape(B, K, D)
        parts = [g_kh.transpose(1, 2).reshape(B * N, D), g_vh.transpose(1, 2).reshape(B * N, D)]
        g_kv = torch.cat(parts, 1) if g_kv_out is None else torch.cat(parts, 1, out=g_kv_out)
        return (g_q.sum(0) if shared else g_q), g_kv
    attn = saved
    g_o = g_o.view(B, K, H, d).transpose(1, 2)                                   # [B, H, K, d]
    kv5 = kv.view(B, N, 2, H, d)
    k_h = kv5[:, :, 0].transpose(1, 2)                                            # [B, H, N, d]
    v_h = kv5[:, :, 1].transpose(1, 2)
    g_kv = torch.empty(B, N, 2, H, d, dtype=kv.dtype, device=kv.device) if g_kv_out is None else \
        g_kv_out.view(B, N, 2, H, d)
    g_kv[:, :, 1] = torch.matmul(dropped(attn, keep, s, zero).transpose(-1, -2), g_o).transpose(1, 2)
    g_attn = dropped(torch.matmul(g_o, v_h.transpose(-1, -2)), keep, s, zero)  # [B,H,K,N]
    g_scores = torch._softmax_backward_data(g_attn, attn, -1, attn.dtype).mul_(1.0 / math.sqrt(d))
    del g_attn, attn
    qh = q.view(*q.shape[:-1], H, d).transpose(-3, -2)                            # [(B,) H, K, d]
    g_kv[:, :, 0] = torch.matmul(g_scores.transpose(-1, -2), qh).transpose(1, 2)
    g_qh = torch.matmul(g_scores, k_h)                                            # [B, H, K, d]
    if shared:
        g_qh = g_qh.sum(0)
    return g_qh.transpose(-3, -2).reshape(*g_qh.shape[:-3], K, D), g_kv.view(B * N, 2 * D)
