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
    """MLPerf ``:::MLLOG`` events in ``path`` (rank 0; needs the ``mlperf-logging`` package): run_start, each
    evaluation (``eval_accuracy`` for accuracy/bleu, ``eval_<name>`` otherwise; non-finite values left out), and
    run_stop with status success, or aborted when training failed."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.logger = None
        try:
            from mlperf_logging import mllog  # noqa: F401 - fail at construction, before training starts
        except ImportError as error:
            raise ValueError("mllog_path needs the mlperf-logging package: pip install mlperf-logging") from error

    def on_train_start(self, state: TrainState) -> None:
        if state.rank != 0:
            return
        from mlperf_logging import mllog
        from mlperf_logging.mllog import constants

        self.path.parent.mkdir(parents=True, exist_ok=True)
        mllog.config(filename=str(self.path))
        self.logger = mllog.get_mllogger()
        self.logger.event(key=constants.SUBMISSION_BENCHMARK, value="fewbit")
        self.logger.event(key="fewbit_precision", value=state.run_config.get("precision"))
        self.logger.start(key=constants.RUN_START)

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        if self.logger is None:
            return
        from mlperf_logging.mllog import constants

        for name, value in metrics.items():
            if math.isfinite(value):
                self.logger.event(key=constants.EVAL_ACCURACY if name in ("accuracy", "bleu") else f"eval_{name}",
                                  value=value, metadata={"step_num": state.step})

    def on_train_end(self, state: TrainState, error: BaseException | None) -> None:
        if self.logger is None:
            return
        from mlperf_logging.mllog import constants

        self.logger.end(key=constants.RUN_STOP, value=None,
                        metadata={"status": "success" if error is None else "aborted", "step": state.result.step})
        self.logger = None


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
