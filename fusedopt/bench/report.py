"""Turning a results dict (from :func:`fusedopt.bench.runner.run`) into a text table,
Markdown, JSON and a PNG chart."""

from __future__ import annotations

import json
import textwrap
import math
from pathlib import Path

__all__ = ["format_table", "format_markdown", "write_results", "plot_results", "sections"]

_COLS = ("preset", "optimizer", "impl", "ms/step", "GB/s", "% of stream BW", "fusedopt speedup")
# A section with fusedopt precision variants: bytes per element differ from row to row, and each
# row is compared with torch's fused step on the same params.
_COLS_PRECISION = ("preset", "optimizer", "impl", "B/elem", "ms/step", "GB/s", "% of stream BW",
                   "fusedopt speedup", "vs torch-fused")

_PRECISION_LEGEND = {
    "master": "master_weights=True (fp32 master)",
    "master+rem": "master_weights=True, master_remainders=True (int16 remainder)",
    "fp32-state": "state_dtype=torch.float32",
    "master+fp32-state": "master_weights=True, state_dtype=torch.float32",
    "sr": "stochastic_rounding=True",
}


def _has_precision(recs: list[dict]) -> bool:
    return any(r.get("precision") not in (None, "none") for r in recs)


def _cols(recs: list[dict]) -> tuple[str, ...]:
    return _COLS_PRECISION if _has_precision(recs) else _COLS


