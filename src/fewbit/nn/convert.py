"""``quantize_(model, recipe)``: swap a model's layers for their quantized versions in place; ``summary(model)``.

No global patching: only the modules of the given model change. Which float layer becomes which quantized layer is
a registry keyed by the module's exact type (:func:`register_conversion`; torchao's
``register_quantize_module_handler`` is the model): ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` are registered
here, transformers' GPT-2 ``Conv1D`` in :mod:`fewbit.nn.hf`, loaded only when a model holds a transformers layer.
A subclass of a registered type is not converted unless it is registered itself: its ``forward`` may do something
the quantized layer does not.

Per-layer recipes by name pattern (fnmatch) let the first and last layers stay in higher precision. Every layer that
was not converted is recorded with its reason (:func:`skipped_layers`) and listed by :func:`summary`, which returns
a :class:`ModelSummary` record; :mod:`fewbit.report.layers` renders it.
"""

from __future__ import annotations

import fnmatch
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fewbit import recipes as _recipes
from fewbit.nn.functional import current_scaling
from fewbit.nn.modules import RECIPE_ONLY, QConv1d, QConv2d, QLinear, QuantizedModule, quantized_layers
from fewbit.qtensor import quantize
from fewbit.recipes import Recipe
from fewbit.scaling import PerTensor

__all__ = ["ConvertFn", "LayerRow", "ModelSummary", "conversion_for", "dequantize_", "mark_skipped", "quantize_",
           "register_conversion", "replace_module", "skipped_layers", "summary", "weight_bytes"]

ConvertFn = Callable[[nn.Module, Recipe], nn.Module]

_CONVERSIONS: dict[type[nn.Module], ConvertFn] = {}

# Conversions for optional libraries, registered by importing a fewbit module, keyed by the library's top-level
# package. A model can only hold a type of the library if the library is imported, so importing fewbit never
# imports it.
_LAZY_CONVERSIONS = {"transformers": "fewbit.nn.hf"}

# Where quantize_ keeps the skipped layers of a model: in its __dict__, so deepcopy and pickle carry it along
# and it is neither a parameter, a buffer nor a submodule.
_SKIPPED = "_fewbit_skipped"


def register_conversion(float_type: type[nn.Module], convert_fn: ConvertFn | None = None):
    """Make :func:`quantize_` convert modules of exactly ``float_type`` with ``convert_fn(module, recipe)``, which
    returns the quantized module (a :class:`~fewbit.nn.QuantizedModule`, sharing ``module``'s parameters). A later
    registration of the same type replaces the earlier one. Subclasses of ``float_type`` are not covered: register
    each. Without ``convert_fn`` it is a decorator::

        @register_conversion(MyLinear)
        def _(module, recipe):
            return MyQLinear.from_float(module, recipe)
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise TypeError(f"register_conversion: float_type={float_type!r}; expected a subclass of torch.nn.Module")

    def register(fn: ConvertFn) -> ConvertFn:
        if not callable(fn):
            raise TypeError(f"register_conversion({float_type.__name__}): convert_fn={fn!r} is not callable; "
                            "expected convert_fn(module, recipe) -> quantized module")
        _CONVERSIONS[float_type] = fn
        return fn

    return register if convert_fn is None else register(convert_fn)


def conversion_for(float_type: type[nn.Module]) -> ConvertFn | None:
    """The conversion registered for exactly ``float_type``, or None."""
    if float_type not in _CONVERSIONS:
        lazy = _LAZY_CONVERSIONS.pop(float_type.__module__.partition(".")[0], None)  # tried once
        if lazy is not None:
            try:
                importlib.import_module(lazy)
            except ImportError as error:  # a library version without the layer: its modules stay unconverted
                warnings.warn(f"fewbit: {lazy} could not register its conversions ({error}); layers of that "
                              "library stay in float", UserWarning, stacklevel=2)
    return _CONVERSIONS.get(float_type)


register_conversion(nn.Linear, QLinear.from_float)
register_conversion(nn.Conv1d, QConv1d.from_float)
register_conversion(nn.Conv2d, QConv2d.from_float)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` in place of ``model``'s submodule ``name`` (dotted, as in ``named_modules``: ``"blocks.0.fc"``,
    ``"head"``); returns the module it replaced. The model itself (``name=""``) cannot be replaced in place."""
    if not isinstance(new, nn.Module):
        raise TypeError(f"replace_module: new={type(new).__name__}; expected a torch.nn.Module")
    if not name:
        raise ValueError("replace_module: name='' is the model itself, which cannot be replaced in place; "
                         "name a submodule (as listed by model.named_modules())")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise AttributeError(f"replace_module: {type(model).__name__} has no submodule {name!r}; submodules are "
                             "named as in model.named_modules() (e.g. 'blocks.0.fc')")
    old = parent._modules[child]
    setattr(parent, child, new)
    return old


