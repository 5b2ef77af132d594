"""``fewbit sparsify``: N:M (2:4) sparsity of a workload's trained model, the 2:4 paper's way.

1. The dense model is the workload's cached FP32 baseline (the one ``fewbit study`` uses; trained first when
   missing).
2. **One-shot** (no weight update), each on a copy: magnitude pruning; Wanda (|W| times each input channel's L2
   norm over calibration batches); and both again after a channel-permutation search (``permute``; applied where
   the model's data flow allows, see :mod:`fewbit.sparsity.graph`).
3. **Retrained**: the magnitude-pruned model (permuted when ``permute``) trained again with its masks fixed
   (:class:`~fewbit.sparsity.KeepMasks`) by the workload's own optimizer, learning-rate schedule and number of
   steps (``steps`` for fewer; the warmup scaled to match), in FP32.
4. Every model is evaluated on the valid and the test split, in FP32 and, with ``recipe``, under that recipe too
   (2:4 composed with a number format: ``quantize_`` keeps the zeros). Weight bytes of the pruned layers: dense
   float32, and compressed (kept values plus 2-bit positions for 2:4) in fp16, int8 and the recipe's weight
   format.

**Calibration batches** for Wanda are the workload's training batches after its last training step (as ``fewbit
ptq`` takes them), about 512 examples. **Tolerance** is the PTQ rule: the retrained metric is within when it is at
most ``tolerance * |dense metric|`` worse, on each split.

Writes ``sparsify.json``, ``report.md`` and a plot into the output folder, and the retrained model as a normal run
folder in it (``retrained/``: ``model.safetensors``, ``masks.safetensors``, ``run.json``) that ``fewbit eval``
reads, masks included. The record is rendered by :mod:`fewbit.report.sparsity`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fewbit import recipes as _recipes
from fewbit import sparsity
from fewbit.atomic import write_bytes, write_text
from fewbit.calibrate import within_tolerance
from fewbit.report import sparsity as render
from fewbit.workloads import get, runs
from fewbit.workloads.base import config_dict, model_device, to_device

CALIBRATION_EXAMPLES = 512
SPLITS = ("valid", "test")


def _evaluate(workload, model, recipes: Sequence, limit) -> dict:
    """``{recipe name: {split: metrics}}``."""
    return {r.name: {s: runs.evaluate_model(workload, model, r, s, limit) for s in SPLITS} for r in recipes}


def _bytes(model, recipe) -> dict:
    """Weight bytes of the pruned layers: dense float32, compressed fp16 / int8 / under the recipe's weight spec."""
    out = {"dense_fp32": 0, "compressed_fp16": 0, "compressed_int8": 0, "dense_fp16": 0, "dense_int8": 0}
    if recipe is not None and recipe.weight is not None:
        out[f"compressed_{recipe.name}"] = 0
    patterns = sparsity.patterns(model)
    for name, mask in sparsity.masks(model).items():
        module = model.get_submodule(name)
        w = sparsity.matrix_of(module).detach().cpu()  # (out, in, ...): grouped along the reduction dimension
        mask = mask.t() if sparsity.is_transposed(module) else mask
        pattern = patterns[name]
        out["dense_fp32"] += w.numel() * 4
        out["dense_fp16"] += w.numel() * 2
        out["dense_int8"] += w.numel()
        out["compressed_fp16"] += sparsity.compressed_bytes(w.half(), pattern, mask=mask.cpu())
        out["compressed_int8"] += sparsity.compressed_bytes(torch.ones_like(w, dtype=torch.int8), pattern,
                                                            mask=mask.cpu())
        if recipe is not None and recipe.weight is not None:
            out[f"compressed_{recipe.name}"] += sparsity.compressed_bytes(w, pattern, recipe.weight, mask=mask.cpu())
    return out


