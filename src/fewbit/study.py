"""``fewbit study``: does a trained model survive each number format?

Train the workload's FP32 baseline (or load it from the cache, :func:`fewbit.workloads.runs.baseline`), then
evaluate it directly cast under every preset recipe: weights and activations of every converted layer (Linear,
Conv, the attention products) quantized as the recipe says, nothing retrained. Embeddings and norms stay in
float32. Writes into the output folder:

- ``results.json``: the study record (one row per recipe: metric, change vs fp32, bits per weight, weight bytes,
  all metrics);
- ``report.md``: the table and how it was made;
- ``<metric>_vs_bits.png``: the metric against bits per weight.

The record is rendered by :mod:`fewbit.report.study`; this module only runs the study. The same study of any model
with any metric, no workload needed: :func:`model_study`, also ``fewbit.study(model, evaluate=fn, recipes=[...])``
(this module is callable).
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.nn import weight_bytes
from fewbit.recipes import Recipe
from fewbit.report import study as render
from fewbit.train import Precision
from fewbit.workloads import runs
from fewbit.workloads.base import config_dict, evaluating, model_device

Progress = Callable[[str, int, int], None]  # (what is happening, recipes done, recipes in all)


def run(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), recipes: Sequence[str] = (),
        out: str | Path | None = None, split: str = "test", retrain: bool = False, progress: bool = True,
        log: Callable[[str], None] | None = None, on_recipe: Progress | None = None) -> dict:
    """The study (see the module docstring); returns the record ``results.json`` holds. ``recipes``: preset names
    or recipe files (default: every study preset, fp32 first). ``log`` hears what happens to the baseline;
    ``on_recipe`` is told before and after each recipe is evaluated."""
    names = _recipe_names(recipes)  # unknown names fail before any training
    base = runs.baseline(workload_name, config, overrides, retrain, progress, log)
    workload = base.workload
    study = model_study(base.model, lambda m: workload.evaluate(m, split), names, metric=workload.metric,
                        higher_is_better=workload.higher_is_better, secondary=workload.secondary,
                        name=workload_name, on_recipe=on_recipe)
    study.update(split=split, config=config_dict(workload.config),
                 baseline={"path": str(base.path), **{k: base.record[k] for k in ("train", "valid", "data", "versions")
                                                      if k in base.record}})
    out = Path(out) if out is not None else runs.default_out("fewbit-study", workload_name, config, overrides)
    study["out"] = str(out)
    write_text(out / "results.json", json.dumps(study, indent=2) + "\n")
    write_text(out / "report.md", render.markdown(study))
    write_bytes(out / render.plot_name(study), render.plot(study))
    return study


def _recipe_names(recipes: Sequence[str | Recipe]) -> list:
    names = list(recipes) or _recipes.names()
    for name in names:
        _recipes.get(name)
    if not any(_recipes.get(name).name == "fp32" for name in names):
        names.insert(0, "fp32")
    return names


def model_study(model: nn.Module, evaluate: Callable[[nn.Module], float | dict[str, float]],
                recipes: Sequence[str | Recipe] = (), *, metric: str | None = None, higher_is_better: bool = True,
                secondary: str | None = None, name: str | None = None,
                on_recipe: Progress | None = None) -> dict:
    """The study of any float ``model`` under ``recipes`` (preset names, recipe files or Recipes; default every
    study preset; fp32 is added first when missing), scored by ``evaluate(model)``: a number, or a dict of
    metrics of which ``metric`` is the headline (required then). This is also ``fewbit.study(model, ...)``.

    Each recipe evaluates a converted copy (:func:`fewbit.workloads.runs.as_recipe`; ``model`` is left
    untouched), under the recipe's autocast, in eval mode without autograd. Returns the record ``fewbit study``
    writes to ``results.json`` (``workload`` is ``name``, default the model's class name; ``results``: one row per
    recipe with ``recipe``, ``metric``, ``delta`` vs fp32, ``bits_per_weight``, ``weight_bytes``, ``seconds``,
    ``metrics``), which :func:`fewbit.report.study.table` renders. A metric that is not a finite number is kept
    (NaN shows a recipe that broke the model) except for fp32, where it is an error."""
    names = _recipe_names(recipes)
    rows = []
    for done, recipe_name in enumerate(names):
        recipe = _recipes.get(recipe_name)
        if on_recipe:
            on_recipe(f"evaluating {recipe.name}", done, len(names))
        started = time.perf_counter()
        converted = runs.as_recipe(model, recipe)
        with evaluating(converted), Precision.of(recipe).autocast(model_device(converted)):
            metrics = _metrics(evaluate(converted), metric)
        headline = metrics[metric or "metric"]
        sizes = weight_bytes(converted)
        rows.append({"recipe": recipe.name, "metric": headline, "delta": 0.0,
                     "bits_per_weight": sizes["bits_per_weight"] if sizes["bits_per_weight"] is not None else 32.0,
                     "weight_bytes": sizes["total"], "seconds": round(time.perf_counter() - started, 2),
                     "metrics": metrics})
        if on_recipe:
            on_recipe(f"{recipe.name}: {metric or 'metric'} {headline:.2f}", done + 1, len(names))
    reference = next(r["metric"] for r in rows if r["recipe"] == "fp32")
    if not math.isfinite(reference):
        raise ValueError(f"study: evaluate returned {reference} for the fp32 model; the changes of the other "
                         "recipes would mean nothing (check the model and evaluate)")
    for row in rows:
        row["delta"] = row["metric"] - reference
    return {"workload": name or type(model).__name__, "metric": metric or "metric",
            "higher_is_better": higher_is_better, "secondary": secondary, "split": "evaluate", "config": {},
            "baseline": {}, "results": rows}


def _metrics(value, metric: str | None) -> dict[str, float]:
    """``evaluate``'s result as a dict of metrics holding the headline ``metric`` (``"metric"`` for a number)."""
    if isinstance(value, dict):
        if metric is None or metric not in value:
            raise ValueError(f"study: evaluate returned metrics {sorted(value)}; name the headline one with "
                             f"metric=... (got metric={metric!r})")
        return {k: float(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, int | float):
        raise TypeError(f"study: evaluate returned {type(value).__name__}; expected a number or a dict of metrics")
    return {metric or "metric": float(value)}


class _CallableVerb(types.ModuleType):
    """This module, callable: ``fewbit.study(model, evaluate=fn, recipes=[...])`` is :func:`model_study`, while
    ``fewbit.study.run`` stays the ``fewbit study`` verb."""

    def __call__(self, model: nn.Module, evaluate: Callable[[nn.Module], float | dict[str, float]],
                 recipes: Sequence[str | Recipe] = (), **options) -> dict:
        return model_study(model, evaluate, recipes, **options)


sys.modules[__name__].__class__ = _CallableVerb
