"""The ways a forward of ``MLDecoderFast`` can run, and the choice among them.

A *path* is one way to compute the head's logits (docs/design.md "Paths": the table from backend,
device, mode and dtype to the path and file). Each is an object with three methods:

- ``applies(head, x, facts)``: whether it runs this forward, from ``facts`` (``route.Facts``: the
  resolved backend, device type, mode, dtypes, settings; everything the choice depends on) and the
  head's fixed configuration. This is where a path states its kernels' domains: anything outside
  them goes to the next path, and ``OP_BY_OP`` takes everything;
- ``derive(head, x, facts)``: what the forward reads (weights in the compute dtype and layout, the
  ops object, the step's kit), kept in ``head.caches`` and made once per parameter version;
- ``forward(head, x, derived)``: the logits.

The paths, in the order the choice tries them:

==================  ===========================  ==================================================
path                file                         runs
==================  ===========================  ==================================================
``LEAN_EVAL``       paths/lean_eval.py           eval without autograd, backend torch, on
                                                 ``head.lean_eval_devices`` (CUDA): few launches
``CPU_EVAL``        paths/cpu_eval.py            eval without autograd, backend torch, on the CPU in
                                                 fp32 or bf16 where oneDNN computes it: few ops
``TRITON_STEP``     paths/train_step.py          training steps, backend triton, on CUDA (Triton's
                                                 attention and LayerNorm kernels)
``CUDA_STEP``       paths/train_step.py          training steps, backends torch/cpp, on
                                                 ``head.lean_train_devices`` (CUDA): few launches
``CPU_STEP``        paths/train_step.py          training steps, backends torch/cpp, on the CPU
                                                 (the GEMM provider's products, little memory)
``OP_BY_OP``        paths/op_by_op.py            everything else: the backend's ops between
                                                 single PyTorch (or GEMM-provider) products
==================  ===========================  ==================================================

``route.choose`` picks the first path of ``PATHS`` (this order) that applies, once per distinct
``Facts`` (kept on the head); ``MLDecoderFast.forward`` checks the input, picks and runs.
"""
from .cpu_eval import CPU_EVAL
from .lean_eval import LEAN_EVAL
from .op_by_op import OP_BY_OP
from .route import PATHS, Facts, choose, facts_of
from .train_step import CPU_STEP, CUDA_STEP, TRITON_STEP

__all__ = ["CPU_EVAL", "CPU_STEP", "CUDA_STEP", "Facts", "LEAN_EVAL", "OP_BY_OP", "PATHS", "TRITON_STEP", "choose",
           "facts_of"]
