"""Callbacks: what the training loop does besides the step, each a small object with hooks.

The loop calls, on every callback in list order:

- ``on_train_start(state)`` once, after the model is prepared and a checkpoint (if any) restored;
- ``on_gradients(state, found_inf)`` each step, after the gradients are unscaled and before the optimizer step;
- ``on_step_end(state, record)`` after each optimizer step; ``record`` is the step's JSON-able dict (``step``,
  ``loss``, ``scale``, ``skipped``, ``lr``, ``samples_per_s``, and ``eval`` when an evaluation ran this step);
- ``on_eval(state, metrics)`` whenever a callback reports an evaluation (:meth:`TrainState.report_eval`);
- ``on_train_end(state, error)`` once, also when training fails (``error`` is then the exception).

A callback stops training with :meth:`TrainState.request_stop`; the loop finishes the current step's callbacks,
then stops (under torchrun, every rank stops when any rank asks) and puts the reason in
:attr:`TrainResult.stop_reason <fewbit.train.TrainResult>`.

Built-ins: :class:`Evaluate` (an eval function on a schedule), :class:`MetricsLog` (JSONL), :class:`ProgressBar`,
:class:`Checkpoints`, :class:`MLPerfLog` (``:::MLLOG`` events), :class:`GradientStats` (histograms of the
gradients), :class:`StopAtTarget` (stop at the first evaluation that reaches a quality target) and :class:`OnStep`
(a plain function after each step). Under torchrun the ones that write (metrics, progress, checkpoints, MLPerf
events, gradient statistics) do so on rank 0 only; evaluation runs on every rank. ``train()``'s keyword arguments
build the built-ins in this order: Evaluate, MetricsLog, MLPerfLog, GradientStats, OnStep, Checkpoints,
ProgressBar; ``callbacks=`` come after them, so they see the evaluation in ``record``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fewbit.atomic import write_text
from fewbit.train import checkpoint as ckpt
from fewbit.train.gradstats import GradientStatistics
from fewbit.train.precision import MasterWeights, Precision

if TYPE_CHECKING:
    from fewbit.train.loop import TrainResult


@dataclass
class TrainState:
    """The run as callbacks see it. ``model`` is the unwrapped model (``net`` the DDP wrapper, or the model);
    ``params`` what the optimizer updates (the master weights when there are any); ``step`` the optimizer steps
    done so far (during ``on_gradients``, the 0-based index of the step being taken)."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    scaler: object | None
    precision: Precision
    master: MasterWeights | None
    params: list[torch.nn.Parameter]
    device: torch.device
    rank: int
    world: int
    steps: int
    run_config: dict
    result: TrainResult
    callbacks: list[Callback]
    step: int = 0
    stop_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)

    def request_stop(self, reason: str) -> None:
        """Stop after this step (the first reason asked for is kept)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def report_eval(self, metrics: dict[str, float], record: dict | None = None) -> None:
        """Record an evaluation at this step (in the result and ``record``) and pass it to every ``on_eval``."""
        self.result.evals.append({"step": self.step, **metrics})
        if record is not None:
            record["eval"] = metrics
        for callback in self.callbacks:
            callback.on_eval(self, metrics)

    def elapsed(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self.started


class Callback:
    """Base class: every hook does nothing; override the ones you need (see the module docstring)."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def on_gradients(self, state: TrainState, found_inf: bool) -> None:
        pass

    def on_step_end(self, state: TrainState, record: dict) -> None:
        pass

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        pass


class Evaluate(Callback):
    """``eval_fn(model) -> {metric: value}`` every ``every`` steps, in eval mode without gradients (the model's
    training mode is restored after); values are converted to float."""

    def __init__(self, eval_fn: Callable[[torch.nn.Module], dict], every: int) -> None:
        if every < 1:
            raise ValueError(f"Evaluate: every={every}; evaluate every N >= 1 steps")
        self.eval_fn, self.every = eval_fn, every

    def on_step_end(self, state: TrainState, record: dict) -> None:
        if state.step % self.every == 0:
            state.report_eval(self.evaluate(state.model), record)

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = self.eval_fn(model)
        model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}


class MetricsLog(Callback):
    """Each step's record as one JSON line in ``path`` (rank 0), flushed after every step.

    The file holds exactly the steps of this run up to now: at the start, lines of steps after the one the run
    starts from are dropped (a resumed run ran them after its newest checkpoint and will run them again; a new run
    starts from step 0 and keeps none), as are lines that do not parse (a line cut short when the process was
    killed). Then records are appended."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.file = None

    def on_train_start(self, state: TrainState) -> None:
        if state.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None
                        and _step_of(line) <= state.step]
                write_text(self.path, "".join(f"{line}\n" for line in kept))
            self.file = open(self.path, "a")  # closed in on_train_end

    def on_step_end(self, state: TrainState, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _step_of(line: str) -> int | None:
    """The ``step`` of one metrics line, or None for a line that is not a complete record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


