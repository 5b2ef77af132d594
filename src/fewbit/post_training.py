"""``fewbit ptq``: post-training quantization of a workload's trained FP32 model, the INT8 paper's way.

The FP32 model is a saved run (``checkpoint``) or the cached FP32 baseline of the workload's config, the one
``fewbit study`` uses (trained first when missing). Then:

1. BatchNorm layers that follow a convolution are folded into it (what an INT8 runtime executes; a model without
   BatchNorm is unchanged);
2. :func:`fewbit.ptq` converts the model, collects activation histograms in one pass over the calibration batches,
   evaluates every calibrator and keeps the best; if that is more than the tolerance off the FP32 metric, it leaves
   the most sensitive layers in float until it is within;
3. the FP32 and the quantized model are evaluated on the test split as well.

**Calibration batches.** Batch ``i`` of ``n`` is the workload's training batch at step ``config.steps + i``:
training-split data drawn exactly as training draws it (a pure function of the seed and the step), but batches the
FP32 run never trained on. The default ``n`` gives about 1024 examples, ``ceil(1024 / batch_size)`` batches (the
INT8 paper calibrates on about 1000). The forward pass is the workload's loss, which runs the whole model.

**Tolerance.** Relative to the FP32 metric on the evaluation split (``split``, default valid; ``limit`` examples,
default the config's ``eval_limit``): the quantized metric is within tolerance when it is at most
``tolerance * |FP32 metric|`` worse, in whichever direction is worse for the metric. With the default 1%: BLEU 30.0
needs at least 29.7, accuracy 90% at least 89.1%; perplexity 5.00 (lower is better) at most 5.05, WER 20% at most
20.2%.

**Quantization-aware fine-tuning** (``qat``): when the quantized model is still beyond the tolerance after the
steps above (for instance with ``max_float_layers=0``), :func:`fewbit.qat` fine-tunes it with its static ranges
fixed, the recommended schedule: 10% of the FP32 run's steps at 1% of its learning rate, cosine decay, the
workload's own optimizer, on its training batches. The metric before and after goes into the report.

**Deployment** (``onnx``, workloads whose model is one forward pass, :meth:`Workload.example_input`): the
quantized model is exported with :func:`fewbit.export_onnx` (QuantizeLinear/DequantizeLinear around every INT8
layer) and evaluated on the test split by onnxruntime (CPU, integer kernels: QLinearConv, QLinearAdd) through the
workload's own evaluation. Its metric differs from fewbit's fake-quant metric because onnxruntime rounds biases to
int32 and requantizes with float multipliers; both are reported, with their difference.

Writes ``ptq.json`` (the :class:`~fewbit.PTQReport` fields, plus the workload, its config, the checkpoint, the
calibration batches, the tolerance rule and the test-split metrics of both models) and ``report.md`` into the
output folder, atomically. The record is rendered by :mod:`fewbit.report.ptq`.

The same workflow on any model with any metric, no workload needed: :func:`model_ptq`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.atomic import write_text
from fewbit.calibrate import ptq, ptq_methods, within_tolerance
from fewbit.nn import fold_batchnorm_
from fewbit.recipes import Recipe
from fewbit.report import ptq as render
from fewbit.workloads import get, runs
from fewbit.workloads.base import config_dict, model_device, to_device

CALIBRATION_EXAMPLES = 1024


def tolerance_rule(metric: str, higher_is_better: bool, tolerance: float) -> str:
    """The within-tolerance rule in words, for reports."""
    if higher_is_better:
        return f"{metric} >= fp32 {metric} - {tolerance:g} * |fp32 {metric}| (higher is better)"
    return f"{metric} <= fp32 {metric} + {tolerance:g} * |fp32 {metric}| (lower is better)"


def run(workload_name: str, recipe: str = "int8", config: str | None = None, overrides: Sequence[str] = (),
        checkpoint: str | Path | None = None, calib_batches: int | None = None,
        methods: Sequence[str] | None = None, tolerance: float = 0.01, max_float_layers: int | None = None,
        split: str = "valid", limit: int | None = None, out: str | Path | None = None, progress: bool = True,
        onnx: str | Path | None = None, qat: bool = False, log=None) -> dict:
    """Post-training quantization of the workload's FP32 model (see the module docstring); returns what
    ``ptq.json`` holds. ``config`` and ``overrides`` pick the cached FP32 baseline (default config: quick);
    ``checkpoint`` is a run folder instead (its own config; then neither may be given). ``methods``: calibrators
    to try (default: every one that applies to the recipe). Every argument is checked before any model is loaded
    or trained: bad values are a ValueError naming the valid ones. ``log(message)`` hears about the baseline."""
    cls = get(workload_name)
    recipe = _recipes.get(recipe)
    methods = ptq_methods(recipe, methods)
    if calib_batches is not None and calib_batches < 1:
        raise ValueError(f"calib_batches={calib_batches}; calibration needs at least 1 batch (default: "
                         f"{CALIBRATION_EXAMPLES} examples' worth)")
    if not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance}; it must be a relative tolerance >= 0 (0.01 is 1%)")
    if max_float_layers is not None and max_float_layers < 0:
        raise ValueError(f"max_float_layers={max_float_layers}; it must be >= 0")
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}; valid: valid, test")
    if checkpoint is not None and (config is not None or overrides):
        raise ValueError("a checkpoint brings its own config: drop --config and the key=value overrides (use "
                         "--limit to evaluate on fewer examples)")
    if checkpoint is None:
        cls.load_config(config or "quick", overrides)  # bad keys fail here, before any training
        base = runs.baseline(workload_name, config or "quick", overrides, progress=progress, log=log)
    else:
        base = runs.load(checkpoint, workload_name)
    workload, model = base.workload, base.model
    if onnx is not None and workload.example_input() is None:
        raise ValueError(f"--onnx: the {workload_name} model is not one forward pass with a fixed input shape; "
                         "export works for: vision")
    c = workload.config
    if c.threads:
        torch.set_num_threads(c.threads)
    started = time.perf_counter()
    model.eval()
    folded = fold_batchnorm_(model)
    count = calib_batches or math.ceil(CALIBRATION_EXAMPLES / c.batch_size)
    device = model_device(model)
    batches = (to_device(workload.batch(c.steps + i), device) for i in range(count))
    test_float = workload.evaluate(model, "test", limit)

    def metric_of(m) -> float:
        return workload.evaluate(m, split, limit)[workload.metric]

    model, report = ptq(model, recipe, batches, metric_of, tolerance=tolerance,
                        higher_is_better=workload.higher_is_better, methods=methods,
                        max_float_layers=max_float_layers, forward_fn=workload.loss, progress=progress)
    fine_tuned = _fine_tune(workload, model, report, metric_of, progress) if qat and not report.within_tolerance \
        else None
    test_quantized = workload.evaluate(model, "test", limit)
    record = {
        "workload": workload_name,
        "metric": workload.metric,
        "split": split,
        "limit": c.eval_limit if limit is None else limit,
        **report.to_dict(),
        "tolerance_rule": tolerance_rule(workload.metric, workload.higher_is_better, tolerance),
        "test": {"float": test_float, "quantized": test_quantized},
        "calibration": {"first_step": c.steps, "batches": count, "examples": count * c.batch_size,
                        "methods": methods},
        "folded_batchnorms": [f"{conv} <- {bn}" for conv, bn in folded],
        "checkpoint": str(base.path) if base.path is not None else None,
        "config": config_dict(c),
        "total_seconds": round(time.perf_counter() - started, 2),
        "qat": fine_tuned,
    }
    if onnx is not None:
        record["onnx"] = _onnx_check(workload, model, onnx, limit, test_quantized, c.threads)
    record = _finite(record)
    out = Path(out) if out is not None else runs.default_out("fewbit-ptq", workload_name, config, overrides)
    record["out"] = str(out)
    write_text(out / "ptq.json", json.dumps(record, indent=2) + "\n")
    write_text(out / "report.md", render.markdown(record))
    return record


def model_ptq(model: nn.Module, evaluate: Callable[[nn.Module], float], calibration: Iterable,
              recipe: str | Recipe = "int8", *, test: Callable[[nn.Module], float | dict[str, float]] | None = None,
              metric: str = "metric", higher_is_better: bool = True, tolerance: float = 0.01,
              methods: Sequence[str] | None = None, max_float_layers: int | None = None,
              forward: Callable[[nn.Module, Any], Any] | None = None, name: str | None = None,
              progress: bool = False) -> tuple[nn.Module, dict]:
    """Post-training quantization of any float ``model``, as ``fewbit ptq`` does for a workload: BatchNorm folded,
    then :func:`fewbit.ptq` (calibrate on ``calibration``, a list or iterable of batches run by ``forward(model,
    batch)``, default ``model(batch)``; choose the calibrator by ``evaluate(model)``, a number; leave the most
    sensitive layers in float until within ``tolerance``). ``test(model)``, when given, scores the float and the
    quantized model on held-out data (a number, or a dict holding ``metric``).

    Returns ``(quantized model, record)``, the record with the fields ``ptq.json`` has (``workload`` is ``name``,
    default the model's class name; ``test`` only with ``test``), which :func:`fewbit.report.ptq.calibration_tables`
    and, with ``test``, :func:`fewbit.report.ptq.summary_table` render. ``model`` is changed in place."""
    started = time.perf_counter()
    recipe = _recipes.get(recipe)
    methods = ptq_methods(recipe, methods)
    model.eval()
    folded = fold_batchnorm_(model)

    def scored(m) -> dict[str, float]:
        value = test(m)
        return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else {metric: float(value)}

    test_float = scored(model) if test is not None else None
    batches = list(calibration)
    model, report = ptq(model, recipe, batches, evaluate, tolerance=tolerance, higher_is_better=higher_is_better,
                        methods=methods, max_float_layers=max_float_layers, forward_fn=forward, progress=progress)
    record = {
        "workload": name or type(model).__name__,
        "metric": metric,
        "split": "evaluate",
        "limit": 0,
        **report.to_dict(),
        "tolerance_rule": tolerance_rule(metric, higher_is_better, tolerance),
        "calibration": {"first_step": 0, "batches": len(batches), "examples": None, "methods": methods},
        "folded_batchnorms": [f"{conv} <- {bn}" for conv, bn in folded],
        "checkpoint": None,
        "config": {},
        "total_seconds": round(time.perf_counter() - started, 2),
        "qat": None,
    }
    if test is not None:
        record["test"] = {"float": test_float, "quantized": scored(model)}
    return model, _finite(record)


def _fine_tune(workload, model, report, metric_of, progress: bool) -> dict:
    """QAT of the calibrated ``model`` (see the module docstring); updates ``report`` to the fine-tuned metric."""
    from fewbit.train.qat import qat

    c = workload.config
    device = model_device(model)
    started = time.perf_counter()
    result = qat(model, lambda step, micro: to_device(workload.batch(step, micro), device), workload.loss,
                 original_steps=c.steps, original_lr=c.lr, grad_clip=c.grad_clip or None, progress=progress,
                 optimizer_fn=lambda params, lr: runs.optimizer_for(dataclasses.replace(c, lr=lr))(params))
    model.eval()
    before = report.final_metric
    after = float(metric_of(model))
    report.steps.append({"step": "qat", "metric": after, "float_layers": list(report.float_layers)})
    report.final_metric = after
    report.within_tolerance = within_tolerance(after, report.float_metric, report.tolerance, report.higher_is_better)
    return {"steps": result.step, "lr": 0.01 * c.lr, "optimizer": c.optimizer, "metric_before": before,
            "metric_after": after, "seconds": round(time.perf_counter() - started, 2)}


def _onnx_check(workload, model, path, limit, fake_quant: dict, threads: int) -> dict:
    """Export ``model`` to ``path`` and score it on the test split with onnxruntime, through the workload's own
    evaluation (the session is a callable from inputs to outputs)."""
    from fewbit.export import export_onnx, onnx_runner

    path = Path(path)
    export_onnx(model, workload.example_input().to(model_device(model)), path)
    metrics = workload.evaluate(onnx_runner(path, threads), "test", limit)
    metric = workload.metric
    return {"path": str(path), "test": metrics, "fake_quant_test": fake_quant[metric],
            "difference": metrics[metric] - fake_quant[metric]}


def _finite(value):
    """``value`` with NaN and infinities as the strings "nan", "inf", "-inf", so that the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