def sections(res: dict) -> list[tuple[str, str, list[dict]]]:
    """[(device, dtype, records)] in run order."""
    order: list[tuple[str, str]] = []
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in res["results"]:
        key = (r["device"], r["dtype"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(r)
    return [(d, t, groups[(d, t)]) for d, t in order]


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _row(r: dict, precision: bool = False) -> list[str]:
    """One table row; ``precision``: the wider layout of _COLS_PRECISION."""
    head = [r["preset"], r["optimizer"], r["impl"]] + ([str(r.get("bytes_per_element", ""))] if precision else [])
    if r["status"] != "ok":
        na = "n/a" if r["status"] == "n/a" else "skipped"
        return head + [na, "", "", ""] + ([""] if precision else [])
    sp = r.get("fusedopt_speedup")
    sp_s = f"{sp:.2f}x" if sp is not None else ("(ref)" if r["impl"] in ("fusedopt", "fusedopt-graph") else "")
    row = head + [_fmt_ms(r["median_ms"]), f"{r['gbps']:.1f}", f"{r['pct_of_stream']:.0f}%", sp_s]
    if precision:
        vf = r.get("speedup_vs_torch_fused")
        row.append("(ref)" if r["impl"] == "torch-fused" else (f"{vf:.2f}x" if vf is not None else ""))
    return row


def _header(res: dict, dev: str, dtype: str) -> str:
    info = res["devices"].get(dev, {})
    bw = info.get("bandwidth", {})
    return (f"{dev} [{info.get('name', '?')}] {dtype}; streaming bandwidth {bw.get('gbps', float('nan')):.1f} GB/s "
            f"({bw.get('method', '?')})")


def _footer(res: dict) -> list[str]:
    lines = []
    seen = set()
    for r in res["results"]:
        key = f"{r['device']}/{r['preset']}"
        if key in seen:
            continue
        seen.add(key)
        p = res["presets"].get(key, {})
        lines.append(f"{r['preset']} on {r['device']}: {p.get('note', '')} "
                     f"({p.get('num_tensors', 0):,} tensors, {p.get('numel', 0):,} elements)")
    lines.append("ms/step: median of timed steps after warm-up. GB/s: bytes the update must move "
                 "(SGD 3/5 x elem size plain/momentum, Adam(W) 7x, amsgrad 9x, RMSprop/Adagrad/Lion 5x, per "
                 "element; precision variants: each tensor at its own size) / median time. "
                 "fusedopt speedup = t(torch variant) / t(fusedopt); > 1 means fusedopt is faster. "
                 "% of stream BW: GB/s against the streaming reference sampled during the same "
                 "preset and optimizer's timing rounds (the machine's bandwidth drifts; the header's "
                 "figure is the run's median). It may exceed 100% on CPU: the reference kernel reads and writes 1:1, "
                 "an optimizer step is read-heavy (Adam 4 reads : 3 writes) and reads stream faster.")
    variants = list(dict.fromkeys(r["precision"] for r in res["results"] if r.get("precision") not in (None, "none")))
    if variants:
        lines.append("Precision variants: fusedopt:OPTION is fusedopt with "
                     + "; ".join(f"{v} = {_PRECISION_LEGEND.get(v, v)}" for v in variants)
                     + ". The plain fusedopt row keeps its state in the param dtype (torch's behaviour). "
                     "B/elem: bytes moved per element (fusedopt/bench/bytes_model.py: with a master the "
                     "16-bit param is only written; a remainder is read and written with the param). "
                     "vs torch-fused = t(torch-fused) / t(row): > 1 means this row is faster than torch's "
                     "fused step on the same params (whose state is in the param dtype).")
    reasons = {}
    for r in res["results"]:
        if r["status"] == "n/a":
            reasons.setdefault(r["reason"], []).append(f"{r['device']}/{r['dtype']}/{r['preset']}/{r['optimizer']}/{r['impl']}")
    for why, where in reasons.items():
        shown = ", ".join(where[:4]) + (f", ... ({len(where)} cells)" if len(where) > 4 else "")
        lines.append(f"n/a: {why} [{shown}]")
    lines += res.get("notes", [])
    m = res["meta"]
    lines.append(f"torch {m.get('torch')}, {_fusedopt_text(m)}, "
                 f"{m.get('torch_num_threads')} CPU threads, commit {(m.get('git') or {}).get('commit') or 'n/a'}; "
                 f"wall time {m.get('wall_s', float('nan')):.0f} s")
    return lines


def format_table(res: dict) -> str:
    """Plain-text table (one block per device/dtype) followed by notes."""
    out = []
    for dev, dtype, recs in sections(res):
        cols = _cols(recs)
        prec = cols is _COLS_PRECISION
        rows = [list(cols)] + [_row(r, prec) for r in recs]
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        right = set(range(3, len(cols)))
        out.append("")
        out.append(_header(res, dev, dtype))

        def fmt(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        out.append(fmt(rows[0]))
        out.append("  ".join("-" * w for w in widths))
        prev = None
        for row in rows[1:]:
            key = (row[0], row[1])
            shown = list(row)
            if prev is not None and key[0] == prev[0]:
                shown[0] = ""
                if key[1] == prev[1]:
                    shown[1] = ""
            elif prev is not None:
                out.append("")
            out.append(fmt(shown))
            prev = key
    out.append("")
    out += _footer(res)
    return "\n".join(out)


def _fusedopt_text(meta: dict, quote: str = "") -> str:
    """"fusedopt <version>", and what the fusedopt rows really ran when that is something else (a
    stand-in, an unavailable extension)."""
    text = f"fusedopt {meta.get('fusedopt')}"
    impl = meta.get("fusedopt_impl")
    return text if impl == text else f"{text} ({quote}{impl}{quote})"


def format_markdown(res: dict) -> str:
    m = res["meta"]
    lines = ["# fusedopt benchmark", ""]
    lines.append(f"- torch {m.get('torch')}, {_fusedopt_text(m, '`')}, "
                 f"python {m.get('python')}, {m.get('torch_num_threads')} CPU threads")
    git = m.get("git") or {}
    lines.append(f"- git commit: `{git.get('commit') or 'n/a'}`{' (dirty)' if git.get('dirty') else ''}; "
                 f"started {m.get('started')}, wall time {m.get('wall_s', float('nan')):.0f} s")
    for dev, info in res["devices"].items():
        bw = info["bandwidth"]
        lines.append(f"- `{dev}`: {info['name']}; streaming bandwidth **{bw['gbps']:.1f} GB/s** ({bw['method']})")
    for dev, dtype, recs in sections(res):
        lines += ["", f"## {dev}, {dtype}", ""]
        cols = _cols(recs)
        prec = cols is _COLS_PRECISION
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(cols) - 3)) + "|")
        for r in recs:
            lines.append("| " + " | ".join(_row(r, prec)) + " |")
    lines += ["", "## Notes", ""]
    lines += [f"- {x}" for x in _footer(res)[:-1]]
    return "\n".join(lines) + "\n"


