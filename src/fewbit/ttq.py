"""``fewbit ttq``: time to quality, MLPerf Training style, per recipe.

For each recipe, N runs with seeds ``seed .. seed + N - 1`` (each seed changes the initialization and the data
order) train the workload from scratch to its quality target (:data:`fewbit.mlperf.training.TARGETS`), each timed
from run_start to run_stop with initialization untimed (:func:`fewbit.mlperf.training.run_to_target`), each
writing an MLPerf log ``<out>/<recipe>/result_<i>.txt`` checked by ``mlperf_logging``'s compliance checker. The
score per recipe is the olympic mean of the time and of the samples to target, with the RCP test against fewbit's
FP32 reference (:func:`fewbit.mlperf.training.olympic`). Writes ``ttq.json`` (the record) and ``report.md`` into
``out``; under torchrun every rank trains and rank 0 writes.

A workload without an entry in the table takes its target from ``--target`` (``hf``: a value of the model
folder's own metric, e.g. perplexity, on the valid split; evaluated ten times over the step budget); its runs
fine-tune the pretrained weights on the folder's text, each seed changing the order of the batches.

The record is rendered by :mod:`fewbit.report.ttq`; this module only runs the runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from fewbit import recipes as _recipes
from fewbit.atomic import write_text
from fewbit.mlperf import training
from fewbit.report import ttq as render
from fewbit.workloads import get as get_workload
from fewbit.workloads.base import config_dict

DEFAULT_RECIPES = ("fp32", "bf16", "mxfp8")


def run(workload: str, recipes: Sequence[str] = DEFAULT_RECIPES, runs: int | None = None, config: str | None = None,
        overrides: Sequence[str] = (), out: str | Path | None = None, seed: int = 0, target: float | None = None,
        check: bool = True, progress: bool = False,
        on_run: Callable[[str, int, int], None] | None = None) -> dict:
    """The runs and scores (see the module docstring); returns the record ``ttq.json`` holds. ``runs``: per recipe
    (default: MLPerf's count, or the quick default on the quick config; at least 3). ``target`` replaces the
    table's quality target (a value of the workload's metric). ``check`` runs the compliance checker on every
    log. ``on_run(info, done, total)`` hears progress."""
    if workload in training.TARGETS:
        goal = training.target_for(workload)
        if target is not None:
            goal = goal.with_target(target)
    elif target is None:
        raise ValueError(f"no quality target for workload {workload!r} in fewbit's table (it has one for "
                         f"{', '.join(training.TARGETS)}); give one with --target VALUE, a value of its metric on "
                         "the valid split")
    else:  # hf: the folder's own metric, fine-tuned on its text
        goal = training.own_target(workload, target, config, overrides)
    count = training.default_runs(goal, config) if runs is None else runs
    if count < 3:
        raise ValueError(f"--runs {count}: the olympic score drops the fastest and the slowest run, so it needs at "
                         "least 3 runs; use --runs 3 or more")
    names = [_recipes.get(r).name for r in recipes]  # unknown recipes fail before any training
    if not names:
        raise ValueError("no recipe given; pass e.g. --recipes fp32,bf16,mxfp8")
    cls = get_workload(workload)
    conf = cls.load_config(config or goal.config, [*goal.overrides, *overrides])
    out = Path(out) if out is not None else Path("fewbit-ttq") / workload
    rank0 = int(os.environ.get("RANK", "0")) == 0
    all_runs: dict[str, list[training.TimedRun]] = {}
    total, done = len(names) * count, 0
    for name in names:
        timed = all_runs.setdefault(name, [])
        for i in range(count):
            if on_run:
                on_run(f"{name} run {i + 1}/{count} (seed {seed + i})", done, total)
            timed.append(training.run_to_target(
                workload, name, seed=seed + i, config=config, overrides=overrides, target=goal,
                log_path=out / name / f"result_{i}.txt", check=check and rank0, progress=progress))
            done += 1
            if on_run:
                r = timed[-1]
                on_run(f"{name} seed {seed + i}: {r.status} in {r.seconds:.1f} s ({r.reason})", done, total)
    # scored at the end, against the reference as it is then (a reference measured meanwhile counts)
    reference = training.rcp_reference(workload, conf.batch_size, goal)
    results = [{"recipe": name, "score": training.olympic(timed, reference).to_dict(),
                "runs": [{k: v for k, v in r.to_dict().items() if k != "losses"} for r in timed]}
               for name, timed in all_runs.items()]
    record = {"workload": workload, "target": {**asdict(goal), "describe": goal.describe()},
              "config": config_dict(conf), "config_name": config or goal.config, "overrides": list(overrides),
              "runs_per_recipe": count, "seeds": list(range(seed, seed + count)),
              "reference": asdict(reference) if reference is not None else None, "results": results,
              "out": str(out)}
    if rank0:
        write_text(out / "ttq.json", json.dumps(record, indent=2) + "\n")
        write_text(out / "report.md", render.markdown(record))
    return record
