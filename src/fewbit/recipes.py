"""Recipes: which QuantSpec each role of a layer gets, plus the training hints that go with it.

A layer computes GEMMs with three operands in training: ``Y = X W^T`` forward, ``dX = dY W`` and ``dW = dY^T X``
backward. A :class:`Recipe` gives a QuantSpec (or None: stay in high precision) to each role:

- ``weight`` (W in the forward GEMM) and ``input`` (X, the activation), blocked along K, the reduction dimension;
- ``grad_output`` (dY), blocked along N for dX and along the tokens for dW;
- ``weight_backward`` and ``input_backward``: W re-quantized along N for dX and X re-quantized along the tokens
  for dW, from the high-precision tensors (as the MX paper and TransformerEngine do); by default the forward spec.

The layer fixes each spec's axis to the GEMM's reduction dimension, so a recipe only says *which* formats.
``compute_format`` ("bf16", "fp16", "tf32" or None) rounds the operands of roles without a spec, emulating 16-bit
GEMM inputs with float32 accumulation.

The other fields are read by the training loop (:mod:`fewbit.train.precision`) and leave direct-cast evaluation
alone: ``autocast`` ("bf16", "fp16" or None) runs the forward pass under ``torch.autocast`` to that format;
``param_dtype`` is the dtype the model's parameters are stored in; ``master_weight_dtype`` the dtype of the copy
the optimizer updates (a separate copy only when it differs from ``param_dtype``); ``loss_scaling`` the default loss
scaler ("none", "dynamic", "logmax", or a number: a static scale). Fields ending in ``_dtype`` name torch dtypes
(``float32``, ``bfloat16``, ``float16``); ``compute_format`` and ``autocast`` name fewbit formats.

So every precision name is one Recipe: ``train(precision="bf16")``, ``quantize_(model, "bf16")`` and
``fewbit train --recipe bf16`` all mean the ``bf16`` preset below. The presets that only change training
(``bf16_mixed``, ``fp16_mixed``, ``fp16_pure``) are listed by ``names(include_training=True)``; ``names()`` is the
list ``fewbit study`` evaluates. :func:`get` takes a preset name, a Recipe, a dict or a ``.yaml``/``.yml`` file.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from fewbit.qtensor import QuantSpec, get_spec

RECIPE_VERSION = 1
ROLES = ("weight", "input", "grad_output", "weight_backward", "input_backward")
COMPUTE_FORMATS = ("bf16", "fp16", "tf32")
AUTOCAST_FORMATS = ("bf16", "fp16")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_SCALING = ("none", "dynamic", "logmax")  # or a positive number: a static scale
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Recipe:
    """Which QuantSpec each role gets (None: high precision), and how to train under it (see the module
    docstring). Validated on construction.

    Specs may be given by name (``"mxfp8_e4m3"``); they are resolved to :class:`~fewbit.QuantSpec`.
    ``master_weight_dtype`` must equal ``param_dtype`` (no separate copy) or be ``float32`` (a float32 master copy
    of lower-precision parameters, the mixed precision paper's method).
    """

    name: str = "custom"
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    grad_output: QuantSpec | None = None
    weight_backward: QuantSpec | None = None
    input_backward: QuantSpec | None = None
    compute_format: str | None = None
    autocast: str | None = None
    param_dtype: str = "float32"
    master_weight_dtype: str = "float32"
    loss_scaling: str | float = "none"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        for role in ROLES:
            value = getattr(self, role)
            if value is not None and not isinstance(value, QuantSpec):
                try:
                    value = get_spec(value)
                except (ValueError, TypeError) as error:
                    raise ValueError(f"recipe {self.name!r}, role {role!r}: {error}") from None
                object.__setattr__(self, role, value)
        # The backward re-quantization defaults to the forward spec of the same operand.
        if self.weight_backward is None and self.weight is not None:
            object.__setattr__(self, "weight_backward", self.weight)
        if self.input_backward is None and self.input is not None:
            object.__setattr__(self, "input_backward", self.input)
        if self.compute_format not in (None, *COMPUTE_FORMATS):
            raise ValueError(f"recipe {self.name!r}: compute_format {self.compute_format!r}; valid: None, "
                             f"{', '.join(map(repr, COMPUTE_FORMATS))}")
        if self.autocast not in (None, *AUTOCAST_FORMATS):
            raise ValueError(f"recipe {self.name!r}: autocast {self.autocast!r}; valid: None, "
                             f"{', '.join(map(repr, AUTOCAST_FORMATS))}")
        for key in ("param_dtype", "master_weight_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"recipe {self.name!r}: {key} {getattr(self, key)!r}; valid: {', '.join(DTYPES)}")
        if self.master_weight_dtype not in (self.param_dtype, "float32"):
            raise ValueError(f"recipe {self.name!r}: master_weight_dtype {self.master_weight_dtype} with "
                             f"param_dtype {self.param_dtype}; the optimizer's copy must be the parameters "
                             f"themselves (master_weight_dtype={self.param_dtype!r}) or wider (float32)")
        scaling = self.loss_scaling
        if isinstance(scaling, bool) or not (scaling in LOSS_SCALING or (isinstance(scaling, int | float)
                                                                          and scaling > 0)):
            raise ValueError(f"recipe {self.name!r}: loss_scaling {scaling!r}; valid: {', '.join(LOSS_SCALING)}, "
                             "or a positive number (a static scale)")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe {self.name!r} has version {self.version}; this fewbit reads version "
                             f"{RECIPE_VERSION}")

    @property
    def is_identity(self) -> bool:
        """True when the recipe leaves every layer's arithmetic as it is (no spec, no compute format), so
        ``quantize_`` has nothing to do: fp32, and the training-only presets (bf16_mixed, fp16_mixed, fp16_pure),
        whose fields only the training loop reads."""
        return all(getattr(self, r) is None for r in ROLES) and self.compute_format is None

    def specs(self) -> dict[str, QuantSpec | None]:
        return {role: getattr(self, role) for role in ROLES}

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, QuantSpec) else value
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        """The inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"a recipe is a mapping of its fields, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(valid)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; valid: {sorted(valid)}")
        values = {k: QuantSpec.from_dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        return cls(**values)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | os.PathLike) -> Recipe:
        """A recipe from YAML text, or from a ``.yaml``/``.yml`` file (see :func:`load`)."""
        if isinstance(text_or_path, os.PathLike) or Path(str(text_or_path)).suffix in YAML_SUFFIXES:
            return load(text_or_path)
        import yaml

        return cls.from_dict(yaml.safe_load(text_or_path))

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)