def skipped_layers(model: nn.Module) -> dict[str, str]:
    """``{layer name: reason}`` for every layer that :func:`quantize_` (or :func:`fewbit.ptq`) left in float, as
    recorded on the model; empty for a model that was never converted. A copy: change it with
    :func:`mark_skipped`."""
    return dict(model.__dict__.get(_SKIPPED, {}))


def mark_skipped(model: nn.Module, name: str, reason: str) -> None:
    """Record that ``model``'s layer ``name`` stays in float, and why (listed by :func:`summary`)."""
    model.__dict__.setdefault(_SKIPPED, {})[name] = reason


def _convert_one(module: nn.Module, recipe: Recipe) -> nn.Module | None:
    if isinstance(module, QuantizedModule):
        return type(module).from_float(module, recipe) if isinstance(module, RECIPE_ONLY) else None
    convert = conversion_for(type(module))
    return convert(module, recipe) if convert is not None else None


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def quantize_(model: nn.Module, recipe: Recipe | str,
              filter_fn: Callable[[nn.Module, str], bool] | None = None,
              layer_recipes: dict[str, Recipe | str | None] | None = None) -> nn.Module:
    """Convert ``model``'s layers of a registered type (Linear, Conv1d, Conv2d, GPT-2's Conv1D; see
    :func:`register_conversion`) and fewbit's QMatmul and QAdd, in place.

    ``recipe``: a Recipe or a preset name. ``filter_fn(module, name)``: convert only where it returns True.
    ``layer_recipes``: ``{name pattern: recipe or None}``, first match wins; None leaves the layer in float
    (e.g. ``{"head": "bf16", "blocks.0.*": None}``). Layers with parameters that are not converted are recorded
    with the reason (:func:`skipped_layers`), replacing the record of an earlier call. Warns when nothing was
    converted. Returns ``model``.
    """
    recipe = _recipes.get(recipe)
    layer_recipes = {k: (_recipes.get(v) if v is not None else None) for k, v in (layer_recipes or {}).items()}
    skipped: dict[str, str] = {}
    converted = 0
    names = [name for name, _ in model.named_modules() if name]
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
            if _has_own_params(module) and not isinstance(module, QuantizedModule):
                skipped[name] = f"{type(module).__name__} has no quantized version (kept in float)"
            continue
        if new is not module:
            replace_module(model, name, new)
        converted += 1
    model.__dict__[_SKIPPED] = skipped
    for pattern in layer_recipes:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.warn(f"quantize_: layer_recipes pattern {pattern!r} matches no layer of {type(model).__name__}, "
                          f"so it changes nothing (patterns are fnmatch patterns over module names such as "
                          f"{', '.join(repr(n) for n in names[:4])}{', ...' if len(names) > 4 else ''})",
                          UserWarning, stacklevel=2)
    if converted == 0:
        already = sum(1 for _ in quantized_layers(model))
        listed = "; ".join(f"{name or '(model)'}: {reason}" for name, reason in skipped.items())
        warnings.warn(f"quantize_: no convertible layer in {type(model).__name__} (Linear, Conv1d, Conv2d, "
                      f"QMatmul); nothing changed. {already} layer(s) already quantized. Not converted "
                      f"({len(skipped)}){': ' + listed if listed else ''}", UserWarning, stacklevel=2)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo :func:`quantize_` in place: every quantized layer goes back to its float class (same parameters)."""
    for name, module in list(quantized_layers(model)):
        if name:
            replace_module(model, name, module.to_float())
    model.__dict__.pop(_SKIPPED, None)
    return model


# ---- summary -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerRow:
    """One quantized layer in a :class:`ModelSummary`. Spec names are ``"-"`` for a role the recipe leaves in
    float. ``float_bytes``: the weight at its own dtype; ``quantized_bytes``: as stored for inference (codes and
    scales, or 2 bytes per element under a bf16/fp16 ``compute_format``); both 0 for a layer without weights."""

    name: str  # "" for the model itself
    type: str  # the module's class name, e.g. "QLinear"
    recipe: str
    weight: str
    input: str
    grad_output: str
    float_bytes: int
    quantized_bytes: int
    weights: int  # weight elements
    tied_to: str | None = None  # the first layer holding the same weight (a tied weight is stored, and counted, once)


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`summary` found: one :class:`LayerRow` per quantized layer, the layers left in float with the
    reason, and totals. ``summary["float_bytes"]`` etc. read :attr:`totals` (the dict ``summary`` returned
    before it returned a record)."""

    model: str  # the model's class name
    rows: tuple[LayerRow, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def _counted(self) -> list[LayerRow]:
        return [r for r in self.rows if r.tied_to is None]

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self._counted())

    @property
    def quantized_bytes(self) -> int:
        return sum(r.quantized_bytes for r in self._counted())

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self._counted())

    @property
    def totals(self) -> dict:
        """``float_bytes``, ``quantized_bytes`` and ``weights`` summed over the quantized layers (a weight tied
        between layers counted once), ``layers`` (their count) and ``skipped`` (``{name: reason}``)."""
        return {"float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes, "layers": len(self.rows),
                "weights": self.weights, "skipped": dict(self.skipped)}

    def __getitem__(self, key: str):
        totals = self.totals
        if key not in totals:
            raise KeyError(f"ModelSummary has no total {key!r}; totals: {', '.join(totals)} (rows: .rows)")
        return totals[key]


