"""The head's operations, one implementation per backend, and the op map.

``MLDecoderFast`` runs its GEMMs with PyTorch (on the CPU through a GEMM provider,
``ops/cpu_gemm.py``) and everything between them through an *ops* object: ``TorchOps`` in
``ops/torch_ops.py`` defines the interface and its plain-PyTorch implementation; backends
override what they accelerate:

- ``torch``: ``TorchOps``, PyTorch's own ops (batched group FC, SDPA).
- ``cpp`` / ``cuda``: ``ExtensionOps`` (``ops/extension_ops.py``): the compiled extension's group FC,
  the rest from ``TorchOps``.
- ``triton``: ``TritonOps`` (``ops/triton_ops.py``): fused Triton kernels (``kernels/``) for
  attention, residual + dropout + LayerNorm and LayerNorm + group-FC decoding, registered as
  custom ops in ``ops/triton_registrations.py`` (shared helpers and dropout seeds:
  ``ops/triton_support.py``).

Why by backend, not one file per op family (as tests/ops/ is): a backend is one object that a
path holds (``head/backends.py: ops_for``), overriding what it accelerates, so each file reads as
what that backend changes; the op map below gives the op-family view across files. The Triton
registrations sit here, not beside the kernels, so that importing the triton backend registers
its custom ops (torch.compile sees them) without importing Triton, which each kernel module does.

Op map: for each op (named as in ``TorchOps``; steps of docs/design.md), where its reference,
torch path, Triton kernel, C++/CUDA kernel, registration and tests are. ``tests/test_op_map.py``
checks that every path below exists, and that a row's test files import nothing of the package
outside the row but what every op shares (the head, the package's top level, the benchmark's
tools, ``kernels/_common.py``, ``ops/triton_support.py``, ``ops/__init__.py``,
``paths/__init__.py``). Tests: tests/ops/ holds one file per op (every implementation's checks),
tests/kernels/ the Triton infrastructure (sm_90 spills, host work, dropout RNG, launch configs,
the chained ops under torch.compile); tests/README.md.

residual_dropout_layer_norm: LayerNorm(residual + dropout(x)) (steps 3, 5 and 6's residual)
    reference     mldecoder_fast/head/reference.py
    torch         mldecoder_fast/ops/torch_ops.py
    Triton        mldecoder_fast/kernels/layer_norm.py
    registration  mldecoder_fast/ops/triton_registrations.py (mldecoder_fast::triton_layer_norm[_backward])
    tests         tests/ops/test_layer_norm.py, tests/kernels/test_triton_rng.py, tests/test_module.py,
                  tests/test_dropout.py

attention / shared_query_attention: multi-head cross-attention (step 4)
    reference     mldecoder_fast/head/reference.py
    torch         mldecoder_fast/ops/torch_ops.py
    Triton        mldecoder_fast/kernels/attention.py
    registration  mldecoder_fast/ops/triton_registrations.py (mldecoder_fast::triton_attention[_backward],
                  mldecoder_fast::triton_shared_query_attention[_backward])
    tests         tests/ops/test_attention.py, tests/test_module.py

group_fc: group fully-connected decoding (step 7)
    reference     mldecoder_fast/head/reference.py (group_fc_loop: the original loop of K products)
    torch         mldecoder_fast/ops/torch_ops.py (group_fc_torch: one batched product)
    Triton        mldecoder_fast/kernels/group_fc_decode.py
    C++/CUDA      csrc/group_fc.cpp (schemas + CPU kernels), csrc/group_fc_cuda.cu, csrc/group_fc.h
    registration  mldecoder_fast/ops/group_fc_extension.py (mldecoder_fast::group_fc, fake and
                  autograd), mldecoder_fast/ops/extension_ops.py (the cpp/cuda backends),
                  mldecoder_fast/ops/triton_registrations.py (mldecoder_fast::triton_group_fc[_backward])
    tests         tests/ops/test_group_fc.py (every implementation: torch, cpp, cuda, triton)

decode: LayerNorm-3 of the residual, then group_fc (steps 6-7)
    reference     mldecoder_fast/head/reference.py
    torch         mldecoder_fast/ops/torch_ops.py
    Triton        mldecoder_fast/kernels/group_fc_decode.py
    registration  mldecoder_fast/ops/triton_registrations.py (mldecoder_fast::triton_decode[_backward])
    tests         tests/ops/test_decode.py, tests/test_triton_module.py

training step: the whole head's forward and hand-written backward as one autograd function
    reference     mldecoder_fast/head/reference.py
    torch         mldecoder_fast/ops/step/function.py (its records: mldecoder_fast/ops/step/records.py,
                  its attention: mldecoder_fast/ops/step/attention.py, its dropout masks:
                  mldecoder_fast/ops/step/dropout_masks.py), GEMMs from mldecoder_fast/ops/cpu_gemm.py, the
                  path objects (which kit where) in mldecoder_fast/paths/train_step.py; the cpp
                  backend's steps: the group FC of mldecoder_fast/ops/group_fc_extension.py
    tests         tests/test_train_step.py, tests/test_cpu_gemm.py, tests/test_launches.py

eval forward on CUDA: the launch-lean path (steps 1-7 in about a dozen launches)
    reference     mldecoder_fast/head/reference.py
    torch         mldecoder_fast/paths/lean_eval.py
    tests         tests/test_lean_eval.py, tests/test_launches.py, tests/test_host_sync.py
"""
from .torch_ops import TorchOps

__all__ = ["TorchOps"]
