"""The precision policy of a training run, read from a :class:`~fewbit.Recipe`.

A recipe says everything about how a run computes; :class:`Precision` turns it into the loop's mechanics:

- the layers: ``quantize_(model, recipe)`` when the recipe changes a layer's arithmetic (a QuantSpec for a role, or
  a ``compute_format`` that rounds GEMM operands), else the layers are left alone;
- the forward pass under ``torch.autocast`` to the recipe's ``autocast`` format, or not;
- the parameters stored in ``param_dtype`` (the batches' floating tensors are cast to it too), and, when
  ``master_weight_dtype`` is wider, a :class:`MasterWeights` copy that receives the gradients and the update and is
  rounded back into the parameters after every step;
- the default loss scaler (``loss_scaling``), which the caller may override.

``Precision.of(x)`` accepts whatever ``train(precision=...)`` does: a preset name, a ``.yaml``/``.yml`` path, a dict
of recipe fields, a Recipe, or a Precision. The table of what each preset name means is in
:mod:`fewbit.train.loop`; :meth:`Precision.describe` gives one row of it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from fewbit import recipes as _recipes
from fewbit.recipes import Recipe
from fewbit.train.scaler import StaticScaler, make_scaler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MasterWeights:
    """A wider copy of the model's parameters that the optimizer updates (the mixed precision paper's master
    weights): gradients are copied up into it before the step, and its values rounded back into the model's
    parameters after it. ``params`` is what the optimizer is built on."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        self.model_params = list(model.parameters())
        self.params = [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in self.model_params]

    def take_grads(self) -> None:
        """Move the model's gradients (in its dtype) to the master copy (in the wider one)."""
        for p, m in zip(self.model_params, self.params, strict=True):
            m.grad = p.grad.detach().to(m.dtype) if p.grad is not None else None
            p.grad = None

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Round the updated master values into the model's parameters."""
        for p, m in zip(self.model_params, self.params, strict=True):
            p.copy_(m)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"master.{i}": m for i, m in enumerate(self.params)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, m in enumerate(self.params):
            m.copy_(tensors[f"master.{i}"])


@dataclass(frozen=True)
class Precision:
    """How a run computes, from ``recipe``: see the module docstring."""

    recipe: Recipe

    @classmethod
    def of(cls, precision: str | os.PathLike | dict | Recipe | Precision) -> Precision:
        """The policy of a preset name, a recipe file, a dict of recipe fields, a Recipe, or a Precision."""
        if isinstance(precision, Precision):
            return precision
        if isinstance(precision, str) and not precision.endswith(_recipes.YAML_SUFFIXES) \
                and precision not in _recipes.names(include_training=True):
            training = [n for n in _recipes.names(include_training=True) if n not in _recipes.names()]
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(training)} (training only), a "
                             f"recipe ({', '.join(_recipes.names())}), a Recipe, a dict of recipe fields, or a "
                             ".yaml/.yml recipe file")
        return cls(_recipes.get(precision))

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def quantizes_layers(self) -> bool:
        """True when the layers are converted with ``quantize_`` (the recipe changes their arithmetic)."""
        return not self.recipe.is_identity

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES[self.recipe.autocast] if self.recipe.autocast else None

    @property
    def param_dtype(self) -> torch.dtype:
        return DTYPES[self.recipe.param_dtype]

    @property
    def master_dtype(self) -> torch.dtype:
        return DTYPES[self.recipe.master_weight_dtype]

    @property
    def has_master(self) -> bool:
        """True when the optimizer updates a separate, wider copy of the parameters."""
        return self.master_dtype != self.param_dtype

    def describe(self) -> dict[str, str]:
        """The effective policy as plain strings (one row of the loop's precision table)."""
        r = self.recipe
        if not self.quantizes_layers:
            layers = "-"
        elif all(s is None for s in r.specs().values()):
            layers = f"operands rounded to {r.compute_format}"
        else:
            layers = "quantize_ by its specs"
        return {"layers": layers, "autocast": str(self.autocast_dtype).removeprefix("torch.")
                if self.autocast_dtype else "-", "param_dtype": r.param_dtype,
                "master_weight_dtype": r.master_weight_dtype if self.has_master else "-",
                "loss_scaling": str(r.loss_scaling)}

    def prepare(self, model: torch.nn.Module) -> MasterWeights | None:
        """Convert ``model`` in place (layers, then parameter dtype); return its master weights, if any.

        ``param_dtype`` float32 leaves the parameters in the dtype the model has them (float32 for an ordinary
        model); another dtype casts every floating parameter and buffer, as ``model.to(dtype)`` does."""
        if self.quantizes_layers:
            from fewbit.nn import quantize_

            quantize_(model, self.recipe)
        if self.param_dtype != torch.float32:
            model.to(self.param_dtype)
        return MasterWeights(model, self.master_dtype) if self.has_master else None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """The context the forward pass runs in: ``torch.autocast`` to the recipe's format, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def cast_batch(self, batch):
        """``batch`` (a tensor, or a tuple/list/dict of them) with floating tensors in ``param_dtype`` when the
        parameters are not float32 (integer tensors, such as token ids and labels, are left alone)."""
        if self.param_dtype == torch.float32:
            return batch
        return _cast_floating(batch, self.param_dtype)

    def scaler(self, loss_scaling: str | float | None = "auto") -> StaticScaler | None:
        """The loss scaler: "auto" takes the recipe's ``loss_scaling``; anything else goes to
        :func:`~fewbit.train.scaler.make_scaler` (None/"none", a number, "dynamic"/"backoff", "logmax")."""
        return make_scaler(self.recipe.loss_scaling if loss_scaling == "auto" else loss_scaling)


def _cast_floating(batch, dtype: torch.dtype):
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast_floating(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(_cast_floating(v, dtype) for v in batch)
    return batch
