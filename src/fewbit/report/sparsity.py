"""Sparsity records rendered: the per-layer table of :func:`fewbit.sparsity.summary`, and ``fewbit sparsify``'s
results (console table, markdown report, plot).

The ``fewbit sparsify`` record is what ``sparsify.json`` holds: ``dense``, ``one_shot`` (by variant) and
``retrained``, each ``{recipe: {split: metrics}}``, plus ``pattern``, ``metric``, ``within_tolerance``,
``pruned_layers``, ``dense_layers``, ``layers``, ``permutation``, ``bytes``, ``retrain`` and ``config``.
"""

from __future__ import annotations

from rich.table import Table

from fewbit.report import markdown as md
from fewbit.report import plots

VARIANTS = {"magnitude": "one-shot magnitude", "wanda": "one-shot Wanda", "magnitude_permuted":
            "one-shot magnitude, permuted", "wanda_permuted": "one-shot Wanda, permuted"}


def layers_table(summary: dict) -> Table:
    """A :class:`fewbit.sparsity.SparsitySummary` (as ``to_dict()``) as a rich table: every layer, pruned or
    dense and why."""
    table = Table(title=f"sparsity: {summary['model']} ({summary['criterion'] or 'not sparsified'})")
    for column in ("layer", "type", "shape", "pattern", "sparsity", "N:M", "dense because / permutation"):
        table.add_column(column, justify="right" if column == "sparsity" else "left")
    for row in summary["layers"]:
        table.add_row(*_layer_cells(row))
    return table


def _permutation_text(info: dict | None) -> str:
    if not info:
        return ""
    if info.get("applied"):
        return f"permuted with {info['producer']}: kept {info['gain']:+.2%}"
    return f"not permuted: {info['reason']}"


def _layer_cells(row: dict) -> list[str]:
    note = row["reason"] if not row["pruned"] else _permutation_text(row.get("permutation"))
    return [row["name"] or "(model)", row["type"], "x".join(map(str, row["shape"])), row["pattern"] or "-",
            f"{row['sparsity']:.2%}", {True: "yes", False: "NO", None: "-"}[row["nm"]], note or ""]


def _rows(record: dict) -> list[tuple[str, dict]]:
    """(label, {recipe: {split: metrics}}) for every model of the study, dense first."""
    rows = [("dense", record["dense"])]
    rows += [(VARIANTS.get(k, k), v) for k, v in record["one_shot"].items()]
    rows.append((f"retrained ({record['retrain']['steps']} steps)", record["retrained"]))
    return rows


def _columns(record: dict) -> list[tuple[str, str]]:
    recipes = list(record["dense"])
    return [(r, s) for r in recipes for s in ("valid", "test")]


def _label(recipe: str, split: str) -> str:
    return f"{split}" if recipe == "fp32" else f"{split} ({recipe})"


def results_table(record: dict) -> Table:
    metric = record["metric"]
    table = Table(title=f"fewbit sparsify: {record['workload']} ({record['pattern']}), {metric}")
    table.add_column("model")
    columns = _columns(record)
    for recipe, split in columns:
        table.add_column(_label(recipe, split), justify="right")
    for label, metrics in _rows(record):
        table.add_row(label, *(f"{metrics[r][s][metric]:.4g}" for r, s in columns))
    return table


def verdict(record: dict) -> str:
    parts = [f"{s}: {'within' if ok else 'NOT within'}" for s, ok in record["within_tolerance"].items()]
    return (f"retrained vs dense, tolerance {record['tolerance']:g} of |dense {record['metric']}|: "
            + ", ".join(parts))


def _bytes_line(record: dict) -> str:
    b = record["bytes"]
    line = (f"pruned layers' weights: dense fp16 {b['dense_fp16']:,} B -> compressed {b['compressed_fp16']:,} B "
            f"({b['compressed_fp16'] / b['dense_fp16']:.2%}); dense int8 {b['dense_int8']:,} B -> compressed "
            f"{b['compressed_int8']:,} B ({b['compressed_int8'] / b['dense_int8']:.2%})")
    extra = [k for k in b if k.startswith("compressed_") and k not in ("compressed_fp16", "compressed_int8")]
    for k in extra:
        line += f"; {k.removeprefix('compressed_')} compressed {b[k]:,} B ({b[k] / b['dense_fp32']:.2%} of fp32)"
    return line


def markdown(record: dict) -> str:
    metric = record["metric"]
    columns = _columns(record)
    perm = record["permutation"]
    applied = {n: i for n, i in perm.items() if i.get("applied")}
    lines = [
        f"# fewbit sparsify: {record['workload']}, {record['pattern']}",
        "",
        f"Metric: **{metric}** ({'higher' if record['higher_is_better'] else 'lower'} is better). Dense: the cached "
        f"FP32 baseline. One-shot: pruned, no weight update. Retrained: {VARIANTS.get(record['retrained_from'])} "
        f"trained {record['retrain']['steps']} steps (the workload trains {record['retrain']['workload_steps']}) "
        f"with the masks fixed, {record['retrain']['optimizer']} at lr {record['retrain']['lr']:g}.",
        "",
        *md.table(["model", *(_label(r, s) for r, s in columns)],
                  [[label, *(f"{m[r][s][metric]:.4g}" for r, s in columns)] for label, m in _rows(record)]),
        "",
        verdict(record) + ".",
        "",
        _bytes_line(record) + ".",
        "",
        "## Layers",
        "",
        f"{len(record['pruned_layers'])} pruned, {len(record['dense_layers'])} dense. Channel permutations applied "
        f"to {len(applied)} layer(s).",
        "",
        *md.table(["layer", "type", "shape", "pattern", "sparsity", "N:M", "dense because / permutation"],
                  [[f"`{c[0]}`", *c[1:]] for c in (_layer_cells({**row, "permutation": perm.get(row["name"])})
                                                   for row in record["layers"])], left=7),
        "",
        *md.config_section(record["config"]),
    ]
    return "\n".join(lines)


def plot_name(record: dict) -> str:
    return f"{record['metric']}_sparsity.png"


def plot(record: dict) -> bytes:
    """Bars: the metric of every model of the study, valid and test (FP32 evaluation)."""
    metric = record["metric"]
    fig, ax = plots.figure(8, 4.5)
    rows = _rows(record)
    width = 0.38
    for i, split in enumerate(("valid", "test")):
        values = [m["fp32"][split][metric] for _, m in rows]
        ax.bar([j + (i - 0.5) * width for j in range(len(rows))], values, width, label=split)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label.replace(", ", "\n").replace(" (", "\n(") for label, _ in rows], fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{record['workload']}: {record['pattern']} sparsity")
    ax.legend()
    return plots.png(fig)