def _spec_name(spec) -> str:
    return str(spec) if spec is not None else "-"


def _stored(spec):
    """The spec whose QTensor has the bytes ``spec`` stores: a delayed per-tensor spec stores what its
    current-scaling twin does (codes and one scale), and needs no history to size."""
    if isinstance(spec.scaling, PerTensor) and spec.scaling.delayed:
        return current_scaling(spec)
    return spec


def _row(name: str, module: QuantizedModule, tied_to: str | None = None) -> LayerRow:
    r = module.recipe
    before = after = count = 0
    if module.weight is not None:
        w = module.weight.detach()
        count = w.numel()
        before = count * w.element_size()
        if r.weight is not None:
            after = quantize(module.weight_matrix().detach().float(), _stored(r.weight)).nbytes
        else:
            after = count * (2 if r.compute_format in ("bf16", "fp16") else w.element_size())
    return LayerRow(name=name, type=type(module).__name__, recipe=r.name, weight=_spec_name(r.weight),
                    input=_spec_name(r.input), grad_output=_spec_name(r.grad_output), float_bytes=before,
                    quantized_bytes=after, weights=count, tied_to=tied_to)


def summary(model: nn.Module) -> ModelSummary:
    """The quantized layers of ``model`` (type, recipe, spec per role, weight bytes before and after) and every
    layer left in float with the reason, as a record; prints nothing (render it with
    :func:`fewbit.report.layers.model_summary_table` or ``model_summary_text``)."""
    first_holder: dict[int, str] = {}
    rows = []
    for name, module in quantized_layers(model):
        key = id(module.weight) if module.weight is not None else None
        tied_to = first_holder.get(key) if key is not None else None
        if key is not None:
            first_holder.setdefault(key, name)
        rows.append(_row(name, module, tied_to))
    return ModelSummary(model=type(model).__name__, rows=tuple(rows), skipped=skipped_layers(model))


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of every parameter as stored for inference: the quantized layers' weights at their packed size
    (codes and scales), everything else (embeddings, norms, biases, unconverted layers) at its own dtype.

    Keys: ``total`` (bytes), ``quantized`` (bytes of the converted weights), ``quantized_weights`` (their element
    count), ``bits_per_weight`` (8 * quantized / quantized_weights; None when no layer is converted)."""
    record = summary(model)
    converted = {id(m.weight) for _, m in quantized_layers(model) if m.weight is not None}
    other = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in converted)
    n = record.weights
    return {"total": other + record.quantized_bytes, "quantized": record.quantized_bytes,
            "quantized_weights": n, "bits_per_weight": 8 * record.quantized_bytes / n if n else None}
