"""Kernel launches per forward of the torch backend: the count made without a GPU (fake CUDA
tensors, ``mldecoder_fast.benchmark.launches``) beside, on a GPU, the same counter on real tensors
and the number of CUDA kernels torch.profiler saw for the same call.

    python bench/launch_counts.py                  # on CUDA if present, else the fake counts only
    python bench/launch_counts.py --quick --json launch_counts.json

Rows: eval forwards (no grad, bf16 features under bf16 autocast) at COCO and ImageNet-21K sizes,
B = 1 and 256, [B, C, H, W] and channels_last inputs; a training forward and forward + backward
(the loss a sum of the logits) at B = 256. Columns: ``fake`` the dispatched ops that launch work
(tests/test_launches.py holds its budget), ``est`` the kernels those ops are known to launch,
``real`` the counter on CUDA tensors (backward node by node, as on fake tensors), ``profiler``
the CUDA kernels (and memcpy/memset) of the call as torch.profiler records them (training:
through ``Tensor.backward``). Where ``profiler`` differs from ``est`` the kernels are listed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from mldecoder_fast import MLDecoderFast
from mldecoder_fast.benchmark.launches import (
    count_launches,
    fake_cuda,
    run_backward,
    total_kernels,
)

CONFIGS = {"coco": (80, 80, 2048, 14, 14), "imagenet21k": (21843, 100, 2048, 7, 7)}


def _calls(head, x, mode: str, region):
    """(call counted by the dispatch counter, call run under the profiler) of one row; each call
    runs in a fresh ``region()`` (bf16 autocast)."""
    def forward():
        with region():
            return head(x)

    if mode == "eval":
        def call():
            with torch.no_grad():
                return forward()
        return call, call
    if mode == "train":
        return forward, forward

    def counted_step():   # train+bwd: the backward node by node, as on fake tensors
        return run_backward(forward().float().sum())

    def real_step():
        head.zero_grad(set_to_none=True)
        forward().float().sum().backward()
    return counted_step, real_step


def _build(config: str, mode: str, batch: int, layout: str):
    classes, k, c, h, w = CONFIGS[config]
    head = MLDecoderFast(classes, k, 768, c, backend="torch").train(mode != "eval")
    x = torch.randn(batch, c, h, w, dtype=torch.bfloat16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return head, x


def _fake_count(config, mode, batch, layout):
    # torch.autocast("cuda") turns itself off without a GPU: fake_cuda forces it on instead, and
    # count_launches empties its cast cache as the exit of a region would.
    with fake_cuda(torch.bfloat16):
        head, x = _build(config, mode, batch, layout)
        counted, _ = _calls(head, x, mode, contextlib.nullcontext)
        launches = count_launches(counted)
    return len(launches), total_kernels(launches)


def _gpu_count(config, mode, batch, layout, device="cuda"):
    """(the counter's launches on real tensors, the kernels the profiler saw) on ``device``."""
    from torch.profiler import ProfilerActivity, profile
    with torch.device(device):
        head, x = _build(config, mode, batch, layout)
    counted, real = _calls(head, x, mode, lambda: torch.autocast(device, dtype=torch.bfloat16))
    launches = count_launches(counted)
    for _ in range(2):
        real()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        real()
        sync()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(launches), kernels


def rows(quick: bool):
    configs = ["coco"] if quick else list(CONFIGS)
    for config in configs:
        for batch in (1, 256):
            for layout in ("nchw", "channels_last"):
                yield config, "eval", batch, layout
        yield config, "train", 256, "nchw"
        yield config, "train+bwd", 256, "nchw"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda: also count on the GPU; cpu: the fake counts only")
    p.add_argument("--quick", action="store_true", help="COCO only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    on_gpu = args.device == "cuda" and torch.cuda.is_available()
    if args.device == "cuda" and not on_gpu:
        print("no CUDA device: fake counts only")
    print(f"{'config':<12}{'mode':<10}{'B':>4} {'layout':<14}{'fake':>5}{'est':>5}{'real':>6}{'profiler':>9}")
    results = []
    for config, mode, batch, layout in rows(args.quick):
        fake, est = _fake_count(config, mode, batch, layout)
        row = {"config": config, "mode": mode, "batch": batch, "layout": layout, "fake": fake,
               "est_kernels": est}
        real = prof = "-"
        if on_gpu:
            real, kernels = _gpu_count(config, mode, batch, layout)
            prof = len(kernels)
            row.update(real=real, profiler=prof, kernels=kernels)
            torch.cuda.empty_cache()
        print(f"{config:<12}{mode:<10}{batch:>4} {layout:<14}{fake:>5}{est:>5}{real:>6}{prof:>9}")
        if on_gpu and prof != est:
            for name in kernels:
                print(f"      {name[:110]}")
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else None,
                       "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
