"""MLDecoderFast: the drop-in fast ML-Decoder head.

Same constructor, parameters and state_dict as the reference ``MLDecoder`` (plus ``backend``).
The forward is the computation of docs/design.md rearranged for speed, run by one of the paths
of ``paths/`` (its docstring has the list; docs/design.md "Paths" the table from backend, device,
mode and dtype to the path): ``forward`` checks the input, gathers the facts the choice depends on,
picks the path (once per distinct facts) and runs it.

The caches (``head.caches``: the eval queries, autocast weight copies, packed oneDNN weights)
track tensors through their version counters. Writes that bypass them (``p.data`` edits, FSDP
re-materialising parameters in place) are invisible to them: call ``clear_caches()`` after such a
write, or set ``head.caches.enabled = False`` (``mldecoder_fast.train.distributed`` clears them
before every forward of FSDP-wrapped heads).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import paths
from .backends import check_backend_name
from .caches import HeadCaches
from .config import DropoutRates
from .inputs import check_input
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
    # (paths/lean_eval.py). The CPU has its own few-ops eval path (paths/cpu_eval.py); tests add
    # "cpu" to check the lean path against the reference.
    lean_eval_devices = ("cuda",)
    # Devices where training steps take the launch-lean kit (paths/train_step.py: CUDA_STEP,
    # TRITON_STEP); the CPU keeps its GEMM-provider kit (CPU_STEP). Tests add "cpu" to check the
    # lean kit against the reference.
    lean_train_devices = ("cuda",)

    def __init__(self, num_classes: int, num_of_groups: int = -1, decoder_embedding: int = 768,
                 initial_num_features: int = 2048, zsl: int = 0, backend: str = "auto"):
        super().__init__(num_classes, num_of_groups, decoder_embedding, initial_num_features, zsl)
        self.backend = check_backend_name(backend)
        self.active_backend = None
        # Training steps of the torch backend (CPU and CUDA) and of the triton backend (CUDA) run as
        # one autograd function with a hand-written backward (ops/step/function.py); False runs them
        # op by op (e.g. for double backward, which that function does not support).
        self.fused_training = True
        self.caches = HeadCaches()
        self.chosen_paths = {}   # paths.Facts -> the path that runs it (paths/route.py)
        self.register_load_state_dict_post_hook(_clear_caches_after_load)

    # construction from existing heads ------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, backend: str = "auto") -> MLDecoderFast:
        """A fast head with the weights, mode, dropout rates, device and dtype of ``module``:
        an ``MLDecoder``/``MLDecoderFast`` of this package, the official head, or timm's copy."""
        from ..interop.convert import head_arguments
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

    def dropout_rates(self) -> DropoutRates:
        """The decoder layer's dropout rates (applied in training mode)."""
        layer = self.decoder.layers[0]
        return DropoutRates(layer.dropout1.p, layer.multihead_attn.dropout, layer.dropout2.p,
                            layer.dropout.p, layer.dropout3.p)

    def clear_caches(self) -> None:
        """Drop everything derived from the parameters (recomputed on the next forward)."""
        self.caches.clear()
        self.chosen_paths.clear()

    def _apply(self, fn, *args, **kwargs):
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        # A mode switch marks the end of a training phase: start eval from the current weights
        # even if they were written behind the version counters' back (FSDP, p.data edits).
        if mode != self.training:
            self.caches.clear()
        return super().train(mode)

    # forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Check the input, pick the path that runs it (``paths/``), run it."""
        check_input(self, x)
        facts = paths.facts_of(self, x)
        path = paths.choose(self, x, facts)
        self.active_backend = facts.backend
        return path.forward(self, x, path.derive(self, x, facts))


def _clear_caches_after_load(module: MLDecoderFast, incompatible_keys) -> None:
    module.clear_caches()
