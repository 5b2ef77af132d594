"""``quantize_(model, recipe)``: swap a model's layers for their quantized versions in place; ``summary(model)``.

No global patching: only the modules of the given model change. Per-layer recipes by name pattern (fnmatch) let
the first and last layers stay in higher precision. Every layer that was not converted is recorded with its
reason and listed by :func:`summary`.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fewbit import recipes as _recipes
from fewbit.nn.functional import current_scaling
from fewbit.nn.modules import RECIPE_ONLY, QConv1d, QConv2d, QLinear, _Quantized
from fewbit.qtensor import quantize
from fewbit.recipes import Recipe
from fewbit.scaling import PerTensor

_SKIPPED = "_fewbit_skipped"


def _hf_conv1d_type():
    """transformers' GPT-2 ``Conv1D`` (a linear layer with its weight stored (in, out)), if installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


class QHFConv1D(QLinear):
    """transformers' ``Conv1D`` (y = x W + b, W of shape (in, out)) as a QLinear. It keeps the (in, out) weight
    parameter (same ``state_dict`` key and shape) and quantizes its transpose, blocks along ``in``."""

    @classmethod
    def from_hf(cls, conv, recipe: Recipe | str) -> QHFConv1D:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = conv.weight.shape
        q.weight, q.bias = conv.weight, conv.bias
        q.train(conv.training)
        q._init_quant(recipe)
        q._hf_type = type(conv)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from fewbit.nn import functional as QF

        cached = self._cached_weight(lambda w: self.quantized_weight(w.t()))
        return QF.qlinear(x, self.weight.t(), self.bias, self.recipe, self._state, cached)

    def to_float(self):
        conv = self._hf_type.__new__(self._hf_type)
        nn.Module.__init__(conv)
        conv.nf = self.out_features
        conv.nx = self.in_features
        conv.weight, conv.bias = self.weight, self.bias
        conv.train(self.training)
        return conv


