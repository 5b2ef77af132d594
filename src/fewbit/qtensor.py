"""QuantSpec (how one tensor is quantized), QTensor (a quantized tensor), quantize / fake_quantize, save / load.

``quantize(x, spec)`` returns a :class:`QTensor` holding one uint8 code per element (``qdata``, in ``x``'s shape)
and one scale per group (``scale``: E8M0 codes for MX blocks, float32 otherwise); ``dequantize()`` gives back
``decode(qdata) * scale``. ``fake_quantize(x, spec)`` equals ``quantize(x, spec).dequantize()`` bit for bit and
runs as one fused pass.

Integer elements are symmetric (``-(2^(b-1) - 1) .. 2^(b-1) - 1``: int8 never uses -128, int4 never -8) unless the
spec says ``symmetric=False``. Under MX block scaling an integer element is OCP fixed point with ``bits - 2``
fraction bits: MXINT8 elements are ``code / 64`` (max 127/64); with the default symmetric range code 0x80 (-2.0)
is never produced (``symmetric=False`` allows it, as the OCP reading does).

Non-finite values and empty tensors follow :mod:`fewbit.scaling`'s rule: inf and NaN never enter an amax, so every
float scale is finite and no other element changes; the non-finite element is rounded as :func:`fewbit.cast`
rounds it. An empty tensor quantizes to an empty QTensor (scales of the layout's shape).

Files (:meth:`QTensor.save`, :func:`load`): safetensors (no pickle), written atomically. Version 2 stores a
checksum (the first 64 bits of the sha256) of each tensor's bytes and of the metadata (``spec``, ``shape``,
``dtype``) under the metadata key ``sha256``; :func:`load` verifies them and checks the metadata against the
tensors (the code count for the shape, the scale's dtype and shape for the spec's layout, ``dtype`` one of
float32, bfloat16, float16, float64), raising ValueError naming the file and the tensor. Version 1 files (no
checksums) still load, with a UserWarning.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewbit import atomic, formats
from fewbit.choices import Overflow, Rounding, parse_choice
from fewbit.formats import Format
from fewbit.kernels import cast as cast_kernel
from fewbit.kernels import native
from fewbit.kernels import quantize as quantize_kernel
from fewbit.kernels.e8m0 import e8m0_to_float
from fewbit.scaling import (
    AmaxHistory,
    Block,
    GroupLayout,
    PerAxis,
    PerGroup,
    PerTensor,
    Scaling,
    amax_scale,
    layout,
    scaling_from_dict,
    scaling_to_dict,
)

__all__ = ["QTensor", "QuantSpec", "fake_quantize", "get_spec", "load", "quantize", "spec_names"]

FILE_VERSION = 2  # 2: sha256 checksums in the metadata; 1 (no checksums) still loads
# The original dtypes a QTensor may hold (what quantize accepts); a file naming any other is rejected.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


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
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"QuantSpec symmetric={self.symmetric!r}; expected a bool (True or False), "
                             f"not {type(self.symmetric).__name__}")
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
        return {"format": self.format.name, "scaling": scaling_to_dict(self.scaling),
                "rounding": self.rounding.value, "overflow": self.overflow.value, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        """Inverse of :meth:`to_dict`; ``rounding``, ``overflow`` and ``symmetric`` may be left out (defaults).
        Every key and value is validated (ValueError naming it)."""
        valid = ("format", "scaling", "rounding", "overflow", "symmetric")
        if not isinstance(d, dict):
            raise ValueError(f"a QuantSpec dict has keys {', '.join(valid)}; got {d!r}")
        missing = [k for k in ("format", "scaling") if k not in d]
        unknown = sorted(set(d) - set(valid))
        if missing or unknown:
            raise ValueError(f"QuantSpec dict: missing {missing}, unknown {unknown}; valid keys: {', '.join(valid)} "
                             "(format and scaling required)")
        return cls(d["format"], scaling_from_dict(d["scaling"]), d.get("rounding", Rounding.NEAREST_EVEN),
                   d.get("overflow", Overflow.SATURATE), d.get("symmetric", True))

    def __str__(self) -> str:
        static = isinstance(self.scaling, PerTensor) and self.scaling.amax is not None
        plain = self.replace(amax=None) if static else self
        suffix = f"@amax={self.scaling.amax:.4g}" if static else ""
        for name, spec in _SPECS.items():
            if spec == plain:
                return name + suffix
        return f"{self.format.name}/{type(self.scaling).__name__}{suffix}"


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
    shape and dtype (float32, bfloat16, float16 or float64). The fields are checked against each other when the
    QTensor is built (ValueError naming the field)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec
    shape: torch.Size
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if not isinstance(self.spec, QuantSpec):
            raise TypeError(f"QTensor spec must be a QuantSpec, got {type(self.spec).__name__}")
        if self.dtype not in DTYPES.values():
            raise ValueError(f"QTensor dtype {self.dtype}; expected one of {', '.join(DTYPES)} "
                             "(the float dtype the tensor had before quantizing)")
        self.shape = torch.Size(self.shape)
        if not isinstance(self.qdata, torch.Tensor) or self.qdata.dtype != torch.uint8 \
                or self.qdata.shape != self.shape:
            got = (self.qdata.dtype, tuple(self.qdata.shape)) if isinstance(self.qdata, torch.Tensor) else self.qdata
            raise ValueError(f"QTensor qdata must be uint8 codes of shape {tuple(self.shape)}, got {got}")
        scale_dtype = torch.uint8 if self.spec.is_mx else torch.float32
        scale_shape = self.layout.scale_shape
        if not isinstance(self.scale, torch.Tensor) or self.scale.dtype != scale_dtype \
                or tuple(self.scale.shape) != scale_shape:
            got = (self.scale.dtype, tuple(self.scale.shape)) if isinstance(self.scale, torch.Tensor) else self.scale
            raise ValueError(f"QTensor scale for {self.spec} on shape {tuple(self.shape)} must be {scale_dtype} of "
                             f"shape {scale_shape}, got {got}")

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
        code_bytes = formats.packed_nbytes(self.qdata.numel(), self.spec.format.bits)
        return code_bytes + self.scale.numel() * self.scale.element_size()

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (packed codes, scales, JSON metadata with sha256 checksums), atomically."""
        from safetensors.torch import save as st_save

        metadata = {"fewbit_qtensor": str(FILE_VERSION), "spec": json.dumps(self.spec.to_dict()),
                    "shape": json.dumps(list(self.shape)), "dtype": str(self.dtype).removeprefix("torch.")}
        tensors = {"qdata": formats.pack(self.qdata, self.spec.format.bits).cpu(),
                   "scale": self.scale.contiguous().cpu()}
        checksums = {name: _sha256(t) for name, t in tensors.items()}
        checksums["metadata"] = _metadata_sha256(metadata)
        payload = st_save(tensors, metadata={**metadata, "sha256": json.dumps(checksums)})
        atomic.write_bytes(path, payload)

    def __repr__(self) -> str:
        return (f"QTensor({self.spec!s}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"{self.bits_per_element:.2f} bits/element)")


