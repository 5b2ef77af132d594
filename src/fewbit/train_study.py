"""``fewbit study <workload> --train``: can the workload be *trained* in each number format?

Trains the workload's model from scratch under each recipe with the same hyper-parameters, seed (so the same
initial weights) and data order, evaluating on the valid split every ``eval_every`` steps (default: 10
evaluations a run), then reports per recipe: the final metric on ``split`` and its change against fp32, steps to
the quality target of :data:`fewbit.mlperf.training.TARGETS` (on the valid curve), skipped steps and the final
loss scale. Default recipes: fp32, bf16, fp16 (operands rounded to fp16, dynamic loss scaling), fp16_noscale (the
same without loss scaling: the mixed precision paper's failure case), fp8, mxfp8, mxfp6, mxfp4. A run whose loss
turns non-finite stops there (``diverged``); the others go on.

For the mixed precision claim, the fp32 run records per-layer histograms of its weight gradients
(:class:`fewbit.train.GradientStats`); the record gives per layer the share of gradient values below fp16's
smallest subnormal (2^-24) — what fp16 without loss scaling flushes to zero — and below 2^-24 / S, with S the
fp16 run's final loss scale — what is still lost with scaling.

On the quick config each run is shortened (:data:`QUICK_STUDY`: fewer steps, a smaller evaluation) so the whole
study of one workload fits in about 15 minutes on a 2-core CPU; ``--config`` another config, or ``steps=N``, for
longer runs.

Writes into the output folder ``results.json``, ``report.md``, ``curves.png`` (every recipe's loss and metric
curves) and ``grad_underflow.png``; each recipe's ``metrics.jsonl`` under ``<recipe>/``. Rendering lives in
:mod:`fewbit.report.train_study`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fewbit import formats
from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.mlperf.training import TARGETS, StopOnDivergence, evaluate_trained
from fewbit.report import train_study as render
from fewbit.train import Precision
from fewbit.train.gradstats import BINS
from fewbit.workloads import get as get_workload
from fewbit.workloads.base import config_dict, resolve_device
from fewbit.workloads.runs import default_out, fit

DEFAULT_RECIPES = ("fp32", "bf16", "fp16", "fp16_noscale", "fp8", "mxfp8", "mxfp6", "mxfp4")

# On the quick config the study shortens each run so that all eight recipes fit in about 15 minutes on a 2-core
# CPU (an emulated format's step costs 1.2-1.5x fp32's): the quick model and hyper-parameters, fewer steps (the
# warmup scaled with them) and a smaller evaluation. Overrides given on the command line come after these.
QUICK_STUDY: dict[str, tuple[str, ...]] = {
    "lm": ("steps=200", "warmup=15", "eval_limit=32768"),
    "vision": ("steps=400", "warmup=20", "eval_limit=2000"),
    "translate": ("steps=300", "warmup=25", "eval_limit=300"),
    "asr": ("steps=250", "warmup=25"),
}
FP16_TINY = formats.get("fp16").min_subnormal  # 2^-24

Progress = Callable[[str, int, int], None]


def recipe(name: str) -> _recipes.Recipe:
    """A preset recipe, or ``<preset>_noscale``: the preset without loss scaling (``fp16_noscale``)."""
    if name.endswith("_noscale") and name not in _recipes.names(include_training=True):
        base = _recipes.get(name[: -len("_noscale")])
        return base.replace(name=name, loss_scaling="none")
    return _recipes.get(name)


def underflow_share(histogram: Sequence[float], zeros: int, count: int, threshold: float) -> float:
    """The share of a layer's gradient values whose magnitude is below ``threshold`` (a power of two), from its
    histogram of log2|g| (one binade per bin, :data:`fewbit.train.gradstats.BINS`); exact zeros and values below the
    histogram's range (2^-60) count as below."""
    edge = math.log2(threshold)
    below = sum(h for h, lo in zip(histogram, BINS[:-1].tolist(), strict=True) if lo + 1 <= edge)
    out_of_range = count - zeros - sum(histogram)
    return (below + zeros + max(out_of_range, 0)) / count if count else 0.0


