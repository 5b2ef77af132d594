"""One training loop for every precision.

``precision=`` is a recipe: a preset name, a :class:`~fewbit.Recipe`, a dict of its fields or a ``.yaml``/``.yml``
file (:func:`fewbit.recipes.get`). A name means the same here, in ``quantize_``, in a workload config and in
``fewbit train --recipe``. The loop honours every field (:class:`~fewbit.train.precision.Precision`): the layers
are converted by ``quantize_`` when the recipe changes their arithmetic, the forward pass runs under
``torch.autocast`` when it sets ``autocast``, the parameters are stored in ``param_dtype`` with a float32 master
copy taking the update when ``master_weight_dtype`` is wider, and ``loss_scaling`` is the default scaler:

| precision | layers (quantize_) | autocast | param_dtype | master copy | loss_scaling |
|---|---|---|---|---|---|
| fp32 | - | - | float32 | - | none |
| bf16 | operands rounded to bf16 | - | float32 | - | none |
| fp16 | operands rounded to fp16 | - | float32 | - | dynamic |
| bf16_mixed | - | bfloat16 | float32 | - | none |
| fp16_mixed | - | float16 | float32 | - | dynamic |
| fp16_pure | - | - | float16 | float32 | dynamic |
| any other recipe (fp8, mxfp8, mxfp6, mxfp4, int8, w4a16, ...) | quantize_ by its specs | - | float32 | - | none |

"operands rounded to bf16": every GEMM operand of the converted layers (Linear, Conv, fewbit's QMatmul) is rounded
to bfloat16 and the GEMM accumulates in float32, exactly as a model directly cast to the recipe evaluates;
``bf16_mixed`` is PyTorch's autocast instead (every autocast-listed op, outputs in bfloat16; the native path on a
GPU). ``fp16_pure`` is the mixed precision paper's method: float16 parameters (half the weight memory) and batches,
a float32 master copy that receives the update and is rounded back after every step. A custom recipe may combine
the fields (``Recipe(param_dtype="bfloat16", master_weight_dtype="bfloat16")``: pure bfloat16, the optimizer
updating the bfloat16 parameters themselves).

The step: forward and backward on ``grad_accum`` micro-batches (the loss multiplied by the loss scale), gradients
unscaled, a non-finite gradient on *any* rank skips the step everywhere (and backs the scale off), gradients
clipped (after unscaling), optimizer step, schedule step. Weight decay is the optimizer's and never sees the scale.
Everything else (evaluation, logs, progress, checkpoints, early stop) is a callback (:mod:`fewbit.train.callbacks`).

**Non-finite values.** A step is skipped (no optimizer step, so neither the weights nor the optimizer's moments see
it, and normalization layers' running statistics are put back as they were before it) and counted in
:attr:`TrainResult.skipped_steps` / ``skipped_at`` when its loss, any gradient, or a value entering a quantized
layer (its input in the forward pass, its output gradient dY in the backward pass, checked *before* quantization: a
saturating format would turn inf into its largest value and hide it) is inf or NaN. The loss scaler backs off as
usual; delayed-scaling amax histories never record a non-finite amax (:class:`~fewbit.scaling.AmaxHistory`), so the
next step computes as if the bad batch had not been seen. A run that skipped steps ends with a RuntimeWarning naming
them (a few at the start under dynamic loss scaling are the scaler finding its scale); a run whose every step was
skipped raises :class:`AllStepsSkipped`, unless a dynamic loss scaler was only backing off from its initial scale
(finite losses and layer values whose scaled gradients overflowed; a scaler that reaches its floor and keeps
overflowing raises :class:`~fewbit.train.LossScaleCollapse`).

**Arguments.** ``grad_clip`` None or 0 means no clipping (as in the workload configs); otherwise a finite number >
0. Every optimizer parameter group needs a finite learning rate >= 0; a loss scale must be finite and > 0.

**Resuming** (``checkpoint_dir`` with ``resume=True``) continues from the newest checkpoint that loads and passes its
checksums (a damaged newer one is reported with a warning and skipped). It is refused with
:class:`~fewbit.train.CheckpointError` naming the difference when the model's shapes, the run's ``config``, or an
optimizer hyper-parameter (``lr``, or ``initial_lr`` under a schedule; betas, weight decay...) differ from the
checkpoint's, and when the checkpoint is beyond ``steps`` (it would return a model trained longer than asked).
``resume=False`` into a folder that already holds checkpoints is refused too (the two runs' checkpoints would mix).

Data is a function ``data(step, micro) -> batch`` of the position, so a resumed run sees exactly the batches it
would have seen; under ``torchrun`` each rank takes its slice of the global batch (:func:`shard`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fewbit import recipes as _recipes
from fewbit.train import checkpoint as ckpt
from fewbit.train.callbacks import (
    Callback,
    Checkpoints,
    Evaluate,
    GradientStats,
    MetricsLog,
    MLPerfLog,
    OnStep,
    ProgressBar,
    TrainState,
)
from fewbit.train.precision import Precision
from fewbit.train.scaler import DynamicScaler, unscale_and_check


class AllStepsSkipped(RuntimeError):
    """Every step of a run met a non-finite loss, gradient or quantized-layer value, so no step was taken."""


@dataclass
class TrainResult:
    """What a run did: optimizer steps done (``step``), the loss of each step run here, steps skipped for
    non-finite values (``skipped_steps``, and ``skipped_at``: their 1-based step numbers), the final loss scale
    (None without scaling), the evaluations (``{"step": ..., metric: value}``), wall-clock seconds, and why it
    stopped before ``steps`` (None when it ran them all)."""

    step: int
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    skipped_at: list[int] = field(default_factory=list)
    final_scale: float | None = None
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason is not None


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


def train(
    model: torch.nn.Module,
    optimizer_fn: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    data: Callable[[int, int], object],
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    steps: int,
    precision: str | os.PathLike | dict | _recipes.Recipe | Precision = "fp32",
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
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimizer steps; see the module docstring. Returns a
    :class:`TrainResult`.

    ``optimizer_fn(params)`` builds the optimizer (with a master copy it receives the float32 master parameters).
    ``precision``: a recipe (name, Recipe, dict, .yaml path) or a :class:`Precision`. ``loss_scaling``: "auto" (the
    recipe's ``loss_scaling``), "none", a number (static), "dynamic"/"backoff" or "logmax". ``checkpoint_dir`` with
    ``resume=True`` continues from the newest usable checkpoint there. ``config``: what this run is (recipe,
    hyper-parameters...), stored in checkpoints and compared on resume.

    The other keyword arguments build the built-in callbacks (:mod:`fewbit.train.callbacks`): ``eval_fn`` every
    ``eval_every`` steps (Evaluate), ``log_path`` (MetricsLog, JSONL), ``mllog_path`` (MLPerfLog),
    ``grad_stats_every`` into ``grad_stats_dir`` (GradientStats; default ``checkpoint_dir/grad_stats``),
    ``on_step(step, model)`` (OnStep), ``checkpoint_every`` into ``checkpoint_dir`` keeping ``keep_last``
    (Checkpoints), ``progress`` (ProgressBar). ``callbacks``: more, run after those (e.g.
    :class:`~fewbit.train.callbacks.StopAtTarget`).
    ``parallel``: under torchrun, "ddp" (DistributedDataParallel) or "fsdp" (FSDP2 ``fully_shard`` per layer with
    parameters, then the whole model: parameters, gradients and optimizer state sharded across ranks).
    """
    for name, value, low in (("steps", steps, 0), ("grad_accum", grad_accum, 1), ("checkpoint_every",
                             checkpoint_every, 0), ("eval_every", eval_every, 0), ("keep_last", keep_last, 0),
                             ("grad_stats_every", grad_stats_every, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"train: {name}={value!r}; it must be an int >= {low}")
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"unknown parallel {parallel!r}; valid: ddp, fsdp")
    grad_clip = check_grad_clip(grad_clip)
    precision = Precision.of(precision)
    scaler = precision.scaler(loss_scaling)
    built = _builtin_callbacks(eval_fn, eval_every, log_path, mllog_path, grad_stats_every,
                               grad_stats_dir or Path(checkpoint_dir or ".") / "grad_stats", on_step,
                               checkpoint_dir if checkpoint_every else None, checkpoint_every, keep_last, progress)
    state = _setup(model, optimizer_fn, precision, scaler, lr_schedule, steps, grad_accum, grad_clip, config,
                   parallel, [*built, *callbacks], uses_checkpoints=checkpoint_dir is not None)
    check_learning_rates(state.optimizer)
    if checkpoint_dir is not None and resume:
        _resume(state, checkpoint_dir)
    elif checkpoint_dir is not None and ckpt.list_checkpoints(checkpoint_dir):
        raise ckpt.CheckpointError(
            f"checkpoint_dir {checkpoint_dir} already holds checkpoints (newest "
            f"{ckpt.list_checkpoints(checkpoint_dir)[-1].name}) and resume=False: the two runs' checkpoints would "
            "mix. Pass resume=True to continue them, or an empty checkpoint_dir to start over")
    state.result.step = state.step
    error = None
    try:
        for callback in state.callbacks:
            callback.on_train_start(state)
        ran, searching = _run(state, data, loss_fn, grad_accum, grad_clip)
        _check_skipped(state.result, ran, searching)
    except BaseException as raised:
        error = raised
        raise
    finally:
        state.result.seconds = state.elapsed()
        state.result.final_scale = scaler.scale if scaler is not None else None
        state.result.stop_reason = state.stop_reason
        for callback in state.callbacks:
            callback.on_train_end(state, error)
    if state.world > 1:
        dist.barrier()
    return state.result


