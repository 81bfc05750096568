"""Where a head's time goes, per implementation: the top operators/kernels of a few eval forwards
or training steps under torch.profiler, side by side (the benchmark table says *how fast*; this
says *why*). For the next kernel change: which kernels of the Triton backend cost more than the
plain-PyTorch path's, and how much of a step is launch overhead (CPU time per step vs device time).

    python bench/profile_backends.py --device cuda --config coco --batch 256 --mode train
    python bench/profile_backends.py --device cpu --config imagenet21k --batch 16 --impls reference,fast-torch

Prints, for each implementation, the wall time per step, the device (or CPU) time per step, and
the top ``--top`` entries by self time; ``--json PATH`` writes the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mldecoder_fast.benchmark.cases import make_case, make_step, prepare
from mldecoder_fast.benchmark.configs import select
from mldecoder_fast.benchmark.contenders import implementations

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def profile_impl(impl, case, steps: int, top: int) -> dict:
    model = prepare(impl, case)
    step = make_step(model, case)
    for _ in range(3):  # warm-up: autotuning, caches, allocator
        step()
    cuda = case.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(case.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(case.device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events)
    out = {"impl": impl.name, "wall_ms_per_step": wall_ms, "busy_ms_per_step": total / 1e3 / steps,
           "what": "device time" if cuda else "CPU self time", "top": []}
    for e in rows[:top]:
        t = getattr(e, key, 0.0)
        if t <= 0:
            break
        out["top"].append({"name": e.key, "ms_per_step": t / 1e3 / steps, "calls_per_step": e.count / steps,
                           "share": t / total if total else 0.0})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", default="coco", help="a standard configuration name or prefix")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on the CPU")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--mode", choices=["eval", "train"], default="train")
    p.add_argument("--impls", default="reference,eager-expert,fast-torch,fast-triton")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="the configuration's shrunken test size")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    batch = args.batch or (256 if device.type == "cuda" else 16)
    cfg = select(args.config, quick=args.quick)[0]
    wanted = [n for n in args.impls.split(",") if n]
    impls, skipped = implementations(device, include_compiled=False)
    impls = [i for i in impls if i.name in wanted]
    for name in wanted:
        if name not in {i.name for i in impls}:
            print(f"not run: {name}: {skipped.get(name, skipped.get('fast-*', 'unknown implementation'))}")
    case = make_case(cfg, args.mode, device, dtype, batch)
    results = []
    for impl in impls:  # make_step runs each step under autocast for low-precision dtypes
        r = profile_impl(impl, case, args.steps, args.top)
        results.append(r)
        print(f"\n== {cfg.name} {args.mode} B={batch} {dtype} | {r['impl']}: {r['wall_ms_per_step']:.2f} ms "
              f"per step (wall), {r['busy_ms_per_step']:.2f} ms {r['what']}")
        for t in r["top"]:
            print(f"  {t['ms_per_step']:8.3f} ms {t['share'] * 100:5.1f}%  "
                  f"x{t['calls_per_step']:<5.1f} {t['name'][:90]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": cfg.name, "mode": args.mode, "batch": batch, "dtype": str(dtype),
                       "device": str(device), "torch": torch.__version__, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