def _convert_one(module: nn.Module, recipe: Recipe) -> nn.Module | None:
    if isinstance(module, _Quantized):
        return type(module).from_float(module, recipe) if isinstance(module, RECIPE_ONLY) else None
    hf_conv1d = _hf_conv1d_type()
    if type(module) is nn.Linear:
        return QLinear.from_float(module, recipe)
    if type(module) is nn.Conv2d:
        return QConv2d.from_float(module, recipe)
    if type(module) is nn.Conv1d:
        return QConv1d.from_float(module, recipe)
    if hf_conv1d is not None and type(module) is hf_conv1d:
        return QHFConv1D.from_hf(module, recipe)
    return None


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def quantize_(model: nn.Module, recipe: Recipe | str,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              layer_recipes: dict[str, Recipe | str | None] | None = None) -> nn.Module:
    """Convert ``model``'s Linear, Conv1d, Conv2d (and GPT-2 Conv1D, and fewbit's QMatmul and QAdd) layers in place.

    ``recipe``: a Recipe or a preset name. ``filter_fn(module, name)``: convert only where it returns True.
    ``layer_recipes``: ``{name pattern: recipe or None}``, first match wins; None leaves the layer in float
    (e.g. ``{"head": "bf16", "blocks.0.*": None}``). Returns ``model``.
    """
    recipe = _recipes.get(recipe)
    layer_recipes = {k: (_recipes.get(v) if v is not None else None) for k, v in (layer_recipes or {}).items()}
    skipped: dict[str, str] = {}
    converted = 0
    for name, module in list(model.named_modules()):
        if name == "" and not isinstance(module, RECIPE_ONLY):
            continue
        layer_recipe = recipe
        for pattern, override in layer_recipes.items():
            if fnmatch.fnmatchcase(name, pattern):
                layer_recipe = override
                break
        if layer_recipe is None:
            skipped[name] = "kept in float by layer_recipes"
            continue
        if filter_fn is not None and not filter_fn(module, name):
            if _has_own_params(module) or isinstance(module, RECIPE_ONLY):
                skipped[name] = "excluded by filter_fn"
            continue
        new = _convert_one(module, layer_recipe)
        if new is None:
            if _has_own_params(module) and not isinstance(module, _Quantized):
                skipped[name] = f"{type(module).__name__} has no quantized version (kept in float)"
            continue
        if new is not module:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        converted += 1
    model.__dict__[_SKIPPED] = skipped
    if converted == 0:
        warnings.warn(f"quantize_: no convertible layer in {type(model).__name__} (Linear, Conv1d, Conv2d, "
                      f"QMatmul); nothing changed. {summary_text(model)}", UserWarning, stacklevel=2)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_` in place: every quantized layer goes back to its float class (same parameters)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, _Quantized) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.to_float())
    model.__dict__.pop(_SKIPPED, None)
    return model


def _spec_name(spec) -> str:
    return str(spec) if spec is not None else "-"


def _stored(spec):
    """The spec whose QTensor has the bytes ``spec`` stores: a delayed per-tensor spec stores what its
    current-scaling twin does (codes and one scale), and needs no history to size."""
    if isinstance(spec.scaling, PerTensor) and spec.scaling.delayed:
        return current_scaling(spec)
    return spec


def _summary_table(model: nn.Module) -> tuple[Table, list[tuple[str, str]], dict]:
    table = Table(title=f"fewbit summary: {type(model).__name__}")
    for col in ["layer", "type", "recipe", "weight", "input", "grad_output", "weight bytes", "quantized bytes"]:
        table.add_column(col, justify="right" if "bytes" in col else "left")
    totals = {"float_bytes": 0, "quantized_bytes": 0, "layers": 0, "weights": 0}
    for name, module in model.named_modules():
        if not isinstance(module, _Quantized):
            continue
        r = module.recipe
        before = after = 0
        if module.weight is not None:
            w = module.weight.detach()
            before = w.numel() * w.element_size()
            weight_2d = w.t() if isinstance(module, QHFConv1D) else w.reshape(w.shape[0], -1)
            # A delayed per-tensor spec stores the same bytes as its current-scaling twin (one scale per tensor).
            after = quantize(weight_2d.float(), _stored(r.weight)).nbytes if r.weight is not None else \
                w.numel() * (2 if r.compute_format in ("bf16", "fp16") else w.element_size())
        totals["float_bytes"] += before
        totals["quantized_bytes"] += after
        totals["layers"] += 1
        totals["weights"] += module.weight.numel() if module.weight is not None else 0
        table.add_row(name or "(model)", type(module).__name__, r.name, _spec_name(r.weight), _spec_name(r.input),
                      _spec_name(r.grad_output), f"{before:,}", f"{after:,}")
    skipped = list(model.__dict__.get(_SKIPPED, {}).items())
    return table, skipped, totals


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of every parameter as stored for inference: the quantized layers' weights at their packed size
    (codes and scales), everything else (embeddings, norms, biases, unconverted layers) at its own dtype.

    Keys: ``total`` (bytes), ``quantized`` (bytes of the converted weights), ``quantized_weights`` (their element
    count), ``bits_per_weight`` (8 * quantized / quantized_weights; None when no layer is converted)."""
    _, _, totals = _summary_table(model)
    converted = {id(m.weight) for m in model.modules() if isinstance(m, _Quantized) and m.weight is not None}
    other = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in converted)
    n = totals["weights"]
    return {"total": other + totals["quantized_bytes"], "quantized": totals["quantized_bytes"],
            "quantized_weights": n, "bits_per_weight": 8 * totals["quantized_bytes"] / n if n else None}


def summary_text(model: nn.Module) -> str:
    """The summary as plain text (for logs and errors)."""
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    summary(model, console=console)
    return console.export_text()


def summary(model: nn.Module, console: Console | None = None) -> dict:
    """Print a table of the quantized layers (type, recipe, spec per role, weight bytes before and after) and every
    layer left in float with the reason; return the totals."""
    console = console or Console()
    table, skipped, totals = _summary_table(model)
    console.print(table)
    if skipped:
        console.print(f"Not converted ({len(skipped)}):")
        for name, reason in skipped:
            console.print(f"  {name or '(model)'}: {reason}")
    if totals["float_bytes"]:
        console.print(f"weights: {totals['float_bytes']:,} bytes in float, {totals['quantized_bytes']:,} quantized "
                      f"({totals['float_bytes'] / max(totals['quantized_bytes'], 1):.2f}x smaller)")
    totals["skipped"] = dict(skipped)
    return totals