def check_grad_clip(grad_clip: float | None) -> float | None:
    """``grad_clip`` as the loop uses it: None (no clipping) for None or 0, else a finite number > 0 (a negative
    max-norm would flip the gradients' sign)."""
    if grad_clip is None:
        return None
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, int | float) or not math.isfinite(grad_clip) \
            or grad_clip < 0:
        raise ValueError(f"grad_clip={grad_clip!r}; it must be a finite max-norm > 0, or 0/None for no clipping")
    return float(grad_clip) if grad_clip > 0 else None


def check_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError unless every parameter group of ``optimizer`` has a finite learning rate >= 0."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        value = float(lr) if isinstance(lr, int | float | torch.Tensor) and not isinstance(lr, bool) else math.nan
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"optimizer parameter group {i} has lr={lr!r}; a learning rate must be a finite number "
                             ">= 0 (e.g. 1e-3)")


def _check_skipped(result: TrainResult, ran: int, searching: int) -> None:
    """Warn about skipped steps; raise :class:`AllStepsSkipped` when every step run here was skipped, unless only
    because a dynamic loss scaler was still backing off from its initial scale (``searching`` such steps)."""
    skipped = result.skipped_at
    if ran and len(skipped) == ran and searching < ran:
        raise AllStepsSkipped(
            f"all {ran} step(s) met a non-finite loss, gradient or quantized-layer value (inf/NaN) and were "
            "skipped; no step was taken. Check the data for inf/NaN, lower the learning rate, or train in a wider "
            "precision (bf16, fp32)")
    if skipped:
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"train: {len(skipped)} of {ran} step(s) skipped for non-finite values (inf/NaN in the loss, "
                      f"a gradient or a quantized layer's input or dY): step(s) {shown}. A few at the start under "
                      "dynamic loss scaling are the scaler finding its scale", RuntimeWarning, stacklevel=3)


