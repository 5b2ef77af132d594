"""QuantSpec (how one tensor is quantized), QTensor (a quantized tensor), quantize / fake_quantize, save / load.

``quantize(x, spec)`` returns a :class:`QTensor` holding one uint8 code per element (``qdata``, in ``x``'s shape)
and one scale per group (``scale``: E8M0 codes for MX blocks, float32 otherwise); ``dequantize()`` gives back
``decode(qdata) * scale``. ``fake_quantize(x, spec)`` equals ``quantize(x, spec).dequantize()`` bit for bit and
runs as one fused pass.

Integer elements are symmetric (``-(2^(b-1) - 1) .. 2^(b-1) - 1``: int8 never uses -128, int4 never -8) unless the
spec says ``symmetric=False``. Under MX block scaling an integer element is OCP fixed point with ``bits - 2``
fraction bits: MXINT8 elements are ``code / 64`` (max 127/64); with the default symmetric range code 0x80 (-2.0)
is never produced (``symmetric=False`` allows it, as the OCP reading does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewbit import atomic, formats
from fewbit.choices import Overflow, Rounding, parse_choice
from fewbit.formats import Format
from fewbit.kernels import cast as cast_kernel
from fewbit.kernels import quantize as quantize_kernel
from fewbit.kernels.e8m0 import e8m0_to_float
from fewbit.scaling import AmaxHistory, Block, GroupLayout, PerAxis, PerGroup, PerTensor, Scaling, amax_scale, layout

__all__ = ["QTensor", "QuantSpec", "fake_quantize", "get_spec", "load", "quantize", "spec_names"]

FILE_VERSION = 1


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: element format, scaling, rounding and overflow rule.

    Examples: ``QuantSpec("fp6_e3m2", Block(32))`` is MXFP6; ``QuantSpec("int8", PerAxis(0))`` is per-channel
    INT8 for a (out, in) weight; ``QuantSpec("fp8_e4m3", PerTensor(delayed=True))`` is TransformerEngine-style FP8.
    """

    format: Format
    scaling: Scaling = field(default_factory=PerTensor)
    rounding: Rounding = Rounding.NEAREST_EVEN
    overflow: Overflow = Overflow.SATURATE
    symmetric: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", formats.get(self.format))
        object.__setattr__(self, "rounding", parse_choice(Rounding, self.rounding, "rounding"))
        object.__setattr__(self, "overflow", parse_choice(Overflow, self.overflow, "overflow"))
        fmt = self.format
        if not isinstance(self.scaling, PerTensor | PerAxis | PerGroup | Block):
            raise TypeError(f"scaling must be PerTensor, PerAxis, PerGroup or Block, got {self.scaling!r}")
        if fmt.bits > 8:
            raise ValueError(f"QuantSpec element formats have at most 8 bits; {fmt.name} has {fmt.bits} "
                             "(use fewbit.cast for bf16/fp16)")
        if fmt.name == "e8m0":
            raise ValueError("e8m0 is a scale format (no zero, no sign); choose an element format")
        if not fmt.signed:
            raise ValueError(f"{fmt.name} is unsigned; QuantSpec scales symmetrically, use a signed format")
        if isinstance(self.scaling, Block) and self.overflow != Overflow.SATURATE:
            raise ValueError("MX block scaling saturates elements (OCP MX); overflow must be 'saturate'")

    @property
    def is_mx(self) -> bool:
        return isinstance(self.scaling, Block)

    @property
    def fixed_point(self) -> int:
        """Fraction bits of an integer element under MX scaling (MXINT8: 6), else 0."""
        return self.format.bits - 2 if self.is_mx and self.format.is_int else 0

    @property
    def element_max(self) -> float:
        """Largest element magnitude the scale maps amax onto (symmetric integers: 2^(b-1) - 1)."""
        return self.format.max

    @property
    def element_params(self) -> cast_kernel.ElementParams:
        """The element grid the kernels round onto: the format's, with the negative limit at ``-max`` when
        ``symmetric`` (integers: -127 for int8, not -128)."""
        return self.format.element_params(symmetric=self.symmetric)

    @property
    def emax(self) -> int:
        """Exponent of the element's largest power of two, in element units (MXINT8: 0)."""
        return 0 if self.format.is_int and self.is_mx else self.format.emax

    def replace(self, **overrides) -> QuantSpec:
        """A copy with fields of the spec or of its scaling replaced (``scale_mode="rceil"``, ``axis=0``, ...)."""
        spec_fields = {f.name for f in dataclasses.fields(self)}
        scaling_fields = {f.name for f in dataclasses.fields(self.scaling)}
        unknown = set(overrides) - spec_fields - scaling_fields
        if unknown:
            raise ValueError(f"unknown override(s) {sorted(unknown)} for {type(self.scaling).__name__} scaling; "
                             f"valid: {sorted(spec_fields | scaling_fields)}")
        scaling = dataclasses.replace(self.scaling, **{k: v for k, v in overrides.items() if k in scaling_fields})
        rest = {k: v for k, v in overrides.items() if k in spec_fields}
        return dataclasses.replace(self, scaling=rest.pop("scaling", scaling), **rest)

    def to_dict(self) -> dict:
        scaling = {f.name: _plain(getattr(self.scaling, f.name)) for f in dataclasses.fields(self.scaling)}
        return {"format": self.format.name, "scaling": {"kind": type(self.scaling).__name__, **scaling},
                "rounding": self.rounding.value, "overflow": self.overflow.value, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        scaling = dict(d["scaling"])
        kinds = {k.__name__: k for k in (PerTensor, PerAxis, PerGroup, Block)}
        kind = scaling.pop("kind")
        if kind not in kinds:
            raise ValueError(f"unknown scaling kind {kind!r}; valid: {', '.join(kinds)}")
        return cls(d["format"], kinds[kind](**scaling), d["rounding"], d["overflow"], d.get("symmetric", True))

    def __str__(self) -> str:
        static = isinstance(self.scaling, PerTensor) and self.scaling.amax is not None
        plain = self.replace(amax=None) if static else self
        suffix = f"@amax={self.scaling.amax:.4g}" if static else ""
        for name, spec in _SPECS.items():
            if spec == plain:
                return name + suffix
        return f"{self.format.name}/{type(self.scaling).__name__}{suffix}"


def _plain(value):
    return value.value if hasattr(value, "value") else value


_SPECS: dict[str, QuantSpec] = {
    "mxfp8_e4m3": QuantSpec("fp8_e4m3", Block(32)),
    "mxfp8_e5m2": QuantSpec("fp8_e5m2", Block(32)),
    "mxfp6_e3m2": QuantSpec("fp6_e3m2", Block(32)),
    "mxfp6_e2m3": QuantSpec("fp6_e2m3", Block(32)),
    "mxfp4_e2m1": QuantSpec("fp4_e2m1", Block(32)),
    "mxint8": QuantSpec("int8", Block(32)),
    "fp8_e4m3_tensor": QuantSpec("fp8_e4m3", PerTensor()),
    "fp8_e5m2_tensor": QuantSpec("fp8_e5m2", PerTensor()),
    "fp8_e4m3_delayed": QuantSpec("fp8_e4m3", PerTensor(delayed=True)),
    "fp8_e5m2_delayed": QuantSpec("fp8_e5m2", PerTensor(delayed=True)),
    "int8_tensor": QuantSpec("int8", PerTensor()),
    "int8_channel": QuantSpec("int8", PerAxis(0)),
    "int4_group32": QuantSpec("int4", PerGroup(32)),
    "int4_group64": QuantSpec("int4", PerGroup(64)),
    "int4_group128": QuantSpec("int4", PerGroup(128)),
}


def spec_names() -> list[str]:
    """Names of the built-in QuantSpecs."""
    return list(_SPECS)


def get_spec(spec: str | QuantSpec, **overrides) -> QuantSpec:
    """A QuantSpec by name (or as given), with ``overrides`` applied."""
    if isinstance(spec, str):
        if spec not in _SPECS:
            raise ValueError(f"unknown quantization spec {spec!r}; valid: {', '.join(_SPECS)}")
        spec = _SPECS[spec]
    elif not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec or a name, got {type(spec).__name__}")
    return spec.replace(**overrides) if overrides else spec


# ---- the quantized tensor -------------------------------------------------------------------------------------


@dataclass
class QTensor:
    """A quantized tensor: ``qdata`` (uint8 codes, one per element, in ``shape``), ``scale`` (one per group:
    uint8 E8M0 codes for MX, float32 otherwise; shaped like the blocked tensor), the spec, and the original
    shape and dtype."""

    qdata: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype

    @property
    def layout(self) -> GroupLayout:
        return layout(tuple(self.shape), self.spec.scaling)

    def scale_values(self) -> torch.Tensor:
        """The scales as float32 (E8M0 codes decoded; NaN for the NaN code)."""
        return e8m0_to_float(self.scale) if self.spec.is_mx else self.scale

    def dequantize(self) -> torch.Tensor:
        """``decode(qdata) * scale`` in the original dtype (exact in float32; 16-bit dtypes round once)."""
        fmt = self.spec.format
        values = formats.decode(self.qdata.reshape(-1), fmt).reshape(self.shape)
        if self.spec.fixed_point:
            values = values * (1.0 / (1 << self.spec.fixed_point))
        lay = self.layout
        groups = lay.to_groups(values) * lay.scale_to_groups(self.scale_values())
        return lay.from_groups(groups).to(self.dtype)

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / max(self.qdata.numel(), 1)

    @property
    def nbytes(self) -> int:
        """True storage size: packed codes (``ceil(n * bits / 8)``; 6-bit codes in 3-byte groups) plus scales.
        MXFP4: 4 bits per element + 8 bits per 32 = 4.25 bits per element."""
        n, bits = self.qdata.numel(), self.spec.format.bits
        code_bytes = 3 * math.ceil(n / 4) if bits == 6 else math.ceil(n * bits / 8)
        return code_bytes + self.scale.numel() * self.scale.element_size()

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (packed codes, scales, JSON metadata), atomically."""
        from safetensors.torch import save as st_save

        metadata = {"fewbit_qtensor": str(FILE_VERSION), "spec": json.dumps(self.spec.to_dict()),
                    "shape": json.dumps(list(self.shape)), "dtype": str(self.dtype).removeprefix("torch.")}
        payload = st_save({"qdata": formats.pack(self.qdata, self.spec.format.bits),
                           "scale": self.scale.contiguous()}, metadata=metadata)
        atomic.write_bytes(path, payload)

    def __repr__(self) -> str:
        return (f"QTensor({self.spec!s}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.bits_per_element:.2f} bits/element)")


def load(path: str | os.PathLike) -> QTensor:
    """Read a QTensor written by :meth:`QTensor.save` (safetensors: no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable fewbit QTensor file ({error}); it may be truncated") from None
    if metadata.get("fewbit_qtensor") != str(FILE_VERSION):
        raise ValueError(f"{path}: not a fewbit QTensor file of version {FILE_VERSION} "
                         f"(metadata {sorted(metadata)})")
    spec = QuantSpec.from_dict(json.loads(metadata["spec"]))
    shape = torch.Size(json.loads(metadata["shape"]))
    dtype = getattr(torch, metadata["dtype"])
    qdata = formats.unpack(tensors["qdata"], spec.format.bits, shape.numel()).reshape(shape)
    return QTensor(qdata, tensors["scale"], spec, shape, dtype)


# ---- quantize -------------------------------------------------------------------------------------------------


def _prepare(x: torch.Tensor, spec: str | QuantSpec, overrides: dict, generator, what: str):
    spec = get_spec(spec, **overrides)
    formats._check_input(x, what)
    lay = layout(tuple(x.shape), spec.scaling)
    xg = lay.to_groups(x.float()).contiguous()
    random_bits = None
    if spec.rounding == Rounding.STOCHASTIC:
        random_bits = torch.randint(0, 1 << 23, xg.shape, generator=generator, dtype=torch.int32, device=x.device)
    return spec, lay, xg, random_bits


def _float_scale(xg: torch.Tensor, spec: QuantSpec, history: AmaxHistory | None) -> torch.Tensor:
    scaling = spec.scaling
    if isinstance(scaling, PerTensor) and scaling.amax is not None:  # static (calibrated): the tensor is not read
        amax = torch.full((1, 1), scaling.amax, dtype=torch.float32, device=xg.device)
        return amax_scale(amax, spec.element_max, scaling.margin, scaling.power_of_two)
    amax = quantize_kernel.row_amax(xg.view(torch.int32))  # NaN rows give a NaN amax, hence a NaN scale
    if isinstance(scaling, PerTensor) and scaling.delayed:
        if history is None:
            raise ValueError("delayed scaling needs an AmaxHistory: quantize(x, spec, history=AmaxHistory())")
        current = amax.reshape(())
        amax = history.amax(current).reshape(1, 1).to(xg.device)
        history.record(current)
    margin = scaling.margin if isinstance(scaling, PerTensor) else 0
    power_of_two = isinstance(scaling, PerTensor) and scaling.power_of_two
    return amax_scale(amax, spec.element_max, margin, power_of_two)


def _mx_kernel(spec: QuantSpec, fake: bool):
    fmt = spec.format
    return quantize_kernel.mx_kernel(fake, spec.scaling.scale_mode, spec.emax, float(spec.element_max),
                                     fmt.mbits, spec.fixed_point, spec.rounding)


def quantize(x: torch.Tensor, spec: str | QuantSpec, *, history: AmaxHistory | None = None,
             generator: torch.Generator | None = None, **overrides) -> QTensor:
    """Quantize ``x`` (float32, bfloat16, float16) by ``spec`` (a QuantSpec or a name such as ``"mxfp8_e4m3"``).

    ``overrides`` replace spec or scaling fields (``scale_mode="rceil"``, ``axis=0``, ``block_size=16``).
    ``history``: the :class:`~fewbit.scaling.AmaxHistory` for delayed per-tensor scaling (updated in place).
    A blocked axis whose length is not a multiple of the block size is zero-padded internally.
    """
    spec, lay, xg, random_bits = _prepare(x, spec, overrides, generator, "quantize")
    elem_params = spec.element_params.as_tensor(cast_kernel.FLOAT32).to(x.device)
    enc_params = spec.format.encoding_params().as_tensor().to(x.device)
    if spec.is_mx:
        codes, scale = _mx_kernel(spec, fake=False)(xg, elem_params, enc_params, random_bits)
    else:
        scale = _float_scale(xg, spec, history)
        codes = quantize_kernel.scaled_kernel(False, spec.rounding, spec.overflow)(
            xg, scale, elem_params, enc_params, random_bits)
    if not spec.is_mx and not spec.format.has_nan and torch.isnan(xg).any():
        raise ValueError(f"x holds NaN, which {spec.format.name} cannot encode; use fake_quantize (NaN stays "
                         "NaN) or remove the NaNs")
    qdata = lay.from_groups(codes).contiguous()
    return QTensor(qdata, lay.scale_from_groups(scale).contiguous(), spec, x.shape, x.dtype)


def fake_quantize(x: torch.Tensor, spec: str | QuantSpec, *, history: AmaxHistory | None = None,
                  generator: torch.Generator | None = None, **overrides) -> torch.Tensor:
    """``quantize(x, spec).dequantize()`` in one fused pass, in ``x``'s dtype. NaN stays NaN (MX: the NaN
    scale makes the whole block NaN)."""
    spec, lay, xg, random_bits = _prepare(x, spec, overrides, generator, "fake_quantize")
    elem_params = spec.element_params.as_tensor(cast_kernel.FLOAT32).to(x.device)
    if spec.is_mx:
        out = _mx_kernel(spec, fake=True)(xg, elem_params, random_bits)
    else:
        scale = _float_scale(xg, spec, history)
        out = quantize_kernel.scaled_kernel(True, spec.rounding, spec.overflow)(xg, scale, elem_params, random_bits)
    return lay.from_groups(out).to(x.dtype)