# Checksums are the first 64 bits (16 hex digits) of a sha256: ample against disk and copy corruption (a random
# change goes unnoticed with probability 2^-64), and small beside the codes of a small tensor.
_CHECKSUM_HEX_DIGITS = 16


def _sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes as safetensors stores them (row-major, little-endian)."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:_CHECKSUM_HEX_DIGITS]


def _metadata_sha256(metadata: dict) -> str:
    fields = json.dumps([metadata["spec"], metadata["shape"], metadata["dtype"]]).encode()
    return hashlib.sha256(fields).hexdigest()[:_CHECKSUM_HEX_DIGITS]


def load(path: str | os.PathLike) -> QTensor:
    """Read a QTensor written by :meth:`QTensor.save` (safetensors: no pickle).

    Raises ValueError naming the file (and the tensor or metadata key) when the file is truncated, not a fewbit
    QTensor file, fails its sha256 checksums, or holds metadata that disagrees with its tensors. Version 1 files
    (written before checksums) load with a UserWarning; re-save them to add checksums.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"{path} is not a readable fewbit QTensor file ({error}); it may be truncated") from None
    version = metadata.get("fewbit_qtensor")
    if version not in ("1", str(FILE_VERSION)):
        raise ValueError(f"{path}: not a fewbit QTensor file of version 1 or {FILE_VERSION} "
                         f"(metadata {sorted(metadata)})")

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; the file is damaged or was edited. Re-save it with QTensor.save")

    missing = [k for k in ("spec", "shape", "dtype") if k not in metadata]
    missing += [f"tensor {k}" for k in ("qdata", "scale") if k not in tensors]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    extra = sorted(set(tensors) - {"qdata", "scale"})
    if extra:
        raise bad(f"unexpected tensor(s) {extra}; a QTensor file holds qdata and scale only")
    try:
        spec = QuantSpec.from_dict(json.loads(metadata["spec"]))
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise bad(f"metadata spec is not a valid QuantSpec ({error})") from None
    try:
        dims = json.loads(metadata["shape"])
    except json.JSONDecodeError:
        dims = None
    if not isinstance(dims, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                             for n in dims):
        raise bad(f"metadata shape {metadata['shape']!r} is not a list of non-negative ints")
    shape = torch.Size(dims)
    if metadata["dtype"] not in DTYPES:
        raise bad(f"metadata dtype {metadata['dtype']!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[metadata["dtype"]]
    packed = tensors["qdata"]
    bits = spec.format.bits
    needed = formats.packed_nbytes(shape.numel(), bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != needed:
        raise bad(f"tensor qdata is {packed.dtype} of shape {tuple(packed.shape)}; shape {list(shape)} of "
                  f"{bits}-bit codes needs {needed} uint8 bytes")
    qdata = formats.unpack(packed, bits, shape.numel()).reshape(shape)
    try:
        qtensor = QTensor(qdata, tensors["scale"], spec, shape, dtype)
    except ValueError as error:
        raise bad(f"tensor scale disagrees with the metadata ({error})") from None
    # Checksums last: the checks above name what is wrong with a file that disagrees with itself; these catch
    # the rest (a flipped bit in the codes or scales, a shape edited to another one of the same size).
    if version == str(FILE_VERSION):
        try:
            checksums = json.loads(metadata["sha256"])
        except (KeyError, json.JSONDecodeError, TypeError):
            raise bad("no readable sha256 checksum in the metadata") from None
        expected = {"qdata": _sha256(tensors["qdata"]), "scale": _sha256(tensors["scale"]),
                    "metadata": _metadata_sha256(metadata)}
        for name, digest in expected.items():
            if not isinstance(checksums, dict) or checksums.get(name) != digest:
                where = "the metadata (spec, shape, dtype)" if name == "metadata" else f"tensor {name!r}"
                raise bad(f"{where} fails its sha256 checksum")
    else:
        warnings.warn(f"{path}: a version 1 QTensor file has no checksum, so it is loaded unverified; "
                      "re-save it with QTensor.save to add checksums", UserWarning, stacklevel=2)
    return qtensor


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
    if xg.numel() == 0:  # no element: amax 0 (scale 1), nothing observed for a history
        amax = torch.zeros((xg.shape[0], 1), dtype=torch.float32, device=xg.device)
        all_finite = None
    else:
        amax, all_finite = quantize_kernel.row_amax(xg.view(torch.int32))  # over the finite values only
    if isinstance(scaling, PerTensor) and scaling.delayed:
        if history is None:
            raise ValueError("delayed scaling needs an AmaxHistory: quantize(x, spec, history=AmaxHistory())")
        current = amax.reshape(())
        amax = history.amax(current).reshape(1, 1).to(xg.device)
        if all_finite is not None:
            # A step with inf or NaN is scaled by the history but not recorded in it (history.skipped counts it).
            history.record(torch.where(all_finite.reshape(()), current, float("inf")))
    margin = scaling.margin if isinstance(scaling, PerTensor) else 0
    power_of_two = isinstance(scaling, PerTensor) and scaling.power_of_two
    return amax_scale(amax, spec.element_max, margin, power_of_two)


def _mx_kernel(spec: QuantSpec, fake: bool):
    fmt = spec.format
    return quantize_kernel.mx_kernel(fake, spec.scaling.scale_mode, spec.emax, float(spec.element_max),
                                     fmt.mbits, spec.fixed_point, spec.rounding)


@functools.cache
def _native_params(spec: QuantSpec) -> torch.Tensor:
    fmt = spec.format
    return native.mx_params(spec.scaling.scale_mode, spec.emax, float(spec.element_max), fmt.mbits, spec.fixed_point,
                            tuple(spec.element_params.as_tensor(cast_kernel.FLOAT32).tolist()),
                            tuple(fmt.encoding_params().as_tensor().tolist()))


def _mx_native(x: torch.Tensor, spec: QuantSpec, fake: bool, generator: torch.Generator | None):
    """The one-pass native kernel's result for an MX spec (fake: the float32 values; else codes and scales), or None
    where it does not apply (not an MX spec, not on the CPU, empty, or the kernel unavailable). Stochastic rounding
    draws the same random integers as the reference path, in its group layout, so both give the same result."""
    if not spec.is_mx or x.device.type != "cpu" or x.numel() == 0 or not native.available():
        return None
    lay = layout(tuple(x.shape), spec.scaling)
    x32 = x.float().contiguous()
    random_bits = None
    if spec.rounding == Rounding.STOCHASTIC:
        groups = x.numel() // x.shape[lay.axis] * lay.padded // lay.group_size
        random_bits = torch.randint(0, 1 << 23, (groups, lay.group_size), generator=generator, dtype=torch.int32)
        random_bits = lay.from_groups(random_bits).contiguous()
    return native.mx_pass(x32, lay.axis, lay.group_size, _native_params(spec), spec.rounding, fake, random_bits)


def quantize(x: torch.Tensor, spec: str | QuantSpec, *, history: AmaxHistory | None = None,
             generator: torch.Generator | None = None, **overrides) -> QTensor:
    """Quantize ``x`` (float32, bfloat16, float16) by ``spec`` (a QuantSpec or a name such as ``"mxfp8_e4m3"``).

    ``overrides`` replace spec or scaling fields (``scale_mode="rceil"``, ``axis=0``, ``block_size=16``).
    ``history``: the :class:`~fewbit.scaling.AmaxHistory` for delayed per-tensor scaling (updated in place).
    A blocked axis whose length is not a multiple of the block size is zero-padded internally. Non-finite values
    do not enter float scales (module docstring); NaN onto a format without a NaN code raises ValueError. An empty
    ``x`` gives an empty QTensor.
    """
    spec = get_spec(spec, **overrides)
    formats._check_input(x, "quantize")
    fast = _mx_native(x, spec, False, generator)
    if fast is not None:
        return QTensor(fast[0], fast[1], spec, x.shape, x.dtype)
    spec, lay, xg, random_bits = _prepare(x, spec, {}, generator, "quantize")
    elem_params = spec.element_params.as_tensor(cast_kernel.FLOAT32).to(x.device)
    enc_params = spec.format.encoding_params().as_tensor().to(x.device)
    empty = xg.numel() == 0  # the kernels are not run on empty rows (nothing to compute, and no compile)
    if spec.is_mx:
        if empty:  # code 0 (2^-127): the scale of an all-zero block
            codes, scale = torch.zeros(xg.shape, dtype=torch.uint8), torch.zeros((xg.shape[0], 1), dtype=torch.uint8)
            codes, scale = codes.to(x.device), scale.to(x.device)
        else:
            codes, scale = _mx_kernel(spec, fake=False)(xg, elem_params, enc_params, random_bits)
    else:
        scale = _float_scale(xg, spec, history)
        if empty:
            codes = torch.zeros(xg.shape, dtype=torch.uint8, device=x.device)
        else:
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
    scale makes the whole block NaN; float scales: only the NaN element). An empty ``x`` gives an empty result."""
    spec = get_spec(spec, **overrides)
    formats._check_input(x, "fake_quantize")
    fast = _mx_native(x, spec, True, generator)
    if fast is not None:
        return fast.to(x.dtype)
    spec, lay, xg, random_bits = _prepare(x, spec, {}, generator, "fake_quantize")
    elem_params = spec.element_params.as_tensor(cast_kernel.FLOAT32).to(x.device)
    empty = xg.numel() == 0
    if spec.is_mx:
        out = xg.clone() if empty else _mx_kernel(spec, fake=True)(xg, elem_params, random_bits)
    else:
        scale = _float_scale(xg, spec, history)
        out = xg.clone() if empty else quantize_kernel.scaled_kernel(True, spec.rounding, spec.overflow)(
            xg, scale, elem_params, random_bits)
    return lay.from_groups(out).to(x.dtype)
