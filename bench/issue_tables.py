"""The GPU check's tables of eval latency (eager, graphed, torch.compile peers) and training steps
(graphed steps, profiles, end to end), and their targets, from the JSON records of
bench/gpu_check.sh's stages ``eval_latency``, ``train_step`` and ``e2e`` (its second list).

    python bench/issue_tables.py OUT_DIR          # reads OUT_DIR/eval_latency-*.json, train_step-*.json, ...

Times are medians in ms. A target that compares two implementations uses the two rows of one
record (the same process, timed in interleaved rounds); a target on one row's time uses the first
record, in the stages' order, that measured it. A row missing (stage skipped or cut short by its
time limit) is "n/a", never a pass.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

# Parts of each stage in the order gpu_check.sh runs them (their records' names after the prefix).
PARTS = {"eval_latency": ["eager", "vs_reduce_overhead", "vs_max_autotune", "fast_reduce_overhead"],
         "train_step": ["eager", "compiled", "fast_reduce_overhead"]}
FAST = ("fast-torch", "fast-triton")
GRAPHED = tuple("graphed-" + f for f in FAST)
MAX_AUTOTUNE = "compiled-expert-max-autotune-no-cudagraphs"
REDUCE_OVERHEAD = "compiled-expert-reduce-overhead"


def load(out: str, stage: str) -> list[tuple[str, list[dict]]]:
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

    at_most("COCO eval B=1 graphed (cuda_graphed, best backend)", "coco", 1, GRAPHED, 0.10)
    for impl in FAST:
        at_most(f"COCO eval B=1 eager {impl}", "coco", 1, [impl], 0.5)
    at_most("COCO eval B=256 (best eager backend)", "coco", 256, FAST, 1.0)
    at_most("ImageNet-21K eval B=256 (best eager backend)", "21k", 256, FAST, 0.7)
    for batch in (1, 32, 256):
        for what, peer, mine in (("eager", MAX_AUTOTUNE, FAST), ("graphed", REDUCE_OVERHEAD, GRAPHED)):
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
        for eager in ("eager-expert", *FAST):
            graphed = "graphed-" + ("expert" if eager == "eager-expert" else eager)
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
    """Per mode, which eager fast backend measured fastest in each case (what ``auto`` should pick)."""
    out = ["fastest eager backend per case (for backend='auto'):"]
    for mode in ("eval", "train"):
        picks = []
        for fam, b in rows.cases(mode):
            found = [(ms, i) for i in FAST for ms, _ in [rows.ms(fam, mode, b, i)] if ms is not None]
            if len(found) == len(FAST):
                (best, name), (other, _) = sorted(found)
                picks.append(f"{fam} B={b}: {name.removeprefix('fast-')} ({other / best:.2f}x)")
        out.append(f"  {mode}: " + ("; ".join(picks) if picks else "n/a"))
    return out


def main(argv=None) -> int:
    out_dir = (argv if argv is not None else sys.argv[1:])[0]
    r11, r12 = Rows(load(out_dir, "eval_latency")), Rows(load(out_dir, "train_step"))
    profiles = []
    for path in sorted(glob.glob(os.path.join(out_dir, "train_step_profile_*.json"))):
        try:
            profiles.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"(unreadable {path}: {exc})")
    lines = (eval_latency_tables(r11) + [""] + train_step_tables(r12, profiles) + [""]
             + auto_choice(Rows(r11.records + r12.records)))
    e2e = Path(out_dir, "e2e_train.json")
    if e2e.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from e2e_train import format_table
        lines += ["", format_table(json.loads(e2e.read_text()))]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
