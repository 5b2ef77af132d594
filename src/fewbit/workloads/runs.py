"""The runs layer: train, save, load and evaluate runs; the cached FP32 baselines; the verbs' output folders.

A run is one workload trained under one recipe, saved as a folder: ``model.safetensors`` (the float weights a
recipe trains: its layers' high-precision parameters), ``run.json`` (workload, config, the full recipe, final
metrics, timings, versions), the workload's artifacts (e.g. ``tokenizer.model``), ``metrics.jsonl`` (one line
per step) and, for a pruned model, ``masks.safetensors`` (:func:`fewbit.sparsity.save_masks`, put back on
load). Everything is written atomically; loading never unpickles.

**Integrity.** ``model.safetensors``'s metadata lists each tensor's dtype, shape and checksum and holds the sha256 of
``run.json``, which holds the sha256 of each artifact; :func:`load` verifies all of them and raises ValueError naming
the damaged file (a flipped bit, a truncated copy, a missing tensor, an edited shape), so a damaged run is never
evaluated. Folders written before checksums load with a warning.

**No silent replacement.** :func:`train` into a folder that already holds a run (``run.json``, the weights, the
metrics or checkpoints) is refused unless ``overwrite=True`` (the old run's files are removed first) or
``resume=True`` (its checkpoints are continued; needs ``checkpoint_every``).

**Evaluation under a recipe** (:func:`evaluate_model`): a copy of the float model with its layers converted by the
recipe (``quantize_``), under ``torch.autocast`` when the recipe sets ``autocast``; parameters stored in a narrower
``param_dtype`` are evaluated at their stored values in float32. A run's own metric is computed this way, under
the recipe it was trained with, so ``fewbit eval`` on the saved folder gives the same number.

Every verb (``study``, ``ptq``, ...) gets its models from here; no verb imports another.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit import sparsity
from fewbit.atomic import write_bytes, write_text
from fewbit.recipes import Recipe
from fewbit.workloads import get
from fewbit.workloads.base import Workload, config_dict, model_device, resolve_device, to_device
from fewbit.workloads.data.cache import keyed_dir

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
RUN_FORMAT = "2"  # the version of the weights file's fewbit metadata; "2": checksums


@dataclass
class Run:
    """A trained model with its workload (data prepared) and what is known about its training. ``model`` is the
    float model (no layer converted); ``recipe`` the one it was trained under, which evaluation applies."""

    workload: Workload
    model: nn.Module
    record: dict[str, Any]
    path: Path | None = None

    @property
    def recipe(self) -> Recipe:
        return _recipes.get(self.record.get("recipe", "fp32"))


def warmup_cosine(warmup: int, steps: int, min_ratio: float):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def optimizer_for(config):
    """``params -> optimizer`` for a workload config: its optimizer and learning rate, weight decay on matrices."""
    def build(params):
        params = list(params)
        decay = [p for p in params if p.ndim >= 2]  # matrices decay; biases, norms and scales do not
        rest = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        if config.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))

    return build


def fit(workload: Workload, model: nn.Module, precision, device: torch.device, steps: int | None = None,
        warmup: int | None = None, **options):
    """The training loop on ``workload``'s data, loss, optimizer, warmup-cosine schedule and gradient clipping (its
    config's), for ``steps`` (default the config's) under ``precision`` (a recipe or a Precision); ``options`` go
    to :func:`fewbit.train.train` (callbacks, evaluation, logs, checkpoints, progress). Returns its TrainResult.
    Every verb that trains a workload (runs, studies, time to quality, sparsity) trains through this."""
    from fewbit.train import train as train_loop

    c = workload.config
    steps = c.steps if steps is None else steps
    warmup = c.warmup if warmup is None else warmup
    return train_loop(
        model, optimizer_for(c), lambda step, micro: to_device(workload.batch(step, micro), device), workload.loss,
        steps=steps, precision=precision,
        lr_schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup, steps, c.min_lr_ratio)),
        grad_clip=c.grad_clip, config={"workload": workload.name, **config_dict(c)}, **options)


def train(workload: Workload, recipe: str | Recipe = "fp32", out: str | Path | None = None,
          progress: bool = True, checkpoint_every: int = 0, overwrite: bool = False, resume: bool = False,
          model: nn.Module | None = None, steps: int | None = None, callbacks: Sequence = ()) -> Run:
    """Train ``workload``'s model under ``recipe`` (a preset name, a Recipe, a dict or a YAML file); evaluate it on
    the valid split under the same recipe (:func:`evaluate_model`); save to ``out``.

    ``checkpoint_every`` > 0 keeps resumable checkpoints in ``out/checkpoints``. An ``out`` that already holds a
    run is refused unless ``overwrite`` (replace it) or ``resume`` (continue its checkpoints, or start them when
    there are none yet; a changed config is refused by the checkpoint). ``model``: train these weights further
    instead of a fresh model (e.g. a pruned baseline). ``steps``: fewer (or more) steps than the config's, the
    warmup scaled to match. ``callbacks``: more training-loop callbacks."""
    from fewbit.nn import dequantize_
    from fewbit.train.loop import check_grad_clip

    recipe = _recipes.get(recipe)
    c = workload.config
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every!r}; use 0 for no checkpoints or N > 0 for one every N "
                         "steps")
    check_grad_clip(c.grad_clip)
    if not (math.isfinite(c.lr) and c.lr >= 0):
        raise ValueError(f"config key 'lr': {c.lr}; a learning rate must be a finite number >= 0 (e.g. lr=1e-3)")
    if out is not None:
        prepare_out(Path(out), overwrite=overwrite, resume=resume, checkpoint_every=checkpoint_every)
    if c.threads:
        torch.set_num_threads(c.threads)
    device = resolve_device(c.device)
    workload.setup()
    model = (workload.build_model() if model is None else model).to(device)
    steps = c.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps={steps}; train at least 1 step")
    warmup = c.warmup if steps == c.steps else max(1, round(c.warmup * steps / c.steps))
    out = Path(out) if out is not None else None
    started = time.perf_counter()
    result = fit(
        workload, model, recipe, device, steps=steps, warmup=warmup, callbacks=callbacks,
        eval_fn=lambda m: workload.evaluate(m, "valid"), eval_every=c.eval_every,
        checkpoint_dir=out / CHECKPOINTS if out is not None and checkpoint_every else None,
        checkpoint_every=checkpoint_every, log_path=out / METRICS_FILE if out is not None else None,
        progress=progress,
    )
    train_seconds = time.perf_counter() - started
    dequantize_(model)  # the float layers with the trained parameters; evaluation applies the recipe again
    metrics = evaluate_model(workload, model, recipe, "valid")
    record = {
        "workload": workload.name,
        "config": config_dict(c),
        "recipe": recipe.to_dict(),
        "metric": workload.metric,
        "valid": metrics,
        "train": {"steps": result.step, "seconds": round(train_seconds, 2), "skipped_steps": result.skipped_steps,
                  "skipped_at": result.skipped_at,
                  "final_loss": result.losses[-1] if result.losses else None},
        "data": workload.info(),
        "versions": _versions(),
    }
    run = Run(workload, model, record, out)
    if out is not None:
        save(run, out)
    return run


def prepare_out(out: Path, overwrite: bool = False, resume: bool = False, checkpoint_every: int = 0) -> None:
    """Check that :func:`train` may write a run into ``out`` (see the module docstring); with ``overwrite``, remove
    the old run's files (only those a run writes: its record, weights, metrics and checkpoints)."""
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: overwrite replaces the run in the folder, resume "
                         "continues it")
    if resume and not checkpoint_every:
        raise ValueError(f"resume continues the checkpoints in {out / CHECKPOINTS}; give checkpoint_every "
                         "(--checkpoint-every N) too")
    held = [name for name in (RUN_FILE, WEIGHTS_FILE, METRICS_FILE, CHECKPOINTS) if (out / name).exists()]
    if not held:
        return
    if overwrite:
        for name in held:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        return
    has_checkpoints = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir())
    if resume and has_checkpoints:
        return
    if resume:
        raise ValueError(f"{out} holds a run ({', '.join(held)}) but no checkpoints to resume; pass --overwrite "
                         "(overwrite=True) to replace it, or another --out")
    raise ValueError(f"{out} already holds a run ({', '.join(held)}); pass --overwrite (overwrite=True) to replace "
                     "it, --resume (resume=True) to continue its checkpoints, or another --out")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(run: Run, out: str | Path) -> None:
    """Write ``run`` into ``out`` (see the module docstring), each file atomically, with checksums."""
    from safetensors.torch import save

    from fewbit.train.checkpoint import tensor_manifest

    out = Path(out)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in run.model.state_dict().items()}
    artifacts = run.workload.artifacts()
    run.record = {**run.record, "files": {name: _sha256(data) for name, data in artifacts.items()}}
    text = json.dumps(run.record, indent=2) + "\n"
    metadata = {"workload": run.workload.name, "fewbit_run": RUN_FORMAT,
                "tensors": json.dumps(tensor_manifest(tensors)), "run_sha256": _sha256(text.encode())}
    write_bytes(out / WEIGHTS_FILE, save(tensors, metadata=metadata))
    for name, data in artifacts.items():
        write_bytes(out / name, data)
    if sparsity.masks(run.model):  # a pruned model: its masks beside the weights
        sparsity.save_masks(run.model, out / sparsity.MASKS_FILE)
    write_text(out / RUN_FILE, text)
    run.path = out


