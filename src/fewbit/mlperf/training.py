"""Time to quality, measured the MLPerf Training way.

**A timed run** (:func:`run_to_target`) trains a workload from scratch under a recipe until its quality target
(:data:`TARGETS`) is reached. As the MLPerf Training rules say:

- the data set is prepared first (generated, tokenized and cached: MLPerf's allowed offline reformatting);
- initialization is logged (``init_start`` .. ``init_stop``) and untimed: building the model, converting its
  layers to the recipe, compiling fewbit's kernels and a warm-up forward and backward pass on *synthetic* input
  (random tokens or images of the batch's shape; no training or evaluation example is read);
- ``run_start`` is logged just before the first training batch is read: the clock starts at the first touch of
  the data;
- evaluations run on the clock every ``eval_every`` steps;
- the run stops at the first evaluation that reaches the target (``run_stop`` status ``success``), or at the step
  budget (the config's ``steps``) with status ``aborted``; a non-finite loss (a diverging run) or an error also
  ends it ``aborted``.

**The score** (:func:`olympic`) of N >= 3 runs with different seeds (each seed changes the initialization and
the data order): drop the fastest and the slowest and average the rest; one run that did not converge counts as
the slowest (and is dropped), more than one makes the result invalid. Samples to target are scored the same way
beside time, so the cost of a format's convergence shows apart from the speed of its emulation.

**Reference convergence points** (:func:`rcp_test`): ``rcps.json`` holds, per workload and global batch size, the
samples to target of reference FP32 runs (with how they were made). A result passes when its olympic mean of
samples to target is not significantly *faster* than the reference's: MLPerf's RCP checker test, a one-sided
two-sample t-test at alpha 0.05 with the reference's standard deviation (over its full list, ``numpy.std``) for
both samples, ``len - 2`` degrees of freedom on each side (the olympic means). ``mlperf_logging``'s
``rcp_checker`` takes a custom RCP file but only for MLPerf's own benchmark names (its table of required run counts
is keyed by them), so the same test is written here from its definition with ``scipy.stats`` and checked against
``rcp_checker.check_directory`` in the tests.

**Logs**: each run writes an ``mllog`` file (:class:`fewbit.train.MLPerfLog`, rank 0 only) that
``python -m mlperf_logging.compliance_checker --usage training --ruleset 6.1.0 --config CONFIG LOG`` accepts,
with the workload's checker config shipped in ``fewbit/mlperf/configs/`` (:func:`checker_config_path`). The stock
rules crash on a benchmark name that is not MLPerf's, so each config is the stock ``common.yaml`` of ruleset
6.1.0 with two records changed (the division no longer loads a benchmark list; the benchmark must be
``fewbit_<workload>``) and the workload's keys added: the hyper-parameters and the quality target as an
at-least-one check on ``eval_accuracy`` (:func:`checker_config_text` writes it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.atomic import write_text
from fewbit.train import Callback, Evaluate, MLPerfLog, Precision, StopAtTarget, TrainState
from fewbit.workloads import get as get_workload
from fewbit.workloads.base import Workload, model_device, resolve_device, to_device
from fewbit.workloads.runs import fit

RULESET = "6.1.0"
ALPHA = 0.05


# -- the table of quality targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityTarget:
    """A workload's quality target and evaluation schedule for timed runs.

    ``metric`` must reach ``target`` (``>=`` when ``higher_is_better``, else ``<=``) on ``split``, evaluated every
    ``eval_every`` steps; ``overrides`` (``key=value``) adapt the named ``config`` for timed runs (its ``steps`` is
    the step budget, its ``eval_limit`` the examples an evaluation reads). ``runs`` is MLPerf's number of runs for
    this kind of task (5 vision, 10 the others); ``quick_runs`` the default on the quick configs."""

    workload: str
    metric: str
    target: float
    higher_is_better: bool
    eval_every: int
    overrides: tuple[str, ...] = ()
    config: str = "quick"
    split: str = "valid"
    runs: int = 10
    quick_runs: int = 3
    attention: bool = False  # whether the model has attention products (for the precision disclosure)

    def __post_init__(self) -> None:
        if self.eval_every < 1:
            raise ValueError(f"{self.workload}: eval_every={self.eval_every}; evaluate every N >= 1 steps")
        if not math.isfinite(self.target):
            raise ValueError(f"{self.workload}: target={self.target}; it must be finite")

    def reached(self, value: float) -> bool:
        return value >= self.target if self.higher_is_better else value <= self.target

    @property
    def comparison(self) -> str:
        return ">=" if self.higher_is_better else "<="

    def describe(self) -> str:
        return f"{self.metric} {self.comparison} {self.target:g}"

    def with_target(self, target: float) -> QualityTarget:
        from dataclasses import replace

        return replace(self, target=float(target))


TARGETS: dict[str, QualityTarget] = {t.workload: t for t in [
    QualityTarget("lm", "perplexity", 35.0, False, eval_every=5, attention=True,
                  overrides=("steps=60", "layers=2", "d_model=64", "heads=2", "d_ff=256", "block_size=64",
                             "batch_size=16", "warmup=10", "eval_limit=2048", "eval_batch_size=32")),
    QualityTarget("vision", "accuracy", 70.0, True, eval_every=10, runs=5,
                  overrides=("steps=400", "warmup=20", "eval_limit=1000")),
    QualityTarget("translate", "bleu", 60.0, True, eval_every=50, attention=True,
                  overrides=("steps=600", "d_model=64", "heads=2", "d_ff=256", "encoder_layers=1", "decoder_layers=1",
                             "batch_size=32", "warmup=50", "eval_limit=200")),
]}


def target_for(workload: str) -> QualityTarget:
    if workload not in TARGETS:
        raise ValueError(f"no quality target for workload {workload!r}; time-to-quality runs exist for "
                         f"{', '.join(TARGETS)}, and for any workload given a target (--target VALUE)")
    return TARGETS[workload]


def own_target(workload: str, target: float, config: str | None = None, overrides: Sequence[str] = (),
               eval_every: int | None = None) -> QualityTarget:
    """A quality target for a workload without an entry in :data:`TARGETS` (``hf``: a model folder, scored by its
    kind's metric): ``target`` on that metric of the valid split, evaluated every ``eval_every`` steps (default: 10
    evaluations over the config's step budget). Reading the metric's name builds the workload (the folder's
    ``config.json``), not its data."""
    cls = get_workload(workload)
    task = cls(cls.load_config(config or "quick", overrides))
    every = eval_every or max(task.config.steps // 10, 1)
    return QualityTarget(workload, task.metric, float(target), task.higher_is_better, eval_every=every,
                         attention=getattr(task, "pretrained", False))


def default_runs(target: QualityTarget, config: str | None) -> int:
    """MLPerf's number of runs, or the smaller quick default on the quick config."""
    return target.quick_runs if (config or target.config) == "quick" else target.runs


# -- synthetic input for the untimed warm-up ----------------------------------------------------------------------
def synthetic_batch(workload: Workload) -> object:
    """A training batch of the workload's shape filled with random values, for the warm-up: no example of the
    data set is read (reading one would start the clock)."""
    c = workload.config
    g = torch.Generator().manual_seed(12345)
    if workload.name == "lm":
        ids = torch.randint(0, 256, (c.batch_size, c.block_size), generator=g)
        return ids, torch.roll(ids, -1, dims=1)
    if workload.name == "vision":
        shape = tuple(workload.data.image_shape)
        return (torch.randn((c.batch_size, *shape), generator=g),
                torch.randint(0, len(workload.data.classes), (c.batch_size,), generator=g))
    if hasattr(workload, "synthetic_batch"):  # a workload that knows its own batch's shape (hf)
        return workload.synthetic_batch(g)
    if workload.name == "translate":
        vocab = workload.tokenizer.vocab_size
        src = torch.randint(4, vocab, (c.batch_size, 16), generator=g)
        tgt = torch.randint(4, vocab, (c.batch_size, 16), generator=g)
        tgt[:, 0] = 1  # BOS
        return src, tgt
    raise ValueError(f"no synthetic input for workload {workload.name!r}")


def warm_up(model: nn.Module, recipe: _recipes.Recipe, workload: Workload, device: torch.device) -> None:
    """One forward and backward pass of a copy of ``model`` under ``recipe`` on synthetic input: compiles the
    kernels the run will use, touching neither the data nor ``model`` (nor the global RNG streams)."""
    precision = Precision.of(recipe)
    with torch.random.fork_rng(devices=[]):
        clone = copy.deepcopy(model)
        precision.prepare(clone)
        clone.train()
        batch = precision.cast_batch(to_device(synthetic_batch(workload), device))
        with precision.autocast(device):
            loss = workload.loss(clone, batch)
        loss.float().backward()
    del clone


# -- one timed run ------------------------------------------------------------------------------------------------
@dataclass
class TimedRun:
    """One run to the quality target. ``status`` is MLPerf's (``success`` or ``aborted``); ``seconds`` is
    run_start to run_stop; ``steps_to_target``/``samples_to_target`` are None unless it converged; ``reason`` says
    why it stopped."""

    workload: str
    recipe: str
    seed: int
    status: str
    reason: str
    seconds: float
    init_seconds: float
    steps: int
    samples: int
    global_batch_size: int
    steps_to_target: int | None
    samples_to_target: int | None
    final_metric: float | None
    evals: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    final_scale: float | None = None
    log_path: str | None = None
    compliance: dict | None = None

    @property
    def converged(self) -> bool:
        return self.status == "success"

    def to_dict(self) -> dict:
        return asdict(self)


class StopOnDivergence(Callback):
    """Stop at the first step whose loss is not finite (a diverging run); ``diverged`` says where."""

    def __init__(self) -> None:
        self.diverged: str | None = None
        self.step = 0

    def on_step_end(self, state: TrainState, record: dict) -> None:
        if self.diverged is None and not math.isfinite(record["loss"]):
            self.step = state.step
            self.diverged = f"the loss is {record['loss']} at step {state.step}: the run diverged"
            state.request_stop(self.diverged)


def evaluate_trained(workload: Workload, model: nn.Module, precision: Precision, split: str) -> dict[str, float]:
    """The training model (its layers already converted) evaluated as its recipe computes: under the recipe's
    autocast, parameters stored narrower than float32 evaluated at their stored values in float32."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model = copy.deepcopy(model).float()
    with precision.autocast(model_device(model)):
        return workload.evaluate(model, split)


def train_samples(workload: Workload) -> int:
    """The training split's size in the examples a batch holds (windows of ``block_size`` bytes for lm)."""
    info = workload.info()
    for key in ("train_images", "train_pairs", "train_utterances"):
        if key in info:
            return int(info[key])
    if "train_bytes" in info:
        return int(info["train_bytes"]) // workload.config.block_size
    if "train_tokens" in info:  # hf causal LM: windows of its block size
        return int(info["train_tokens"]) // workload.block_size
    if "train_sentences" in info:
        return int(info["train_sentences"])
    raise ValueError(f"cannot tell the training set size of {workload.name!r} from {sorted(info)}")


def mlperf_precision(recipe: _recipes.Recipe) -> str:
    """The narrowest number format a recipe's GEMM operands use, in MLPerf's vocabulary (``fp32``, ``bfloat16``,
    ``fp16``, ``fp8``, ``mxfp6``, ``mxfp4``, ``int8``, ``int4``); MXFP8 elements are FP8."""
    names = {"bfloat16": "bfloat16", "float16": "fp16", "float32": "fp32", "bf16": "bfloat16", "fp16": "fp16",
             "tf32": "tf32"}
    found = [("fp32", 32)]
    for value in (recipe.compute_format, recipe.autocast, recipe.param_dtype):
        if value and value in names and value != "float32":
            found.append((names[value], 19 if value == "tf32" else 16))
    for spec in recipe.specs().values():
        if spec is None:
            continue
        fmt = spec.format
        if fmt.name.startswith("fp8"):
            found.append(("fp8", 8))
        elif fmt.name.startswith("fp6"):
            found.append(("mxfp6", 6))
        elif fmt.name.startswith("fp4"):
            found.append(("mxfp4", 4))
        elif fmt.name.startswith("int") or fmt.name.startswith("mxint"):
            found.append((f"int{fmt.bits}", fmt.bits))
    return min(found, key=lambda item: item[1])[0]


def run_to_target(workload: str, recipe: str | _recipes.Recipe = "fp32", *, seed: int = 0,
                  config: str | None = None, overrides: Sequence[str] = (), target: QualityTarget | None = None,
                  log_path: str | os.PathLike | None = None,
                  build_model: Callable[[Workload], nn.Module] | None = None,
                  check: bool = False, progress: bool = False) -> TimedRun:
    """One timed run of ``workload`` under ``recipe`` (see the module docstring). ``target`` replaces the table's
    (:data:`TARGETS`); ``overrides`` come after its overrides, then ``seed``. ``log_path``: the mllog file (rank 0
    writes it). ``build_model(workload)`` replaces the workload's model builder (it runs inside the untimed
    initialization). ``check`` runs the compliance checker on the log (:func:`check_compliance`)."""
    goal = target or target_for(workload)
    recipe = _recipes.get(recipe)
    cls = get_workload(workload)
    conf = cls.load_config(config or goal.config, [*goal.overrides, *overrides, f"seed={seed}"])
    task = cls(conf)
    if conf.threads:
        torch.set_num_threads(conf.threads)
    device = resolve_device(conf.device)
    task.setup()
    precision = Precision.of(recipe)
    stop = StopAtTarget(goal.metric, goal.target, goal.higher_is_better)
    guard = StopOnDivergence()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    narrowest = mlperf_precision(recipe)
    log = MLPerfLog(log_path, metric=goal.metric, target=stop, global_batch_size=conf.batch_size,
                    train_samples=train_samples(task), eval_samples=len(task.samples(goal.split, conf.eval_limit)),
                    metadata={"submission_benchmark": f"fewbit_{workload}", "fewbit_recipe": recipe.name,
                              "fewbit_quality_target": goal.describe(),
                              "lowest_numerical_precision_in_linear": narrowest,
                              "lowest_numerical_precision_in_attn": narrowest if goal.attention else "fp32",
                              "lowest_numerical_precision_in_comm": "fp32",
                              "tensor_parallelism": 1, "pipeline_parallelism": 1, "context_parallelism": 1,
                              "expert_parallelism": 1, "micro_batch_size": max(conf.batch_size // world, 1),
                              "config_filename": f"{workload}-{config or goal.config}.yaml",
                              "opt_name": conf.optimizer, "opt_base_learning_rate": conf.lr,
                              "opt_learning_rate_warmup_steps": conf.warmup, "max_steps": conf.steps,
                              "eval_every_steps": goal.eval_every})
    log.start_init()
    model = (build_model(task) if build_model is not None else task.build_model()).to(device)
    warm_up(model, recipe, task, device)
    evaluate = Evaluate(log.timed(lambda m: evaluate_trained(task, m, precision, goal.split)), goal.eval_every)
    error: BaseException | None = None
    result = None
    try:
        result = fit(task, model, precision, device, callbacks=[evaluate, stop, guard, log], progress=progress)
    except Exception as raised:  # the run is aborted; the caller's other runs go on
        error = raised
    evals = [dict(e) for e in (result.evals if result is not None else [])]
    # A run that diverges at its first step ends in the loop's AllStepsSkipped (no step was taken): the
    # divergence is the reason.
    steps = result.step if result is not None else guard.step
    if stop.reached is not None:
        reason = f"reached {goal.describe()} at step {stop.reached['step']} ({goal.metric} " \
                 f"{stop.reached['value']:.4g})"
    elif guard.diverged is not None:
        reason = guard.diverged
    elif error is not None:
        reason = f"failed: {type(error).__name__}: {error}"
    else:
        values = [e[goal.metric] for e in evals if math.isfinite(e.get(goal.metric, math.nan))]
        best = (max(values) if goal.higher_is_better else min(values)) if values else None
        reason = f"did not reach {goal.describe()} within the budget of {conf.steps} steps" + \
            (f" (best {goal.metric} {best:.4g})" if best is not None else "")
    reached = stop.reached["step"] if stop.reached is not None else None
    run = TimedRun(
        workload=workload, recipe=recipe.name, seed=seed, status=log.status or "aborted", reason=reason,
        seconds=log.run_seconds or 0.0, init_seconds=log.init_seconds or 0.0, steps=steps,
        samples=steps * conf.batch_size, global_batch_size=conf.batch_size, steps_to_target=reached,
        samples_to_target=reached * conf.batch_size if reached is not None else None,
        final_metric=evals[-1].get(goal.metric) if evals else None, evals=evals,
        losses=list(result.losses) if result is not None else [],
        skipped_steps=result.skipped_steps if result is not None else 0,
        final_scale=result.final_scale if result is not None else None,
        log_path=str(log_path) if log_path is not None and log.rank == 0 else None)
    if check and run.log_path is not None:
        checker = None
        if TARGETS.get(workload) != goal:  # another target than the shipped config's: its own config, beside the log
            checker = Path(run.log_path).with_suffix(".checker.yaml")
            write_text(checker, checker_config_text(workload, goal))
        run.compliance = check_compliance(run.log_path, workload, checker)
    return run


def run_from_log(path: str | os.PathLike, workload: str, recipe: str, seed: int) -> TimedRun:
    """A timed run read back from its MLPerf log (as MLPerf's result summarizer reads results): the status and
    samples of ``run_stop``, run_start to run_stop and init_start to init_stop from the time stamps (ms), the
    evaluations from ``eval_accuracy``."""
    events = [json.loads(line.split(":::MLLOG ", 1)[1]) for line in Path(path).read_text().splitlines()
              if ":::MLLOG " in line]
    stamp = {e["key"]: e for e in events}
    if "run_stop" not in stamp or "run_start" not in stamp:
        raise ValueError(f"{path}: no run_start/run_stop: the run did not finish")
    stop, batch = stamp["run_stop"], int(stamp["global_batch_size"]["value"])
    evals = [{"step": e["metadata"]["step_num"], e["metadata"]["metric"]: e["value"]} for e in events
             if e["key"] == "eval_accuracy"]
    success = stop["metadata"]["status"] == "success"
    steps = int(stop["metadata"]["step"])
    return TimedRun(workload=workload, recipe=recipe, seed=seed, status=stop["metadata"]["status"],
                    reason="read from its log", seconds=(stop["time_ms"] - stamp["run_start"]["time_ms"]) / 1000,
                    init_seconds=(stamp["init_stop"]["time_ms"] - stamp["init_start"]["time_ms"]) / 1000,
                    steps=steps, samples=steps * batch, global_batch_size=batch,
                    steps_to_target=steps if success else None, samples_to_target=steps * batch if success else None,
                    final_metric=stamp["eval_accuracy"]["value"] if "eval_accuracy" in stamp else None, evals=evals,
                    log_path=str(path))


# -- the olympic score --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Olympic:
    """An olympic mean: ``value`` (None when invalid), the runs it averaged, and why it is invalid."""

    value: float | None
    kept: tuple[int, ...]
    reason: str

    @property
    def valid(self) -> bool:
        return self.value is not None


def olympic_mean(values: Sequence[float | None]) -> Olympic:
    """MLPerf's olympic mean of one number per run (None: the run did not converge): drop the fastest and the
    slowest, average the rest. One non-converged run counts as the slowest, more than one makes it invalid.
    Fewer than 3 runs is an error."""
    n = len(values)
    if n < 3:
        raise ValueError(f"olympic scoring needs at least 3 runs (it drops the fastest and the slowest), got {n}; "
                         "use --runs 3 or more")
    missing = [i for i, v in enumerate(values) if v is None or not math.isfinite(v)]
    if len(missing) > 1:
        return Olympic(None, (), f"{len(missing)} of {n} runs did not converge; the MLPerf score allows at most "
                                 "one: the result is invalid")
    order = sorted(range(n), key=lambda i: math.inf if i in missing else values[i])
    kept = tuple(sorted(order[1:-1]))
    mean = sum(values[i] for i in kept) / len(kept)
    note = "one run did not converge and counts as the slowest" if missing else ""
    return Olympic(mean, kept, note)


@dataclass
class Score:
    """The score of N runs: olympic means of seconds and of samples (and steps) to target, how many converged,
    whether it is valid, and the RCP verdict."""

    runs: int
    converged: int
    valid: bool
    reason: str
    seconds: float | None
    samples: float | None
    steps: float | None
    rcp: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def olympic(runs: Sequence[TimedRun], rcp: RcpReference | None = None) -> Score:
    """The MLPerf score of ``runs`` (:func:`olympic_mean` of the time and of the samples to target) and, with a
    reference, the RCP test of their samples to target (:func:`rcp_test`)."""
    seconds = olympic_mean([r.seconds if r.converged else None for r in runs])
    samples = olympic_mean([r.samples_to_target for r in runs])
    steps = olympic_mean([r.steps_to_target for r in runs])
    converged = sum(r.converged for r in runs)
    verdict = None
    if rcp is not None:
        verdict = asdict(rcp_test([r.samples_to_target for r in runs], rcp.samples_to_target))
    elif runs:
        verdict = asdict(RcpVerdict("missing", f"no reference convergence points for {runs[0].workload} at global "
                                               f"batch size {runs[0].global_batch_size}"))
    return Score(runs=len(runs), converged=converged, valid=seconds.valid, reason=seconds.reason,
                 seconds=seconds.value, samples=samples.value, steps=steps.value, rcp=verdict)


# -- reference convergence points ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RcpVerdict:
    """The RCP test's outcome: ``status`` pass, fail, missing (no reference) or invalid (no valid score); the
    olympic means compared, the reference's standard deviation, the one-sided p-value and the smallest olympic mean
    that passes."""

    status: str
    message: str
    submission_mean: float | None = None
    reference_mean: float | None = None
    reference_stdev: float | None = None
    p_value: float | None = None
    min_passing_mean: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def rcp_p_value(submission_mean: float, reference_mean: float, stdev: float, n_submission: int,
                n_reference: int) -> float:
    """The one-sided p-value of MLPerf's RCP t-test: how likely a submission mean this small (or smaller) is if it
    converges as the reference does, both samples with standard deviation ``stdev`` (Student's t, pooled, equal
    variances, ``n_submission + n_reference - 2`` degrees of freedom)."""
    import scipy.stats

    _, p_value = scipy.stats.ttest_ind_from_stats(submission_mean, stdev, n_submission, reference_mean, stdev,
                                                  n_reference, equal_var=True, alternative="less")
    return float(p_value)


def rcp_test(submission: Sequence[float | None], reference: Sequence[float], alpha: float = ALPHA) -> RcpVerdict:
    """MLPerf's RCP test of a submission's convergence (one number per run, None for a run that did not converge)
    against a reference's: the submission's olympic mean must not be significantly smaller (faster) than the
    reference's, by a one-sided two-sample t-test at ``alpha`` that uses the reference's standard deviation (numpy's,
    over its full list) for both and ``len - 2`` samples on each side, as ``mlperf_logging.rcp_checker`` does."""
    import numpy as np
    import scipy.stats

    if len(reference) < 3:
        raise ValueError(f"a reference needs at least 3 runs, got {len(reference)}")
    subm = olympic_mean(submission)
    if not subm.valid:
        return RcpVerdict("invalid", f"no RCP test: {subm.reason}")
    ref = sorted(float(x) for x in reference)
    ref_mean = float(np.mean(ref[1:-1]))
    stdev = float(np.std(ref))
    n_subm, n_ref = len(submission) - 2, len(ref) - 2
    if stdev == 0:
        passed = subm.value >= ref_mean
        p_value, min_mean = None, ref_mean
    else:
        p_value = rcp_p_value(subm.value, ref_mean, stdev, n_subm, n_ref)
        passed = p_value > alpha
        df = n_subm + n_ref - 2
        min_mean = ref_mean + float(scipy.stats.t.ppf(alpha, df)) * stdev * math.sqrt(1 / n_subm + 1 / n_ref)
    faster = subm.value < ref_mean
    if passed:
        message = "converges as the reference does" if not faster else \
            "faster than the reference mean, but not significantly (MLPerf would normalize the score by " \
            f"{ref_mean / subm.value:.3f})"
    else:
        message = f"converges significantly faster than the reference (p = {p_value:.3g} < {alpha})" \
            if p_value is not None else "converges faster than the reference, whose runs all agree"
    return RcpVerdict("pass" if passed else "fail", message, subm.value, ref_mean, stdev, p_value, min_mean)


@dataclass(frozen=True)
class RcpReference:
    """The reference runs of one workload at one global batch size: samples to target per run and how they were
    made (command, seeds, date, machine)."""

    workload: str
    global_batch_size: int
    target: str
    samples_to_target: tuple[float, ...]
    made: dict


RCP_FILE = "rcps.json"


def load_rcps() -> dict:
    """The shipped reference convergence points (``fewbit/mlperf/rcps.json``)."""
    return json.loads((resources.files("fewbit.mlperf") / RCP_FILE).read_text())


def rcp_reference(workload: str, global_batch_size: int, goal: QualityTarget | None = None) -> RcpReference | None:
    """The reference of ``workload`` at ``global_batch_size`` for the table's target, or None when fewbit has
    none (a reference measured for another target or config does not count)."""
    goal = goal or target_for(workload)
    entry = load_rcps().get(workload, {}).get(str(global_batch_size))
    if entry is None or entry.get("target") != goal.describe() or list(entry.get("overrides", [])) != \
            list(goal.overrides) or entry.get("config") != goal.config:
        return None
    return RcpReference(workload, global_batch_size, entry["target"], tuple(entry["samples_to_target"]),
                        entry.get("made", {}))


def rcp_entry(runs: Sequence[TimedRun], goal: QualityTarget, made: dict) -> dict:
    """A reference entry for ``rcps.json`` from converged FP32 runs (every run must have converged)."""
    if any(not r.converged for r in runs):
        raise ValueError("a reference is made of converged runs only; "
                         f"{sum(not r.converged for r in runs)} of {len(runs)} did not converge")
    return {"config": goal.config, "overrides": list(goal.overrides), "target": goal.describe(),
            "eval_every": goal.eval_every, "samples_to_target": [r.samples_to_target for r in runs],
            "steps_to_target": [r.steps_to_target for r in runs], "seeds": [r.seed for r in runs],
            "seconds": [round(r.seconds, 2) for r in runs], "made": made}


# -- compliance checker configs -----------------------------------------------------------------------------------
def _stock_common() -> list[dict]:
    import yaml

    path = resources.files("mlperf_logging.compliance_checker") / f"training_{RULESET}" / "common.yaml"
    return yaml.load(path.read_text(), Loader=yaml.BaseLoader)


def checker_config_text(workload: str, target: QualityTarget | None = None) -> str:
    """The compliance checker config of ``workload``: ruleset 6.1.0's ``common.yaml`` with the division record no
    longer loading MLPerf's benchmark list and the benchmark required to be ``fewbit_<workload>``, plus the
    workload's keys: hyper-parameters and the quality target as an at-least-one check on ``eval_accuracy``
    (``target``: another than the table's)."""
    import yaml

    goal = target or target_for(workload)
    records = []
    for record in _stock_common():
        key = record.get("KEY", {})
        if key.get("NAME") == "submission_division":
            key = {**key, "POST": " s['compile_time_mins'] = 240 if v['value'] == 'open' else 30 "}
            record = {"KEY": key}
        elif key.get("NAME") == "submission_benchmark":
            record = {"KEY": {"NAME": "submission_benchmark", "REQ": "EXACTLY_ONE",
                              "CHECK": f" v['value'] == 'fewbit_{workload}' "}}
        elif key.get("NAME") == "eval_accuracy":
            continue  # replaced below, with the quality target
        records.append(record)
    records += [
        {"KEY": {"NAME": "seed", "REQ": "EXACTLY_ONE", "CHECK": " is_integer(v['value']) "}},
        {"KEY": {"NAME": "global_batch_size", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] >= 1 "}},
        {"KEY": {"NAME": "opt_name", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] in ['adamw', 'sgd'] "}},
        {"KEY": {"NAME": "opt_base_learning_rate", "REQ": "EXACTLY_ONE", "CHECK": " v['value'] > 0 "}},
        {"KEY": {"NAME": "eval_accuracy", "REQ": "AT_LEAST_ONE",
                 "CHECK": ["'samples_count' in v['metadata']", f"v['metadata']['metric'] == '{goal.metric}'"],
                 "ATLEAST_ONE_CHECK": f"v['value'] {goal.comparison} {goal.target!r}"}},
    ]
    import mlperf_logging

    version = getattr(mlperf_logging, "__version__", None) or _distribution_version("mlperf-logging")
    header = (f"# Compliance checker config of fewbit's {workload} time-to-quality runs (quality target "
              f"{goal.describe()}).\n# Check a log with:\n#   python -m mlperf_logging.compliance_checker --usage "
              f"training --ruleset {RULESET} --config <this file> LOG\n# Written by "
              f"fewbit.mlperf.training.checker_config_text({workload!r}) from mlperf-logging {version}'s "
              f"training_{RULESET}/common.yaml;\n# the tests require the shipped file to equal it.\n")
    return header + yaml.safe_dump(records, sort_keys=False, width=200)


def _distribution_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def checker_config_path(workload: str) -> Path:
    """The shipped compliance checker config of ``workload`` (``fewbit/mlperf/configs/training_<workload>.yaml``)."""
    target_for(workload)
    return Path(str(resources.files("fewbit.mlperf") / "configs" / f"training_{workload}.yaml"))


def check_compliance(log_path: str | os.PathLike, workload: str, config: str | os.PathLike | None = None) -> dict:
    """``python -m mlperf_logging.compliance_checker`` on one log with the workload's shipped config (or
    ``config``): ``{"passed", "output", "command"}`` (passed: exit status 0 and ``SUCCESS`` printed)."""
    log_path = Path(log_path)
    command = [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "training", "--ruleset",
               RULESET, "--config", str(config or checker_config_path(workload)), "--log_output",
               str(log_path.with_name(log_path.stem + ".compliance.log")), str(log_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    return {"passed": done.returncode == 0 and "SUCCESS" in output, "output": output[-4000:],
            "command": " ".join(command[1:])}


__all__ = ["ALPHA", "RULESET", "TARGETS", "Olympic", "QualityTarget", "RcpReference", "RcpVerdict", "Score",
           "StopOnDivergence", "TimedRun", "check_compliance", "checker_config_path", "checker_config_text",
           "default_runs", "evaluate_trained", "load_rcps", "mlperf_precision", "olympic", "olympic_mean",
           "rcp_entry", "rcp_p_value", "rcp_reference", "rcp_test", "run_from_log", "run_to_target",
           "target_for", "train_samples", "warm_up"]
