"""The ``fewbit`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from fewbit import formats, recipes
from fewbit.report import catalog
from fewbit.report.console import console as _console
from fewbit.train.loop import AllStepsSkipped
from fewbit.train.scaler import LossScaleCollapse
from fewbit.workloads.base import DataError

# What a user's input or files can cause; each becomes one ``fewbit: error: ...`` line and exit code 2. Anything
# else is a bug in fewbit and keeps its traceback. (CheckpointError is a ValueError; AllStepsSkipped and
# LossScaleCollapse are the training run's verdicts on its data and settings; yaml.YAMLError and
# json.JSONDecodeError come from recipe and config files.)
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, OSError, ImportError, DataError, KeyError, StopIteration, yaml.YAMLError, AllStepsSkipped,
    LossScaleCollapse)


def _cmd_formats(args: argparse.Namespace) -> int:
    console = _console()
    if args.name is None:
        if args.json:
            print(json.dumps([formats.get(n).as_dict() for n in formats.names()], indent=2))
        else:
            console.print(catalog.formats_table([formats.get(n) for n in formats.names()]))
            console.print(catalog.FORMATS_NOTE)
        return 0
    fmt = formats.get(args.name)
    if fmt.bits > 8:
        raise ValueError(f"{fmt.name} has {fmt.num_codes} codes; value listings exist for formats of 8 bits or "
                         "fewer. Run `fewbit formats` for its facts")
    if args.json:
        facts = fmt.as_dict()
        facts["values"] = [v if math.isfinite(v) else str(v) for v in fmt.values.tolist()]
        print(json.dumps(facts, indent=2))
    else:
        console.print(catalog.values_table(fmt))
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    rows = [recipes.get(n) for n in recipes.names(include_training=True)]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    _console().print(catalog.recipes_table(rows))
    return 0


def _cmd_workloads(args: argparse.Namespace) -> int:
    from fewbit import workloads

    rows = []
    for name in workloads.names():
        cls = workloads.get(name)
        rows.append({"name": name, "description": cls.description, "metric": cls.metric,
                     "higher_is_better": cls.higher_is_better, "configs": cls.config_names(),
                     "sources": [{"name": s.name, "description": s.description, "available": s.available,
                                  "install": s.install} for s in cls.sources()]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _console().print(catalog.workloads_table(rows))
    return 0


def _metrics_line(metrics: dict) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _cmd_train(args: argparse.Namespace) -> int:
    from fewbit import workloads
    from fewbit.workloads import runs

    _check_count("--checkpoint-every", args.checkpoint_every, "0 for no checkpoints or N > 0 for one every N steps")
    cls = workloads.get(args.workload)
    with _yaml_named("--recipe", args.recipe):
        recipe = recipes.get(args.recipe)
    with _yaml_named("--config", args.config):
        workload = cls(cls.load_config(args.config, args.overrides))
    out = args.out or f"runs/{args.workload}-{recipe.name}"
    if not args.overwrite:  # refuse before any work; with --overwrite, runs.train clears the folder
        runs.prepare_out(Path(out), resume=args.resume, checkpoint_every=args.checkpoint_every)
    console = _console()
    console.print(f"fewbit train {args.workload}: recipe {recipe.name}, config {args.config}, "
                  f"{workload.config.steps} steps -> {out}")
    result = runs.train(workload, recipe, out=out, progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                        overwrite=args.overwrite, resume=args.resume)
    console.print(f"valid: {_metrics_line(result.record['valid'])}")
    console.print(f"trained in {result.record['train']['seconds']:.1f} s; saved {out}/ "
                  f"(evaluate with `fewbit eval {args.workload} --checkpoint {out}`)")
    return 0


@contextlib.contextmanager
def _yaml_named(option: str, value: str | None):
    """A YAML syntax error in the file given to ``option``, as a ValueError naming the option and the file."""
    try:
        yield
    except yaml.YAMLError as error:
        raise ValueError(f"{option} {value}: not valid YAML ({_one_line(error)})") from None


def _check_count(option: str, value: int, expected: str) -> None:
    if value < 0:
        raise ValueError(f"{option} {value}: use {expected}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from fewbit.workloads import runs

    if args.limit is not None:
        _check_count("--limit", args.limit, "0 for the whole split or N > 0 for its first N examples")
    loaded = runs.load(args.checkpoint, args.workload)
    with _yaml_named("--recipe", args.recipe):
        recipe = loaded.recipe if args.recipe is None else recipes.get(args.recipe)
    metrics = runs.evaluate(loaded, recipe, args.split, args.limit)
    as_trained = " (as trained)" if args.recipe is None else ""
    record = {"workload": args.workload, "checkpoint": str(args.checkpoint), "recipe": recipe.name + as_trained,
              "split": args.split, **metrics}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        _console().print(f"{args.workload} {args.split} ({record['recipe']}): {_metrics_line(metrics)}")
    return 0


@contextlib.contextmanager
def _json_mode(enabled: bool):
    """With ``--json`` stdout holds the JSON alone: tables, progress and training bars go to stderr."""
    with contextlib.redirect_stdout(sys.stderr) if enabled else contextlib.nullcontext():
        yield _console(stderr=enabled)


def _progress_bar(console, title: str, enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{title}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, disable=not enabled)


def _cmd_study(args: argparse.Namespace) -> int:
    if args.train:
        return _cmd_study_train(args)
    from fewbit import study
    from fewbit.report import study as render

    with _json_mode(args.json) as console, _progress_bar(console, "study", not args.quiet) as bar:
        task = bar.add_task("study", total=None, info="")
        result = study.run(
            args.workload, args.config, args.overrides, [r for r in args.recipes.split(",") if r] if args.recipes
            else (), out=args.out, split=args.split, retrain=args.retrain, progress=not args.quiet,
            log=console.print, on_recipe=lambda info, done, total: bar.update(task, info=info, completed=done,
                                                                             total=total))
    console.print(render.table(result))
    console.print(f"wrote {Path(result['out']) / 'results.json'}, report.md, {render.plot_name(result)}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_ptq(args: argparse.Namespace) -> int:
    from fewbit import post_training
    from fewbit.report import ptq as render

    methods = [m.strip().replace("percentile-", "percentile_") for m in args.methods.split(",") if m.strip()] \
        if args.methods else None
    with _json_mode(args.json) as console:
        record = post_training.run(
            args.workload, args.recipe, args.config, args.overrides, args.checkpoint, args.calib_batches, methods,
            args.tolerance, args.max_float_layers, args.split, args.limit, args.out, progress=not args.quiet,
            onnx=args.onnx, qat=args.qat, log=console.print)
        for renderable in render.calibration_tables(record):
            console.print(renderable)
        console.print(render.summary_table(record))
        console.print(f"wrote {Path(record['out']) / 'ptq.json'} and report.md")
    if args.json:
        print(json.dumps(record, indent=2))
    return 0


def _cmd_ttq(args: argparse.Namespace) -> int:
    from fewbit import ttq
    from fewbit.report import ttq as render

    recipes_ = [r.strip() for r in args.recipes.split(",") if r.strip()]
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun every rank trains; rank 0 alone reports
    quiet = args.quiet or not rank0
    with _json_mode(args.json) as console, _progress_bar(console, "ttq", not quiet) as bar:
        task = bar.add_task("ttq", total=None, info="")

        def on_run(info: str, done: int, total: int) -> None:
            bar.update(task, info=info, completed=done, total=total)
            if not quiet:
                console.print(info)

        record = ttq.run(args.workload, recipes_, args.runs, args.config, args.overrides, out=args.out,
                         seed=args.seed, target=args.target, check=not args.no_check, on_run=on_run)
    if not rank0:
        return 0
    console.print(render.table(record))
    for line in render.notes(record):
        console.print(line)
    console.print(f"wrote {Path(record['out']) / 'ttq.json'}, report.md and one MLPerf log per run "
                  f"({record['out']}/<recipe>/result_<i>.txt)")
    if args.json:
        print(json.dumps(record, indent=2))
    return 0


def _cmd_study_train(args: argparse.Namespace) -> int:
    from fewbit import train_study
    from fewbit.report import train_study as render

    with _json_mode(args.json) as console, _progress_bar(console, "study --train", not args.quiet) as bar:
        task = bar.add_task("study", total=None, info="")
        record = train_study.run(
            args.workload, args.config, args.overrides, [r for r in args.recipes.split(",") if r] if args.recipes
            else (), out=args.out, split=args.split,
            on_recipe=lambda info, done, total: bar.update(task, info=info, completed=done, total=total))
    console.print(render.table(record))
    console.print(f"wrote {Path(record['out']) / 'results.json'}, report.md, {render.PLOT}, {render.GRAD_PLOT}")
    if args.json:
        print(json.dumps(record, indent=2))
    return 0


def _cmd_sparsify(args: argparse.Namespace) -> int:
    from fewbit import sparsify
    from fewbit.report import sparsity as render

    with _json_mode(args.json) as console:
        record = sparsify.run(
            args.workload, args.pattern, args.config, args.overrides, args.recipe, args.steps,
            permute=not args.no_permute, permute_time=args.permute_time, calib_batches=args.calib_batches,
            tolerance=args.tolerance, limit=args.limit, out=args.out, progress=not args.quiet, log=console.print)
        console.print(render.results_table(record))
        console.print(render.verdict(record))
        console.print(f"wrote {Path(record['out']) / 'sparsify.json'}, report.md, {render.plot_name(record)}; "
                      f"retrained run: {record['run']} (`fewbit eval {args.workload} --checkpoint {record['run']}`)")
    if args.json:
        print(json.dumps(record, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from fewbit import bench
    from fewbit.mlperf.inference import BackendError, RunInterrupted
    from fewbit.report import bench as render

    options = dict(config=args.config, overrides=args.overrides, limit=args.limit, onnx=args.onnx,
                   official=args.official, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                   workers=args.workers, device=args.device, min_duration_ms=args.min_duration_ms,
                   min_queries=args.min_queries, server_latency_ms=args.latency_ms, progress=not args.quiet)
    with _json_mode(args.json) as console:
        try:
            if args.sweep:
                result = bench.sweep(args.workload, args.scenario, [r for r in args.recipes.split(",") if r],
                                     [b for b in args.backends.split(",") if b], out=args.out, mode=args.mode,
                                     checkpoint=args.checkpoint, server_qps=args.server_qps, log=console.print,
                                     **options)
            else:
                result = bench.run(args.workload, args.scenario, args.recipe, args.backend, args.mode, out=args.out,
                                   checkpoint=args.checkpoint, server_qps=args.server_qps, log=console.print,
                                   **options)
        except BackendError as error:
            print(f"fewbit: error: {error}", file=sys.stderr)
            return 1
        except RunInterrupted as error:
            print(f"fewbit: {error}", file=sys.stderr)
            return 130
        console.print(render.table(result))
        console.print(f"LoadGen's logs and the record: {result['out']}")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from fewbit.workloads import hf

    out = hf.export_lm(args.checkpoint, args.out)
    _console().print(f"wrote {out}/ (GPT2LMHeadModel, byte tokenizer); score it with `fewbit study hf --path {out}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewbit", description="Train, quantize, sparsify and benchmark "
                                     "neural networks in few bits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("formats", help="table of number formats, or every value of one format")
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(formats.names())}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_formats)
    p = sub.add_parser("recipes", help="the preset recipes and the QuantSpec each gives to each role")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_recipes)

    p = sub.add_parser("workloads", help="the reference workloads, their data sources and whether they are here")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_workloads)

    overrides_help = "config overrides, e.g. steps=200 lr=3e-4 (unknown keys are rejected)"
    p = sub.add_parser("train", help="train a workload's model under a recipe and save the run")
    p.add_argument("workload")
    p.add_argument("--recipe", default="fp32", help="a preset recipe (see `fewbit recipes`) or a recipe YAML file "
                   "(`Recipe.to_yaml`); the run records the full recipe")
    p.add_argument("--config", default="quick", help="a named config of the workload, or a .yaml path")
    p.add_argument("--out", help="run folder (default runs/<workload>-<recipe>)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="keep resumable checkpoints every N steps")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (refused otherwise)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoints in --out (needs "
                   "--checkpoint-every; starts them when there are none yet; a changed config is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved run, as trained or directly cast to a recipe")
    p.add_argument("workload")
    p.add_argument("--checkpoint", required=True, help="a run folder written by `fewbit train`")
    p.add_argument("--recipe", help="evaluate under this recipe, a preset or a YAML file (default: the recipe the "
                   "run was trained with; fp32: the float model)")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--limit", type=int, help="evaluate only the first N examples (0: all; default: the config's "
                   "eval_limit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_eval)

    p = sub.add_parser("study", help="train (or load) the FP32 baseline and evaluate it under every recipe")
    p.add_argument("workload")
    p.add_argument("--config", default="quick", help="a named config of the workload, or a .yaml path")
    p.add_argument("--recipes", help="comma-separated preset names or recipe YAML files (default: every study "
                   "preset)")
    p.add_argument("--out", help="output folder (default fewbit-study/<workload>, suffixed by "
                   "a non-default config and the overrides, e.g. fewbit-study/vision-model=mobilenet_v2)")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--retrain", action="store_true", help="train the baseline again instead of using the cache")
    p.add_argument("--train", action="store_true", help="train from scratch under each recipe instead (default "
                   "recipes: fp32, bf16, fp16_mixed, fp16 without loss scaling, fp8, mxfp8, mxfp6, mxfp4)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="also print results.json to stdout")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_study)

    p = sub.add_parser("ptq", help="post-training quantization of a trained model: calibrate, choose the best "
                       "calibrator, leave sensitive layers in float until within tolerance",
                       description="Post-training quantization of the FP32 baseline (trained or loaded as `fewbit "
                       "study` does) or of --checkpoint: BatchNorm folded, every calibrator tried on one pass over "
                       "training batches the FP32 run never used (steps config.steps onwards), the most sensitive "
                       "layers left in float while the metric is more than --tolerance off. Tolerance is relative "
                       "to |FP32 metric| on --split: with 0.01, BLEU or accuracy may drop by 1% of its value, "
                       "perplexity or WER (lower is better) may rise by 1%. Writes ptq.json and report.md.")
    p.add_argument("workload")
    p.add_argument("--recipe", default="int8", help="a preset recipe with per-tensor inputs: int8 (default), fp8, "
                   "fp8_current")
    p.add_argument("--config", help="a named config of the workload, or a .yaml path (default quick; not with "
                   "--checkpoint)")
    p.add_argument("--checkpoint", help="a run folder written by `fewbit train` (default: the cached FP32 baseline)")
    p.add_argument("--calib-batches", type=int, help="calibration batches (default: enough for 1024 examples)")
    p.add_argument("--methods", help="comma-separated calibrators: max, percentile_99.9, percentile_99.99, "
                   "percentile_99.999, percentile_99.9999, entropy, mse (default: every one that applies)")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative to |FP32 metric| (default 0.01: 1%%)")
    p.add_argument("--max-float-layers", type=int, help="leave at most this many layers in float (default: no cap)")
    p.add_argument("--split", default="valid", choices=["valid", "test"],
                   help="the split that decides (default valid); test is always reported")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples (0: all; default: the config's "
                   "eval_limit)")
    p.add_argument("--out", help="output folder (default fewbit-ptq/<workload>, suffixed like "
                   "fewbit study's)")
    p.add_argument("--qat", action="store_true", help="when still beyond tolerance, fine-tune the quantized model "
                   "(10%% of the FP32 run's steps at 1%% of its learning rate, cosine decay)")
    p.add_argument("--onnx", metavar="PATH", help="also export the INT8 model to this ONNX file and evaluate it "
                   "on the test split with onnxruntime (vision)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-evaluation lines")
    p.add_argument("--json", action="store_true", help="print ptq.json to stdout (everything else to stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_ptq)

    p = sub.add_parser("ttq", help="time to quality, MLPerf Training style: N runs per recipe to the workload's "
                       "quality target, olympic score, RCP check, one MLPerf log per run",
                       description="Each run trains from scratch to the workload's quality target (timed from "
                       "run_start to run_stop; initialization untimed), at most the config's steps (then aborted). "
                       "The score is the olympic mean of N runs (fastest and slowest dropped; more than one "
                       "non-converged run: invalid), in seconds and in samples; the RCP test compares the samples "
                       "to target with fewbit's FP32 reference. Writes ttq.json, report.md and <recipe>/result_<i>"
                       ".txt MLPerf logs, each checked by mlperf_logging's compliance checker.")
    p.add_argument("workload")
    p.add_argument("--recipes", default="fp32,bf16,mxfp8", help="comma-separated preset recipes or YAML files "
                   "(default fp32,bf16,mxfp8)")
    p.add_argument("--runs", type=int, help="runs per recipe, at least 3 (default: 3 on the quick config; MLPerf's "
                   "5 for vision, 10 for the others on other configs)")
    p.add_argument("--config", help="a named config of the workload, or a .yaml path (default quick)")
    p.add_argument("--target", type=float, help="replace the workload's quality target (a value of its metric)")
    p.add_argument("--seed", type=int, default=0, help="the first run's seed (run i uses seed + i)")
    p.add_argument("--out", help="output folder (default fewbit-ttq/<workload>)")
    p.add_argument("--no-check", action="store_true", help="do not run the compliance checker on the logs")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-run lines")
    p.add_argument("--json", action="store_true", help="print ttq.json to stdout (everything else to stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_ttq)

    p = sub.add_parser("sparsify", help="N:M (2:4) sparsity of the FP32 baseline: one-shot magnitude and Wanda, "
                       "with and without channel permutations, and retrained with the masks fixed",
                       description="Prune the FP32 baseline (trained or loaded as `fewbit study` does) to N:M along "
                       "every Linear's and convolution's reduction dimension; evaluate one-shot magnitude and Wanda "
                       "pruning, each with and without a channel-permutation search, then retrain the pruned model "
                       "with its masks fixed (the workload's optimizer, schedule and steps) and evaluate it, on the "
                       "valid and test splits. Writes sparsify.json, report.md, a plot, and the retrained run "
                       "(retrained/, readable by `fewbit eval`).")
    p.add_argument("workload")
    p.add_argument("--pattern", default="2:4", help="N:M, e.g. 2:4 (default), 1:2, 4:8")
    p.add_argument("--config", default="quick", help="a named config of the workload, or a .yaml path")
    p.add_argument("--recipe", help="also evaluate every model under this recipe (2:4 composed with a number format, "
                   "e.g. mxfp4); byte counts are the compressed ones")
    p.add_argument("--steps", type=int, help="retrain for this many steps (default: the workload's own number)")
    p.add_argument("--no-permute", action="store_true", help="skip the channel-permutation variants")
    p.add_argument("--permute-time", type=float, default=1.0, help="seconds of permutation search per layer")
    p.add_argument("--calib-batches", type=int, help="Wanda calibration batches (default: 512 examples' worth)")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative to |dense metric| (default 0.01: 1%%)")
    p.add_argument("--limit", type=int, help="evaluate only the first N examples (0: all; default: the config's "
                   "eval_limit)")
    p.add_argument("--out", help="output folder (default fewbit-sparsify/<workload>, suffixed like fewbit study's); "
                   "the retrained run goes into its retrained/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print sparsify.json to stdout (everything else to stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_sparsify)

    p = sub.add_parser("bench", help="MLPerf Inference through LoadGen: a scenario, a recipe, a backend; "
                       "performance beside accuracy",
                       description="Runs the workload's FP32 baseline (cached, as `fewbit study` trains it) or "
                       "--checkpoint under --recipe on --backend through MLPerf's LoadGen: the test split is the "
                       "query sample library, accuracy mode is scored with the workload's metric. Quick settings "
                       "by default (1 s minimum duration); --official keeps mlperf.conf's (600 s). LoadGen's logs "
                       "and bench.json go to --out.")
    p.add_argument("workload")
    p.add_argument("--scenario", default="Offline", help="SingleStream, MultiStream, Server or Offline")
    p.add_argument("--recipe", default="fp32", help="a preset recipe or a recipe YAML file (default fp32)")
    p.add_argument("--backend", default="torch", help="torch, compile, ort, ort_int8 (with --onnx), fp8 (CUDA), "
                   "noop")
    p.add_argument("--mode", default="both", choices=["performance", "accuracy", "both"])
    p.add_argument("--onnx", metavar="PATH", help="the ONNX file of ort_int8 (`fewbit ptq --onnx PATH`) or ort")
    p.add_argument("--checkpoint", help="a run folder written by `fewbit train` (default: the cached FP32 baseline)")
    p.add_argument("--config", help="a named config of the workload, or a .yaml path (default quick)")
    p.add_argument("--limit", type=int, help="the first N test samples (0: all; default: the config's eval_limit)")
    p.add_argument("--out", help="output folder (default fewbit-bench/<workload>/<scenario>-<backend>-<recipe>)")
    p.add_argument("--official", action="store_true", help="mlperf.conf's durations and query counts (600 s)")
    p.add_argument("--server-qps", type=float, help="Server: run at this target QPS instead of searching")
    p.add_argument("--latency-ms", type=float, help="Server: this p99 latency bound instead of the workload's "
                   "(README, Benchmarking)")
    p.add_argument("--max-batch", type=int, help="largest batch the SUT forms (default by scenario)")
    p.add_argument("--max-wait-ms", type=float, help="longest a batch waits to fill (default: Server a tenth of "
                   "the latency bound, else 0)")
    p.add_argument("--workers", type=int, default=1, help="SUT worker threads (default 1)")
    p.add_argument("--device", default="cpu", help="where the PyTorch backends run (cpu, cuda)")
    p.add_argument("--min-duration-ms", type=int, help="override the quick minimum duration")
    p.add_argument("--min-queries", type=int, help="override the quick minimum query count")
    p.add_argument("--sweep", action="store_true", help="run --recipes x --backends and print one table")
    p.add_argument("--recipes", default="fp32,bf16", help="--sweep: comma-separated recipes (default fp32,bf16)")
    p.add_argument("--backends", default="torch,ort", help="--sweep: comma-separated backends (default "
                   "torch,ort; ort_int8 with --onnx)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the record to stdout (everything else to stderr)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    p.set_defaults(run=_cmd_bench)

    p = sub.add_parser("export-hf", help="save a fewbit lm run as a Hugging Face folder (GPT2LMHeadModel, byte "
                       "tokenizer), for `fewbit study hf --path DIR` and transformers")
    p.add_argument("checkpoint", help="an lm run folder written by `fewbit train lm --out DIR`")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.set_defaults(run=_cmd_export_hf)
    return parser


def _config_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with ``--key value`` and ``--key=value`` rewritten to the override ``key=value`` wherever ``--key``
    is not an option of the command (``fewbit study vision --model mobilenet_v2``); dashes in keys become
    underscores. Whether the key exists is checked against the workload's config later."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in commands or "overrides" not in {a.dest for a in commands[argv[0]]._actions}:
        return argv
    known = commands[argv[0]]._option_string_actions
    out, i = [argv[0]], 1
    while i < len(argv):
        item = argv[i]
        key, sep, value = item.partition("=")
        if item.startswith("--") and len(item) > 2 and key not in known:
            if not sep:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    parser.error(f"{item} needs a value (a config key: {item} VALUE or {key[2:]}=VALUE)")
                value, i = argv[i + 1], i + 1
            out.append(f"{key[2:].replace('-', '_')}={value}")
        else:
            out.append(item)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = _config_options(parser, list(sys.argv[1:] if argv is None else argv))
    # key=value overrides may come before or after the options (argparse alone takes them only before).
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except KeyboardInterrupt:
        # Outputs are written atomically (checkpoints, run files, metrics lines flushed per step): what is on disk
        # stays readable, and a run with --checkpoint-every continues with --resume.
        print("fewbit: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as error:
        print(f"fewbit: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """The message of an expected failure as one line (YAML and JSON errors span several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError | StopIteration):
        text = f"{type(error).__name__}: {text}"  # their messages alone are just a key or nothing
    return text


if __name__ == "__main__":
    sys.exit(main())
