"""``mldecoder-fast bench``: every standard configuration, every implementation, one table.

    mldecoder-fast bench                       # all configurations, best local device
    mldecoder-fast bench --quick               # shrunken configurations, few repetitions
    mldecoder-fast bench --configs imagenet21k,openimages --json out.json --markdown out.md
    mldecoder-fast bench --plot scaling.png    # adds the scaling study (80 ... 100k classes)
    mldecoder-fast bench --from-json out.json --markdown out.md   # re-render, no measurement

Exit status: 0 when every implementation agreed with the reference, 1 otherwise; 130 when
interrupted (Ctrl-C, or SIGINT from ``timeout --signal=INT``), after writing the cases measured
until then.
"""
from __future__ import annotations

import json
import sys
import time

import torch

from ..cli.types import float_range, int_list, int_range

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time reference vs eager-expert vs MLDecoderFast on the standard configurations",
        description="Time the reference head, the eager-expert head, optionally torch.compile of both, "
                    "and every available MLDecoderFast backend on the standard configurations (eval "
                    "forward and training step), after checking each agrees with the reference.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="float32/float64: weights and input in that dtype; float16/bfloat16: fp32 "
                        "weights under torch.autocast (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--batch", type=int_list(1), default=None,
                   help="batch size(s), comma-separated (default: 16 on CPU, 32,256 on CUDA)")
    p.add_argument("--configs", default=None, help="comma-separated configuration names or prefixes (default: all)")
    p.add_argument("--modes", default="eval,train", help="eval, train or both (default: eval,train)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations (reference, eager-expert, compiled-reference, "
                        "compiled-expert, fast-torch, fast-cpp, fast-cuda, fast-triton, onnxruntime); "
                        "default: all available")
    p.add_argument("--compiled", action="store_true",
                   help="also time torch.compile of the reference and of the eager-expert (each "
                        "compile takes tens of seconds on a CPU)")
    p.add_argument("--quick", action="store_true",
                   help="shrunken configurations (same structure, ~20x smaller) and 2 repetitions: "
                        "checks that everything runs, in seconds")
    p.add_argument("--repeats", type=int_range(1), default=None, help="timed repetitions per row (default 5, quick 2)")
    p.add_argument("--warmup", type=int_range(0), default=None,
                   help="untimed calls per implementation before timing, besides the agreement check's "
                        "call and the memory measurement's (default: 0 on CPU, 1 on CUDA)")
    p.add_argument("--budget", type=float_range(gt=0), default=2.0,
                   help="seconds of timed repetitions per row after which no more are started, "
                        "once 3 are done (default 2)")
    p.add_argument("--threads", type=int_range(1), default=None,
                   help="CPU threads (torch.set_num_threads); default: torch's default, 1 with --quick "
                        "(tiny shapes on a busy machine drown in OpenMP synchronisation otherwise)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", metavar="PATH", help="write every result and the environment as JSON")
    p.add_argument("--jsonl", metavar="PATH",
                   help="append each row to PATH as one JSON line as soon as its case is measured (with the "
                        "device, torch version and commit): a run cut short keeps what it measured")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as markdown (generated from the JSON record)")
    p.add_argument("--plot", metavar="PATH", help="run the scaling study and write its PNG")
    p.add_argument("--scaling-only", action="store_true", help="with --plot: only the scaling study, no main table")
    p.add_argument("--scaling-classes", type=int_list(1), default=None,
                   help="class counts of the scaling study "
                        "(default 80,1000,10000,21843,50000,100000; quick 80,1000,10000)")
    p.add_argument("--from-json", metavar="PATH", help="no measurement: render the table/markdown/plot of a saved JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from . import record

    if args.from_json:
        data = record.load_json(args.from_json)
        return _render(args, data)

    from . import configs as configs_mod
    from .cases import MODES
    from .contenders import implementations
    from .runner import fill_ratios, run_suite
    from .timing import copy_bandwidth, matmul_probes, matmul_rates, memory_method

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mldecoder-fast bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = args.batch or ([16] if device.type == "cpu" else [32, 256])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"mldecoder-fast bench: unknown mode(s) {bad}; choose from {list(MODES)}", file=sys.stderr)
        return 2
    try:
        cfgs = configs_mod.select(args.configs, quick=args.quick)
        impl_names = [s.strip() for s in args.impls.split(",")] if args.impls else None
        include_compiled = args.compiled or bool(impl_names and any(n.startswith("compiled") for n in impl_names))
        impls, skipped = implementations(device, include_compiled=include_compiled, names=impl_names,
                                         allow_interpreted_triton=bool(impl_names and "fast-triton" in impl_names),
                                         dtype=dtype)
    except ValueError as exc:
        print(f"mldecoder-fast bench: {exc}", file=sys.stderr)
        return 2
    if not include_compiled:
        skipped["compiled-*"] = "not requested (pass --compiled: torch.compile takes tens of seconds per case)"
    if args.scaling_only and not args.plot:
        print("mldecoder-fast bench: --scaling-only needs --plot PATH", file=sys.stderr)
        return 2
    if args.scaling_only:
        cfgs = []
    repeats = args.repeats or (2 if args.quick else 5)
    # On the CPU the agreement check's call and the memory measurement's call warm up enough;
    # on CUDA one more call settles autotuning and the caching allocator.
    warmup = args.warmup if args.warmup is not None else (1 if device.type == "cuda" else 0)
    run_kwargs = dict(warmup=warmup, repeats=repeats, min_repeats=min(3, repeats),
                      budget_s=args.budget, measure_memory=not args.no_memory,
                      probes=matmul_probes(device, dtype))
    threads = args.threads if args.threads is not None else (1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)

    t_start = time.perf_counter()
    load_start = record.load_average()
    mm_rates = matmul_rates(device, dtype)
    mm = max(mm_rates.values())
    bw = copy_bandwidth(device)

    results = []
    interrupted = False
    if cfgs:
        print(f"mldecoder-fast bench: {len(cfgs)} configuration(s) x {len(modes)} mode(s) x "
              f"{len(batches)} batch size(s) x {len(impls)} implementation(s) on {device} ({dtype}); "
              f"implementations: {', '.join(i.name for i in impls)}", file=sys.stderr)
        total = len(cfgs) * len(batches) * sum(m in i.modes for m in modes for i in impls)
        on_case = results.extend
        if args.jsonl:
            stamp = {"device_name": record.device_name(device), "torch": torch.__version__,
                     "commit": record.git_commit()}

            def on_case(rows):
                results.extend(rows)
                fill_ratios(rows, mm, bw)
                with open(args.jsonl, "a") as f:
                    for r in rows:
                        f.write(json.dumps({**r.as_dict(), **stamp}) + "\n")
        try:
            with _progress(total, args.no_progress) as bar:
                run_suite(cfgs, device, dtype, batches, modes=modes, impls=impls, progress=bar,
                          on_case=on_case, **run_kwargs)
        except KeyboardInterrupt:
            interrupted = True
            print(f"\nmldecoder-fast bench: interrupted; keeping the {len(results)} row(s) of the cases "
                  "measured so far", file=sys.stderr)
        fill_ratios(results, mm, bw)

    scaling = None
    if args.plot and not interrupted:
        from .scaling import run_scaling, scaling_impls
        classes = (args.scaling_classes if args.scaling_classes
                   else ([80, 1000, 10000] if args.quick else list(configs_mod.SCALING_CLASSES)))
        base = configs_mod.scaling_config(80).shrunk() if args.quick else None
        s_impls = scaling_impls(device)
        s_batch = batches[-1] if device.type == "cuda" else batches[0]
        print(f"mldecoder-fast bench: scaling study, {len(classes)} class counts x {len(modes)} mode(s), "
              f"batch {s_batch}: {', '.join(i.name for i in s_impls)}", file=sys.stderr)
        with _progress(len(classes) * len(modes) * len(s_impls), args.no_progress) as bar:
            scaling = run_scaling(device, dtype, s_batch, classes=classes, modes=modes, impls=s_impls,
                                  base=base, progress=bar, **run_kwargs)
        fill_ratios(scaling, mm, bw)

    meta = record.collect_meta(device, dtype, batches, mm_rates, bw, quick=bool(args.quick), repeats=repeats,
                               warmup=warmup, threads=torch.get_num_threads(),
                               load_average_start=load_start, memory_method=memory_method(device),
                               seconds=round(time.perf_counter() - t_start, 1), interrupted=interrupted)
    data = {"meta": meta, "results": [r.as_dict() for r in results], "skipped": skipped}
    if scaling is not None:
        data["scaling"] = [r.as_dict() for r in scaling]
    if args.json:
        record.write_json(args.json, meta, results, skipped, scaling)
    status = _render(args, data)
    print(f"\n({meta['seconds']:.0f} s)", file=sys.stderr)
    return 130 if interrupted else status


