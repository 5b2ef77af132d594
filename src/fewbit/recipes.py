"""Recipes: which QuantSpec each role of a layer gets, plus the training hints that go with it.

A layer computes GEMMs with three operands in training: ``Y = X W^T`` forward, ``dX = dY W`` and ``dW = dY^T X``
backward. A :class:`Recipe` gives a QuantSpec (or None: stay in high precision) to each role:

- ``weight`` (W in the forward GEMM) and ``input`` (X, the activation), blocked along K, the reduction dimension;
- ``grad_output`` (dY), blocked along N for dX and along the tokens for dW;
- ``weight_backward`` and ``input_backward``: W re-quantized along N for dX and X re-quantized along the tokens
  for dW, from the high-precision tensors (as the MX paper and TransformerEngine do); by default the forward spec.

The layer fixes each spec's axis to the GEMM's reduction dimension, so a recipe only says *which* formats.
``compute_format`` ("bf16", "fp16" or None) rounds the operands of roles without a spec, emulating 16-bit GEMM
inputs with float32 accumulation. ``master_weight_dtype`` and ``loss_scaling`` are hints for the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fewbit.qtensor import QuantSpec, get_spec

RECIPE_VERSION = 1
ROLES = ("weight", "input", "grad_output", "weight_backward", "input_backward")
_LOSS_SCALING = ("none", "static", "dynamic")


@dataclass(frozen=True)
class Recipe:
    """Which QuantSpec each role gets (None: high precision), and training hints. Validated on construction.

    Specs may be given by name (``"mxfp8_e4m3"``); they are resolved to :class:`~fewbit.QuantSpec`.
    """

    name: str = "custom"
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    grad_output: QuantSpec | None = None
    weight_backward: QuantSpec | None = None
    input_backward: QuantSpec | None = None
    compute_format: str | None = None
    master_weight_dtype: str = "float32"
    loss_scaling: str = "none"
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
        if self.compute_format not in (None, "bf16", "fp16", "tf32"):
            raise ValueError(f"recipe {self.name!r}: compute_format {self.compute_format!r}; valid: None, 'bf16', "
                             "'fp16', 'tf32'")
        if self.master_weight_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"recipe {self.name!r}: master_weight_dtype {self.master_weight_dtype!r}; valid: "
                             "float32, bfloat16, float16")
        if self.loss_scaling not in _LOSS_SCALING:
            raise ValueError(f"recipe {self.name!r}: loss_scaling {self.loss_scaling!r}; valid: "
                             f"{', '.join(_LOSS_SCALING)}")
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe {self.name!r} has version {self.version}; this fewbit reads version "
                             f"{RECIPE_VERSION}")

    @property
    def is_identity(self) -> bool:
        """True when the recipe changes nothing (fp32)."""
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
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - valid
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(unknown)}; valid: {sorted(valid)}")
        values = {k: QuantSpec.from_dict(v) if isinstance(v, dict) else v for k, v in d.items()}
        return cls(**values)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> Recipe:
        import yaml

        text = Path(text_or_path).read_text() if Path(str(text_or_path)).suffix in (".yaml", ".yml") else text_or_path
        return cls.from_dict(yaml.safe_load(text))

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)


def _preset(name: str, **roles) -> Recipe:
    return Recipe(name=name, **roles)


_PRESETS: dict[str, Recipe] = {
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
        _preset("mxint8", weight="mxint8", input="mxint8", grad_output="mxint8"),
        _preset("int8", weight="int8_channel", input="int8_tensor"),
        _preset("w4a16", weight="int4_group128", compute_format="bf16"),
    ]
}


def names() -> list[str]:
    """Names of the preset recipes."""
    return list(_PRESETS)


def get(recipe: str | Recipe) -> Recipe:
    """A preset recipe by name (a Recipe is returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in _PRESETS:
        raise ValueError(f"unknown recipe {recipe!r}; valid: {', '.join(_PRESETS)}")
    return _PRESETS[recipe]
