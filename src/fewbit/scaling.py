"""How a tensor is fitted to a narrow format: per tensor, per axis, per group, or per MX block.

Every scaling kind views the tensor as a 2-D array of *groups* (one row per group, the elements that share one
scale along the columns) and gives each row one scale. The dequantized value is ``element * scale``.

=============  ===============================================  ====================================
kind           groups                                           scale
=============  ===============================================  ====================================
PerTensor      one: the whole tensor                            ``amax * 2^margin / fmt_max`` (float32;
                                                                amax measured, delayed, or static)
PerAxis(a)     one per index along axis ``a`` (per channel)     ``amax / fmt_max`` (float32)
PerGroup(a,g)  runs of ``g`` consecutive elements along ``a``   ``amax / fmt_max`` (float32)
Block(a,k)     runs of ``k`` (32) elements along ``a`` (MX)     a power of two, stored as E8M0 codes
=============  ===============================================  ====================================

MX scale modes (``Block.scale_mode``; the bit arithmetic is in :mod:`fewbit.kernels.e8m0`), with ``emax`` the
exponent of the element format's largest power of two (fp8_e4m3 8, fp8_e5m2 15, fp6_e3m2 4, fp6_e2m3 2, fp4_e2m1 2,
MX int8 0):

- ``floor`` (OCP MX v1.0 and the MX paper, default): ``X = 2^(floor(log2(amax)) - emax)``. The scaled block max
  lands in ``[2^emax, 2^(emax+1))``, so values above the element's max saturate (fp8_e4m3: 448..512 clip; a block
  whose max is 957 keeps 896 = 448 * 2).
- ``rceil`` (NVIDIA hardware, cuBLAS, TransformerEngine): ``X = 2^ceil(log2(amax / fmt_max))`` with the division
  rounded in float32 and the ceiling taken exactly from the bits (as the hardware's round-up conversion); never
  saturates, may leave up to one binade unused.
- ``ceil``: ``X = 2^(ceil(log2(amax)) - emax)``.
- ``even``: ``floor`` after rounding amax to the element's mantissa width (ties away), so a max that would round up
  to the next binade gets the larger scale.

Edge cases: a NaN in the block gives the NaN scale (E8M0 0xFF) and every element of the block dequantizes to NaN;
an inf makes the block's exponent that of 2^128 (floor/ceil/even: the scale is 2^(128 - emax), or NaN when that
exceeds 2^127 as for MXINT8; rceil: 2^127), so the inf saturates to the element max, dequantizes to inf again
(floor) and its finite neighbours go to zero; exponents below -127 clamp to -127 (all-zero blocks get 2^-127);
blocks of float32 subnormals are handled exactly.

Non-finite values under float32 scales (PerTensor, PerAxis, PerGroup): **they never enter the amax**. The amax of a
group is the largest *finite* magnitude, so one inf or NaN changes no other element and every scale is a finite,
positive float32. The non-finite element itself is rounded as :func:`fewbit.cast` rounds it: NaN stays NaN (and
``quantize`` onto a format without a NaN code raises ValueError); +-inf becomes +-max times the scale under
``overflow="saturate"`` (the default), and +-inf (fp8_e5m2) or NaN (fp8_e4m3) under ``overflow="nonfinite"``.
Scales are kept in float32's normal range: ``amax_scale`` clamps ``amax * 2^margin / fmt_max`` to
``[2^-126, 3.4e38]`` (power-of-two scales to ``[2^-126, 2^127]``), so a subnormal amax or a large margin gives no
inf, NaN or zero scale. A group of no finite value (all zero, empty, or all non-finite) gets scale 1. Delayed
scaling: a step whose tensor holds a non-finite value is quantized with the history's amax but does not enter
the :class:`AmaxHistory` (counted in ``skipped``), so one bad batch cannot set the scale of the next
``history_len`` steps.

Empty tensors: every scaling kind accepts them; the result has the tensor's shape, and scales of the layout's
``scale_shape`` (1.0 for a float scale, the E8M0 code of an all-zero block for MX).

Every field is validated when the record is built: booleans must be ``bool`` (the string ``"false"`` is an error,
not True), integers must be ``int`` within the ranges below, and each error names the value and its valid range.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass

import torch

from fewbit.choices import AmaxAlgo, ScaleMode, parse_choice
from fewbit.kernels.e8m0 import E8M0_BIAS, E8M0_NAN, e8m0_reciprocal, e8m0_to_float, mx_scale_codes

# The choices live in fewbit.choices and the E8M0 bit arithmetic in fewbit.kernels.e8m0; their names are kept here,
# where the scalings and the MX scale modes are described.
__all__ = [
    "E8M0_BIAS",
    "E8M0_NAN",
    "AmaxAlgo",
    "AmaxHistory",
    "Block",
    "GroupLayout",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "ScaleMode",
    "Scaling",
    "amax_scale",
    "e8m0_reciprocal",
    "e8m0_to_float",
    "layout",
    "mx_scale_codes",
    "scaling_from_dict",
    "scaling_to_dict",
]

# Valid ranges of the integer fields (inclusive).
MARGIN_RANGE = (-64, 64)  # 2^margin is exact in float32; amax_scale clamps what is still out of range
HISTORY_LEN_RANGE = (1, 1 << 20)  # a float32 window of at most 4 MiB
GROUP_SIZE_RANGE = (1, 1 << 16)  # elements per block or group; the padded axis is allocated
AXIS_RANGE = (-64, 63)  # torch tensors have at most 64 dimensions; the tensor's own ndim is checked at use


def _check_bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {name}={value!r}; expected a bool (True or False), not {type(value).__name__}")


def _check_int(owner: str, name: str, value: object, valid: tuple[int, int]) -> None:
    low, high = valid
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ValueError(f"{owner} {name}={value!r}; expected an int in the valid range [{low}, {high}]")


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: ``scale = amax * 2^margin / fmt_max``.

    ``delayed``: take amax from an :class:`AmaxHistory` of previous steps (TransformerEngine's delayed scaling)
    instead of this tensor; ``history_len`` and ``algo`` configure that history. ``power_of_two`` rounds the scale
    up to a power of two (no saturation, exact rescaling).

    ``amax``: a *static* (calibrated) amax, as :func:`fewbit.calibrate` sets it: the scale is fixed at
    ``amax * 2^margin / fmt_max`` whatever the tensor holds, values beyond it saturate to the format's max, and the
    straight-through gradient is zeroed there (clipped STE). None (default): the amax comes from the tensor
    (current scaling) or its history (``delayed``).
    """

    delayed: bool = False
    history_len: int = 1024
    algo: AmaxAlgo = AmaxAlgo.MAX
    margin: int = 0
    power_of_two: bool = False
    amax: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "algo", parse_choice(AmaxAlgo, self.algo, "algo"))
        _check_bool("PerTensor", "delayed", self.delayed)
        _check_bool("PerTensor", "power_of_two", self.power_of_two)
        _check_int("PerTensor", "history_len", self.history_len, HISTORY_LEN_RANGE)
        _check_int("PerTensor", "margin", self.margin, MARGIN_RANGE)
        object.__setattr__(self, "history_len", int(self.history_len))
        object.__setattr__(self, "margin", int(self.margin))
        if self.amax is not None:
            if isinstance(self.amax, bool) or not isinstance(self.amax, numbers.Real) \
                    or not 0 < float(self.amax) < float("inf"):
                raise ValueError(f"PerTensor amax={self.amax!r}; a static amax must be a positive finite number "
                                 "(valid range (0, inf)), or None to measure it")
            amax = float(self.amax)
            if self.delayed:
                raise ValueError("a static amax and delayed=True exclude each other; set one of them")
            object.__setattr__(self, "amax", amax)


@dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis`` (per output channel for a weight of shape (out, in): ``axis=0``)."""

    axis: int = 0

    def __post_init__(self) -> None:
        _check_int("PerAxis", "axis", self.axis, AXIS_RANGE)


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements along ``axis`` (INT4 weights: 32, 64, 128 along in)."""

    group_size: int = 128
    axis: int = -1

    def __post_init__(self) -> None:
        _check_int("PerGroup", "group_size", self.group_size, GROUP_SIZE_RANGE)
        _check_int("PerGroup", "axis", self.axis, AXIS_RANGE)


@dataclass(frozen=True)
class Block:
    """MX block scaling: ``block_size`` consecutive elements along ``axis`` share one E8M0 power-of-two scale."""

    block_size: int = 32
    axis: int = -1
    scale_mode: ScaleMode = ScaleMode.FLOOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_mode", parse_choice(ScaleMode, self.scale_mode, "scale_mode"))
        _check_int("Block", "block_size", self.block_size, GROUP_SIZE_RANGE)  # MX uses 32
        _check_int("Block", "axis", self.axis, AXIS_RANGE)


Scaling = PerTensor | PerAxis | PerGroup | Block
_KINDS = {k.__name__: k for k in (PerTensor, PerAxis, PerGroup, Block)}


def scaling_to_dict(scaling: Scaling) -> dict:
    """``{"kind": "Block", "block_size": 32, ...}``: every field, choices as their string values (JSON-ready)."""
    fields = {f.name: getattr(scaling, f.name) for f in dataclasses.fields(scaling)}
    return {"kind": type(scaling).__name__, **{k: getattr(v, "value", v) for k, v in fields.items()}}


