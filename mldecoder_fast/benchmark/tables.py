"""A record's rows as text: the CLI's fixed-width table, markdown table rows, the scaling table."""
from __future__ import annotations

from .contenders import EXPERT, REFERENCE
from .record import CPU_ISA_FLAGS
from .runner import Result


def as_dicts(results) -> list[dict]:
    return [r.as_dict() if isinstance(r, Result) else r for r in results]


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def mb(b) -> str:
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
    rows = as_dicts(results)
    ref_mem = {(r["config"], r["mode"], r["batch"]): r.get("peak_bytes") for r in rows
               if r["impl"] == REFERENCE}
    out = []
    for r in rows:
        base = ref_mem.get((r["config"], r["mode"], r["batch"]))
        mem_ratio = (r["peak_bytes"] / base) if (r.get("peak_bytes") is not None and base) else None
        n = len(r.get("times_ms") or [])
        out.append([r["config"], r["mode"], str(r["batch"]), r["impl"], fmt(r.get("median_ms"), ".1f"),
                    str(n) if n else "-",
                    fmt(r.get("speedup_vs_reference"), ".2f"), fmt(r.get("speedup_vs_expert"), ".2f"),
                    mb(r.get("peak_bytes")), fmt(mem_ratio, ".2f"), fmt(r.get("roofline"), ".0%"),
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
        lines.append(meta_line(meta))
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


def meta_line(meta: dict) -> str:
    parts = [f"device: {meta.get('device_name')} [{meta.get('device')}]", f"dtype: {meta.get('dtype')}",
             f"torch {meta.get('torch')}"]
    cpu = meta.get("cpu")
    if cpu and str(meta.get("device", "")).startswith("cpu"):
        parts.append(f"ISA {', '.join(cpu['isa']) or 'none of ' + '/'.join(CPU_ISA_FLAGS)}"
                     f" (ATen {cpu['aten_capability']})")
    if meta.get("triton"):
        parts.append(f"triton {meta['triton']}")
    if meta.get("matmul_tflops"):
        parts.append(f"GEMM {gemm_rates(meta)}")
    if meta.get("copy_gbps"):
        parts.append(f"copy {meta['copy_gbps']:.1f} GB/s")
    if meta.get("commit"):
        parts.append(f"commit {meta['commit']}")
    if meta.get("memory_method"):
        parts.append(f"memory: {memory_counted(meta)}")
    return " | ".join(parts)


def memory_counted(meta: dict) -> str:
    """What a record's peak memory counts (records made before ``held_bytes`` count only what a
    step allocates)."""
    if "held" in meta.get("memory_method", ""):
        return "a step's peak plus what the head holds between steps (caches)"
    return "a step's peak only (what the head holds between steps, e.g. cached weight copies, not counted)"


def gemm_rates(meta: dict) -> str:
    """"torch.mm 210, onednn 440 GFLOP/s" (older records: their one matmul rate)."""
    rates = meta.get("matmul_gflops") or {"matmul": meta["matmul_tflops"] * 1e3}
    return ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s"


def scaling_markdown(rows) -> str:
    rows = as_dicts(rows)
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
                    cells.append(f"{r['median_ms']:.1f} / {mb(r.get('peak_bytes'))}")
            out.append(f"| {c:,} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
