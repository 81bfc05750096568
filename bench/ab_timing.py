"""Proof that a change moved code without making it slower: MLDecoderFast's eval forwards (B = 1
and 16) and training steps (B = 16) timed at two commits, in alternating processes on one machine.

    python bench/ab_timing.py against COMMIT [--rounds 3]   # COMMIT (a temporary worktree) vs this checkout
    python bench/ab_timing.py measure OUT.json              # this checkout's times (one process)
    AB_ONLY="eval B=1 bf16" python bench/ab_timing.py ...  # only the rows whose name contains it

Each process times every row (``ROWS``: COCO and ImageNet-21K, fp32, and bf16 autocast eval)
with the public API only (so any two commits can be compared): ``STANDARD_CONFIGS``' head and
input, an eval forward under ``torch.no_grad``, or a training step of forward, BCE, backward,
fused AdamW and zeroing the gradients, as the benchmark's steps. Per row: the median of ``CALLS``
timed calls after warm-up. The processes alternate A, B, A, B, ... so that drifts of the machine
hit both alike; the result per row is B's median of its rounds' medians over A's, with the
spread of the rounds (the largest over the smallest round median, each side).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

# (config, mode, batch, dtype name); calls timed per row. The "-tiny" rows (the benchmark's
# shrunken COCO head: well under a millisecond) are bound by the host's per-call work.
ROWS = [(cfg, mode, batch, dtype) for cfg in ("coco-tresnet_l-448", "imagenet21k-resnet50-224")
        for mode, batch, dtype in (("eval", 1, "fp32"), ("eval", 16, "fp32"), ("train", 16, "fp32"),
                                   ("eval", 1, "bf16"))]
ROWS += [("coco-tresnet_l-448-tiny", mode, 1, "fp32") for mode in ("eval", "train")]
CALLS = {("eval", 1): 60, ("eval", 16): 12, ("train", 16): 8, ("train", 1): 200}
TINY_CALLS = 400


def _step(head, x, mode: str, autocast):
    ctx = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext
    if mode == "eval":
        head.eval()

        def step():
            with torch.no_grad(), ctx():
                head(x)
        return step
    head.train()
    target = (torch.rand(x.shape[0], head.config.num_classes, generator=torch.Generator().manual_seed(1)) < 0.1)
    target = target.float()
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-6, fused=True)
    xg = x.detach().clone().requires_grad_(True)

    def step():
        with ctx():
            logits = head(xg)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        xg.grad = None
    return step


def measure(path: str) -> None:
    from mldecoder_fast import MLDecoderFast
    from mldecoder_fast.benchmark.configs import STANDARD_CONFIGS
    torch.set_num_threads(int(os.environ.get("AB_THREADS", "2")))
    out = {}
    only = os.environ.get("AB_ONLY")     # rows whose name contains this (all by default)
    for cfg_name, mode, batch, dtype in ROWS:
        if only and only not in f"{cfg_name} {mode} B={batch} {dtype}":
            continue
        tiny = cfg_name.endswith("-tiny")
        cfg = STANDARD_CONFIGS[cfg_name.removesuffix("-tiny")]
        cfg = cfg.shrunk() if tiny else cfg
        torch.manual_seed(0)
        head = cfg.make_head(MLDecoderFast)
        x = cfg.make_input(batch, "cpu", torch.float32)
        step = _step(head, x, mode, torch.bfloat16 if dtype == "bf16" else None)
        for _ in range(3):
            step()
        times = []
        for _ in range(TINY_CALLS if tiny else CALLS[(mode, batch)]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out[f"{cfg_name} {mode} B={batch} {dtype}"] = statistics.median(times) * 1e3
    with open(path, "w") as f:
        json.dump(out, f)


def against(commit: str, rounds: int) -> int:
    from base_tree import HERE, worktree_at  # (a sibling script: bench/ is on the path when run)
    with worktree_at(commit) as (tree, tmp, same_csrc):
        if not same_csrc:
            print(f"csrc/ differs from {commit}: build that tree's extension first")
            return 2
        times = {"A": [], "B": []}
        for r in range(rounds):
            for side, root in (("A", tree), ("B", HERE)):
                path = os.path.join(tmp, f"{side}{r}.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "measure", path], check=True, cwd=root,
                               env={**os.environ, "PYTHONPATH": root})
                with open(path) as f:
                    times[side].append(json.load(f))
        print(f"A = {commit}, B = this checkout; medians of {rounds} rounds, ms (spread: max/min round)")
        worst = 0.0
        for key in times["A"][0]:
            a = [t[key] for t in times["A"]]
            b = [t[key] for t in times["B"]]
            ratio = statistics.median(b) / statistics.median(a)
            worst = max(worst, abs(ratio - 1))
            print(f"  {key:<44} A {statistics.median(a):8.2f} ({max(a) / min(a):.2f})  "
                  f"B {statistics.median(b):8.2f} ({max(b) / min(b):.2f})  B/A {ratio:.3f}")
        print(f"largest |B/A - 1|: {worst:.1%}")
        return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["measure"] and len(argv) == 2:
        measure(argv[1])
        return 0
    if argv[:1] == ["against"] and len(argv) in (2, 4):
        rounds = int(argv[3]) if len(argv) == 4 and argv[2] == "--rounds" else 3
        return against(argv[1], rounds)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
