"""Results as a text table, JSON and markdown.

The JSON file is the record: ``meta`` (device, versions, commit, date, dtype, batches, the
measured GEMM rates and copy bandwidth, the command), ``results`` (one row per configuration,
mode, batch and implementation: times, memory, the GEMM rates of its rounds, and per compared
tensor the error vs the float64 reference and the bound allowed), ``skipped`` (implementations
not run, and why) and optionally ``scaling``. The markdown of BENCHMARKS.md is generated from
that file, never typed.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .agreement import ERROR_FLOOR
from .configs import STANDARD_CONFIGS
from .contenders import EXPERT, ONNXRUNTIME, REFERENCE
from .runner import Result

# The CPU targets (fp32, batch 16, every standard configuration): (mode, measure, bound); a
# measure is "x <impl>" (time of <impl> / time of MLDecoderFast, at least bound), "roofline" (at
# least bound) or "ms" (at most bound, for the configurations in CPU_MS_CONFIGS).
CPU_GOALS = [
    ("eval", f"x {EXPERT}", 1.8),
    ("train", f"x {EXPERT}", 1.75),
    ("eval", f"x {ONNXRUNTIME}", 1.0),
    ("train", "roofline", 0.7),
    ("train", "ms", 190.0),
]
CPU_MS_CONFIGS = ("imagenet21k-resnet50-224",)
CPU_MEMORY_GOAL = ("imagenet21k-resnet50-224", "train", 0.5)  # peak(fast) / peak(reference) <=


# -- environment ---------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def module_version(name: str) -> str | None:
    """``name.__version__`` when the module imports, else None."""
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return None


def triton_version() -> str | None:
    return module_version("triton")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def collect_meta(device, dtype: torch.dtype, batches, mm_rates: dict | None, bandwidth: float | None,
                 **extra) -> dict:
    """``mm_rates``: FLOP/s of each GEMM probe (``timing.matmul_rates``); the fastest is recorded
    as ``matmul_tflops``."""
    device = torch.device(device)
    mm_rate = max(mm_rates.values()) if mm_rates else None
    meta = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "onnx": module_version("onnx"),
        "onnxruntime": module_version("onnxruntime"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": str(dtype).replace("torch.", ""),
        "batches": list(batches),
        "matmul_tflops": None if mm_rate is None else mm_rate / 1e12,
        "matmul_gflops": {k: v / 1e9 for k, v in (mm_rates or {}).items()},
        "copy_gbps": None if bandwidth is None else bandwidth / 1e9,
        "load_average": load_average(),
        "command": ("mldecoder-fast " + " ".join(sys.argv[1:])) if sys.argv[1:2] == ["bench"] else None,
    }
    try:
        from .. import backends
        meta["backends"] = {k: {"available": v["available"], "devices": v["devices"], "detail": v["detail"]}
                            for k, v in backends().items()}
    except Exception as exc:  # the fast head is optional here
        meta["backends"] = {"error": repr(exc)}
    from .contenders import auto_backend
    meta["auto_backend"] = auto_backend(device)
    meta.update(extra)
    return meta


# -- JSON ----------------------------------------------------------------------------------------

def write_json(path, meta: dict, results: list[Result], skipped: dict | None = None,
               scaling: list | None = None) -> dict:
    data = {"meta": meta, "results": [r.as_dict() if isinstance(r, Result) else r for r in results],
            "skipped": skipped or {}}
    if scaling is not None:
        data["scaling"] = [r.as_dict() if isinstance(r, Result) else r for r in scaling]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return data


def load_json(path) -> dict:
    return json.loads(Path(path).read_text())


# -- formatting ----------------------------------------------------------------------------------

def _rows(results) -> list[dict]:
    return [r.as_dict() if isinstance(r, Result) else r for r in results]


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _status(r: dict) -> str:
    if r.get("skipped"):
        return "skipped: " + r.get("detail", "")
    if r.get("agree") is False:
        return "MISMATCH: " + r.get("detail", "")
    return "ok"


TABLE_COLUMNS = ("config", "mode", "batch", "impl", "ms (median)", "n", "x ref", "x expert",
                 "peak MB", "mem / ref", "roofline", "agrees")


def table_rows(results) -> list[list[str]]:
    rows = _rows(results)
    ref_mem = {(r["config"], r["mode"], r["batch"]): r.get("peak_bytes") for r in rows
               if r["impl"] == REFERENCE}
    out = []
    for r in rows:
        base = ref_mem.get((r["config"], r["mode"], r["batch"]))
        mem_ratio = (r["peak_bytes"] / base) if (r.get("peak_bytes") is not None and base) else None
        n = len(r.get("times_ms") or [])
        out.append([r["config"], r["mode"], str(r["batch"]), r["impl"], _fmt(r.get("median_ms"), ".1f"),
                    str(n) if n else "-",
                    _fmt(r.get("speedup_vs_reference"), ".2f"), _fmt(r.get("speedup_vs_expert"), ".2f"),
                    _mb(r.get("peak_bytes")), _fmt(mem_ratio, ".2f"), _fmt(r.get("roofline"), ".0%"),
                    _status(r)])
    return out


def format_table(results, meta: dict | None = None) -> str:
    """Fixed-width text table (the CLI's output)."""
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(TABLE_COLUMNS)]
    widths[-1] = len(TABLE_COLUMNS[-1])  # the status column is last and may be long: no padding
    lines = []
    if meta:
        lines.append(_meta_line(meta))
    header = "  ".join(h.ljust(w) if i < 4 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(TABLE_COLUMNS, widths, strict=True)))
    lines += [header, "-" * len(header)]
    prev = None
    for r in rows:
        key = (r[0], r[1], r[2])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        lines.append("  ".join(c.ljust(w) if i < 4 or i == len(r) - 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def _meta_line(meta: dict) -> str:
    parts = [f"device: {meta.get('device_name')} [{meta.get('device')}]", f"dtype: {meta.get('dtype')}",
             f"torch {meta.get('torch')}"]
    if meta.get("triton"):
        parts.append(f"triton {meta['triton']}")
    if meta.get("matmul_tflops"):
        parts.append(f"GEMM {_gemm_rates(meta)}")
    if meta.get("copy_gbps"):
        parts.append(f"copy {meta['copy_gbps']:.1f} GB/s")
    if meta.get("commit"):
        parts.append(f"commit {meta['commit']}")
    if meta.get("memory_method"):
        parts.append(f"memory: {_memory_counted(meta)}")
    return " | ".join(parts)


def _memory_counted(meta: dict) -> str:
    """What a record's peak memory counts (records made before ``held_bytes`` count only what a
    step allocates)."""
    if "held" in meta.get("memory_method", ""):
        return "a step's peak plus what the head holds between steps (caches)"
    return "a step's peak only (what the head holds between steps, e.g. cached weight copies, not counted)"


def _gemm_rates(meta: dict) -> str:
    """"torch.mm 210, onednn 440 GFLOP/s" (older records: their one matmul rate)."""
    rates = meta.get("matmul_gflops") or {"matmul": meta["matmul_tflops"] * 1e3}
    return ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s"


def headline_impl(results, meta: dict | None = None) -> str | None:
    """The MLDecoderFast row a user gets by default (backend "auto", as recorded in ``meta``),
    else the first measured fast row."""
    rows = _rows(results)
    names = {r["impl"] for r in rows if r["impl"].startswith("fast-") and r.get("median_ms") is not None}
    if not names:
        return None
    auto = (meta or {}).get("auto_backend")
    if auto and f"fast-{auto}" in names:
        return f"fast-{auto}"
    return sorted(names)[0]


def _goal_value(measure: str, r: dict, by: dict, key: tuple):
    """The value of ``measure`` for row ``r`` (None where this run did not measure it)."""
    if measure == "roofline":
        return r.get("roofline")
    if measure == "ms":
        return r.get("median_ms")
    other = by.get(key + (measure[2:],), {})
    if other.get("median_ms") and r.get("median_ms"):
        return other["median_ms"] / r["median_ms"]
    return None


def summary(results, meta: dict | None = None) -> list[str]:
    """One line per (config, mode, batch): the headline fast implementation's ratios, and the CPU
    targets (``CPU_GOALS``) where this run measured them (CPU, float32, batch 16)."""
    rows = _rows(results)
    fast = headline_impl(rows, meta)
    if fast is None:
        return ["no MLDecoderFast implementation was measured"]
    by = {(r["config"], r["mode"], r["batch"], r["impl"]): r for r in rows}
    cpu_goal_run = bool(meta) and meta.get("device") == "cpu" and meta.get("dtype") == "float32"
    auto = (meta or {}).get("auto_backend")
    how = "what backend=\"auto\" runs" if auto and fast.endswith(auto) else "first measured backend"
    lines = [f"MLDecoderFast ({fast}, {how}) vs reference:"]
    for (cfg, mode, batch, impl), r in by.items():
        if impl != fast or r.get("speedup_vs_reference") is None:
            continue
        ref = by.get((cfg, mode, batch, REFERENCE), {})
        mem = (r["peak_bytes"] / ref["peak_bytes"]) if r.get("peak_bytes") and ref.get("peak_bytes") else None
        goals = []
        if cpu_goal_run and batch == 16 and cfg in STANDARD_CONFIGS:
            for goal_mode, measure, bound in CPU_GOALS:
                if goal_mode != mode or (measure == "ms" and cfg not in CPU_MS_CONFIGS):
                    continue
                value = _goal_value(measure, r, by, (cfg, mode, batch))
                if value is None:
                    continue
                ok = value <= bound if measure == "ms" else value >= bound
                rel = "<=" if measure == "ms" else ">="
                goals.append(f"{measure} {value:.3g} ({rel} {bound:g}: {'met' if ok else 'NOT met'})")
            if (cfg, mode) == CPU_MEMORY_GOAL[:2] and mem is not None:
                ok = mem <= CPU_MEMORY_GOAL[2]
                goals.append(f"memory <= {CPU_MEMORY_GOAL[2]:g}x: {'met' if ok else 'NOT met'}")
        lines.append(f"  {cfg:30s} {mode:5s} b{batch:<4d} {r['speedup_vs_reference']:6.2f}x time"
                     f"  {_fmt(mem, '.2f')}x memory" + (f"  {'; '.join(goals)}" if goals else ""))
    return lines


def to_markdown(data: dict, title: str | None = None, command: str | None = None) -> str:
    """A BENCHMARKS.md section generated from a JSON record (see ``write_json``)."""
    meta, rows = data["meta"], data["results"]
    out = []
    if title:
        out += [f"## {title}", ""]
    out.append(f"- device: {meta.get('device_name')} (`{meta.get('device')}`), dtype {meta.get('dtype')}, "
               f"batch {', '.join(str(b) for b in meta.get('batches', []))}")
    out.append(f"- torch {meta.get('torch')}, triton {meta.get('triton')}, onnx {meta.get('onnx')}, "
               f"onnxruntime {meta.get('onnxruntime')}, Python {meta.get('python')}")
    run = f"- commit `{meta.get('commit')}`, {meta.get('date')}"
    if meta.get("seconds") is not None:
        run += f", the run took {meta['seconds']:.0f} s"
    if meta.get("interrupted"):
        run += " (interrupted: only the cases measured before the interruption)"
    loads = [meta.get("load_average_start"), meta.get("load_average")]
    if all(loads):
        run += (f"; 1-minute load average {loads[0][0]:.1f} at its start, {loads[1][0]:.1f} at its end "
                f"(other processes share these cores)")
    out.append(run)
    if meta.get("matmul_tflops"):
        out.append(f"- measured at the start of the run: GEMM {_gemm_rates(meta)}"
                   + (f", copy {meta['copy_gbps']:.1f} GB/s" if meta.get("copy_gbps") else "")
                   + " (each row's roofline uses the fastest GEMM rate timed in its own rounds)")
    if meta.get("memory_method"):
        out.append(f"- peak memory: {_memory_counted(meta)}")
    backends = meta.get("backends") or {}
    if backends and "error" not in backends:
        present = [k for k, v in backends.items() if v.get("available")]
        auto = f" (backend=\"auto\" runs {meta['auto_backend']})" if meta.get("auto_backend") else ""
        out.append(f"- MLDecoderFast backends available: {', '.join(present) or 'none'}{auto}")
    cmd = command or meta.get("command")
    if cmd:
        out.append(f"- reproduce: `{cmd}`")
    skipped = data.get("skipped") or {}
    if skipped:
        out.append("- not run: " + "; ".join(f"`{k}`: {v}" for k, v in skipped.items()))
    out.append("")
    if rows:
        out.append("| " + " | ".join(TABLE_COLUMNS) + " |")
        out.append("|" + "|".join("---" if i < 4 or i == len(TABLE_COLUMNS) - 1 else "---:"
                                  for i in range(len(TABLE_COLUMNS))) + "|")
        for r in table_rows(rows):
            out.append("| " + " | ".join(c.replace("|", "/") for c in r) + " |")
        out.append("")
        out += ["```", *summary(rows, meta), "```", ""]
    if data.get("scaling"):
        out.append(scaling_markdown(data["scaling"]))
    return "\n".join(out)


def scaling_markdown(rows) -> str:
    rows = _rows(rows)
    impls = sorted({r["impl"] for r in rows}, key=lambda n: (n != REFERENCE, n != EXPERT, n))
    classes = sorted({r["classes"] for r in rows})
    out = []
    for mode in ("train", "eval"):
        out.append(f"Scaling, {mode}: ms (median) / peak MB")
        out.append("")
        out.append("| classes | " + " | ".join(impls) + " |")
        out.append("|---:|" + "---:|" * len(impls))
        by = {(r["classes"], r["impl"]): r for r in rows if r["mode"] == mode}
        for c in classes:
            cells = []
            for i in impls:
                r = by.get((c, i))
                if r is None or r.get("median_ms") is None:
                    cells.append("-")
                else:
                    cells.append(f"{r['median_ms']:.1f} / {_mb(r.get('peak_bytes'))}")
            out.append(f"| {c:,} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


# -- BENCHMARKS.md -------------------------------------------------------------------------------

_FLOORS = ", ".join(f"{o:.0e} / {g:.0e} in {str(dt).replace('torch.', '')}"
                    for dt, (o, g) in ERROR_FLOOR.items() if dt != torch.float64)
BENCHMARKS_INTRO = """\
# Benchmarks

Generated by `python -m mldecoder_fast.benchmark.report` from the JSON records that
`mldecoder-fast bench --json` wrote (kept under `docs/bench/`); no number here is typed by hand.

What is measured (see `mldecoder_fast/benchmark/`):

- **Implementations**, all in one process, on the same weights (one seeded reference's
  state_dict, biases and LayerNorm affines perturbed) and the same inputs: `reference` (the
  faithful MLDecoder: nn.MultiheadAttention, per-sample query path, K-step group-FC loop into a
  zero buffer), `eager-expert` (hand-written plain PyTorch: one k/v GEMM, SDPA, one q projection
  per batch in eval, bmm group FC), `compiled-*` (torch.compile of those two, when requested),
  every available MLDecoderFast backend (`fast-torch`, `fast-cpp`, `fast-cuda`, `fast-triton`),
  on CUDA `graphed-*` (the head replayed from CUDA graphs: `cuda_graphed` in eval,
  `torch.cuda.make_graphed_callables` in training) and, when named, torch.compile's GPU peers
  (`compiled-expert-max-autotune-no-cudagraphs`, `compiled-*-reduce-overhead`; graphed and
  reduce-overhead rows report no peak memory: theirs is a pool allocated at capture),
  and `onnxruntime` (eval, CPU, float32): MLDecoderFast exported by `mldecoder_fast.export_onnx`
  (`torch.onnx.export(..., dynamo=True)`, dynamic batch) run by ONNX Runtime with the benchmark's
  threads intra-op, one inter-op thread, sequential execution, no spinning.
- **Modes**: `eval` = forward under `torch.no_grad` in eval mode; `train` = one training step:
  forward, BCE-with-logits against fixed random targets, backward (input gradient included), a
  fused AdamW step (state allocated before measuring), zeroing the gradients; dropout p = 0.1 as
  in the head. Records made before the optimizer step was timed say so in their section.
- **Agreement**: before timing, every implementation is compared, tensor by tensor (eval logits;
  in training with every dropout at p = 0, the logits, the input gradient and every parameter
  gradient), with the reference run in float64 on the same weights and inputs. The relative RMS
  error of each tensor may be up to max(2x the reference's own error in the run's dtype, a floor):
  floors (outputs / gradients) {floors}.
  The JSON keeps, per row, each tensor's error (`errors`) and bound (`allowed`); the reference's
  row holds its own errors. A mismatch is printed as MISMATCH and makes the command exit 1.
- **Time**: median of up to 5 timed calls (`n`) after warm-up, the implementations of one case
  timed in interleaved rounds (so a change of load from other processes hits them alike). Ratios
  (`x ref` = reference time / this time, `x expert` likewise) are what to read: these machines
  are shared.
- **Peak memory**: bytes allocated during one step beyond what existed before it (weights,
  input, optimizer state), plus what the head holds between steps beyond its parameters
  (`MLDecoderFast`'s caches: eval queries, weight copies, packed weights): on CUDA
  `max_memory_allocated`; on the CPU the maximum running sum of the allocations and frees of
  PyTorch's CPU allocator recorded by `torch.profiler` (`profile_memory=True`).
- **Roofline**: the head's FLOPs (docs/benchmarks.md formula; a training step counts 3x the forward)
  over the fastest GEMM rate measured in the same dtype, in the same interleaved rounds: a large
  square `torch.mm`, and on the CPU also oneDNN's inner product
  (`torch.ops.mkldnn._linear_pointwise` on dense tensors, about 2x `torch.mm` in fp32 on AVX-512
  machines); each row records the rates (`matmul_rates`). On a GPU the floor is the larger of that
  and the bytes that must move over the measured copy bandwidth.
- **Reading the CPU numbers**: the CPU records come from a 2-core machine shared with other
  jobs (the load average is recorded with each run). Compare ratios within one run, not
  milliseconds across runs. The reference's training step at many classes is bound by page
  faults: its group-FC loop materialises a full [K, D, G] weight gradient per group (67 MB x 100
  per step at 21,843 classes), so its time, and every `x ref` of those rows, moves with how fast
  the kernel hands out fresh pages at that moment (21,843 classes, batch 16: 0.72 s in one run and 2.55 s
  in the next, minutes apart, same commit, quiet machine).
  `pytest bench/` (pytest-benchmark) times implementations one after another, not interleaved:
  use `mldecoder-fast bench` for ratios.
""".replace("{floors}", _FLOORS)


def benchmarks_markdown(sections: list[tuple[str, dict, str | None]], regenerate: str | None = None) -> str:
    """BENCHMARKS.md: the intro, then one generated section per (title, JSON record, PNG or None)."""
    out = [BENCHMARKS_INTRO]
    if regenerate:
        out.append(f"Regenerate this file from the records with\n\n```\n{regenerate}\n```\n")
    for title, data, image in sections:
        if isinstance(data, str):  # a text record (e.g. bench/gpu_check.sh's summary), verbatim
            out.append(f"## {title}\n\n```\n{data.rstrip()}\n```\n")
            continue
        out.append(to_markdown(data, title=title))
        if image:
            out.append(f"![{title}]({image})\n")
    if not any(isinstance(d, str) or str(d["meta"].get("device", "")).startswith("cuda")
               for _, d, _ in sections):
        out.append("## GPU\n\nNo GPU record yet. On a GPU machine, `bench/gpu_check.sh` (or "
                   "`mldecoder-fast bench --device cuda --json PATH`) writes the records; add each "
                   "as a `--section` of the command above.\n")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mldecoder_fast.benchmark.report",
                                description="Write BENCHMARKS.md from saved `mldecoder-fast bench --json` records.")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--section", action="append", default=[], metavar="TITLE=JSON[=PNG]",
                   help="one section per record, in order; PNG (relative to the output) is shown below it; "
                        "a .txt record (bench/gpu_check.sh's summary.txt) is shown verbatim")
    args = p.parse_args(argv)
    sections = []
    for spec in args.section:
        parts = spec.split("=")
        if len(parts) not in (2, 3):
            p.error(f"--section wants TITLE=JSON[=PNG], got {spec!r}")
        record = Path(parts[1]).read_text() if parts[1].endswith(".txt") else load_json(parts[1])
        sections.append((parts[0], record, parts[2] if len(parts) == 3 else None))
    import shlex
    regenerate = " \\\n    ".join(["python -m mldecoder_fast.benchmark.report --out " + shlex.quote(args.out)]
                                  + [f"--section {shlex.quote(spec)}" for spec in args.section])
    Path(args.out).write_text(benchmarks_markdown(sections, regenerate))
    print(f"wrote {args.out} ({len(sections)} section(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