def run(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), recipes: Sequence[str] = (),
        out: str | Path | None = None, split: str = "test", eval_every: int | None = None,
        on_recipe: Progress | None = None, with_fp32: bool = True) -> dict:
    """The training study (see the module docstring); returns the record ``results.json`` holds. ``with_fp32``
    False trains only ``recipes`` (parts of one study run apart; the changes against fp32 are then None unless
    fp32 is among them)."""
    chosen = [recipe(n) for n in (recipes or DEFAULT_RECIPES)]  # unknown names fail before any training
    if with_fp32 and "fp32" not in [r.name for r in chosen]:
        chosen.insert(0, _recipes.get("fp32"))
    cls = get_workload(workload_name)
    shortened = QUICK_STUDY.get(workload_name, ()) if config == "quick" else ()
    conf = cls.load_config(config, [*shortened, *overrides])
    every = eval_every or max(conf.steps // 10, 1)
    goal = TARGETS.get(workload_name)
    out = Path(out) if out is not None else default_out("fewbit-study-train", workload_name, config, overrides)
    grad_every = max(conf.steps // 4, 1)
    rows = []
    grad_stats = None
    for done, rec in enumerate(chosen):
        if on_recipe:
            on_recipe(f"training {rec.name}", done, len(chosen))
        row = _train_one(cls, conf, rec, out / rec.name, split, every, grad_every if rec.name == "fp32" else 0)
        if rec.name == "fp32":
            grad_stats = row.pop("grad_stats")
        else:
            row.pop("grad_stats")
        row["steps_to_target"] = _steps_to_target(row["evals"], goal) if goal is not None else None
        rows.append(row)
        if on_recipe:
            on_recipe(f"{rec.name}: {cls.metric} {row['metric']:.4g} ({row['status']})", done + 1, len(chosen))
    reference = next((r["metric"] for r in rows if r["recipe"] == "fp32"), None)
    for row in rows:
        row["delta"] = row["metric"] - reference if reference is not None and math.isfinite(row["metric"]) \
            else None
    scale = next((r["final_scale"] for r in rows if r["recipe"] == "fp16" and r["final_scale"]), None)
    record = {"workload": workload_name, "metric": cls.metric, "higher_is_better": cls.higher_is_better,
              "split": split, "config_name": config, "overrides": list(overrides), "study_overrides": list(shortened),
              "config": config_dict(conf),
              "eval_every": every, "target": {"metric": goal.metric, "describe": goal.describe(),
                                             "target": goal.target} if goal is not None else None,
              "results": rows, "gradients": _gradient_table(grad_stats, scale), "out": str(out)}
    write_text(out / "results.json", json.dumps(record, indent=2) + "\n")
    write_text(out / "report.md", render.markdown(record))
    write_bytes(out / render.PLOT, render.plot(record))
    write_bytes(out / render.GRAD_PLOT, render.gradient_plot(record))
    return record


def _train_one(cls, conf, rec: _recipes.Recipe, folder: Path, split: str, every: int, grad_every: int) -> dict:
    if conf.threads:
        torch.set_num_threads(conf.threads)
    device = resolve_device(conf.device)
    task = cls(conf).setup()
    model = task.build_model().to(device)
    precision = Precision.of(rec)
    guard = StopOnDivergence()
    started = time.perf_counter()
    error = None
    result = None
    try:
        result = fit(task, model, precision, device, eval_fn=lambda m: evaluate_trained(task, m, precision, "valid"),
                     eval_every=every, log_path=folder / "metrics.jsonl", grad_stats_every=grad_every,
                     grad_stats_dir=folder / "grad_stats", callbacks=[guard], progress=False)
    except Exception as raised:  # this recipe failed; the study goes on with the others
        error = raised
    seconds = time.perf_counter() - started
    metrics = evaluate_trained(task, model, precision, split) if error is None and guard.diverged is None else {}
    status = "ok"
    if error is not None:
        status = f"failed: {type(error).__name__}: {error}"
    elif guard.diverged is not None:
        status = guard.diverged
    grad_file = folder / "grad_stats" / "grad_stats.json"
    return {"recipe": rec.name, "status": status, "metric": metrics.get(cls.metric, math.nan), "metrics": metrics,
            "steps": result.step if result is not None else 0, "seconds": round(seconds, 2),
            "skipped_steps": result.skipped_steps if result is not None else 0,
            "final_scale": result.final_scale if result is not None else None,
            "losses": list(result.losses) if result is not None else [],
            "evals": list(result.evals) if result is not None else [],
            "grad_stats": json.loads(grad_file.read_text()) if grad_every and grad_file.is_file() else None}


def _steps_to_target(evals: list[dict], goal) -> int | None:
    for e in evals:
        value = e.get(goal.metric)
        if value is not None and math.isfinite(value) and goal.reached(value):
            return int(e["step"])
    return None


def _gradient_table(stats: dict | None, scale: float | None) -> dict | None:
    """Per layer, at the fp32 run's last record: the share of gradient values below 2^-24 (lost in fp16 without
    loss scaling) and below 2^-24 / S (lost with the fp16 run's final scale S), and the summed histogram."""
    if not stats or not stats["records"]:
        return None
    last = stats["records"][-1]
    layers = []
    total = [0.0] * (len(BINS) - 1)
    for name, layer in last["layers"].items():
        total = [a + b for a, b in zip(total, layer["histogram"], strict=True)]
        layers.append({"layer": name, "values": layer["count"],
                       "below_fp16": underflow_share(layer["histogram"], layer["zeros"], layer["count"], FP16_TINY),
                       "below_fp16_scaled": underflow_share(layer["histogram"], layer["zeros"], layer["count"],
                                                            FP16_TINY / scale) if scale else None})
    return {"step": last["step"], "loss_scale": scale, "layers": layers, "histogram": total,
            "bin_edges_log2": BINS.tolist()}
