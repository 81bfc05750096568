"""The targets a run is judged against, and the verdicts.

CPU (``summary``): per (configuration, mode, batch), the headline fast row's ratios to the
reference, and the CPU targets (``CPU_GOALS``) where the run measured them. GPU
(``gpu_targets``): the tables and targets of bench/gpu_check.sh's ``eval_latency`` and
``train_step`` stages, read from their JSON records:

    python -m mldecoder_fast.benchmark.goals OUT_DIR   # OUT_DIR/eval_latency-*.json, train_step-*.json

Times are medians in ms. A target that compares two implementations uses the two rows of one
record (the same process, timed in interleaved rounds); a target on one row's time uses the first
record, in the stages' order, that measured it. A row missing (stage skipped or cut short by its
time limit) is "n/a", never a pass."""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

from ..head.backends import AUTO_MARGIN
from .configs import STANDARD_CONFIGS
from .contenders import EXPERT, GRAPHED, MAX_AUTOTUNE, ONNXRUNTIME, REDUCE_OVERHEAD, REFERENCE
from .tables import as_dicts, fmt

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


def headline_impl(results, meta: dict | None = None) -> str | None:
    """The MLDecoderFast row a user gets by default (backend "auto", as recorded in ``meta``),
    else the first measured fast row."""
    rows = as_dicts(results)
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
    rows = as_dicts(results)
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
                     f"  {fmt(mem, '.2f')}x memory" + (f"  {'; '.join(goals)}" if goals else ""))
    return lines


# ---- the GPU check's targets ----

# Parts of each stage in the order gpu_check.sh runs them (their records' names after the prefix).
PARTS = {"eval_latency": ["eager", "vs_reduce_overhead", "vs_max_autotune", "fast_reduce_overhead"],
         "train_step": ["eager", "compiled", "fast_reduce_overhead"]}
FAST = ("fast-torch", "fast-triton")
GRAPHED_FAST = tuple(GRAPHED + f for f in FAST)
EXPERT_MAX_AUTOTUNE = f"compiled-expert-{MAX_AUTOTUNE}"
EXPERT_REDUCE_OVERHEAD = f"compiled-expert-{REDUCE_OVERHEAD}"


def load_stage(out: str, stage: str) -> list[tuple[str, list[dict]]]:
    """[(part, measured rows)] of ``stage``'s records, in the stage's order."""
    found = {Path(p).stem[len(stage) + 1:]: p for p in glob.glob(os.path.join(out, f"{stage}-*.json"))}
    order = PARTS[stage] + sorted(set(found) - set(PARTS[stage]))
    records = []
    for part in order:
        if part not in found:
            continue
        try:
            data = json.loads(Path(found[part]).read_text())
        except (OSError, ValueError) as exc:
            print(f"(unreadable {found[part]}: {exc})")
            continue
        records.append((part, [r for r in data.get("results", []) if r.get("median_ms") is not None]))
    return records


def _family(config: str) -> str:
    return "coco" if config.startswith("coco") else "21k" if config.startswith("imagenet21k") else config


class Rows:
    def __init__(self, records):
        self.records = records

    def ms(self, family, mode, batch, impl):
        """(ms, row) from the first record that measured it."""
        for _, rows in self.records:
            for r in rows:
                if (_family(r["config"]), r["mode"], r["batch"], r["impl"]) == (family, mode, batch, impl):
                    return r["median_ms"], r
        return None, None

    def ratio(self, family, mode, batch, slow, fast_impls):
        """(time of ``slow`` / time of the fastest of ``fast_impls``, that impl) within one record."""
        for _, rows in self.records:
            by = {r["impl"]: r["median_ms"] for r in rows
                  if (_family(r["config"]), r["mode"], r["batch"]) == (family, mode, batch)}
            mine = [(by[f], f) for f in fast_impls if f in by]
            if slow in by and mine:
                best, name = min(mine)
                return by[slow] / best, name
        return None, None

    def cases(self, mode):
        return sorted({(_family(r["config"]), r["batch"]) for _, rows in self.records for r in rows
                       if r["mode"] == mode}, key=lambda c: (c[0] != "coco", c[1]))

    def impls(self, mode):
        return list(dict.fromkeys(r["impl"] for _, rows in self.records for r in rows if r["mode"] == mode))


def matrix(rows: Rows, mode: str, value, title: str) -> list[str]:
    cases = rows.cases(mode)
    if not cases:
        return [f"{title}: no rows"]
    width = max(len(i) for i in rows.impls(mode)) + 1
    out = [title, f"{'':<{width}}" + "".join(f"{f'{fam} B={b}':>13}" for fam, b in cases)]
    for impl in rows.impls(mode):
        cells = []
        for fam, b in cases:
            _, r = rows.ms(fam, mode, b, impl)
            v = value(r) if r else None
            cells.append(f"{'-' if v is None else f'{v:.3f}' if v < 10 else f'{v:.1f}':>13}")
        out.append(f"{impl:<{width}}" + "".join(cells))
    return out


def verdict(value, limit, at_most: bool) -> str:
    if value is None:
        return "n/a "
    return "met " if (value <= limit if at_most else value >= limit) else "MISS"