def _builtin_callbacks(eval_fn, eval_every, log_path, mllog_path, grad_stats_every, grad_stats_dir, on_step,
                       checkpoint_dir, checkpoint_every, keep_last, progress) -> list[Callback]:
    """train()'s keyword arguments as callbacks, in the documented order."""
    built: list[Callback] = []
    if eval_fn is not None and eval_every:
        built.append(Evaluate(eval_fn, eval_every))
    if log_path:
        built.append(MetricsLog(log_path))
    if mllog_path:
        built.append(MLPerfLog(mllog_path))
    if grad_stats_every:
        built.append(GradientStats(grad_stats_every, grad_stats_dir))
    if on_step is not None:
        built.append(OnStep(on_step))
    if checkpoint_dir is not None:
        built.append(Checkpoints(checkpoint_dir, checkpoint_every, keep_last))
    if progress:
        built.append(ProgressBar())
    return built


def _setup(model, optimizer_fn, precision: Precision, scaler, lr_schedule, steps, grad_accum, grad_clip, config,
           parallel, callbacks, uses_checkpoints: bool) -> TrainState:
    """Prepare the model (layers, dtype, master weights, DDP/FSDP) and build the optimizer and schedule."""
    rank, world = distributed()
    device = next(model.parameters()).device
    master = precision.prepare(model)
    net = model
    if world > 1 and parallel == "fsdp":
        if master is not None or uses_checkpoints or any(isinstance(c, Checkpoints) for c in callbacks):
            raise ValueError("parallel='fsdp' does not yet support master weights (fp16_pure) or checkpoints; use "
                             "parallel='ddp' for those")
        _fully_shard(model)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    params = master.params if master is not None else list(model.parameters())
    optimizer = optimizer_fn(params)
    schedule = lr_schedule(optimizer) if lr_schedule else None
    run_config = {"precision": precision.name, "grad_accum": grad_accum, "grad_clip": grad_clip,
                  "world_size": world, **(config or {}), "recipe": precision.recipe.to_dict()}
    return TrainState(model=model, net=net, optimizer=optimizer, schedule=schedule, scaler=scaler,
                      precision=precision, master=master, params=params, device=device, rank=rank, world=world,
                      steps=steps, run_config=run_config, result=TrainResult(step=0), callbacks=list(callbacks))


