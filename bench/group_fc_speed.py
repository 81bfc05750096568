"""Group FC speed, side by side: the compiled op vs the bmm expression vs the reference loop.

    python bench/group_fc_speed.py [--device cpu|cuda] [--dtype float32|bfloat16|...] [--autocast bfloat16]
        [--batch 16 64] [--classes 21843] [--groups 100] [--dim 768] [--reps 7] [--threads N]
        [--h-layout contiguous|transposed] [--no-loop] [--json PATH]

Times forward + backward (grads of h, weight and bias) of one group FC on random data,
median of --reps runs after warm-up, every provider on the same tensors in the same run,
taking turns within each repetition.
Ratios are provider time / extension time (> 1: the extension is faster). On CUDA it also
times cuBLAS's strided-batched bmm alone (forward + the two backward bmms, no bias, no
slice) as the floor to compare against, and reports TFLOP/s.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mldecoder_fast.benchmark.timing import time_interleaved  # noqa: E402
from mldecoder_fast.head.reference import group_fc_loop  # noqa: E402
from mldecoder_fast.ops.group_fc_extension import extension_status, group_fc  # noqa: E402
from mldecoder_fast.ops.torch_ops import group_fc_torch  # noqa: E402


def reference_loop(h, weight, bias, num_classes):
    """The official computation: K matmuls into a zero [B, K, G] buffer, slice, bias."""
    b, k, _ = h.shape
    out = torch.zeros(b, k, weight.shape[-1], dtype=h.dtype, device=h.device)
    group_fc_loop(h, weight.to(h.dtype), out)
    return out.flatten(1)[:, :num_classes] + bias.to(h.dtype)


def bmm_only(h, weight, bias, num_classes):
    """cuBLAS strided-batched bmm alone: the floor (no bias, no slice, no class order)."""
    return torch.bmm(h.transpose(0, 1), weight)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(fn, h, weight, bias, num_classes, autocast=None):
    """One forward + backward of ``fn`` (grads of h, weight and bias) on fixed random data,
    under autocast to ``autocast`` (a dtype) if given."""
    grad = None

    def step():
        nonlocal grad
        for t in (h, weight, bias):
            t.grad = None
        with torch.autocast(h.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = fn(h, weight, bias, num_classes)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--autocast", default=None, metavar="DTYPE",
                   help="fp32 tensors under torch.autocast(DTYPE), as in mixed-precision training")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--classes", type=int, default=21843)
    p.add_argument("--groups", type=int, default=100)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-loop", action="store_true", help="skip the (slow) reference loop")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--h-layout", choices=["contiguous", "transposed"], default="contiguous",
                   help="h [B, K, D] as the head's LayerNorm gives it, or a transposed [K, B, D]")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    ok, detail = extension_status()
    if not ok:
        raise SystemExit(f"extension unavailable: {detail}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    amp = getattr(torch, args.autocast) if args.autocast else None
    k, c, d = args.groups, args.classes, args.dim
    g = -(-c // k)
    torch.manual_seed(0)
    weight = (torch.randn(k, d, g, device=device) * d ** -0.5).to(dtype).requires_grad_()
    bias = torch.randn(c, device=device, dtype=dtype).requires_grad_()
    providers = {"extension": group_fc, "bmm_expr": group_fc_torch}
    if device.type == "cuda":
        providers["bmm_only"] = bmm_only
    mm_rate = None
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=amp or dtype)
        for _ in range(3):
            a @ a
        _sync(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(10):
            a @ a
        e1.record()
        torch.cuda.synchronize()
        mm_rate = 2 * 8192 ** 3 * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e12
        del a
    rows = []
    for b in args.batch:
        if args.h_layout == "transposed":
            h = torch.randn(k, b, d, device=device, dtype=dtype).transpose(0, 1).requires_grad_()
        else:
            h = torch.randn(b, k, d, device=device, dtype=dtype).requires_grad_()
        steps = {name: make_step(fn, h, weight, bias, c, amp) for name, fn in providers.items()}
        times = {n: t.median_ms for n, t in time_interleaved(steps, device, warmup=2, repeats=args.reps).items()}
        if not args.no_loop:  # seconds per step on a CPU: a couple of runs, no warm-up
            loop = {"reference_loop": make_step(reference_loop, h, weight, bias, c, amp)}
            times.update({n: t.median_ms for n, t in
                          time_interleaved(loop, device, warmup=0, repeats=min(args.reps, 2)).items()})
        flops = 3 * 2 * b * k * d * g
        for name, ms in times.items():
            rows.append({"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                         "threads": torch.get_num_threads(), "dtype": args.dtype,
                         "autocast": args.autocast, "batch": b,
                         "classes": c, "K": k, "G": g, "D": d, "h_layout": args.h_layout,
                         "provider": name,
                         "ms_fwd_bwd": round(ms, 3),
                         "ratio_vs_extension": round(ms / times["extension"], 2),
                         "tflops": round(flops / (ms * 1e-3) / 1e12, 2)})
    print(f"group FC forward+backward, {args.device} ({torch.get_num_threads()} threads), "
          f"{args.dtype}{f' (autocast {args.autocast})' if amp else ''}, C={c} K={k} G={g} D={d}, "
          f"{args.h_layout} h; median of {args.reps}"
          + (f"; matmul rate {mm_rate:.0f} TFLOP/s" if mm_rate else ""))
    print(f"{'B':>5} {'provider':>15} {'ms':>10} {'x ext':>8} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r['batch']:>5} {r['provider']:>15} {r['ms_fwd_bwd']:>10.3f} "
              f"{r['ratio_vs_extension']:>8.2f} {r['tflops']:>8.2f}")
    if args.json or os.environ.get("OUT"):
        path = args.json or os.path.join(os.environ["OUT"], "group_fc_speed.json")
        with open(path, "w") as f:
            json.dump({"matmul_tflops": mm_rate, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
