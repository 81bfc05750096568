"""fp16 autocast training (the recipes' CUDA default) with a GradScaler: the fused training step
never overflows a gradient that the op-by-op path (autocast's own ops) keeps finite, so its loss
scale never falls below the op-by-op path's. The LayerNorm weight and bias gradients are sums over
B*K rows of scaled gradients: written in fp16 they overflow at the initial 2^16 scale.

Run with the CUDA step's kit on the CPU (``lean_train_devices``) under CPU fp16 autocast."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from heads import disable_dropout_, make_pair


def _trajectory(fused: bool, steps: int = 4):
    """Per step: (loss scale after the step, parameters whose gradient was non-finite)."""
    torch.manual_seed(0)
    _, head = make_pair(101, 10, 64, 48)
    head.lean_train_devices = ("cpu",)
    head.fused_training = fused
    disable_dropout_(head).train()
    opt = torch.optim.SGD(head.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(16, 48, 3, 3, generator=g)
        target = (torch.rand(16, 101, generator=g) < 0.1).float()
        with torch.autocast("cpu", dtype=torch.float16):
            logits = head(x)
        assert (type(logits.grad_fn).__name__ == "HeadTrainStepBackward") == fused
        loss = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="sum") / 16
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        bad = {n for n, p in head.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()}
        scaler.step(opt)
        scaler.update()
        out.append((scaler.get_scale(), bad))
    return out


def test_fused_fp16_step_overflows_no_gradient_the_op_by_op_path_keeps_finite():
    fused, op_by_op = _trajectory(True), _trajectory(False)
    for step, ((scale_f, bad_f), (scale_o, bad_o)) in enumerate(zip(fused, op_by_op, strict=True)):
        assert bad_f <= bad_o, f"step {step + 1}: non-finite gradients only in the fused step: {sorted(bad_f - bad_o)}"
        assert scale_f >= scale_o, f"step {step + 1}: loss scale {scale_f} < the op-by-op path's {scale_o}"