def scaling_from_dict(d: dict) -> Scaling:
    """Inverse of :func:`scaling_to_dict`; every field is validated (ValueError naming the bad key or value)."""
    if not isinstance(d, dict):
        raise ValueError(f"a scaling must be a dict with a 'kind' ({', '.join(_KINDS)}) and its fields, got {d!r}")
    fields = dict(d)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"unknown scaling kind {kind!r}; valid: {', '.join(_KINDS)}")
    valid = {f.name for f in dataclasses.fields(_KINDS[kind])}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {kind} scaling; valid: {sorted(valid)}")
    return _KINDS[kind](**fields)


# ---- the 2-D group view ---------------------------------------------------------------------------------------


def _check_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} axis={axis} is out of range for a tensor with {ndim} dimension(s); "
                         f"use an axis in [{-ndim}, {ndim - 1}]")
    return axis % ndim


@dataclass(frozen=True)
class GroupLayout:
    """How a tensor of ``shape`` maps to ``(groups, group_size)`` rows and back."""

    shape: tuple[int, ...]
    axis: int | None  # the axis moved last (blocks, groups) or first (per axis); None for per tensor
    group_size: int
    padded: int  # length of the blocked axis after zero padding (blocks and groups)
    kind: str  # "tensor", "axis", "group"

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the scale tensor: the blocked tensor's shape (groups), keepdim form (per axis), () per tensor."""
        if self.kind == "tensor":
            return ()
        if self.kind == "axis":
            return tuple(n if d == self.axis else 1 for d, n in enumerate(self.shape))
        return tuple(self.padded // self.group_size if d == self.axis else n for d, n in enumerate(self.shape))

    def to_groups(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (of ``shape``) as a contiguous (groups, group_size) tensor, zero-padded where needed."""
        if self.kind == "tensor":
            return x.reshape(1, -1)
        if self.kind == "axis":
            return x.movedim(self.axis, 0).reshape(self.shape[self.axis], self.group_size)
        moved = x.movedim(self.axis, -1)
        pad = self.padded - self.shape[self.axis]
        if pad:
            moved = torch.nn.functional.pad(moved, (0, pad))
        return moved.reshape(-1, self.group_size)

    def from_groups(self, g: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_groups` (drops the padding)."""
        if self.kind == "tensor":
            return g.reshape(self.shape)
        if self.kind == "axis":
            rest = [n for d, n in enumerate(self.shape) if d != self.axis]
            return g.reshape(self.shape[self.axis], *rest).movedim(0, self.axis)
        moved_shape = [n for d, n in enumerate(self.shape) if d != self.axis] + [self.padded]
        moved = g.reshape(moved_shape)[..., : self.shape[self.axis]]
        return moved.movedim(-1, self.axis)

    def scale_to_groups(self, scale: torch.Tensor) -> torch.Tensor:
        """A scale tensor (``scale_shape``) as a (groups, 1) column matching :meth:`to_groups`."""
        if self.kind == "tensor":
            return scale.reshape(1, 1)
        if self.kind == "axis":
            return scale.reshape(-1, 1)
        return scale.movedim(self.axis, -1).reshape(-1, 1)

    def scale_from_groups(self, column: torch.Tensor) -> torch.Tensor:
        if self.kind in ("tensor", "axis"):
            return column.reshape(self.scale_shape)
        moved = [n for d, n in enumerate(self.scale_shape) if d != self.axis] + [self.scale_shape[self.axis]]
        return column.reshape(moved).movedim(-1, self.axis)


def layout(shape: tuple[int, ...], scaling: Scaling) -> GroupLayout:
    """The group layout of a tensor of ``shape`` under ``scaling``."""
    ndim = len(shape)
    if isinstance(scaling, PerTensor):
        n = 1
        for s in shape:
            n *= s
        return GroupLayout(tuple(shape), None, n, n, "tensor")
    if ndim == 0:
        raise ValueError(f"{type(scaling).__name__} scaling needs a tensor with at least one dimension, got a scalar")
    if isinstance(scaling, PerAxis):
        axis = _check_axis(scaling.axis, ndim, "PerAxis")
        rest = 1
        for d, s in enumerate(shape):
            if d != axis:
                rest *= s
        return GroupLayout(tuple(shape), axis, rest, rest, "axis")
    size = scaling.block_size if isinstance(scaling, Block) else scaling.group_size
    axis = _check_axis(scaling.axis, ndim, type(scaling).__name__)
    padded = -(-shape[axis] // size) * size
    return GroupLayout(tuple(shape), axis, size, padded, "group")


# ---- float32 scales and delayed-scaling state -------------------------------------------------------------------


_MIN_SCALE = 2.0**-126  # float32's smallest normal: 1 / scale stays finite and dequantizing loses no bits
_MAX_SCALE = torch.finfo(torch.float32).max


def amax_scale(amax: torch.Tensor, fmt_max: float, margin: int = 0, power_of_two: bool = False) -> torch.Tensor:
    """Float32 scale ``amax * 2^margin / fmt_max`` (1 where amax is 0, so zeros stay zeros); with
    ``power_of_two`` the scale is rounded up to a power of two, exactly.

    ``amax``: finite, >= 0 (fewbit's amax is always over finite values). The scale is clamped to float32's
    normal range, ``[2^-126, 3.4e38]`` (power of two: ``[2^-126, 2^127]``), so it is never 0, subnormal or inf.
    """
    scale = amax * (2.0**margin) / fmt_max
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
        scale = torch.clamp(scale, _MIN_SCALE, 2.0**127)
    else:
        scale = torch.clamp(scale, _MIN_SCALE, _MAX_SCALE)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


class AmaxHistory:
    """Delayed scaling state: the amax of the last ``history_len`` steps (TransformerEngine's recipe).

    :meth:`amax` gives the amax to scale this step with (the history's max, or its most recent entry), falling back
    to the current tensor's amax while nothing is recorded; :meth:`record` appends this step's amax afterwards.
    A non-finite amax (a step whose tensor held inf or NaN) is not recorded: ``skipped`` counts those steps and
    ``steps`` the recorded ones, so one bad batch does not set the scale for the next ``history_len`` steps.
    """

    def __init__(self, history_len: int = 1024, algo: AmaxAlgo | str = AmaxAlgo.MAX) -> None:
        _check_int("AmaxHistory", "history_len", history_len, HISTORY_LEN_RANGE)
        self.algo = parse_choice(AmaxAlgo, algo, "algo")
        self.history = torch.zeros(int(history_len), dtype=torch.float32)
        self.steps = 0
        self.skipped = 0

    def amax(self, current: torch.Tensor) -> torch.Tensor:
        if self.steps == 0:
            return current
        if self.algo == AmaxAlgo.MOST_RECENT:
            return self.history[(self.steps - 1) % len(self.history)].clone()
        return self.history[: min(self.steps, len(self.history))].max()

    def record(self, current: torch.Tensor | float) -> bool:
        """Append this step's amax (a 1-element tensor or a float); skip it (and count it in ``skipped``) when it
        is inf or NaN. Returns whether it was recorded."""
        value = torch.as_tensor(current).detach().float().reshape(-1).to(self.history.device)
        if value.numel() != 1:
            raise ValueError(f"AmaxHistory.record takes one amax, got a tensor of {value.numel()} elements")
        if not torch.isfinite(value).all():
            self.skipped += 1
            return False
        if (value < 0).any():
            raise ValueError(f"AmaxHistory.record: amax {value.item()!r} is negative; an amax is a max of |x|")
        self.history[self.steps % len(self.history)] = value[0]
        self.steps += 1
        return True

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "steps": torch.tensor(self.steps),
                "skipped": torch.tensor(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (states saved before ``skipped`` existed load with 0 skipped;
        non-finite entries of such a state are dropped to 0 with a warning)."""
        history = state["history"]
        if not isinstance(history, torch.Tensor) or history.dim() != 1 or len(history) == 0:
            raise ValueError(f"AmaxHistory state: 'history' must be a non-empty 1-D tensor, got {history!r}")
        history = history.detach().float().clone()
        bad = ~torch.isfinite(history)
        if bad.any():
            warnings.warn(f"AmaxHistory state holds {int(bad.sum())} non-finite amax value(s); they are dropped "
                          "to 0 (saved before non-finite steps were skipped)", RuntimeWarning, stacklevel=2)
            history[bad] = 0.0
        steps, skipped = int(state["steps"]), int(state.get("skipped", 0))
        if steps < 0 or skipped < 0:
            raise ValueError(f"AmaxHistory state: steps={steps}, skipped={skipped}; both must be >= 0")
        self.history, self.steps, self.skipped = history, steps, skipped