def _read_weights(folder: Path, record_bytes: bytes, record: dict) -> dict[str, torch.Tensor]:
    """The weights of a run folder, verified against their checksums and ``run.json``'s (module docstring)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    from fewbit.train.checkpoint import verify_tensors

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} is an incomplete run: {WEIGHTS_FILE} is missing")
    try:
        state = load(weights.read_bytes())
        with safe_open(weights, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights} is truncated or corrupted ({type(error).__name__}: {error}); train the run "
                         "again or restore the file") from None
    if "fewbit_run" not in metadata:
        warnings.warn(f"{weights} has no checksums (written by an older fewbit); it is loaded unverified. Save the "
                      "run again to add them", UserWarning, stacklevel=3)
        return state
    if metadata.get("run_sha256") != _sha256(record_bytes):
        raise ValueError(f"{folder / RUN_FILE} is corrupted: it does not match the checksum recorded in {weights} "
                         "(a flipped bit, an edit, or a copy interrupted between the two files)")
    try:
        manifest = json.loads(metadata.get("tensors", ""))
    except json.JSONDecodeError:
        raise ValueError(f"{weights} is corrupted: its list of tensors does not parse") from None
    verify_tensors(state, manifest, str(weights))
    for name, digest in (record.get("files") or {}).items():
        artifact = folder / name
        if not artifact.is_file():
            raise FileNotFoundError(f"{folder} is an incomplete run: {name} is missing")
        if _sha256(artifact.read_bytes()) != digest:
            raise ValueError(f"{artifact} is corrupted: it does not match its checksum in {folder / RUN_FILE}")
    return state


def load(path: str | Path, workload_name: str | None = None) -> Run:
    """A saved run (its folder, or the ``model.safetensors`` inside it), verified (module docstring), its data
    prepared and weights loaded."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    record_file = folder / RUN_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"{path} is not a fewbit run: no {RUN_FILE} in {folder} (make one with "
                                "`fewbit train <workload> --out DIR`)")
    record_bytes = record_file.read_bytes()
    try:
        record = json.loads(record_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{record_file} is corrupted: not valid JSON ({error})") from None
    missing_keys = [key for key in ("workload", "config") if not isinstance(record, dict) or key not in record]
    if missing_keys:
        raise ValueError(f"{record_file} is corrupted: it has no {missing_keys[0]!r}")
    state = _read_weights(folder, record_bytes, record)
    if workload_name is not None and record["workload"] != workload_name:
        raise ValueError(f"{folder} holds a {record['workload']!r} run, not {workload_name!r}")
    cls = get(record["workload"])
    config = cls.load_config(None, values=record["config"])
    artifacts = {p.name: p.read_bytes() for p in folder.iterdir()
                 if p.name not in (RUN_FILE, WEIGHTS_FILE, sparsity.MASKS_FILE) and p.is_file()
                 and not p.name.endswith((".jsonl", ".json", ".png", ".md"))}
    workload = cls(config, artifacts=artifacts).setup()
    model = workload.build_model()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a shape that does not fit the config's model
        first = str(error).strip().splitlines()[-1].strip()
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the {cls.name} model of its config: {first}") from None
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the {cls.name} model of its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if (folder / sparsity.MASKS_FILE).is_file():  # a pruned model: its masks come back with it
        sparsity.load_masks(model, folder / sparsity.MASKS_FILE)
    return Run(workload, model, record, folder)


def evaluate(run: Run, recipe: str | Recipe | None = None, split: str = "test",
             limit: int | None = None) -> dict[str, float]:
    """Metrics of the run's model on ``split`` under ``recipe`` (None: the recipe it was trained with; ``fp32``: the
    float model), by :func:`evaluate_model`. The run's model is left untouched."""
    return evaluate_model(run.workload, run.model, run.recipe if recipe is None else recipe, split, limit)


def evaluate_model(workload: Workload, model: nn.Module, recipe: str | Recipe, split: str = "test",
                   limit: int | None = None) -> dict[str, float]:
    """``workload.evaluate`` of ``model`` as ``recipe`` computes (see the module docstring); ``model`` is left
    untouched."""
    from fewbit.train import Precision

    recipe = _recipes.get(recipe)
    converted = as_recipe(model, recipe)
    with Precision.of(recipe).autocast(model_device(converted)):  # a no-op unless the recipe sets autocast
        return workload.evaluate(converted, split, limit)


def as_recipe(model: nn.Module, recipe: str | Recipe) -> nn.Module:
    """``model`` as evaluated under ``recipe``: ``model`` itself when the recipe changes nothing, else a float32
    copy with its layers converted by ``quantize_``. (A recipe's ``autocast`` is a context, not a conversion:
    :meth:`fewbit.train.Precision.autocast`.)"""
    from fewbit.nn import quantize_

    recipe = _recipes.get(recipe)
    narrow = any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters())
    converts = not recipe.is_identity
    if not narrow and not converts:
        return model
    model = copy.deepcopy(model)
    if narrow:
        model.float()  # parameters stored narrower are evaluated at their stored values (exact upcast)
    return quantize_(model, recipe) if converts else model


