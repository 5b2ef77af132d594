"""``fewbit bench``: a workload's model under a recipe on a backend, measured by MLPerf's LoadGen.

The model is the cached FP32 baseline of the workload's config (the one ``fewbit study`` trains and caches) or a
saved run (``checkpoint``). One bench is:

1. the backend built (:mod:`fewbit.mlperf.backends`) and warmed up, which measures LoadGen's hints (a run that is
   INVALID only for ending before its minimum duration, because the SUT was faster than the warm-up said, runs
   again (twice at most) with hints from what LoadGen measured; the record keeps the earlier tries);
2. a performance run of the scenario (:func:`fewbit.mlperf.inference.run_loadgen`); for Server, unless a target QPS
   is given, a search for the highest target QPS that stays VALID under the workload's latency bound
   (:func:`~fewbit.mlperf.inference.search_server_qps`; each trial in ``performance/trial-N``);
3. an accuracy run (``mode`` accuracy or both): LoadGen's accuracy log decoded and scored with the workload's
   metric, beside the same model evaluated as ``fewbit eval`` does (``eval``, which it equals) and the FP32 model's
   metric on the same samples, against which ``accuracy_ok`` applies the workload's tolerance
   (:data:`fewbit.mlperf.settings.TARGETS`).

Writes LoadGen's logs under ``out/performance`` and ``out/accuracy`` and the record as ``out/bench.json``; the
record is rendered by :mod:`fewbit.report.bench`. :func:`sweep` runs recipes x backends into one folder each and
returns their records, with the combinations that do not apply listed as skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.calibrate import within_tolerance
from fewbit.mlperf import backends as _backends
from fewbit.mlperf import inference
from fewbit.mlperf import settings as _settings
from fewbit.report import bench as render
from fewbit.workloads import get, runs

BENCH_MODES = ("performance", "accuracy", "both")


def default_batching(scenario: str, workload, latency_ms: float) -> tuple[int, float]:
    """(max batch, max wait in ms) by scenario: SingleStream 1; MultiStream one query (8); Server up to 16 samples
    waiting at most a tenth of the latency bound; Offline the workload's evaluation batch size, so accuracy mode
    reads the batches ``fewbit eval`` reads."""
    if scenario == "SingleStream":
        return 1, 0.0
    if scenario == "MultiStream":
        return _settings.MULTISTREAM_SAMPLES, 0.0
    if scenario == "Server":
        return 16, latency_ms / 10
    return workload.eval_batch_size, 0.0


def run(workload_name: str, scenario: str = "Offline", recipe: str = "fp32", backend: str = "torch",
        mode: str = "both", *, config: str | None = None, overrides: Sequence[str] = (),
        checkpoint: str | Path | None = None, limit: int | None = None, onnx: str | Path | None = None,
        out: str | Path | None = None, official: bool = False, server_qps: float | None = None,
        max_batch: int | None = None, max_wait_ms: float | None = None, workers: int = 1, device: str = "cpu",
        performance_samples: int = 1024, min_duration_ms: int | None = None, min_queries: int | None = None,
        search_trials: int = 6, server_latency_ms: float | None = None, model=None, log=None,
        progress: bool = True) -> dict[str, Any]:
    """One bench (module docstring); returns the record ``bench.json`` holds. ``limit``: the first N test samples
    (None: the config's ``eval_limit``; 0: all). ``server_qps``: run Server at this target instead of searching.
    ``min_duration_ms`` / ``min_queries`` override the quick settings; ``server_latency_ms`` the workload's Server
    latency bound. ``model``: a float model of the workload to
    use instead of the baseline (with ``checkpoint`` None; tests). Every argument is checked before any model is
    loaded or trained."""
    cls = get(workload_name)
    scenario = _settings.check_scenario(scenario)
    _backends.check_backend(backend)
    recipe_name = _recipes.get(recipe).name
    if mode not in BENCH_MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(BENCH_MODES)}")
    if checkpoint is not None and (config is not None or overrides):
        raise ValueError("a checkpoint brings its own config: drop --config and the key=value overrides")
    if workers < 1 or performance_samples < 1 or search_trials < 1:
        raise ValueError(f"workers={workers}, performance_samples={performance_samples} and search_trials="
                         f"{search_trials} must be >= 1")
    if model is not None:
        workload = cls(cls.load_config(config or "quick", overrides)).setup()
        source = "given model"
    elif checkpoint is None:
        cls.load_config(config or "quick", overrides)  # bad keys fail here, before any training
        base = runs.baseline(workload_name, config or "quick", overrides, progress=progress, log=log)
        workload, model, source = base.workload, base.model, str(base.path)
    else:
        base = runs.load(checkpoint, workload_name)
        workload, model, source = base.workload, base.model, str(base.path)
    c = workload.config
    if c.threads:
        torch.set_num_threads(c.threads)
    out = Path(out) if out is not None else runs.default_out("fewbit-bench", workload_name, config, overrides) / \
        f"{scenario}-{backend}-{recipe_name}"
    out.mkdir(parents=True, exist_ok=True)
    target = _settings.target(workload_name)
    if server_latency_ms is not None:  # a bound other than the table's (a slower machine); the record says so
        target = dataclasses.replace(target, server_latency_ms=server_latency_ms, reference="given")
    samples = workload.samples("test", c.eval_limit if limit is None else limit)
    be = _backends.build(backend, workload, model, recipe_name, onnx=onnx, folder=out, threads=c.threads,
                         device=device)
    batch, wait = default_batching(scenario, workload, target.server_latency_ms)
    batch = max_batch or batch
    wait = wait if max_wait_ms is None else max_wait_ms
    started = time.perf_counter()
    hints = inference.measure_hints(workload, samples, be, batch)
    record: dict[str, Any] = {
        "workload": workload_name, "scenario": scenario, "backend": backend, "recipe": be.recipe,
        "backend_description": be.description, "onnx": be.onnx, "model": source, "samples": len(samples),
        "max_batch": batch, "max_wait_ms": wait, "workers": workers,
        "hints": {"single_latency_ns": hints.single_latency_ns, "multi_latency_ns": hints.multi_latency_ns,
                  "offline_qps": hints.offline_qps, "server_qps": hints.server_qps},
        "target": {"server_latency_ms": target.server_latency_ms, "accuracy_tolerance": target.accuracy_tolerance,
                   "reference": target.reference},
        "mode": mode, "out": str(out),
    }

    def settings(run_mode: str, qps: float | None = None, scale: int = 1) -> _settings.RunSettings:
        duration, queries = min_duration_ms, min_queries
        if scale > 1 and not official:  # a longer Server trial: more queries for LoadGen's early stopping
            duration = (duration or _settings.QUICK_MIN_DURATION_MS) * scale
            queries = (queries or _settings.QUICK_MIN_QUERIES[scenario]) * scale
        return _settings.RunSettings(scenario, run_mode, workload_name, hints, target.server_latency_ms,
                                     server_target_qps=qps, official=official, min_duration_ms=duration,
                                     min_queries=queries)

    def loadgen(run_settings, folder):
        return inference.run_loadgen(workload, samples, be, run_settings, folder, max_batch=batch, max_wait_ms=wait,
                                     workers=workers, performance_samples=performance_samples)

    if mode in ("performance", "both"):
        if scenario == "Server" and server_qps is None:
            best, trail = inference.search_server_qps(
                lambda qps, trial, scale=1: loadgen(settings("performance", qps, scale),
                                                    out / "performance" / f"trial-{trial}"),
                hints.server_qps, trials=search_trials)
            record["server_search"] = trail
            if best is None:  # nothing VALID: report the lowest target tried, INVALID with LoadGen's reasons
                lowest = min(range(len(trail)), key=lambda k: trail[k]["target_qps"])
                best = loadgen(settings("performance", trail[lowest]["target_qps"]), out / "performance" / "final")
        else:
            best = loadgen(settings("performance", server_qps), out / "performance")
            for _ in range(2):  # the warm-up's guess was too slow: again with what LoadGen measured
                better = inference.corrected_hints(best, hints)
                if better is None:
                    break
                record.setdefault("earlier_tries", []).append({"result": best.summary.result,
                                                               "reasons": best.summary.reasons})
                hints = better
                best = loadgen(settings("performance", server_qps), out / "performance")
            record["hints"] = dataclasses.asdict(hints)
        record.update(best.record())
        record["mode"] = mode
    else:
        record.update({"result": None, "valid": None, "metric_name": None, "metric": None, "reasons": []})
    record.update({"accuracy": None, "accuracy_metric": workload.metric, "accuracy_ok": None})
    if mode in ("accuracy", "both") and not be.is_noop:
        accuracy_run = loadgen(settings("accuracy"), out / "accuracy")
        scored = inference.score_accuracy(workload, samples, accuracy_run.folder)
        evaluated = _evaluate(workload, model, be, recipe_name, limit)
        fp32 = evaluated if be.recipe == "fp32" and backend == "torch" else \
            runs.evaluate_model(workload, model, "fp32", "test", limit)
        metric = workload.metric
        record.update({
            "accuracy": scored[metric], "accuracy_metrics": scored, "eval": evaluated[metric],
            "accuracy_equals_eval": scored[metric] == evaluated[metric], "fp32_accuracy": fp32[metric],
            "accuracy_ok": within_tolerance(scored[metric], fp32[metric], target.accuracy_tolerance,
                                            workload.higher_is_better),
            "accuracy_rule": f"{metric} within {target.accuracy_tolerance:g} x |FP32 {metric}| "
                             f"({'higher' if workload.higher_is_better else 'lower'} is better)",
            "accuracy_folder": str(accuracy_run.folder),
        })
    record["total_seconds"] = round(time.perf_counter() - started, 2)
    write_text(out / "bench.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def _evaluate(workload, model, backend: _backends.Backend, recipe: str, limit: int | None) -> dict[str, float]:
    """The backend's model evaluated as ``fewbit eval`` does: the PyTorch backends by ``runs.evaluate_model`` under
    the recipe, the onnxruntime ones through the workload's evaluation of the same session."""
    if backend.name in ("ort", "ort_int8"):
        return workload.evaluate(backend.model, "test", limit)
    return runs.evaluate_model(workload, model, recipe, "test", limit)


def sweep(workload_name: str, scenario: str = "Offline", recipes: Sequence[str] = ("fp32", "bf16"),
          backends: Sequence[str] = ("torch", "ort"), *, out: str | Path | None = None,
          config: str | None = None, overrides: Sequence[str] = (), onnx: str | Path | None = None,
          log=None, **options) -> dict[str, Any]:
    """:func:`run` for every recipe x backend (``ort_int8`` once, for the ``onnx`` file), each into
    ``out/<recipe>-<backend>``; combinations that do not apply here are rows with ``skipped`` and the reason.
    Returns ``{"workload", "scenario", "out", "records"}`` and writes it as ``out/sweep.json``, with
    ``report.md`` (the table) and the latency-distribution plot (:mod:`fewbit.report.bench`)."""
    root = Path(out) if out is not None else runs.default_out("fewbit-bench", workload_name, config, overrides) / \
        f"sweep-{_settings.check_scenario(scenario)}"
    records = []
    pairs = [(r, b) for b in backends for r in (recipes if b != "ort_int8" else ("int8",))]
    for recipe, backend in pairs:
        try:
            record = run(workload_name, scenario, recipe, backend, out=root / f"{recipe}-{backend}", config=config,
                         overrides=overrides, onnx=onnx if backend == "ort_int8" else None, log=log, **options)
        except ValueError as error:  # the combination does not apply (or cannot run here): say why
            record = {"workload": workload_name, "scenario": scenario, "recipe": recipe, "backend": backend,
                      "skipped": str(error)}
        records.append(record)
        if log:
            log(f"{recipe} on {backend}: " + (f"skipped ({record['skipped']})" if "skipped" in record else
                                               f"{record.get('result')} {record.get('metric')}"))
    result = {"workload": workload_name, "scenario": _settings.check_scenario(scenario), "out": str(root),
              "records": records}
    root.mkdir(parents=True, exist_ok=True)
    write_text(root / "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
    write_text(root / "report.md", render.markdown(result))
    write_bytes(root / render.PLOT_NAME, render.latency_plot(result))
    return result
