"""``fewbit study`` records rendered: the table (rich), the markdown report and the metric-vs-bits plot.

A study record is what ``results.json`` holds: ``workload``, ``metric``, ``higher_is_better``, ``secondary`` (a
finer metric shown beside the main one, or None), ``split``, ``config``, ``baseline`` (path, train, data,
versions) and ``results`` (one row per recipe: ``recipe``, ``metric``, ``delta``, ``bits_per_weight``,
``weight_bytes``, ``seconds``, ``metrics``).
"""

from __future__ import annotations

import json

from rich.table import Table

from fewbit.report import markdown as md
from fewbit.report import plots


def columns(study: dict) -> list[str]:
    extra = [study["secondary"]] if study["secondary"] else []
    return ["recipe", study["metric"], "change vs fp32", *extra, "bits/weight", "weight bytes"]


def cells(study: dict) -> list[list[str]]:
    rows = []
    for r in study["results"]:
        extra = [f"{r['metrics'][study['secondary']]:.4f}"] if study["secondary"] else []
        rows.append([r["recipe"], f"{r['metric']:.2f}", f"{r['delta']:+.2f}", *extra, f"{r['bits_per_weight']:.2f}",
                     f"{r['weight_bytes']:,}"])
    return rows


def table(study: dict) -> Table:
    arrow = "higher is better" if study["higher_is_better"] else "lower is better"
    t = Table(title=f"fewbit study: {study['workload']} ({study['split']} split, {study['metric']}: {arrow})",
              title_style="bold")
    for col in columns(study):
        t.add_column(col, justify="left" if col == "recipe" else "right")
    for row in cells(study):
        t.add_row(*row)
    return t


def plot_name(study: dict) -> str:
    return f"{study['metric']}_vs_bits.png"


def markdown(study: dict) -> str:
    b = study["baseline"]
    secondary = f"; beside it {study['secondary']}" if study["secondary"] else ""
    lines = [
        f"# fewbit study: {study['workload']}",
        "",
        f"Metric: **{study['metric']}** on the {study['split']} split "
        f"({'higher' if study['higher_is_better'] else 'lower'} is better){secondary}. The FP32 baseline is "
        "evaluated directly cast under each recipe: the weights and activations "
        "of every converted layer quantized as the recipe says, no retraining; embeddings and norms stay in "
        "float32. Bits per weight count the converted layers' weights with their scales.",
        "",
        *md.table(columns(study), cells(study)),
        "",
        "## Baseline",
        "",
        f"- trained: {b.get('train', {}).get('steps')} steps in {b.get('train', {}).get('seconds')} s "
        f"(cached run: `{b.get('path')}`)",
        f"- data: {json.dumps(b.get('data', {}))}",
        f"- versions: {json.dumps(b.get('versions', {}))}",
        "",
        *md.config_section(study["config"]),
        f"![{study['metric']} vs bits per weight]({plot_name(study)})",
        "",
    ]
    return "\n".join(lines)


def plot(study: dict) -> bytes:
    """The metric of each recipe against its bits per weight (log2 axis), the fp32 level dashed."""
    fig, ax = plots.figure()
    rows = study["results"]
    ax.scatter([r["bits_per_weight"] for r in rows], [r["metric"] for r in rows], color="tab:blue", zorder=3)
    for r in rows:
        ax.annotate(r["recipe"], (r["bits_per_weight"], r["metric"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.axhline(rows[0]["metric"], color="grey", linestyle="--", linewidth=1, label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (converted layers, scales included)")
    ax.set_ylabel(f"{study['metric']} ({study['split']})")
    ax.set_title(f"fewbit study: {study['workload']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return plots.png(fig)
