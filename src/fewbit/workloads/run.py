"""A run: one workload trained under one recipe, saved as a folder that can be evaluated later.

A run folder holds ``model.safetensors`` (float weights; a recipe-trained model keeps its high-precision master
weights), ``run.json`` (workload, config, recipe, final metrics, timings, versions), the workload's artifacts
(e.g. ``tokenizer.model``) and ``metrics.jsonl`` (one line per step). Everything is written atomically; loading
never unpickles.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewbit import recipes as _recipes
from fewbit.atomic import write_bytes, write_text
from fewbit.workloads import get
from fewbit.workloads.base import Workload, config_dict, resolve_device, to_device

RUN_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Run:
    """A trained model with its workload (data prepared) and what is known about its training."""

    workload: Workload
    model: nn.Module
    record: dict[str, Any]
    path: Path | None = None


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


def train(workload: Workload, recipe: str | _recipes.Recipe = "fp32", out: str | Path | None = None,
          progress: bool = True, checkpoint_every: int = 0) -> Run:
    """Train ``workload``'s model from scratch under ``recipe``; evaluate on the valid split; save to ``out``.

    ``checkpoint_every`` > 0 keeps resumable checkpoints in ``out/checkpoints`` (a rerun continues from them)."""
    from fewbit.train import train as train_loop

    recipe = _recipes.get(recipe)
    c = workload.config
    if c.threads:
        torch.set_num_threads(c.threads)
    device = resolve_device(c.device)
    workload.setup()
    model = workload.build_model().to(device)
    out = Path(out) if out is not None else None
    started = time.perf_counter()
    result = train_loop(
        model, optimizer_for(c), lambda step, micro: to_device(workload.batch(step, micro), device), workload.loss,
        steps=c.steps, precision=recipe,
        lr_schedule=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.warmup, c.steps,
                                                                                     c.min_lr_ratio)),
        grad_clip=c.grad_clip or None, eval_fn=lambda m: workload.evaluate(m, "valid"), eval_every=c.eval_every,
        checkpoint_dir=out / "checkpoints" if out is not None and checkpoint_every else None,
        checkpoint_every=checkpoint_every, log_path=out / "metrics.jsonl" if out is not None else None,
        progress=progress, config={"workload": workload.name, **config_dict(c)},
    )
    train_seconds = time.perf_counter() - started
    metrics = workload.evaluate(model, "valid")
    record = {
        "workload": workload.name,
        "config": config_dict(c),
        "recipe": recipe.to_dict(),
        "metric": workload.metric,
        "valid": metrics,
        "train": {"steps": result.step, "seconds": round(train_seconds, 2), "skipped_steps": result.skipped_steps,
                  "final_loss": result.losses[-1] if result.losses else None},
        "data": workload.info(),
        "versions": _versions(),
    }
    run = Run(workload, model, record, out)
    if out is not None:
        save(run, out)
    return run


def save(run: Run, out: str | Path) -> None:
    from safetensors.torch import save

    out = Path(out)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in run.model.state_dict().items()}
    write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"workload": run.workload.name}))
    for name, data in run.workload.artifacts().items():
        write_bytes(out / name, data)
    write_text(out / RUN_FILE, json.dumps(run.record, indent=2) + "\n")
    run.path = out


def load(path: str | Path, workload_name: str | None = None) -> Run:
    """A saved run (its folder, or the ``model.safetensors`` inside it), its data prepared and weights loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    folder = path.parent if path.is_file() else path
    record_file = folder / RUN_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"{path} is not a fewbit run: no {RUN_FILE} in {folder} (make one with "
                                "`fewbit train <workload> --out DIR`)")
    record = json.loads(record_file.read_text())
    if workload_name is not None and record["workload"] != workload_name:
        raise ValueError(f"{folder} holds a {record['workload']!r} run, not {workload_name!r}")
    cls = get(record["workload"])
    config = cls.load_config(None, values=record["config"])
    artifacts = {p.name: p.read_bytes() for p in folder.iterdir() if p.name not in (RUN_FILE, WEIGHTS_FILE)
                 and p.is_file() and not p.name.endswith((".jsonl", ".json", ".png", ".md"))}
    workload = cls(config, artifacts=artifacts).setup()
    model = workload.build_model()
    state = load_file(folder / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit the {cls.name} model of its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return Run(workload, model, record, folder)


def evaluate(run: Run, recipe: str | _recipes.Recipe | None = None, split: str = "test",
             limit: int | None = None) -> dict[str, float]:
    """Metrics of the run's model on ``split``, directly cast to ``recipe`` (None or fp32: as trained). The run's
    model is left untouched (a copy is converted)."""
    from fewbit.nn import quantize_

    model = run.model
    if recipe is not None:
        recipe = _recipes.get(recipe)
        if not recipe.is_identity:
            model = quantize_(copy.deepcopy(model), recipe)
    model.eval()
    return run.workload.evaluate(model, split, limit)


def _versions() -> dict[str, str]:
    import fewbit

    return {"fewbit": fewbit.__version__, "torch": torch.__version__, "python": platform.python_version()}