class ProgressBar(Callback):
    """A rich progress bar with the loss, the loss scale and the throughput (rank 0)."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_start(self, state: TrainState) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=state.rank != 0,
                            transient=False)
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.steps, completed=state.step, info="")

    def on_step_end(self, state: TrainState, record: dict) -> None:
        self.bar.update(self.task, advance=1, info=f"loss {record['loss']:.4f}  scale {record['scale']:g}  "
                                                   f"{record['samples_per_s']:.0f} samples/s")

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Checkpoints(Callback):
    """A checkpoint every ``every`` steps under ``directory`` (rank 0), the newest ``keep_last`` kept: model,
    master weights, optimizer, scaler, schedule, RNG states and the run's config (see
    :mod:`fewbit.train.checkpoint`). Resuming is ``train(checkpoint_dir=..., resume=True)``'s."""

    def __init__(self, directory: str | os.PathLike, every: int, keep_last: int = 3) -> None:
        if every < 1:
            raise ValueError(f"Checkpoints: every={every}; checkpoint every N >= 1 steps")
        self.directory, self.every, self.keep_last = Path(directory), every, keep_last

    def on_step_end(self, state: TrainState, record: dict) -> None:
        if state.step % self.every == 0 and state.rank == 0:
            ckpt.save_training(self.directory, state.step, state.model, state.optimizer, state.schedule,
                               state.scaler, state.master.state_tensors() if state.master is not None else {},
                               state.run_config, self.keep_last)