def _render(args, data: dict) -> int:
    from . import goals, report, tables

    meta, rows = data["meta"], data["results"]
    if rows:
        print(tables.format_table(rows, meta))
        print()
        for line in goals.summary(rows, meta):
            print(line)
    if data.get("scaling"):
        print()
        print(tables.scaling_markdown(data["scaling"]))
    skipped = data.get("skipped") or {}
    for name, why in skipped.items():
        print(f"not run: {name}: {why}")
    if args.markdown:
        from pathlib import Path
        Path(args.markdown).write_text(report.to_markdown(data) + "\n")
    if args.plot and data.get("scaling"):
        from .scaling import plot_scaling
        plot_scaling(data["scaling"], args.plot,
                     title=f"ML-Decoder head vs number of classes: {meta.get('device_name')}, "
                           f"{meta.get('dtype')}, batch {data['scaling'][0]['batch']}")
        print(f"scaling plot: {args.plot}")
    elif args.plot:
        print("no scaling data to plot", file=sys.stderr)
    mismatches = [r for r in rows + (data.get("scaling") or []) if r.get("agree") is False]
    if mismatches:
        print(f"\n{len(mismatches)} row(s) DISAGREE with the reference: "
              + ", ".join(f"{r['impl']}@{r['config']}/{r['mode']}" for r in mismatches), file=sys.stderr)
        return 1
    return 0


class _NullBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(total: int, disabled: bool):
    if disabled:
        return _NullBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total, unit="row", file=sys.stderr, dynamic_ncols=True)