def _preset(name: str, **fields) -> Recipe:
    return Recipe(name=name, **fields)


# What `fewbit study` evaluates, in its order; each also trains (fp16 with dynamic loss scaling).
_STUDY: dict[str, Recipe] = {
    r.name: r
    for r in [
        _preset("fp32"),
        _preset("bf16", compute_format="bf16"),
        _preset("fp16", compute_format="fp16", loss_scaling="dynamic"),
        _preset("fp8", weight="fp8_e4m3_delayed", input="fp8_e4m3_delayed", grad_output="fp8_e5m2_delayed"),
        _preset("fp8_current", weight="fp8_e4m3_tensor", input="fp8_e4m3_tensor", grad_output="fp8_e5m2_tensor"),
        _preset("mxfp8", weight="mxfp8_e4m3", input="mxfp8_e4m3", grad_output="mxfp8_e5m2"),
        _preset("mxfp6", weight="mxfp6_e2m3", input="mxfp6_e2m3", grad_output="mxfp6_e3m2"),
        _preset("mxfp6_e3m2", weight="mxfp6_e3m2", input="mxfp6_e3m2", grad_output="mxfp6_e3m2"),
        _preset("mxfp6_e2m3", weight="mxfp6_e2m3", input="mxfp6_e2m3", grad_output="mxfp6_e2m3"),
        _preset("mxfp4", weight="mxfp4_e2m1", input="mxfp6_e2m3", grad_output="mxfp8_e5m2"),
        _preset("mxfp4_a8", weight="mxfp4_e2m1", input="mxfp8_e4m3", grad_output="mxfp8_e5m2"),
        _preset("mxfp4_a4", weight="mxfp4_e2m1", input="mxfp4_e2m1", grad_output="mxfp8_e5m2"),
        _preset("mxint8", weight="mxint8", input="mxint8", grad_output="mxint8"),
        _preset("int8", weight="int8_channel", input="int8_tensor"),
        _preset("w4a16", weight="int4_group128", compute_format="bf16"),
    ]
}
# Training-only: they change how the loop runs (autocast, parameter storage), not a layer's arithmetic, so a
# directly cast model evaluates as in fp32 under them.
_TRAINING: dict[str, Recipe] = {
    r.name: r
    for r in [
        _preset("bf16_mixed", autocast="bf16"),
        _preset("fp16_mixed", autocast="fp16", loss_scaling="dynamic"),
        _preset("fp16_pure", param_dtype="float16", master_weight_dtype="float32", loss_scaling="dynamic"),
    ]
}
_PRESETS: dict[str, Recipe] = {**_STUDY, **_TRAINING}


def names(include_training: bool = False) -> list[str]:
    """Names of the preset recipes: the ones ``fewbit study`` evaluates, in its order; with ``include_training``
    also the training-only presets (bf16_mixed, fp16_mixed, fp16_pure) after them."""
    return list(_PRESETS if include_training else _STUDY)


def load(path: str | os.PathLike) -> Recipe:
    """A recipe from a YAML file of its fields (as :meth:`Recipe.to_yaml` writes); without a ``name`` key it is
    named after the file. A missing file, bad YAML or a bad field raises ValueError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"recipe file {path} does not exist") from None
    except OSError as error:
        raise ValueError(f"recipe file {path} cannot be read: {error}") from None
    try:
        fields = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"recipe file {path} is not valid YAML: {error}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"recipe file {path} must hold a mapping of recipe fields (name: ..., weight: ...), got "
                         f"{type(fields).__name__}")
    try:
        return Recipe.from_dict({"name": path.stem, **fields})
    except (ValueError, TypeError) as error:
        raise ValueError(f"recipe file {path}: {error}") from None


def get(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A recipe from a preset name (``names(include_training=True)``), a path to a ``.yaml``/``.yml`` file
    (:func:`load`), a dict of fields (:meth:`Recipe.from_dict`), or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and recipe.endswith(YAML_SUFFIXES)):
        return load(recipe)
    if not isinstance(recipe, str):
        raise TypeError(f"a recipe is a preset name, a .yaml path, a dict or a Recipe, got {type(recipe).__name__}")
    if recipe not in _PRESETS:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(_STUDY)}; training-only: "
                         f"{', '.join(_TRAINING)}; or a path to a .yaml/.yml recipe file")
    return _PRESETS[recipe]