def _resume(state: TrainState, directory) -> None:
    found = ckpt.load_latest_valid(directory)
    if found is None:
        return
    path, tensors, saved = found
    ckpt.check_compatible(_comparable(saved), state.model, state.run_config)
    _check_optimizer_settings(saved, state.optimizer, path)
    if int(saved["step"]) > state.steps:
        raise ckpt.CheckpointError(
            f"{path} is at step {saved['step']}, beyond steps={state.steps}: resuming would return a model trained "
            f"for {saved['step']} steps. Ask for steps >= {saved['step']} to continue it, or use another "
            "checkpoint_dir to train a new run")
    state.step = ckpt.restore_training(tensors, saved, state.model, state.optimizer, state.schedule, state.scaler)
    if state.master is not None:
        state.master.load_state_tensors(tensors)


def _group_settings(groups: list[dict]) -> list[dict]:
    """The hyper-parameters of each optimizer parameter group, as JSON would store them. Under an LR schedule the
    current ``lr`` moves with the step and ``initial_lr`` is the setting; without one ``lr`` is."""
    settings = []
    for group in groups:
        keys = [k for k in group if k != "params" and not (k == "lr" and "initial_lr" in group)]
        settings.append(json.loads(json.dumps({k: group[k] for k in keys}, default=float)))
    return settings


def _check_optimizer_settings(saved: dict, optimizer: torch.optim.Optimizer, path) -> None:
    """Refuse to resume when this run's optimizer settings differ from the checkpoint's (loading the checkpoint
    would silently replace them with the saved ones)."""
    before = _group_settings(saved["optimizer"]["param_groups"])
    now = _group_settings(optimizer.param_groups)
    if len(before) != len(now):
        raise ckpt.CheckpointError(f"{path}: the checkpoint's optimizer has {len(before)} parameter group(s), this "
                                   f"run's {len(now)}")
    for i, (a, b) in enumerate(zip(before, now, strict=True)):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise ckpt.CheckpointError(
                    f"{path}: the checkpoint's optimizer differs at parameter group {i} {key!r}: saved "
                    f"{a.get(key)!r}, this run {b.get(key)!r}. Resume with the same setting, or train a new run "
                    "in another checkpoint_dir")


# The policies train() took before precision names were recipes, as the presets that compute the same.
_OLD_POLICIES = {"fp32": "fp32", "bf16": "bf16_mixed", "fp16_mixed": "fp16_mixed", "fp16_pure": "fp16_pure"}


def _comparable(saved: dict) -> dict:
    """A checkpoint's state with its recipe in today's form: fields added since filled with their defaults, and a
    checkpoint of an old policy (no recipe stored) given the preset that computes as it did. Old ``bf16`` runs were
    autocast: they map to ``bf16_mixed`` and are refused when resumed as the ``bf16`` recipe."""
    config = dict(saved.get("config", {}))
    try:
        if "recipe" in config:
            config["recipe"] = _recipes.Recipe.from_dict(config["recipe"]).to_dict()
        elif config.get("precision") in _OLD_POLICIES:
            config["recipe"] = _recipes.get(_OLD_POLICIES[config["precision"]]).to_dict()
    except (ValueError, TypeError):
        pass  # left as saved: check_compatible names the difference
    return {**saved, "config": config}