# -- baselines and output folders ---------------------------------------------------------------------------------
def baseline(workload_name: str, config: str = "quick", overrides: Sequence[str] = (), retrain: bool = False,
             progress: bool = True, log=None) -> Run:
    """The FP32 baseline run of this config: from the cache (keyed by the workload, its full config and the
    versions of fewbit and torch), or trained now and cached. ``log(message)`` hears which of the two happened."""
    import fewbit

    cls = get(workload_name)
    workload = cls(cls.load_config(config, overrides))
    if getattr(cls, "pretrained", False):
        return pretrained(workload, log)
    key = {"workload": workload_name, "config": config_dict(workload.config), "fewbit": fewbit.__version__,
           "torch": torch.__version__.split("+")[0]}
    data = workload.data_key()
    if data:  # only where it says something, so the other workloads' cached baselines keep their keys
        key["data"] = data
    folder = keyed_dir("baseline", key)
    if not retrain and (folder / RUN_FILE).is_file():
        if log:
            log(f"FP32 baseline: cached in {folder}")
        return load(folder)
    if log:
        log(f"FP32 baseline: training {workload_name} ({workload.config.steps} steps), saving to {folder}")
    return train(workload, "fp32", out=folder, progress=progress, overwrite=True)


def pretrained(workload: Workload, log=None) -> Run:
    """The baseline of a workload that brings its own trained weights (``hf``: a model folder): loaded, nothing
    trained. Its ``location`` is the run's path."""
    workload.setup()
    if log:
        log(f"FP32 baseline: the pretrained weights in {workload.location} (nothing trained)")
    started = time.perf_counter()
    model = workload.build_model()
    record = {"workload": workload.name, "config": config_dict(workload.config), "recipe": "fp32",
              "metric": workload.metric, "train": {"steps": 0, "seconds": 0.0, "pretrained": str(workload.location),
                                                   "load_seconds": round(time.perf_counter() - started, 2)},
              "data": workload.info(), "versions": _versions()}
    return Run(workload, model, record, Path(workload.location))


def default_out(root: str, workload_name: str, config: str | None, overrides: Sequence[str]) -> Path:
    """``root/<workload>``, suffixed by a config other than quick and by the overrides, so that two variants
    (``--model mobilenet_v2``) do not overwrite each other: ``fewbit-study/vision-model=mobilenet_v2``."""
    parts = [workload_name]
    if config not in (None, "quick"):
        parts.append(Path(config).stem)
    parts += [o.replace("/", "_").replace(" ", "") for o in overrides]
    return Path(root) / "-".join(parts)


def _versions() -> dict[str, str]:
    import fewbit

    return {"fewbit": fewbit.__version__, "torch": torch.__version__, "python": platform.python_version()}