def _impl_colors(impls: list[str]) -> dict[str, str]:
    fixed = {"fusedopt": "#d62728", "fusedopt-graph": "#ff9896", "torch-forloop": "#7f7f7f",
             "torch-foreach": "#1f77b4", "torch-fused": "#2ca02c", "torch-fused-graph": "#98df8a"}
    variants = {"fusedopt:master": "#ff7f0e", "fusedopt:master+rem": "#ffbb78", "fusedopt:fp32-state": "#9467bd",
                "fusedopt:master+fp32-state": "#8c564b", "fusedopt:sr": "#e377c2"}
    fixed.update(variants)
    return {i: fixed.get(i, "#17becf") for i in impls}


def plot_results(res: dict, path: str | Path) -> Path:
    """Grouped bars per (device, dtype, preset): step time (log scale) and % of stream bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    panels = []
    for dev, dtype, recs in sections(res):
        presets = list(dict.fromkeys(r["preset"] for r in recs))
        for pre in presets:
            panels.append((dev, dtype, pre, [r for r in recs if r["preset"] == pre]))
    impls = list(dict.fromkeys(r["impl"] for r in res["results"]))
    colors = _impl_colors(impls)
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 2, figsize=(12, 2.7 * n + 1.0), squeeze=False, layout="constrained")
    for row, (dev, dtype, pre, recs) in enumerate(panels):
        opts = list(dict.fromkeys(r["optimizer"] for r in recs))
        here = [i for i in impls if any(r["impl"] == i for r in recs)]
        width = 0.8 / max(1, len(here))
        note = res["presets"].get(f"{dev}/{pre}", {}).get("note", "")
        for col, (key, ylabel) in enumerate((("median_ms", "ms / step (log)"), ("pct_of_stream", "% of stream BW"))):
            ax = axes[row][col]
            for k, impl in enumerate(here):
                xs, ys, labels = [], [], []
                for j, opt in enumerate(opts):
                    r = next((r for r in recs if r["optimizer"] == opt and r["impl"] == impl), None)
                    x = j - 0.4 + width * (k + 0.5)
                    if r is None or r["status"] != "ok":
                        if r is not None:
                            ax.text(x, 0.02, "n/a" if r["status"] == "n/a" else "skip", rotation=90,
                                    ha="center", va="bottom", fontsize=6, color="0.4",
                                    transform=ax.get_xaxis_transform())
                        continue
                    xs.append(x)
                    ys.append(r[key])
                    labels.append(f"{r[key]:.0f}" if key == "pct_of_stream" else _fmt_ms(r[key]))
                bars = ax.bar(xs, ys, width * 0.92, color=colors[impl])
                ax.bar_label(bars, labels=labels, fontsize=6, padding=1, rotation=90 if len(here) > 4 else 0)
            ax.set_xticks(range(len(opts)))
            ax.set_xticklabels(opts)
            ax.set_ylabel(ylabel)
            if key == "median_ms":
                # a panel whose every row is n/a has no value to scale by: it keeps a linear axis
                vals = [r["median_ms"] for r in recs if r["status"] == "ok"]
                if vals:
                    ax.set_yscale("log")
                    ax.set_ylim(min(vals) / 2.5, max(vals) * 4)
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
            else:
                ax.axhline(100, color="0.5", lw=0.8, ls="--")
                top = max([r.get("pct_of_stream", 0) or 0 for r in recs] + [100])
                ax.set_ylim(0, top * 1.25)
            ax.grid(axis="y", alpha=0.3)
            if col == 0:
                ax.set_title(f"{pre}  ({dev}, {dtype}): step time", fontsize=9.5, loc="left", fontweight="bold")
            else:
                ax.set_title(textwrap.fill(f"% of streaming bandwidth. {note}", 88), fontsize=7.5, loc="left")
    m = res["meta"]
    bws = "; ".join(f"{d}: {info['bandwidth']['gbps']:.0f} GB/s stream" for d, info in res["devices"].items())
    fig.supxlabel(f"fusedopt vs torch.optim - torch {m.get('torch')}, {m.get('fusedopt_impl')}; {bws}. "
                  "Bars: median ms/step (log scale) and effective GB/s as % of the streaming reference.",
                  fontsize=8, color="0.3")
    # one entry per implementation of the whole run, in its panels' colours (a panel alone may
    # lack some, or have only n/a rows for them)
    handles = [Patch(color=colors[i], label=i) for i in impls]
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 6), fontsize=8.5,
                   frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def write_results(res: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(_jsonable(res), indent=1) + "\n")
    paths["md"].write_text(format_markdown(res))
    plot_results(res, paths["png"])
    return paths