def eval_latency_tables(rows: Rows) -> list[str]:
    out = matrix(rows, "eval", lambda r: r["median_ms"], "eval latency, ms (median):")
    out.append("targets:")

    def at_most(what, family, batch, impls, limit, note=""):
        found = [(ms, i, r) for i in impls for ms, r in [rows.ms(family, "eval", batch, i)] if ms is not None]
        ms, impl, r = min(found, key=lambda f: f[0]) if found else (None, None, None)
        extra = ""
        if r is not None:
            extra = f"  ({impl}; x ref {r.get('speedup_vs_reference') or 0:.1f}"
            if r.get("roofline"):
                extra += f"; floor {r['roofline'] * ms:.3f} ms"
            extra += ")"
        value = "" if ms is None else f"{ms:.3f} ms"
        out.append(f"  {verdict(ms, limit, True)} {what:<52} <= {limit:<5} {value}{extra}{note}")

    at_most("COCO eval B=1 graphed (cuda_graphed, best backend)", "coco", 1, GRAPHED_FAST, 0.10)
    for impl in FAST:
        at_most(f"COCO eval B=1 eager {impl}", "coco", 1, [impl], 0.5)
    at_most("COCO eval B=256 (best eager backend)", "coco", 256, FAST, 1.0)
    at_most("ImageNet-21K eval B=256 (best eager backend)", "21k", 256, FAST, 0.7)
    for batch in (1, 32, 256):
        for what, peer, mine in (("eager", EXPERT_MAX_AUTOTUNE, FAST),
                                 ("graphed", EXPERT_REDUCE_OVERHEAD, GRAPHED_FAST)):
            x, impl = rows.ratio("coco", "eval", batch, peer, mine)
            value = "" if x is None else f"{x:.2f}x  ({impl}, same run)"
            out.append(f"  {verdict(x, 1.1, False)} {f'COCO eval B={batch} {what} vs {peer}':<52} >= 1.1x  {value}")
    return out


def train_step_tables(rows: Rows, profiles: list[dict]) -> list[str]:
    out = matrix(rows, "train", lambda r: r["median_ms"], "training step (AdamW included), ms (median):")
    out += matrix(rows, "train", lambda r: r["peak_bytes"] / 2**20 if r.get("peak_bytes") else None,
                  "peak memory of a step, MB (graphed and reduce-overhead rows: their pool, not counted):")
    out.append("graphed / eager step time (same run):")
    for fam, b in rows.cases("train"):
        cells = []
        for eager in (EXPERT, *FAST):
            graphed = GRAPHED + ("expert" if eager == EXPERT else eager)
            x, _ = rows.ratio(fam, "train", b, eager, [graphed])
            cells.append(f"{graphed} {'-' if x is None else f'{x:.2f}x faster'}")
        out.append(f"  {fam} B={b}: " + "; ".join(cells))
    for p in profiles:
        out.append(f"top kernels, {p['config']} {p['mode']} B={p['batch']}:")
        for r in p["results"]:
            top = ", ".join(f"{t['name'][:38]} {t['share'] * 100:.0f}%" for t in r["top"][:3])
            out.append(f"  {r['impl']:<13} wall {r['wall_ms_per_step']:.2f} ms, {r['what']} "
                       f"{r['busy_ms_per_step']:.2f} ms: {top}")
    return out


def auto_choice(rows: Rows) -> list[str]:
    """Per mode, which eager fast backend measured fastest in each case, and what ``auto`` should
    run on this device in that mode: another backend than torch only where it was at least
    ``AUTO_MARGIN`` times faster than torch in every case of the mode (``head/backends.py``)."""
    out = ["fastest eager backend per case (for backend='auto'):"]
    for mode in ("eval", "train"):
        picks, ratios = [], {}
        for fam, b in rows.cases(mode):
            found = {i: ms for i in FAST for ms, _ in [rows.ms(fam, mode, b, i)] if ms is not None}
            if len(found) == len(FAST):
                (best, name), (other, _) = sorted((ms, i) for i, ms in found.items())
                picks.append(f"{fam} B={b}: {name.removeprefix('fast-')} ({other / best:.2f}x)")
                for impl, ms in found.items():
                    ratios.setdefault(impl, []).append(found["fast-torch"] / ms)
        out.append(f"  {mode}: " + ("; ".join(picks) if picks else "n/a"))
        better = [(min(r), impl) for impl, r in ratios.items() if impl != "fast-torch" and min(r) >= AUTO_MARGIN]
        if not picks:
            verdict = "n/a"
        elif better:
            x, impl = max(better)
            verdict = f"{impl.removeprefix('fast-')} (at least {x:.2f}x torch in every case)"
        else:
            verdict = f"torch (no backend {AUTO_MARGIN:.2f}x faster in every case)"
        out.append(f"  auto for {mode}: {verdict}")
    return out


def gpu_targets(out_dir: str) -> list[str]:
    """The GPU check's eval-latency and training-step tables and targets from ``out_dir``."""
    evals, steps = Rows(load_stage(out_dir, "eval_latency")), Rows(load_stage(out_dir, "train_step"))
    profiles = []
    for path in sorted(glob.glob(os.path.join(out_dir, "train_step_profile_*.json"))):
        try:
            profiles.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"(unreadable {path}: {exc})")
    return (eval_latency_tables(evals) + [""] + train_step_tables(steps, profiles) + [""]
            + auto_choice(Rows(evals.records + steps.records)))


def main(argv=None) -> int:
    print("\n".join(gpu_targets((argv if argv is not None else sys.argv[1:])[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
