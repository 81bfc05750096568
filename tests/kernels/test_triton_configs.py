"""The Triton kernels' launch configurations (pure Python): autotune lists pruned by problem size,
the attention kernel's split of the head dimension into column blocks. Whether each config
compiles for sm_90 without spills: test_triton_spills.py."""
from __future__ import annotations

from triton_helpers import TRITON_MARKS

pytestmark = TRITON_MARKS


def test_head_split():
    from mldecoder_fast.kernels.attention import head_split
    assert [head_split(d) for d in (96, 80, 64, 24, 12, 128)] == [
        (64, 32), (64, 16), (64, 16), (16, 16), (16, 16), (128, 16)]


def test_autotune_pruning():
    """The GPU autotuners drop tiles larger than the problem (pure Python: runs everywhere)."""
    import triton

    from mldecoder_fast.kernels._common import prune_by_size
    cfgs = [triton.Config({"BLOCK_B": bb, "BLOCK_G": bg}) for bb, bg in [(128, 128), (64, 16), (16, 64), (16, 16)]]
    prune = prune_by_size({"BLOCK_B": "B", "BLOCK_G": "G"})
    kept = prune(cfgs, {"B": 1, "G": 1})
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in kept] == [(16, 16)]
    assert len(prune(cfgs, {"B": 256, "G": 219})) == 4
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in prune(cfgs, {"B": 40, "G": 219})] == [
        (64, 16), (16, 64), (16, 16)]
    assert len(prune(cfgs[:1], {"B": 1, "G": 1})) == 1  # never empty
    from mldecoder_fast.kernels._common import _safe_only
    safe = _safe_only(prune)(cfgs, {"B": 256, "G": 219})
    assert [(c.kwargs["BLOCK_B"], c.kwargs["BLOCK_G"]) for c in safe] == [(16, 16)]