class MLPerfLog(Callback):
    """MLPerf Training ``:::MLLOG`` events in ``path``, written through ``mlperf_logging.mllog`` on rank 0 only
    (every rank keeps the timing). Needs the ``mlperf-logging`` package.

    The events follow the MLPerf Training rules: ``cache_clear``, the submission fields and ``init_start`` when
    :meth:`start_init` is called (by a time-to-quality runner, before it builds the model), ``init_stop`` then the
    hyper-parameters (``seed``, ``global_batch_size``, ``opt_name``, ``opt_base_learning_rate``, ...),
    ``train_samples``, ``eval_samples`` and ``run_start`` when training starts (the first touch of the data comes
    next), ``block_start``/``block_stop`` around the steps between evaluations (``samples_count`` in the metadata),
    ``eval_start``/``eval_stop`` around an evaluation wrapped by :meth:`timed` (``Evaluate(log.timed(eval_fn),
    every)``), ``eval_accuracy`` (the ``metric`` of each evaluation, with ``samples_count`` and ``epoch_num``; the
    other metrics as ``eval_<name>``; non-finite values left out) and ``run_stop`` with ``status``: ``success``
    when training ended without error and, given ``target`` (a :class:`StopAtTarget`), the target was reached;
    ``aborted`` otherwise.

    ``metric``: which evaluation metric is logged as ``eval_accuracy`` (None: ``accuracy`` or ``bleu``).
    ``metadata``: more ``key: value`` events logged before ``run_start`` (``submission_benchmark``, ...: they
    override the defaults). ``global_batch_size`` (default: the first batch's size times the world size) and
    ``train_samples`` (to turn samples into ``epoch_num``) come from the caller who knows the data. Without
    :meth:`start_init` the initialization interval is empty (``init_start`` and ``init_stop`` at ``run_start``).
    After the run, :attr:`run_seconds` is run_start to run_stop (wall clock) and :attr:`init_seconds`
    init_start to init_stop. Put it after :class:`Evaluate` and :class:`StopAtTarget` in the callback list (as
    ``train()``'s built-ins are), so that it knows whether the run goes on after an evaluation.
    """

    def __init__(self, path: str | os.PathLike | None, *, metric: str | None = None,
                 target: StopAtTarget | None = None, global_batch_size: int | None = None,
                 train_samples: int | None = None, eval_samples: int | None = None,
                 metadata: dict | None = None, rank: int | None = None) -> None:
        try:
            from mlperf_logging.mllog import constants, mllog  # noqa: F401 - fail at construction, before training
        except ImportError as error:
            raise ValueError("mllog_path needs the mlperf-logging package: pip install mlperf-logging") from error
        self.path = Path(path) if path is not None else None
        self.metric, self.target = metric, target
        self.global_batch_size, self.train_samples, self.eval_samples = global_batch_size, train_samples, eval_samples
        self.metadata = dict(metadata or {})
        self.rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.logger = None
        self._handler = None
        self._init_started: float | None = None
        self._init_stopped: float | None = None
        self._run_started: float | None = None
        self._run_stopped: float | None = None
        self._block_open = False
        self._state: TrainState | None = None
        self.status: str | None = None

    # -- timing ------------------------------------------------------------------------------------------------
    @property
    def init_seconds(self) -> float | None:
        if self._init_started is None or self._init_stopped is None:
            return None
        return self._init_stopped - self._init_started

    @property
    def run_seconds(self) -> float | None:
        if self._run_started is None or self._run_stopped is None:
            return None
        return self._run_stopped - self._run_started

    # -- the log -----------------------------------------------------------------------------------------------
    def _open(self) -> None:
        if self.logger is not None or self.path is None or self.rank != 0:
            return
        import logging

        from mlperf_logging.mllog import mllog

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A logger of our own (not mllog's shared one): its file handler is this run's alone and nothing goes to
        # stdout, so several runs in one process each write their own file.
        logger = logging.getLogger(f"fewbit.mllog.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        self._handler = logging.FileHandler(self.path, mode="w")
        logger.addHandler(self._handler)
        self.logger = mllog.MLLogger(logger=logger, default_stack_offset=2)

    def _close(self) -> None:
        if self.logger is not None:
            self.logger.logger.removeHandler(self._handler)
            self._handler.close()
            self.logger = self._handler = None

    def _event(self, kind: str, key: str, value=None, metadata: dict | None = None,
               time_ms: float | None = None) -> None:
        if self.logger is not None:
            getattr(self.logger, kind)(key=key, value=value, metadata=metadata,
                                       time_ms=int(time_ms) if time_ms is not None else None)

    @staticmethod
    def _now() -> tuple[float, float]:
        """(perf_counter seconds, wall-clock ms) read together: the timing and the log's time stamps agree."""
        return time.perf_counter(), time.time() * 1000

    def _samples(self, state: TrainState) -> int:
        return state.step * (self.global_batch_size or 0)

    def _position(self, state: TrainState) -> dict:
        samples = self._samples(state)
        position = {"samples_count": samples, "step_num": state.step}
        if self.train_samples:
            position["epoch_num"] = samples / self.train_samples
        return position

    def start_init(self) -> None:
        """Open the log and write ``cache_clear``, the submission fields and ``init_start``: call it before the
        model is built (everything until :meth:`on_train_start` is initialization, untimed)."""
        from mlperf_logging.mllog import constants

        if self._init_started is not None:
            return
        self._open()
        self._event("event", constants.CACHE_CLEAR, True)
        for key, value in {constants.SUBMISSION_ORG: "fewbit", constants.SUBMISSION_PLATFORM: _platform(),
                           constants.SUBMISSION_DIVISION: "open", constants.SUBMISSION_STATUS: "research",
                           constants.SUBMISSION_BENCHMARK: "fewbit", **self.metadata}.items():
            if key.startswith("submission_"):
                self._event("event", key, value)
        self._init_started, ms = self._now()
        self._event("start", constants.INIT_START, time_ms=ms)

    def on_train_start(self, state: TrainState) -> None:
        from mlperf_logging.mllog import constants

        self._state = state
        self.start_init()
        if self.global_batch_size is None:
            self.global_batch_size = int(state.run_config.get("batch_size", 0)) or None
        defaults = {constants.SEED: state.run_config.get("seed"),
                    constants.GLOBAL_BATCH_SIZE: self.global_batch_size,
                    constants.GRADIENT_ACCUMULATION_STEPS: state.run_config.get("grad_accum", 1),
                    constants.OPT_NAME: type(state.optimizer).__name__.lower(),
                    constants.OPT_BASE_LR: state.optimizer.param_groups[0].get("initial_lr",
                                                                               state.optimizer.param_groups[0]["lr"]),
                    constants.TRAIN_SAMPLES: self.train_samples, constants.EVAL_SAMPLES: self.eval_samples,
                    "fewbit_precision": state.run_config.get("precision"), "world_size": state.world}
        for key, value in {**defaults, **self.metadata}.items():
            if value is not None and not key.startswith("submission_"):
                self._event("event", key, value)
        self._init_stopped, ms = self._now()
        self._event("end", constants.INIT_STOP, time_ms=ms)
        self._run_started, ms = self._now()
        self._event("start", constants.RUN_START, time_ms=ms)
        self._open_block(state)

    def _open_block(self, state: TrainState) -> None:
        from mlperf_logging.mllog import constants

        if not self._block_open and state.step < state.steps and state.stop_reason is None:
            self._event("start", constants.BLOCK_START, metadata={"first_epoch_num": self._position(state).get(
                "epoch_num", 0.0), "epoch_count": 1, **self._position(state)})
            self._block_open = True

    def _close_block(self, state: TrainState) -> None:
        from mlperf_logging.mllog import constants

        if self._block_open:
            self._event("end", constants.BLOCK_STOP, metadata={"first_epoch_num": self._position(state).get(
                "epoch_num", 0.0), **self._position(state)})
            self._block_open = False

    def timed(self, eval_fn: Callable[[torch.nn.Module], dict]) -> Callable[[torch.nn.Module], dict]:
        """``eval_fn`` bracketed by ``block_stop``, ``eval_start`` and ``eval_stop`` (the evaluation is on the
        clock); give the result to :class:`Evaluate`."""
        from mlperf_logging.mllog import constants

        def evaluate(model: torch.nn.Module) -> dict:
            state = self._state
            if state is None:
                return eval_fn(model)
            self._close_block(state)
            self._event("start", constants.EVAL_START, metadata=self._position(state))
            metrics = eval_fn(model)
            self._event("end", constants.EVAL_STOP, metadata=self._position(state))
            return metrics

        return evaluate

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        from mlperf_logging.mllog import constants

        self._close_block(state)
        main = self.metric if self.metric is not None else next((m for m in ("accuracy", "bleu") if m in metrics),
                                                                None)
        for name, value in metrics.items():
            if math.isfinite(value):
                key = constants.EVAL_ACCURACY if name == main else f"eval_{name}"
                self._event("event", key, value, metadata={**self._position(state), "metric": name})

    def on_step_end(self, state: TrainState, record: dict) -> None:
        self._open_block(state)  # after an evaluation, the next block begins (unless the run is stopping)

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        from mlperf_logging.mllog import constants

        self._run_stopped, ms = self._now()
        self._close_block(state)
        reached = self.target is None or self.target.reached is not None
        self.status = constants.SUCCESS if error is None and reached else constants.ABORTED
        if self._run_started is None:  # the loop failed before on_train_start
            self._run_started = self._run_stopped
        self._event("end", constants.RUN_STOP, metadata={"status": self.status, "step": state.result.step,
                                                         **self._position(state)}, time_ms=ms)
        self._close()


def _platform() -> str:
    """The machine, for ``submission_platform``: the CPU's architecture and cores, or the GPU."""
    import platform

    if torch.cuda.is_available():
        return f"1x{torch.cuda.get_device_name(0)}"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


class GradientStats(Callback):
    """Per-layer histograms of log2|g| every ``every`` steps (0-based step index, unscaled gradients, steps with a
    non-finite gradient left out), saved to ``directory`` at the end (rank 0); see :mod:`fewbit.train.gradstats`."""

    def __init__(self, every: int, directory: str | os.PathLike) -> None:
        if every < 1:
            raise ValueError(f"GradientStats: every={every}; record every N >= 1 steps")
        self.every, self.directory = every, Path(directory)
        self.stats: GradientStatistics | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.stats = GradientStatistics(state.model)

    def on_gradients(self, state: TrainState, found_inf: bool) -> None:
        if state.step % self.every == 0 and not found_inf:
            self.stats.record(state.step, state.master.params if state.master is not None else None)

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        if error is None and state.rank == 0 and self.stats is not None:
            self.stats.save(self.directory)


class OnStep(Callback):
    """``fn(step, model)`` after each optimizer step (``step`` counts from 1)."""

    def __init__(self, fn: Callable[[int, torch.nn.Module], None]) -> None:
        self.fn = fn

    def on_step_end(self, state: TrainState, record: dict) -> None:
        self.fn(state.step, state.model)


class StopAtTarget(Callback):
    """Stop at the first evaluation whose ``metric`` reaches ``target`` (``>= target`` when higher is better,
    ``<= target`` otherwise; NaN never does). Needs an :class:`Evaluate` (``train(eval_fn=..., eval_every=...)``).
    After the run, ``reached`` is ``{"step", "metric", "value", "target", "seconds"}`` or None."""

    def __init__(self, metric: str, target: float, higher_is_better: bool = True) -> None:
        if not math.isfinite(target):
            raise ValueError(f"StopAtTarget: target {target}; it must be finite")
        self.metric, self.target, self.higher_is_better = metric, float(target), higher_is_better
        self.reached: dict | None = None

    def on_train_start(self, state: TrainState) -> None:
        if not any(isinstance(c, Evaluate) for c in state.callbacks):
            raise ValueError(f"StopAtTarget({self.metric!r}) needs evaluations: give train() eval_fn= and "
                             "eval_every=, or add an Evaluate callback")

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.reached is not None:
            return
        if self.metric not in metrics:
            raise ValueError(f"StopAtTarget: the evaluation has no metric {self.metric!r}; it has "
                             f"{', '.join(metrics) or 'none'}")
        value = metrics[self.metric]
        if value >= self.target if self.higher_is_better else value <= self.target:
            self.reached = {"step": state.step, "metric": self.metric, "value": value, "target": self.target,
                            "seconds": state.elapsed()}
            state.request_stop(f"{self.metric} {value:.6g} reached the target {self.target:g} "
                               f"({'>=' if self.higher_is_better else '<='}) at step {state.step}")
