"""``fewbit study --train`` records rendered: the table (rich), the markdown report, the curves plot and the
gradient-underflow plot.

A record (what ``results.json`` holds): ``workload``, ``metric``, ``higher_is_better``, ``split``, ``config``,
``eval_every``, ``target`` (or None), ``results`` (one row per recipe: ``recipe``, ``status``, ``metric``,
``delta``, ``steps``, ``seconds``, ``skipped_steps``, ``final_scale``, ``steps_to_target``, ``losses``, ``evals``,
``metrics``) and ``gradients`` (the fp32 run's per-layer shares below fp16's smallest subnormal, without and with
the fp16 run's loss scale, and the summed histogram; or None).
"""

from __future__ import annotations

import math

from rich.table import Table

from fewbit.report import markdown as md
from fewbit.report import plots

PLOT = "curves.png"
GRAD_PLOT = "grad_underflow.png"


def columns(record: dict) -> list[str]:
    target = f"steps to {record['target']['describe']}" if record.get("target") else "steps to target"
    return ["recipe", record["metric"], "change vs fp32", target, "skipped steps", "final loss scale", "train s",
            "status"]


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def cells(record: dict) -> list[list[str]]:
    return [[r["recipe"], _fmt(r["metric"], ".2f"), _fmt(r["delta"], "+.2f"),
             _fmt(r["steps_to_target"], "d") if r["steps_to_target"] is not None else "not reached",
             str(r["skipped_steps"]), _fmt(r["final_scale"], "g"), _fmt(r["seconds"], ".0f"), r["status"]]
            for r in record["results"]]


def table(record: dict) -> Table:
    arrow = "higher is better" if record["higher_is_better"] else "lower is better"
    t = Table(title=f"fewbit study --train: {record['workload']} ({record['split']} split, {record['metric']}: "
                    f"{arrow}; {record['config']['steps']} steps)", title_style="bold")
    for col in columns(record):
        t.add_column(col, justify="left" if col in ("recipe", "status") else "right")
    for row in cells(record):
        t.add_row(*row)
    return t


def gradient_cells(record: dict) -> list[list[str]]:
    g = record.get("gradients")
    if not g:
        return []
    return [[layer["layer"], f"{layer['values']:,}", f"{100 * layer['below_fp16']:.3f}",
             _fmt(100 * layer["below_fp16_scaled"], ".3f") if layer["below_fp16_scaled"] is not None else "-"]
            for layer in g["layers"]]


def markdown(record: dict) -> str:
    g = record.get("gradients")
    scale = g.get("loss_scale") if g else None
    lines = [
        f"# fewbit study --train: {record['workload']}",
        "",
        f"Each recipe trains the model from scratch with the same hyper-parameters, seed and data order "
        f"({record['config']['steps']} steps); {record['metric']} on the {record['split']} split at the end "
        f"({'higher' if record['higher_is_better'] else 'lower'} is better), steps to the quality target on the "
        f"valid split (evaluated every {record['eval_every']} steps).",
        "",
        *md.table(columns(record), cells(record)),
        "",
        f"![loss and {record['metric']} curves]({PLOT})",
        "",
    ]
    if g:
        lines += [
            f"## Gradients below fp16's smallest subnormal (fp32 run, step {g['step']})",
            "",
            "Share of each layer's weight-gradient values (exact zeros included) below 2^-24, which fp16 without "
            "loss scaling flushes to zero, and below 2^-24 / S with the fp16 run's final loss scale S = "
            f"{_fmt(scale, 'g')}.",
            "",
            *md.table(["layer", "values", "% below 2^-24", "% below 2^-24 / S"], gradient_cells(record)),
            "",
            f"![gradient histogram]({GRAD_PLOT})",
            "",
        ]
    lines += md.config_section(record["config"])
    return "\n".join(lines)


def plot(record: dict) -> bytes:
    """Two panels: every recipe's training loss (a moving average over 10 steps) and its valid metric against the
    step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110)
    for r in record["results"]:
        losses = [x if math.isfinite(x) else math.nan for x in r["losses"]]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        left.plot(range(1, len(smooth) + 1), smooth, label=r["recipe"], linewidth=1)
        evals = [e for e in r["evals"] if math.isfinite(e.get(record["metric"], math.nan))]
        right.plot([e["step"] for e in evals], [e[record["metric"]] for e in evals], marker=".", label=r["recipe"],
                   linewidth=1)
    if record.get("target"):
        right.axhline(record["target"]["target"], color="grey", linestyle="--", linewidth=1, label="target")
    left.set_xlabel("step")
    left.set_ylabel("training loss (10-step mean)")
    right.set_xlabel("step")
    right.set_ylabel(f"{record['metric']} (valid)")
    if not record["higher_is_better"]:
        right.set_yscale("log")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"fewbit study --train: {record['workload']}")
    fig.tight_layout()
    return plots.png(fig)


def gradient_plot(record: dict) -> bytes:
    """The fp32 run's weight gradients: the share of values per binade of |g|, with fp16's smallest subnormal and
    that limit divided by the loss scale."""
    fig, ax = plots.figure()
    g = record.get("gradients")
    if g:
        total = sum(g["histogram"]) or 1.0
        edges = g["bin_edges_log2"]
        ax.bar([e + 0.5 for e in edges[:-1]], [h / total for h in g["histogram"]], width=1.0, color="tab:blue")
        ax.axvline(-24, color="red", linestyle="--", label="fp16 smallest subnormal 2^-24")
        if g.get("loss_scale"):
            ax.axvline(-24 - math.log2(g["loss_scale"]), color="orange", linestyle="--",
                       label=f"2^-24 / loss scale {g['loss_scale']:g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("log2 |weight gradient|")
    ax.set_ylabel("share of values")
    ax.set_title(f"{record['workload']}: fp32 gradients against fp16's range")
    return plots.png(fig)
