"""One training loop for every precision.

Precision policies (``precision=``):

- ``fp32``: plain float32.
- ``bf16``: autocast to bfloat16, float32 parameters, no loss scaling.
- ``fp16_mixed``: autocast to float16, float32 parameters, dynamic loss scaling by default.
- ``fp16_pure``: the mixed precision paper's method: parameters stored in float16 (half the weight memory); an
  float32 master copy receives the update and is rounded back into the float16 parameters after every step;
  dynamic loss scaling by default.
- any fewbit recipe name or :class:`~fewbit.Recipe` (``fp8``, ``mxfp8``, ``mxfp6``, ...): the model's layers are
  converted with :func:`fewbit.quantize_` and train in the emulated formats; the recipe's ``loss_scaling`` hint
  picks the default scaler.

The step: forward and backward on ``grad_accum`` micro-batches (the loss multiplied by the loss scale), gradients
unscaled, a non-finite gradient on *any* rank skips the step everywhere (and backs the scale off), gradients
clipped (after unscaling), optimizer step, schedule step. Weight decay is the optimizer's and never sees the scale.

Data is a function ``data(step, micro) -> batch`` of the position, so a resumed run sees exactly the batches it
would have seen; under ``torchrun`` each rank takes its slice of the global batch (:func:`shard`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fewbit import recipes as _recipes
from fewbit.train import checkpoint as ckpt
from fewbit.train.gradstats import GradientStatistics
from fewbit.train.scaler import StaticScaler, make_scaler, unscale_and_check

POLICIES = ("fp32", "bf16", "fp16_mixed", "fp16_pure")


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    final_scale: float | None = None
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def distributed() -> tuple[int, int]:
    """(rank, world size), initializing torch.distributed from torchrun's environment when needed."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(batch, rank: int, world: int):
    """This rank's slice (along dim 0) of a global batch: a tensor, or a tuple/list/dict of tensors."""
    if world == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] % world:
            raise ValueError(f"global batch of {batch.shape[0]} does not split evenly over {world} ranks")
        return batch.chunk(world)[rank]
    if isinstance(batch, dict):
        return {k: shard(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(shard(v, rank, world) for v in batch)
    return batch


def _to_half(batch):
    if isinstance(batch, torch.Tensor):
        return batch.half() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_half(v) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_to_half(v) for v in batch)
    return batch


def train(
    model: torch.nn.Module,
    optimizer_fn: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    data: Callable[[int, int], object],
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    steps: int,
    precision: str | _recipes.Recipe = "fp32",
    loss_scaling: str | float | None = "auto",
    lr_schedule: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler] | None = None,
    grad_clip: float | None = None,
    grad_accum: int = 1,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    eval_every: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 3,
    resume: bool = True,
    log_path: str | os.PathLike | None = None,
    mllog_path: str | os.PathLike | None = None,
    grad_stats_every: int = 0,
    grad_stats_dir: str | os.PathLike | None = None,
    progress: bool = True,
    config: dict | None = None,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    parallel: str = "ddp",
) -> TrainResult:
    """Train ``model`` for ``steps`` optimizer steps; see the module docstring. Returns a :class:`TrainResult`.

    ``optimizer_fn(params)`` builds the optimizer (for ``fp16_pure`` it receives the float32 master parameters).
    ``loss_scaling``: "auto" (dynamic for fp16 policies and recipes that ask for it, else none), "none", a
    number (static), "dynamic"/"backoff" or "logmax". ``checkpoint_dir`` with ``resume=True`` continues from the
    newest usable checkpoint there. ``config``: what this run is (recipe, hyper-parameters...), stored in
    checkpoints and compared on resume. ``on_step(step, model)``: a hook after each optimizer step.
    ``parallel``: under torchrun, "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard`` per layer with
    parameters, then the whole model: parameters, gradients and optimizer state sharded across ranks).
    """
    if steps < 0 or grad_accum < 1:
        raise ValueError(f"steps={steps}, grad_accum={grad_accum}; need steps >= 0 and grad_accum >= 1")
    rank, world = distributed()
    policy, recipe = _policy(precision)
    device = next(model.parameters()).device
    if recipe is not None and not recipe.is_identity:
        from fewbit.nn import quantize_

        quantize_(model, recipe)

    master: list[torch.nn.Parameter] | None = None
    if policy == "fp16_pure":
        model.half()
        master = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    net = model
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"unknown parallel {parallel!r}; valid: ddp, fsdp")
    if world > 1 and parallel == "fsdp":
        if master is not None or checkpoint_dir is not None:
            raise ValueError("parallel='fsdp' does not yet support fp16_pure master weights or checkpoints; use "
                             "parallel='ddp' for those")
        _fully_shard(model)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)

    params = master if master is not None else list(model.parameters())
    optimizer = optimizer_fn(params)
    schedule = lr_schedule(optimizer) if lr_schedule else None
    scaler = _scaler(loss_scaling, policy, recipe)

    run_config = {"precision": recipe.name if recipe is not None else policy, "grad_accum": grad_accum,
                  "grad_clip": grad_clip, "world_size": world, **(config or {})}
    if recipe is not None:
        run_config["recipe"] = recipe.to_dict()
    start_step = 0
    if checkpoint_dir is not None and resume:
        found = ckpt.load_latest_valid(checkpoint_dir)
        if found is not None:
            _, tensors, state = found
            ckpt.check_compatible(state, model, run_config)
            start_step = _restore(state, tensors, model, master, optimizer, schedule, scaler)

    autocast = _autocast(policy, device)
    stats = GradientStatistics(model) if grad_stats_every else None
    for path in (log_path, mllog_path):
        if path and rank == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a") if log_path and rank == 0 else None
    mllogger = _mllogger(mllog_path, run_config) if mllog_path and rank == 0 else None
    result = TrainResult(step=start_step)
    started = time.perf_counter()
    bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                   disable=not progress or rank != 0, transient=False)
    try:
        with bar:
            task = bar.add_task("train", total=steps, completed=start_step, info="")
            for step in range(start_step, steps):
                t0 = time.perf_counter()
                scale = scaler.scale if scaler is not None else 1.0
                loss_sum = 0.0
                samples = 0
                for micro in range(grad_accum):
                    batch = shard(data(step, micro), rank, world)
                    if policy == "fp16_pure":
                        batch = _to_half(batch)
                    last = world == 1 or micro == grad_accum - 1
                    sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
                    with sync, autocast:
                        loss = loss_fn(net, batch)
                    if not loss.dim() == 0:
                        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
                    with sync:
                        (loss.float() * (scale / grad_accum)).backward()
                    loss_sum += float(loss.detach()) / grad_accum
                    samples += _batch_size(batch)
                if master is not None:  # float16 gradients -> the float32 master copy
                    for p, m in zip(model.parameters(), master, strict=True):
                        m.grad = p.grad.detach().float() if p.grad is not None else None
                        p.grad = None
                found_inf, grad_max = unscale_and_check(params, scale)
                found_inf = _any_rank(found_inf, device, world)
                if stats is not None and step % grad_stats_every == 0 and not found_inf:
                    stats.record(step, master)
                skip = scaler.update(found_inf, grad_max) if scaler is not None else found_inf
                if not skip:
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    optimizer.step()
                    if master is not None:
                        with torch.no_grad():
                            for p, m in zip(model.parameters(), master, strict=True):
                                p.copy_(m)  # rounded to float16
                else:
                    result.skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if schedule is not None:
                    schedule.step()
                result.step = step + 1
                result.losses.append(loss_sum)
                lr = optimizer.param_groups[0]["lr"]
                record = {"step": step + 1, "loss": loss_sum, "scale": scale, "skipped": bool(skip), "lr": lr,
                          "samples_per_s": samples * world / max(time.perf_counter() - t0, 1e-9)}
                if eval_fn is not None and eval_every and (step + 1) % eval_every == 0:
                    metrics = _evaluate(eval_fn, model)
                    record["eval"] = metrics
                    result.evals.append({"step": step + 1, **metrics})
                    if mllogger is not None:
                        _mllog_eval(mllogger, step + 1, metrics)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                if on_step is not None:
                    on_step(step + 1, model)
                if checkpoint_dir is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 \
                        and rank == 0:
                    _save(checkpoint_dir, step + 1, model, master, optimizer, schedule, scaler, run_config,
                          keep_last)
                bar.update(task, advance=1, info=f"loss {loss_sum:.4f}  scale {scale:g}  "
                                                 f"{record['samples_per_s']:.0f} samples/s")
    finally:
        if log is not None:
            log.close()
    result.seconds = time.perf_counter() - started
    result.final_scale = scaler.scale if scaler is not None else None
    if stats is not None and rank == 0:
        stats.save(grad_stats_dir or (Path(checkpoint_dir or ".") / "grad_stats"))
    if mllogger is not None:
        from mlperf_logging.mllog import constants

        mllogger.end(key=constants.RUN_STOP, value=None, metadata={"status": "success", "step": result.step})
    if world > 1:
        dist.barrier()
    return result


