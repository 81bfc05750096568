"""Fused Triton kernels of the ``triton`` backend (wrapped as custom ops in ``ops/triton_ops.py``).

- ``layer_norm``: residual + dropout + LayerNorm, forward and backward (LN1, LN2; LN3's statistics).
- ``attention``: cross-attention with online softmax over N, in-kernel Philox dropout regenerated
  in the backward, batch-shared or per-sample queries, and the folded shared-query form.
- ``group_fc_decode``: the grouped class products, with LayerNorm-3 in the prologue and the bias +
  class slice in the epilogue; backward for the input, W, bias and the LayerNorm affine.
- ``_common``: the dropout mask (``dropout_keep``, and ``dropout_mask`` to materialise it for
  tests), autotuning helpers.

Importing these modules needs Triton; the kernels need a CUDA device or TRITON_INTERPRET=1 (set
before import). Environment: MLDECODER_FAST_AUTOTUNE=0 skips autotuning (one safe config per
kernel). The reference for each kernel is ``ops/torch_ops.TorchOps``; tests are
``tests/ops/`` (one file per op), ``tests/kernels/`` (spills, host work, RNG, configs) and
``tests/test_triton_module.py``; ``bench/gpu_check.sh``
checks and times them on a GPU.
"""
