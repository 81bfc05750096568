"""The fused training step (ops/step/function.py) under DDP, 2 gloo processes on the CPU (fp64, dropout
off), with the CPU kit and with the launch-lean (CUDA) kit: its fp32/fp64 parameter gradients come
out of the backward through autograd, so DDP's hooks reduce every one of them and the gradients
equal one process's on the global batch."""
from __future__ import annotations

import copy

import pytest
import torch
from heads import disable_dropout_, make_pair

from mldecoder_fast.train import distributed as D

WORLD = 2
GLOBAL_BATCH = 6


def _ddp_worker(rank, world, kit):
    import torch.distributed as dist
    info = D.init_distributed("cpu")
    torch.manual_seed(0)
    _, head = make_pair(37, 5, dtype=torch.float64)
    if kit == "lean":
        head.lean_train_devices = ("cuda", "cpu")
    disable_dropout_(head).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 24, 3, 3, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 37, generator=g, dtype=torch.float64)

    def loss(model, xs, ys):
        out = model(xs)
        return ((out - ys) ** 2).mean(), out

    ref = copy.deepcopy(head)
    loss(ref, x, y)[0].backward()

    hooked = []

    def allreduce_and_record(state, bucket):
        hooked.extend(bucket.parameters())
        buf = bucket.buffer().div_(world)
        return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0])

    lo, hi = rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world
    ddp = D.wrap_ddp(head, info)
    ddp.register_comm_hook(None, allreduce_and_record)
    value, out = loss(ddp, x[lo:hi], y[lo:hi])
    assert type(out.grad_fn).__name__ == "HeadTrainStepBackward"
    value.backward()
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert {id(p) for p in hooked} == {id(p) for p in trainable}, "DDP's hooks missed a gradient"
    for (name, p), r in zip(head.named_parameters(), ref.parameters(), strict=True):
        if p.requires_grad:
            assert torch.allclose(p.grad, r.grad, rtol=1e-9, atol=1e-12), (
                f"rank {rank} {kit} {name}: DDP gradient differs from the single-process one "
                f"(max diff {(p.grad - r.grad).abs().max():.3e})")
    # (the group is torn down by spawn_local once this function's DDP object is gone: destroyed
    # after the group, torch 2.13's reducer can wait forever on it)


@pytest.mark.parametrize("kit", ["cpu", "lean"])
def test_fused_step_gradients_through_ddp(kit):
    D.spawn_local(_ddp_worker, WORLD, kit)
