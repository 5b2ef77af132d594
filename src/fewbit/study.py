"""``fewbit study``: does a trained model survive each number format?

Train the workload's FP32 baseline (or load it from the cache, keyed by the workload's config and the versions of
fewbit and torch), then evaluate it directly cast under every preset recipe: weights and activations of every
converted layer (Linear, Conv, the attention products) quantized as the recipe says, nothing retrained. Embeddings
and norms stay in float32. Writes into the output folder:

- ``results.json``: one record per recipe (metric, change vs fp32, bits per weight, weight bytes, all metrics);
- ``report.md``: the table and how it was made;
- ``<metric>_vs_bits.png``: the metric against bits per weight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.workloads import get
from fewbit.workloads import run as runs
from fewbit.workloads.base import config_dict
from fewbit.workloads.data.cache import keyed_dir


@dataclass
class Row:
    recipe: str
    metric: float
    delta: float  # metric - fp32 metric
    bits_per_weight: float  # of the converted layers' weights, scales included
    weight_bytes: int  # every parameter, converted layers at their packed size
    seconds: float
    metrics: dict = field(default_factory=dict)


@dataclass
class Study:
    workload: str
    metric: str
    higher_is_better: bool
    secondary: str | None
    split: str
    config: dict
    baseline: dict
    rows: list[Row]

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"},
                "results": [asdict(r) for r in self.rows]}


def baseline(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), retrain: bool = False,
             progress: bool = True, console: Console | None = None) -> runs.Run:
    """The FP32 baseline run of this config: from the cache, or trained now (and cached)."""
    cls = get(workload_name)
    workload = cls(cls.load_config(config, overrides))
    import fewbit

    folder = keyed_dir("baseline", {"workload": workload_name, "config": config_dict(workload.config),
                                    "fewbit": fewbit.__version__, "torch": torch.__version__.split("+")[0]})
    if not retrain and (folder / runs.RUN_FILE).is_file():
        if console:
            console.print(f"FP32 baseline: cached in {folder}")
        return runs.load(folder)
    if console:
        console.print(f"FP32 baseline: training {workload_name} ({workload.config.steps} steps), saving to {folder}")
    return runs.train(workload, "fp32", out=folder, progress=progress)


def config_section(config: dict) -> list[str]:
    """The lines of a report's "Config" section: the config, one ``key: value`` a line."""
    return ["## Config", "", "```yaml", *(f"{k}: {v}" for k, v in config.items()), "```", ""]


def default_out(root: str, workload_name: str, config: str | None, overrides: Sequence[str]) -> Path:
    """``root/<workload>``, suffixed by a config other than quick and by the overrides, so that studies of two
    variants (``--model mobilenet_v2``) do not overwrite each other: ``fewbit-study/vision-model=mobilenet_v2``."""
    parts = [workload_name]
    if config not in (None, "quick"):
        parts.append(Path(config).stem)
    parts += [o.replace("/", "_").replace(" ", "") for o in overrides]
    return Path(root) / "-".join(parts)