def run(workload_name: str, pattern: str = "2:4", config: str = "quick", overrides: Sequence[str] = (),
        recipe: str | None = None, steps: int | None = None, permute: bool = True, permute_time: float = 1.0,
        calib_batches: int | None = None, tolerance: float = 0.01, limit: int | None = None,
        out: str | Path | None = None, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """The sparsity study of one workload (see the module docstring); returns what ``sparsify.json`` holds.
    Arguments are checked before any model is loaded or trained. ``log(message)`` hears what happens."""
    say = log or (lambda message: None)
    cls = get(workload_name)
    p = sparsity.parse_pattern(pattern)
    extra = _recipes.get(recipe) if recipe is not None else None
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps}; retrain at least 1 step (default: the workload's own number)")
    if calib_batches is not None and calib_batches < 1:
        raise ValueError(f"calib_batches={calib_batches}; Wanda needs at least 1 calibration batch")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance}; it must be a relative tolerance >= 0 (0.01 is 1%)")
    cls.load_config(config, overrides)  # bad keys fail here, before any training
    out = Path(out) if out is not None else runs.default_out("fewbit-sparsify", workload_name, config, overrides)
    base = runs.baseline(workload_name, config, overrides, progress=progress, log=log)
    workload, dense = base.workload, base.model
    c = workload.config
    if c.threads:
        torch.set_num_threads(c.threads)
    started = time.perf_counter()
    evaluations = [_recipes.get("fp32")] + ([extra] if extra is not None else [])
    device = model_device(dense)
    count = calib_batches or math.ceil(CALIBRATION_EXAMPLES / c.batch_size)
    calibration = [to_device(workload.batch(c.steps + i), device) for i in range(count)]

    say("evaluating the dense model")
    record_dense = _evaluate(workload, dense, evaluations, limit)
    one_shot, summaries, timings = {}, {}, {}
    variants = [("magnitude", "magnitude", False), ("wanda", "wanda", False)]
    if permute:
        variants += [("magnitude_permuted", "magnitude", True), ("wanda_permuted", "wanda", True)]
    models = {}
    for key, criterion, permuted in variants:
        say(f"one-shot {key}")
        t0 = time.perf_counter()
        model = sparsity.sparsify_(copy.deepcopy(dense), p, criterion, calibration=calibration,
                                   forward_fn=workload.loss, permute=permuted, permute_time=permute_time)
        timings[key] = round(time.perf_counter() - t0, 2)
        models[key] = model
        summaries[key] = sparsity.summary(model).to_dict()
        one_shot[key] = _evaluate(workload, model, evaluations, limit)
    start_from = "magnitude_permuted" if permute else "magnitude"
    retrain_steps = steps or c.steps
    say(f"retraining {start_from} for {retrain_steps} steps with the masks fixed")
    keep_dir = out / "retrained"
    t0 = time.perf_counter()
    retrained = runs.train(workload, "fp32", out=keep_dir, progress=progress, model=copy.deepcopy(models[start_from]),
                           steps=retrain_steps, callbacks=[sparsity.KeepMasks()]).model
    retrain_seconds = round(time.perf_counter() - t0, 2)
    after = sparsity.summary(retrained)
    not_nm = [r.name for r in after.rows if r.pruned and not r.nm]
    if not_nm:
        raise RuntimeError(f"retraining broke the {p} pattern of {not_nm[:5]}: a bug in mask keeping")
    record_retrained = _evaluate(workload, retrained, evaluations, limit)
    metric = workload.metric
    reference = {s: record_dense["fp32"][s][metric] for s in SPLITS}
    verdict = {s: within_tolerance(record_retrained["fp32"][s][metric], reference[s], tolerance,
                                   workload.higher_is_better) for s in SPLITS}
    permutation = {name: info for name, info in
                   ((r["name"], r["permutation"]) for r in summaries.get("magnitude_permuted", {}).get("layers", []))
                   if info is not None}
    record = {
        "workload": workload_name,
        "metric": metric,
        "higher_is_better": workload.higher_is_better,
        "pattern": str(p),
        "recipe": extra.name if extra is not None else None,
        "dense": record_dense,
        "one_shot": one_shot,
        "retrained": record_retrained,
        "retrained_from": start_from,
        "retrain": {"steps": retrain_steps, "workload_steps": c.steps, "optimizer": c.optimizer, "lr": c.lr,
                    "seconds": retrain_seconds},
        "tolerance": tolerance,
        "within_tolerance": verdict,
        "pruned_layers": after.pruned,
        "dense_layers": {r.name: r.reason for r in after.rows if not r.pruned},
        "layers": after.to_dict()["layers"],
        "permutation": permutation,
        "bytes": _bytes(retrained, extra),
        "calibration": {"first_step": c.steps, "batches": count, "examples": count * c.batch_size},
        "one_shot_seconds": timings,
        "baseline": str(base.path),
        "config": config_dict(c),
        "limit": c.eval_limit if limit is None else limit,
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    record["out"] = str(out)
    record["run"] = str(keep_dir)
    write_text(out / "sparsify.json", json.dumps(record, indent=2) + "\n")
    write_text(out / "report.md", render.markdown(record))
    write_bytes(out / render.plot_name(record), render.plot(record))
    return record
