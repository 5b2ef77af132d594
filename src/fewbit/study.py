"""``fewbit study``: does a trained model survive each number format?

Train the workload's FP32 baseline (or load it from the cache, :func:`fewbit.workloads.runs.baseline`), then
evaluate it directly cast under every preset recipe: weights and activations of every converted layer (Linear,
Conv, the attention products) quantized as the recipe says, nothing retrained. Embeddings and norms stay in
float32. Writes into the output folder:

- ``results.json``: the study record (one row per recipe: metric, change vs fp32, bits per weight, weight bytes,
  all metrics);
- ``report.md``: the table and how it was made;
- ``<metric>_vs_bits.png``: the metric against bits per weight.

The record is rendered by :mod:`fewbit.report.study`; this module only runs the study.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.nn import weight_bytes
from fewbit.report import study as render
from fewbit.train import Precision
from fewbit.workloads import runs
from fewbit.workloads.base import config_dict, model_device

Progress = Callable[[str, int, int], None]  # (what is happening, recipes done, recipes in all)


def run(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), recipes: Sequence[str] = (),
        out: str | Path | None = None, split: str = "test", retrain: bool = False, progress: bool = True,
        log: Callable[[str], None] | None = None, on_recipe: Progress | None = None) -> dict:
    """The study (see the module docstring); returns the record ``results.json`` holds. ``recipes``: preset names
    or recipe files (default: every study preset, fp32 first). ``log`` hears what happens to the baseline;
    ``on_recipe`` is told before and after each recipe is evaluated."""
    names = list(recipes) or _recipes.names()
    for name in names:
        _recipes.get(name)  # unknown names fail before any training
    if "fp32" not in names:
        names.insert(0, "fp32")
    base = runs.baseline(workload_name, config, overrides, retrain, progress, log)
    workload = base.workload
    rows = []
    for done, name in enumerate(names):
        if on_recipe:
            on_recipe(f"evaluating {name}", done, len(names))
        started = time.perf_counter()
        recipe = _recipes.get(name)
        model = runs.as_recipe(base.model, recipe)
        with Precision.of(recipe).autocast(model_device(model)):  # as runs.evaluate_model, keeping the model
            metrics = workload.evaluate(model, split)
        sizes = weight_bytes(model)
        rows.append({"recipe": recipe.name, "metric": metrics[workload.metric], "delta": 0.0,
                     "bits_per_weight": sizes["bits_per_weight"] if sizes["bits_per_weight"] is not None else 32.0,
                     "weight_bytes": sizes["total"], "seconds": round(time.perf_counter() - started, 2),
                     "metrics": metrics})
        if on_recipe:
            on_recipe(f"{recipe.name}: {workload.metric} {metrics[workload.metric]:.2f}", done + 1, len(names))
    reference = next(r["metric"] for r in rows if r["recipe"] == "fp32")
    for row in rows:
        row["delta"] = row["metric"] - reference
    study = {"workload": workload_name, "metric": workload.metric, "higher_is_better": workload.higher_is_better,
             "secondary": workload.secondary, "split": split, "config": config_dict(workload.config),
             "baseline": {"path": str(base.path), **{k: base.record[k] for k in ("train", "valid", "data", "versions")
                                                     if k in base.record}},
             "results": rows}
    out = Path(out) if out is not None else runs.default_out("fewbit-study", workload_name, config, overrides)
    study["out"] = str(out)
    write_text(out / "results.json", json.dumps(study, indent=2) + "\n")
    write_text(out / "report.md", render.markdown(study))
    write_bytes(out / render.plot_name(study), render.plot(study))
    return study