def _fully_shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)


def _policy(precision) -> tuple[str, _recipes.Recipe | None]:
    if isinstance(precision, _recipes.Recipe):
        return "recipe", precision
    if precision in POLICIES:
        return precision, None
    try:
        return "recipe", _recipes.get(precision)
    except ValueError:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(POLICIES)}, or a recipe: "
                         f"{', '.join(_recipes.names())}") from None


def _scaler(loss_scaling, policy: str, recipe) -> StaticScaler | None:
    if loss_scaling == "auto":
        if policy in ("fp16_mixed", "fp16_pure"):
            loss_scaling = "dynamic"
        elif recipe is not None:
            loss_scaling = recipe.loss_scaling
        else:
            loss_scaling = None
    return make_scaler(loss_scaling)


def _autocast(policy: str, device: torch.device):
    if policy == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if policy == "fp16_mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _any_rank(found_inf: bool, device: torch.device, world: int) -> bool:
    if world == 1:
        return found_inf
    flag = torch.tensor([1.0 if found_inf else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, tuple | list) and batch:
        return _batch_size(batch[0])
    return 1


def _evaluate(eval_fn, model) -> dict:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(model)
    model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def _save(directory, step, model, master, optimizer, schedule, scaler, run_config, keep_last) -> None:
    extra = {f"master.{i}": m for i, m in enumerate(master)} if master is not None else {}
    state = {"config": run_config, "scaler": scaler.state_dict() if scaler is not None else None,
             "scaler_kind": type(scaler).__name__ if scaler is not None else None,
             "schedule": _plain_schedule(schedule)}
    ckpt.save(directory, step, model, optimizer, extra, state, keep_last)


def _plain_schedule(schedule) -> dict | None:
    if schedule is None:
        return None
    state = schedule.state_dict()
    try:
        json.dumps(state)
    except TypeError as error:
        raise ValueError(f"the LR schedule's state is not JSON-serializable ({error}); use a schedule built from "
                         "numbers (LambdaLR lambdas are not stored, only their counters)") from None
    return state


def _restore(state, tensors, model, master, optimizer, schedule, scaler) -> int:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if master is not None:
        with torch.no_grad():
            for i, m in enumerate(master):
                m.copy_(tensors[f"master.{i}"])
    optimizer.load_state_dict(ckpt._unflatten_optimizer(tensors, state["optimizer"]))
    if schedule is not None and state.get("schedule") is not None:
        schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng(state, tensors)
    return int(state["step"])


def _mllogger(path, run_config):
    try:
        from mlperf_logging import mllog
        from mlperf_logging.mllog import constants
    except ImportError as error:
        raise ValueError("mllog_path needs the mlperf-logging package: pip install mlperf-logging") from error
    mllog.config(filename=str(path))
    logger = mllog.get_mllogger()
    logger.event(key=constants.SUBMISSION_BENCHMARK, value="fewbit")
    logger.event(key="fewbit_precision", value=run_config.get("precision"))
    logger.start(key=constants.RUN_START)
    return logger


def _mllog_eval(logger, step: int, metrics: dict) -> None:
    from mlperf_logging.mllog import constants

    for name, value in metrics.items():
        if math.isfinite(value):
            logger.event(key=constants.EVAL_ACCURACY if name in ("accuracy", "bleu") else f"eval_{name}",
                         value=value, metadata={"step_num": step})
