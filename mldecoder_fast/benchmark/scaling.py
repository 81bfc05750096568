"""How cost grows with the number of classes: time and peak memory of an eval forward and of a
training step at 80 ... 100k classes (ResNet-50 224 px features, default 100 groups, so the group
FC's G grows from 1 to 1000), for the reference, the eager-expert and MLDecoderFast.

``run_scaling`` measures (same machinery as the main table: agreement check, median, peak memory);
``plot_scaling`` draws a PNG: one row per mode, columns time, peak memory (both log-log) and
speedup over the reference (log-x), one line per implementation.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .cases import MODES, make_case
from .configs import SCALING_CLASSES, BenchConfig, scaling_config
from .contenders import EXPERT, REFERENCE, Impl, auto_backend, implementations
from .runner import Result, fill_ratios, run_case

_STYLE = {REFERENCE: dict(color="#7f7f7f", marker="o"), EXPERT: dict(color="#1f77b4", marker="s")}
_FAST_COLORS = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def scaling_impls(device, impls: list[Impl] | None = None) -> list[Impl]:
    """Reference, eager-expert and MLDecoderFast as a user gets it (backend "auto")."""
    if impls is not None:
        return impls
    available, _ = implementations(device, include_compiled=False)
    chosen = [i for i in available if i.name in (REFERENCE, EXPERT)]
    try:
        from ..head.fast import MLDecoderFast
    except Exception:  # no fast head: baselines only
        return chosen
    # Named like the main table's row of the backend that "auto" resolves to.
    resolved = auto_backend(device) or "auto"
    chosen.append(Impl(f"fast-{resolved}", lambda c: c.make_head(MLDecoderFast, backend="auto"),
                       backend="auto"))
    return chosen


def run_scaling(device, dtype: torch.dtype = torch.float32, batch: int = 16,
                classes: Iterable[int] = SCALING_CLASSES, modes=MODES, impls: list[Impl] | None = None,
                base: BenchConfig | None = None, progress=None, **kwargs) -> list[Result]:
    device = torch.device(device)
    impls = scaling_impls(device, impls)
    out: list[Result] = []
    for n in classes:
        if base is None:
            cfg = scaling_config(n)
        else:
            import dataclasses
            cfg = dataclasses.replace(base, name=f"{base.name}-{n}cls", num_classes=n)
        for mode in modes:
            if progress is not None:
                progress.set_description(f"scaling {n} classes {mode}")
            case = make_case(cfg, mode, device, dtype, batch)
            out += run_case(case, impls, on_result=(lambda r: progress.update(1)) if progress else None,
                            **kwargs)
            del case
    fill_ratios(out)
    return out


def _yscale(ax) -> str:
    """Log y where the curves span a wide range (growth with classes), linear otherwise."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    return "log" if ys and max(ys) / min(ys) >= 5 else "linear"


def plot_scaling(rows, path, title: str | None = None) -> None:
    """Write the scaling PNG (see module docstring). ``rows``: Results or their dicts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    rows = [r.as_dict() if isinstance(r, Result) else r for r in rows]
    impls = sorted({r["impl"] for r in rows}, key=lambda n: (n != REFERENCE, n != EXPERT, n))
    modes = [m for m in ("train", "eval") if any(r["mode"] == m for r in rows)]
    fig, axes = plt.subplots(len(modes), 3, figsize=(15, 4.2 * len(modes)), squeeze=False)
    fast_i = 0
    styles = {}
    for name in impls:
        if name in _STYLE:
            styles[name] = _STYLE[name]
        else:
            styles[name] = dict(color=_FAST_COLORS[fast_i % len(_FAST_COLORS)], marker="^")
            fast_i += 1
    for row, mode in enumerate(modes):
        ax_t, ax_m, ax_s = axes[row]
        for name in impls:
            pts = sorted((r["classes"], r) for r in rows if r["mode"] == mode and r["impl"] == name
                         and r.get("median_ms") is not None)
            if not pts:
                continue
            xs = [c for c, _ in pts]
            ax_t.plot(xs, [r["median_ms"] for _, r in pts], label=name, **styles[name])
            mem = [(c, r["peak_bytes"] / 2**20) for c, r in pts if r.get("peak_bytes")]
            if mem:
                ax_m.plot([c for c, _ in mem], [m for _, m in mem], label=name, **styles[name])
            sp = [(c, r["speedup_vs_reference"]) for c, r in pts if r.get("speedup_vs_reference")]
            if sp:
                ax_s.plot([c for c, _ in sp], [s for _, s in sp], label=name, **styles[name])
        what = "training step (fwd + bwd + AdamW)" if mode == "train" else "eval forward"
        ax_t.set(xscale="log", yscale=_yscale(ax_t), xlabel="classes", ylabel="ms (median)",
                 title=f"time, {what}")
        ax_m.set(xscale="log", yscale=_yscale(ax_m), xlabel="classes",
                 ylabel="peak MB (above weights + input)", title=f"peak memory, {what}")
        ax_s.set(xscale="log", xlabel="classes", ylabel="speedup over reference (x)",
                 title=f"speedup, {what}")
        ax_s.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        for ax in (ax_t, ax_m, ax_s):
            if ax.get_yscale() == "log":  # ticks at 1, 2, 5 x 10^k, printed as plain numbers
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
