"""End to end: a whole training step of a timm backbone with each of three heads, side by side.

    python bench/e2e_train.py                                  # ResNet-50, 224 px, 21,843 classes, B = 256
    python bench/e2e_train.py --model test_resnet --batch 2 --steps 2 --image-size 64 --classes 50 \\
        --decoder-embedding 64 --device cpu                    # the CPU smoke run

Heads on the same backbone (timm, random init, ``pretrained=False``): ``plain`` (timm's own global
average pool + linear classifier), ``reference`` (the faithful MLDecoder) and ``fast``
(MLDecoderFast, backend "auto"), both attached by ``mldecoder_fast.train.models.build_model``.
One step: forward under autocast (bf16 by default) on channels_last synthetic images already on
the device, BCE-with-logits against synthetic multi-hot targets, backward, AdamW step, gradients
zeroed. Warm-up steps first (cuDNN and Triton autotuning, the optimizer's state), then the timed
steps of the three models in interleaved rounds (``benchmark.timing.time_interleaved``: CUDA events,
one step of each per round), the median per head.

Printed: ms per step, images/s, time over the plain classifier's, the peak memory of a step
(``benchmark.timing.peak_memory_bytes``: bytes a step holds beyond what existed before it) and,
on CUDA, what each model holds between steps (weights and optimizer state);
``--json PATH`` writes the same.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mldecoder_fast.benchmark.cases import autocast_context
from mldecoder_fast.benchmark.record import device_name, git_commit
from mldecoder_fast.benchmark.timing import peak_memory_bytes, synchronize, time_interleaved
from mldecoder_fast.cli.types import int_range

HEADS = ("plain", "reference", "fast")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build(head: str, args) -> torch.nn.Module:
    """The backbone ``args.model`` with ``head``, random weights."""
    import timm

    from mldecoder_fast.train.models import build_model
    if head == "plain":
        return timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    return build_model(args.model, args.classes, head=head, num_of_groups=args.groups,
                       decoder_embedding=args.decoder_embedding, backend=args.backend)


def make_step(model, batches, device, dtype, losses: list):
    """One training step per call, cycling over ``batches`` [(images, targets)]."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    count = [0]

    def step():
        images, targets = batches[count[0] % len(batches)]
        count[0] += 1
        with autocast_context(device, dtype):
            logits = model(images)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return step


def allocated(device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):   # two synthetic batches, alternated
        images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
        targets = (torch.rand(args.batch, args.classes, generator=g) < 0.01).float()
        batches.append((images.to(device).contiguous(memory_format=torch.channels_last), targets.to(device)))

    steps, rows, losses = {}, {}, {}
    for head in args.heads:
        before = allocated(device)
        torch.manual_seed(0)
        model = build(head, args).to(device).to(memory_format=torch.channels_last).train()
        losses[head] = []
        steps[head] = make_step(model, batches, device, dtype, losses[head])
        for _ in range(args.warmup):
            steps[head]()
        synchronize(device)
        resident = allocated(device)
        rows[head] = {
            "head": head,
            "params": sum(p.numel() for p in model.parameters()),
            "resident_bytes": None if before is None else resident - before,
            "peak_step_bytes": peak_memory_bytes(steps[head], device),
        }
        if head == "fast":
            from mldecoder_fast.interop.timm_head import ml_decoder_of
            rows[head]["backend"] = getattr(ml_decoder_of(model), "active_backend", None)

    timings = time_interleaved(steps, device, warmup=0, repeats=args.steps)
    plain_ms = timings["plain"].median_ms if "plain" in timings else None
    for head, t in timings.items():
        last = float(losses[head][-1])
        if not math.isfinite(last):
            raise RuntimeError(f"the {head} head's loss is {last} after {len(losses[head])} steps")
        rows[head].update(median_ms=t.median_ms, min_ms=t.min_ms, times_ms=t.times_ms,
                          images_per_s=args.batch / (t.median_ms * 1e-3), last_loss=last,
                          vs_plain=None if not plain_ms else t.median_ms / plain_ms)
    meta = {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "timm": __import__("timm").__version__, "commit": git_commit(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
            "classes": args.classes, "batch": args.batch, "image_size": args.image_size,
            "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
            "decoder_embedding": args.decoder_embedding, "groups": args.groups}
    return {"meta": meta, "rows": [rows[h] for h in args.heads]}


def format_table(data: dict) -> str:
    m = data["meta"]
    mb = lambda b: "-" if b is None else f"{b / 2**20:.0f}"  # noqa: E731
    lines = [f"e2e training step: {m['model']} {m['image_size']} px, {m['classes']} classes, {m['dtype']} "
             f"autocast, channels_last, AdamW, batch {m['batch']}, median of {m['steps']} steps | "
             f"{m['device_name']} | torch {m['torch']} | timm {m['timm']}",
             f"{'head':<14}{'ms/step':>9}{'images/s':>10}{'vs plain':>10}{'peak step MB':>14}"
             f"{'resident MB':>13}{'params M':>10}"]
    for r in data["rows"]:
        name = r["head"] + (f" ({r['backend']})" if r.get("backend") else "")
        vs = "-" if r["vs_plain"] is None else f"{(r['vs_plain'] - 1) * 100:+.1f}%"
        lines.append(f"{name:<14}{r['median_ms']:>9.2f}{r['images_per_s']:>10.0f}{vs:>10}"
                     f"{mb(r['peak_step_bytes']):>14}{mb(r['resident_bytes']):>13}{r['params'] / 1e6:>10.1f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="timm model name (default resnet50)")
    p.add_argument("--classes", type=int_range(1), default=21843)
    p.add_argument("--batch", type=int_range(1), default=256)
    p.add_argument("--image-size", type=int_range(16), default=224)
    p.add_argument("--steps", type=int_range(1), default=30, help="timed steps per head (default 30)")
    p.add_argument("--warmup", type=int_range(1), default=5, help="untimed steps per head first (default 5)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype; fp32: none")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--heads", default=",".join(HEADS), help=f"comma-separated, of {', '.join(HEADS)}")
    p.add_argument("--backend", default="auto", help="MLDecoderFast backend (default auto)")
    p.add_argument("--decoder-embedding", type=int_range(1), default=768)
    p.add_argument("--groups", type=int_range(1, also=(-1,)), default=-1, help="ML-Decoder groups (default -1: 100)")
    p.add_argument("--json", metavar="PATH", help="write the rows and the environment as JSON")
    args = p.parse_args(argv)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    bad = [h for h in args.heads if h not in HEADS]
    if bad or not args.heads:
        p.error(f"--heads: choose from {', '.join(HEADS)}; got {args.heads}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        print(f"e2e_train: needs timm ({exc}); pip install 'mldecoder-fast[timm]'", file=sys.stderr)
        return 2
    data = run(args)
    print(format_table(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