class _NonFiniteWatch:
    """Flags an inf or NaN entering a quantized layer: its floating inputs (forward hook) and the gradient of its
    output dY (a hook on the output tensor, which autograd calls before the layer's backward quantizes dY). The flag
    stays on the device; :meth:`take` reads it once per step."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        from fewbit.nn import quantized_layers

        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.handles = [module.register_forward_hook(self._forward) for _, module in quantized_layers(model)
                        if isinstance(module, torch.nn.Module) and not module.recipe.is_identity]

    def _note(self, tensor: torch.Tensor) -> None:
        if tensor.is_floating_point() and tensor.numel():
            self.flag.logical_or_(~torch.isfinite(tensor).all().to(self.flag.device))

    def _forward(self, module, args, output) -> None:
        if not module.training:
            return  # an evaluation inside the run (Evaluate) is not a training step
        for arg in args:
            if isinstance(arg, torch.Tensor):
                self._note(arg.detach())
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self._note(grad.detach()))

    def take(self) -> bool:
        """Whether a non-finite value was seen since the last call; resets the flag."""
        seen = bool(self.flag)
        self.flag.zero_()
        return seen

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _run(state: TrainState, data, loss_fn, grad_accum: int, grad_clip: float | None) -> tuple[int, int]:
    """The steps from ``state.step`` to ``state.steps``, or until a callback asks to stop; returns how many ran,
    and how many of them were skipped only for a dynamic loss scale still too high (the scaler's search)."""
    watch = _NonFiniteWatch(state.model, state.device)  # also a model converted before train() (QAT)
    if not watch.handles:
        watch = None
    try:
        return _steps(state, data, loss_fn, grad_accum, grad_clip, watch)
    finally:
        if watch is not None:
            watch.close()


def _steps(state: TrainState, data, loss_fn, grad_accum: int, grad_clip: float | None,
           watch: _NonFiniteWatch | None) -> tuple[int, int]:
    net, optimizer, scaler, master = state.net, state.optimizer, state.scaler, state.master
    autocast = state.precision.autocast(state.device)
    ran = searching = 0
    running_stats = [b for m in state.model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                     for b in m.buffers(recurse=False)]
    for step in range(state.step, state.steps):
        if watch is not None:
            watch.take()  # forget what evaluations between steps passed through the layers
        stats_before = [b.clone() for b in running_stats]  # a skipped step must not leave NaN in them
        t0 = time.perf_counter()
        scale = scaler.scale if scaler is not None else 1.0
        loss_sum = 0.0
        samples = 0
        for micro in range(grad_accum):
            batch = state.precision.cast_batch(shard(data(step, micro), state.rank, state.world))
            last = state.world == 1 or micro == grad_accum - 1
            with contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
                with autocast:
                    loss = loss_fn(net, batch)
                if not loss.dim() == 0:
                    raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
                (loss.float() * (scale / grad_accum)).backward()
            loss_sum += float(loss.detach()) / grad_accum
            samples += _batch_size(batch)
        if master is not None:
            master.take_grads()
        found_inf, grad_max = unscale_and_check(state.params, scale)
        # Saturating quantizers turn inf into a finite value, so the gradients alone may look clean.
        nonfinite_values = (watch is not None and watch.take()) or not math.isfinite(loss_sum)
        if nonfinite_values:
            found_inf, grad_max = True, math.inf
        found_inf = _any_rank(found_inf, state.device, state.world)
        # Overflow of finite values scaled by a dynamic scale not yet at its floor: the scaler's search.
        search = found_inf and not _any_rank(nonfinite_values, state.device, state.world) \
            and isinstance(scaler, DynamicScaler) and scale > scaler.min_scale
        for callback in state.callbacks:
            callback.on_gradients(state, found_inf)
        skip = scaler.update(found_inf, grad_max) if scaler is not None else found_inf
        if not skip:
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(state.params, grad_clip)
            optimizer.step()
            if master is not None:
                master.copy_to_model()
        else:
            with torch.no_grad():
                for buffer, before in zip(running_stats, stats_before, strict=True):
                    buffer.copy_(before)
            state.result.skipped_steps += 1
            state.result.skipped_at.append(step + 1)
            searching += bool(search)
        ran += 1
        optimizer.zero_grad(set_to_none=True)
        if state.schedule is not None:
            state.schedule.step()
        state.step = state.result.step = step + 1
        state.result.losses.append(loss_sum)
        record = {"step": step + 1, "loss": loss_sum, "scale": scale, "skipped": bool(skip),
                  "lr": optimizer.param_groups[0]["lr"],
                  "samples_per_s": samples * state.world / max(time.perf_counter() - t0, 1e-9)}
        for callback in state.callbacks:
            callback.on_step_end(state, record)
        if _any_rank(state.stop_reason is not None, state.device, state.world):
            state.request_stop("another rank asked to stop")
            break
    return ran, searching


def _fully_shard(model: torch.nn.Module) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module)
    fully_shard(model)


def _any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when ``flag`` is True on any."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _batch_size(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 1
    if isinstance(batch, dict) and batch:
        return _batch_size(next(iter(batch.values())))
    if isinstance(batch, tuple | list) and batch:
        return _batch_size(batch[0])
    return 1