def run(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), recipes: Sequence[str] = (),
        out: str | Path | None = None, split: str = "test", retrain: bool = False, progress: bool = True,
        console: Console | None = None) -> Study:
    """The study; see the module docstring. ``recipes``: preset names (default: all, fp32 first)."""
    from fewbit.nn import weight_bytes

    console = console or Console()
    names = list(recipes) or _recipes.names()
    for name in names:
        _recipes.get(name)  # unknown names fail before any training
    if "fp32" not in names:
        names.insert(0, "fp32")
    base = baseline(workload_name, config, overrides, retrain, progress, console)
    workload = base.workload
    rows: list[Row] = []
    reference = None
    bar = Progress(TextColumn("[bold]study"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=not progress)
    with bar:
        task = bar.add_task("study", total=len(names), info="")
        for name in names:
            bar.update(task, info=f"evaluating {name}")
            started = time.perf_counter()
            recipe = _recipes.get(name)
            model = base.model
            if not recipe.is_identity:
                from fewbit.nn import quantize_

                model = quantize_(_copy(base.model), recipe)
            model.eval()
            metrics = workload.evaluate(model, split)
            value = metrics[workload.metric]
            if name == "fp32":
                reference = value
            sizes = weight_bytes(model)
            bits = sizes["bits_per_weight"] if sizes["bits_per_weight"] is not None else 32.0
            rows.append(Row(name, value, 0.0, bits, sizes["total"], round(time.perf_counter() - started, 2),
                            metrics))
            bar.update(task, advance=1, info=f"{name}: {workload.metric} {value:.2f}")
    for row in rows:
        row.delta = row.metric - reference
    kept = {k: base.record[k] for k in ("train", "valid", "data", "versions") if k in base.record}
    study = Study(workload_name, workload.metric, workload.higher_is_better, workload.secondary, split,
                  config_dict(workload.config), {"path": str(base.path), **kept}, rows)
    console.print(table(study))
    if out is None:
        out = default_out("fewbit-study", workload_name, config, overrides)
    write(study, out)
    console.print(f"wrote {Path(out) / 'results.json'}, report.md, {_plot_name(study)}")
    return study


def _copy(model):
    import copy

    return copy.deepcopy(model)


def table(study: Study) -> Table:
    arrow = "higher is better" if study.higher_is_better else "lower is better"
    t = Table(title=f"fewbit study: {study.workload} ({study.split} split, {study.metric}: {arrow})",
              title_style="bold")
    for col in _columns(study):
        t.add_column(col, justify="left" if col == "recipe" else "right")
    for row in _cells(study):
        t.add_row(*row)
    return t


def _columns(study: Study) -> list[str]:
    extra = [study.secondary] if study.secondary else []
    return ["recipe", study.metric, "change vs fp32", *extra, "bits/weight", "weight bytes"]


def _cells(study: Study) -> list[list[str]]:
    rows = []
    for r in study.rows:
        extra = [f"{r.metrics[study.secondary]:.4f}"] if study.secondary else []
        rows.append([r.recipe, f"{r.metric:.2f}", f"{r.delta:+.2f}", *extra, f"{r.bits_per_weight:.2f}",
                     f"{r.weight_bytes:,}"])
    return rows


def markdown(study: Study) -> str:
    b = study.baseline
    lines = [
        f"# fewbit study: {study.workload}",
        "",
        f"Metric: **{study.metric}** on the {study.split} split ({'higher' if study.higher_is_better else 'lower'} "
        f"is better){f'; beside it {study.secondary}' if study.secondary else ''}. The FP32 baseline is "
        "evaluated directly cast under each recipe: the weights and activations "
        "of every converted layer quantized as the recipe says, no retraining; embeddings and norms stay in "
        "float32. Bits per weight count the converted layers' weights with their scales.",
        "",
        "| " + " | ".join(_columns(study)) + " |",
        "|---" + "|---:" * (len(_columns(study)) - 1) + "|",
        *("| " + " | ".join(cells) + " |" for cells in _cells(study)),
        "",
        "## Baseline",
        "",
        f"- trained: {b.get('train', {}).get('steps')} steps in {b.get('train', {}).get('seconds')} s "
        f"(cached run: `{b.get('path')}`)",
        f"- data: {json.dumps(b.get('data', {}))}",
        f"- versions: {json.dumps(b.get('versions', {}))}",
        "",
        *config_section(study.config),
        f"![{study.metric} vs bits per weight]({_plot_name(study)})",
        "",
    ]
    return "\n".join(lines)


def _plot_name(study: Study) -> str:
    return f"{study.metric}_vs_bits.png"


def plot(study: Study) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r.bits_per_weight for r in study.rows]
    ys = [r.metric for r in study.rows]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    for r in study.rows:
        ax.annotate(r.recipe, (r.bits_per_weight, r.metric), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(study.rows[0].metric, color="grey", linestyle="--", linewidth=1, label="fp32")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (converted layers, scales included)")
    ax.set_ylabel(f"{study.metric} ({study.split})")
    ax.set_title(f"fewbit study: {study.workload}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write(study: Study, out: str | Path) -> None:
    out = Path(out)
    write_text(out / "results.json", json.dumps(study.to_dict(), indent=2) + "\n")
    write_text(out / "report.md", markdown(study))
    write_bytes(out / _plot_name(study), plot(study))
