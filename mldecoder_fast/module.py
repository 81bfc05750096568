"""MLDecoderFast: the drop-in fast ML-Decoder head.

Same constructor, parameters and state_dict as the reference ``MLDecoder`` (plus ``backend``).
The forward is the computation of docs/design.md rearranged for speed:

- the GEMMs (input projection, one fused k/v projection, output projection, feed-forward) run as
  single PyTorch matmuls over all rows;
- everything between them goes through the backend's ops object (``ops/``): attention,
  residual + dropout + LayerNorm, and LayerNorm-3 + group-FC decoding;
- the queries' path (T1 = LN1(2 T0) and q = T1 W_q + b_q) does not depend on the input: outside
  training-mode query dropout it is computed once per forward for the whole batch, and with no
  gradient needed it is cached (``caches.py``) until any tensor it depends on changes (in-place
  updates, loads, device or dtype moves, new word vectors) or the head switches between train
  and eval mode;
- training steps of the torch backend (CPU: fp32/fp64 or bf16 autocast; CUDA: fp32 parameters,
  optionally under bf16/fp16 autocast) run as one autograd function with a hand-written backward
  (``ops/fused_train.py``). On the CPU: bool dropout masks, activations recomputed or freed as early
  as possible: under half the reference's peak memory at 21,843 classes in fp32 (level with it
  under bf16 autocast, with the bf16 weight copies). On CUDA: few launches
  (weights in the compute dtype from the caches, biases/ReLU in GEMM epilogues, one attention op,
  dropout masks regenerated in the backward); the triton backend's CUDA steps are the same
  function with its Triton attention and LayerNorm kernels. ``fused_training = False`` runs them
  op by op.

The caches (``head.caches``: the eval queries, autocast weight copies, packed oneDNN weights)
track tensors through their version counters. Writes that bypass them (``p.data`` edits, FSDP
re-materialising parameters in place) are invisible to them: call ``clear_caches()`` after such a
write, or set ``head.caches.enabled = False`` (``mldecoder_fast.train.distributed`` clears them
before every forward of FSDP-wrapped heads).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import lean_eval
from ._config import NUM_HEADS
from ._inputs import check_input, tokens_from_input
from .caches import HeadCaches
from .dispatch import check_backend_name, select_ops
from .ops import cpu_gemm
from .reference import _HeadBase


class MLDecoderFast(_HeadBase):
    """Drop-in fast ML-Decoder head.

    Args: as ``MLDecoder`` (``num_classes, num_of_groups=-1, decoder_embedding=768,
    initial_num_features=2048, zsl=0``), plus ``backend``: ``"auto"`` (the fastest available for
    the input's device), ``"torch"``, ``"cpp"`` (CPU extension), ``"cuda"`` (CUDA extension) or
    ``"triton"``. An unavailable backend falls back to ``"torch"`` with a one-time warning;
    ``active_backend`` says what ran last.
    """

    # Devices where eval forwards of the torch backend without autograd take the launch-lean path
    # (lean_eval.py). The CPU keeps its GEMM-provider path (ops/cpu_gemm.py); tests add "cpu" to
    # check the lean path against the reference.
    lean_eval_devices = ("cuda",)
    # Devices where fused training steps take the launch-lean kit (ops/fused_train.py); the CPU
    # keeps its GEMM-provider kit. Tests add "cpu" to check the lean kit against the reference.
    lean_train_devices = ("cuda",)

    def __init__(self, num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768,
                 initial_num_features: int = 2048, zsl: int = 0, backend: str = "auto"):
        super().__init__(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl)
        self.backend = check_backend_name(backend)
        self.active_backend = None
        # Training steps of the torch backend (CPU and CUDA) and of the triton backend (CUDA) run as
        # one autograd function with a hand-written backward (ops/fused_train.py); False runs them
        # op by op (e.g. for double backward, which that function does not support).
        self.fused_training = True
        self.caches = HeadCaches()
        self.register_load_state_dict_post_hook(_clear_caches_after_load)

    # construction from existing heads ------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> MLDecoderFast:
        """A fast head with the weights, mode, dropout rates, device and dtype of ``module``:
        an ``MLDecoder``/``MLDecoderFast`` of this package, the official head, or timm's copy."""
        from .convert import head_arguments
        kwargs, state_dict, word_vectors = head_arguments(module)
        ref_param = next(module.parameters())
        fast = cls(**kwargs, backend=backend)
        fast.to(device=ref_param.device, dtype=ref_param.dtype)
        fast.load_state_dict(state_dict)
        if word_vectors is not None:
            fast.set_word_vectors(word_vectors)
        src_dropouts = [m for m in module.modules() if isinstance(m, (nn.Dropout, nn.MultiheadAttention))]
        dst_dropouts = [m for m in fast.modules() if isinstance(m, (nn.Dropout, nn.MultiheadAttention))]
        if len(src_dropouts) == len(dst_dropouts):
            for s, d in zip(src_dropouts, dst_dropouts, strict=True):
                if isinstance(d, nn.Dropout):
                    d.p = s.p
                else:
                    d.dropout = s.dropout
        fast.train(module.training)
        return fast

    # the query path ------------------------------------------------------------------------------
    def _query_inputs(self):
        layer = self.decoder.layers[0]
        attn = layer.multihead_attn
        tensors = [layer.norm1.weight, layer.norm1.bias, attn.in_proj_weight, attn.in_proj_bias]
        if self.config.zsl:
            tensors += [self.wordvec_proj.weight, self.wordvec_proj.bias, self.decoder.query_embed]
        else:
            tensors.append(self.decoder.query_embed.weight)
        return tensors

    def _base_queries(self) -> torch.Tensor:
        """T0 [K, D]: the learned queries, or relu(wordvec_proj(V)) in ZSL mode."""
        if self.config.zsl:
            v = self.decoder.query_embed.to(self.wordvec_proj.weight)   # its device and dtype
            return F.relu(self.wordvec_proj(v))
        return self.decoder.query_embed.weight

    def _shared_queries(self):
        """(T1 [K, D], q [K, D], qk [H, K, D]) for the whole batch (eval, or query dropout p == 0).

        qk = W_k,h^T q_h / sqrt(d) per head: the queries with the key projection folded in (see
        ``TorchOps.shared_query_attention``)."""
        layer = self.decoder.layers[0]
        d = self.config.embed_dim
        attn = layer.multihead_attn

        def compute():
            t0 = self._base_queries()
            t1 = F.layer_norm(2 * t0, (d,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
            q = F.linear(t1, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
            hd = d // NUM_HEADS
            w_k = attn.in_proj_weight[d:2 * d].view(NUM_HEADS, hd, d)
            acc = torch.promote_types(w_k.dtype, torch.float32)
            with torch.autocast(w_k.device.type, enabled=False):  # fold in full precision
                qk = torch.einsum("khc,hcd->hkd", q.to(acc).view(-1, NUM_HEADS, hd),
                                  w_k.to(acc)) / math.sqrt(hd)
            qk = qk.to(w_k.dtype)
            return t1, q, qk

        inputs = self._query_inputs()
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if needs_grad:
            return compute()

        def compute_full_precision():
            with torch.autocast(inputs[0].device.type, enabled=False):
                return compute()
        return self.caches.get("queries", inputs, compute_full_precision)

    def clear_caches(self) -> None:
        """Drop everything derived from the parameters (recomputed on the next forward)."""
        self.caches.clear()

    def _apply(self, fn, *args, **kwargs):
        self.caches.clear()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        # A mode switch marks the end of a training phase: start eval from the current weights
        # even if they were written behind the version counters' back (FSDP, p.data edits).
        if mode != self.training:
            self.caches.clear()
        return super().train(mode)

    # the fused training step ----------------------------------------------------------------------
    def _fused_parameters(self):
        dec = self.decoder
        layer = dec.layers[0]
        attn = layer.multihead_attn
        return (dec.embed_standart.weight, dec.embed_standart.bias, layer.norm1.weight, layer.norm1.bias,
                attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                layer.norm2.weight, layer.norm2.bias, layer.linear1.weight, layer.linear1.bias,
                layer.linear2.weight, layer.linear2.bias, layer.norm3.weight, layer.norm3.bias,
                dec.duplicate_pooling, dec.duplicate_pooling_bias)

    def _use_fused_training(self, x: torch.Tensor, params) -> bool:
        dev = x.device.type
        if not (self.fused_training and dev in ("cpu", "cuda") and x.shape[0] > 0 and torch.is_grad_enabled()):
            return False
        if torch.compiler.is_compiling():
            return False
        if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
            return False  # torch.func.grad/vmap/jvp: the op-by-op path composes with them
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.float64) or any(p.dtype != dtype for p in params):
            return False
        if not torch.is_autocast_enabled(dev):
            return x.dtype == dtype
        low = torch.get_autocast_dtype(dev)
        if dev == "cpu" and dev not in self.lean_train_devices:
            # the CPU step's low-precision products are bf16 from fp32 parameters (the input in
            # fp32, or in bf16 as a backbone under autocast gives it)
            return low == torch.bfloat16 and dtype == torch.float32 and x.dtype in (dtype, low)
        return low in (torch.bfloat16, torch.float16) and dtype == torch.float32 and x.dtype in (dtype, low)

    def _triton_step_applies(self, ops, x: torch.Tensor, params) -> bool:
        """Whether the triton backend's training step runs fused, with its kernels for attention and
        LayerNorm (on ``lean_train_devices``, in dtypes and at head sizes the kernels take); else it
        runs op by op through its ops object."""
        dev = x.device.type
        compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else params[0].dtype
        return (dev in self.lean_train_devices and self.config.embed_dim // NUM_HEADS <= 256
                and ops._takes(x, dtypes=(compute,)))

    def _train_step_kit(self, device: torch.device, compute: torch.dtype, p_attn: float, triton: bool):
        """How the fused step runs here (``fused_train.StepKit``; activations in the compute
        dtype): the CPU kit (GEMM provider, stored masks, LayerNorm outputs recomputed), or on
        ``lean_train_devices`` the launch-lean one (cuBLAS/torch products, one fused attention op
        (``triton``: the Triton attention and LayerNorm kernels), masks regenerated in the
        backward except under CUDA graph capture, products writing fp32 gradients themselves on
        CUDA)."""
        from .ops.fused_train import StepKit, efficient_attention_takes
        if device.type not in self.lean_train_devices:
            # masks in a 16-bit compute dtype (no cast per use), bool for fp32 (a quarter of the bytes)
            masks = compute if compute.itemsize == 2 else torch.bool
            return StepKit(cpu_gemm.provider(compute, device), compute, "explicit", regenerate=False,
                           keep_ln_outputs=False, direct_out=False, layer_norm="aten", mask_dtype=masks)
        cuda = device.type == "cuda"
        # CUDA's memory-efficient attention within its domain; the CPU's flash kernel has no dropout
        fused = efficient_attention_takes(compute, self.config.embed_dim // NUM_HEADS) if cuda else p_attn == 0
        capturing = cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        attention = "triton" if triton else ("fused" if fused else "explicit")
        return StepKit(cpu_gemm.TORCH, compute, attention, regenerate=not capturing,
                       keep_ln_outputs=True, direct_out=cuda, layer_norm="triton" if triton else "aten")

    def _fused_training_forward(self, tokens, params, p_query, p_attn, p_out, p_ff, p_res, ext=False,
                                triton=False):
        from .ops.fused_train import HeadTrainStep, derive_weights
        layer = self.decoder.layers[0]
        t0 = self._base_queries()
        zsl = bool(self.config.zsl)
        num_out = t0.shape[0] if zsl else self.config.num_classes
        dev = tokens.device
        param_dtype = params[0].dtype
        compute = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else param_dtype
        kit = self._train_step_kit(dev, compute, p_attn, triton)
        # the weights as the step reads them, made once per parameter version (an optimizer step)
        fixed_t0 = None if zsl else t0
        sources = list(params) + ([] if zsl else [t0])
        weights = self.caches.get(("train_step", kit.compute, p_ff), sources,
                                  lambda: derive_weights(params, fixed_t0, kit, p_ff, zsl),
                                  lambda stale: derive_weights(params, fixed_t0, kit, p_ff, zsl, into=stale))
        cfg = (NUM_HEADS, (layer.norm1.eps, layer.norm2.eps, layer.norm3.eps),
               (p_query, p_attn, p_out, p_ff, p_res), num_out, zsl, ext, kit, weights)
        return HeadTrainStep.apply(cfg, tokens, t0, *params)

    # the products of a forward ---------------------------------------------------------------------
    def _linear(self, needs_grad: bool, device: torch.device):
        """``linear(x, weight, bias, rows, relu)`` = x weight[rows]^T + bias[rows] (then relu) for this
        forward.

        With autograd: ``F.linear`` (autocast casts as usual). Without: the GEMM provider
        (``ops/cpu_gemm.py``), with the weights in the autocast dtype and, for oneDNN, packed, each
        made once per weight version and kept in ``caches``."""
        if needs_grad:
            def linear(x, weight, bias, rows=slice(None), relu=False, nan_carried=False, nan_of=()):
                y = F.linear(x, weight[rows], bias[rows])
                return F.relu(y) if relu else y
            return linear
        autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        caches = self.caches

        def linear(x, weight, bias, rows=slice(None), relu=False, nan_carried=False, nan_of=()):
            dtype = autocast or x.dtype
            gemm = cpu_gemm.provider(dtype, device)
            w = caches.cast(id(weight), weight, dtype)[rows]
            b = caches.cast(id(bias), bias, dtype)[rows]
            packed = None
            if gemm is not cpu_gemm.TORCH:
                packed = caches.get(("packed", id(weight), rows.start, rows.stop, dtype), (weight,),
                                    lambda: gemm.pack(w))
                if nan_of:   # a NaN in these weights made NaN everywhere here in the reference
                    b = caches.get(("nan_of", id(bias), dtype), (bias, *nan_of), lambda: _with_nan_of(b, nan_of))
            return gemm.linear(x.to(dtype), w, b, packed, relu=relu, nan_carried=nan_carried)
        return linear

    # the launch-lean eval forward ------------------------------------------------------------------
    def _eval_forward_lean(self, x: torch.Tensor):
        """The logits from ``lean_eval.forward``, or None where that path does not apply (training,
        autograd needed, another device, double-precision parameters under autocast)."""
        if self.training or x.device.type not in self.lean_eval_devices:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        dtypes = lean_eval.dtypes(x, self.decoder.embed_standart.weight.dtype)
        if dtypes is None:
            return None
        sources = list(self.parameters())
        if self.config.zsl:
            sources.append(self.decoder.query_embed)
        weights = self.caches.get(("lean_eval",) + dtypes, sources, lambda: lean_eval.derive(self, *dtypes))
        layer = self.decoder.layers[0]
        num_out = weights.r2.shape[0] if self.config.zsl else self.config.num_classes
        return lean_eval.forward(x, weights, num_out, layer.norm2.eps, layer.norm3.eps)

    # forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(self, x)
        name, ops = select_ops(self.backend, x.device)
        self.active_backend = name
        if name == "torch":
            out = self._eval_forward_lean(x)
            if out is not None:
                return out
        cfg = self.config
        dec = self.decoder
        layer = dec.layers[0]
        attn = layer.multihead_attn
        d = cfg.embed_dim
        training = self.training
        p_query = layer.dropout1.p if training else 0.0
        p_attn = attn.dropout if training else 0.0
        p_out = layer.dropout2.p if training else 0.0
        p_ff = layer.dropout.p if training else 0.0
        p_res = layer.dropout3.p if training else 0.0

        tokens = tokens_from_input(x)                                               # [B, N, C]
        if training and name in ("torch", "cpp", "triton"):
            params = self._fused_parameters()
            triton = name == "triton"
            if self._use_fused_training(x, params) and (not triton or self._triton_step_applies(ops, x, params)):
                return self._fused_training_forward(tokens, params, p_query, p_attn, p_out, p_ff, p_res,
                                                    ext=name == "cpp" and not self.config.zsl, triton=triton)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        linear = self._linear(needs_grad, x.device)
        memory = linear(tokens, dec.embed_standart.weight, dec.embed_standart.bias, relu=True)

        if p_query > 0:
            # Training: every sample draws its own dropout mask on the queries (docs/design.md step 3).
            t0 = self._base_queries()
            t0 = t0.unsqueeze(0).expand(x.shape[0], -1, -1)
            t1 = ops.residual_dropout_layer_norm(t0, t0, p_query, layer.norm1.weight,
                                                 layer.norm1.bias, layer.norm1.eps)  # [B, K, D]
            q = F.linear(t1, attn.in_proj_weight[:d], attn.in_proj_bias[:d])
            shared = False
        else:
            t1, q, qk = self._shared_queries()                                      # [K, D]
            shared = True
        k_queries = t1.shape[-2]
        if shared and NUM_HEADS * k_queries < d + k_queries:
            # Fewer FLOPs to fold W_k into the shared queries than to form the keys.
            v = linear(memory, attn.in_proj_weight, attn.in_proj_bias, slice(2 * d, None))
            # the CPU's score GEMM through the GEMM provider (oneDNN), as the other products
            gemm = {"gemm": cpu_gemm.provider(memory.dtype, x.device)} if (
                not needs_grad and name in ("torch", "cpp") and x.device.type == "cpu") else {}
            if not needs_grad:  # the cached queries in the memory's dtype, cast once per version
                qk = self.caches.cast("qk", qk, memory.dtype)
            o = ops.shared_query_attention(qk, memory, v, NUM_HEADS, p_attn, **gemm)  # [B, K, D]
        else:
            kv = linear(memory, attn.in_proj_weight, attn.in_proj_bias, slice(d, None))  # [B, N, 2D]
            o = ops.attention(q, kv, NUM_HEADS, p_attn)                             # [B, K, D]
        o = linear(o, attn.out_proj.weight, attn.out_proj.bias)
        t2 = ops.residual_dropout_layer_norm(t1, o, p_out, layer.norm2.weight, layer.norm2.bias,
                                             layer.norm2.eps)
        # Without autograd the relu may map NaN to 0 here (oneDNN's post-op, ops/cpu_gemm.py): a NaN
        # row of T2 is added back below, and a non-finite linear1 weight makes linear2's bias NaN.
        f = linear(t2, layer.linear1.weight, layer.linear1.bias, relu=True, nan_carried=True)
        if p_ff > 0:
            f = F.dropout(f, p_ff, training=True)
        f = linear(f, layer.linear2.weight, layer.linear2.bias, nan_of=(layer.linear1.weight, layer.linear1.bias))
        num_out = k_queries if cfg.zsl else cfg.num_classes
        group_weight = dec.duplicate_pooling
        if not needs_grad and torch.is_autocast_enabled(x.device.type):
            # the group-FC weight in the autocast dtype once per version, not per call (every
            # backend: the products cast their operands to that dtype anyway)
            group_weight = self.caches.cast(id(group_weight), group_weight,
                                            torch.get_autocast_dtype(x.device.type))
        return ops.decode(t2, f, p_res, layer.norm3.weight, layer.norm3.bias, layer.norm3.eps,
                          group_weight, dec.duplicate_pooling_bias, num_out)


def _with_nan_of(bias: torch.Tensor, sources) -> torch.Tensor:
    """``bias``, all NaN if any of ``sources`` holds a non-finite value (no host sync: the same
    bits as ``bias`` otherwise)."""
    finite = torch.stack([t.detach().isfinite().all() for t in sources]).all()
    return torch.where(finite, bias, torch.full_like(bias, float("nan")))


def _clear_caches_after_load(module: MLDecoderFast, incompatible_keys) -> None:
    module.clear_caches()
