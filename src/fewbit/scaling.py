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
"""

from __future__ import annotations

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
]


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
        if self.history_len < 1:
            raise ValueError(f"history_len={self.history_len}; it must be >= 1")
        if self.amax is not None:
            amax = float(self.amax)
            if not (amax > 0 and amax < float("inf")):
                raise ValueError(f"amax={self.amax!r}; a static amax must be a positive finite number")
            if self.delayed:
                raise ValueError("a static amax and delayed=True exclude each other; set one of them")
            object.__setattr__(self, "amax", amax)


@dataclass(frozen=True)
class PerAxis:
    """One scale per index along ``axis`` (per output channel for a weight of shape (out, in): ``axis=0``)."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements along ``axis`` (INT4 weights: 32, 64, 128 along in)."""

    group_size: int = 128
    axis: int = -1

    def __post_init__(self) -> None:
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size}; it must be a positive number of elements")


@dataclass(frozen=True)
class Block:
    """MX block scaling: ``block_size`` consecutive elements along ``axis`` share one E8M0 power-of-two scale."""

    block_size: int = 32
    axis: int = -1
    scale_mode: ScaleMode = ScaleMode.FLOOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_mode", parse_choice(ScaleMode, self.scale_mode, "scale_mode"))
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size}; it must be a positive number of elements (MX uses 32)")


Scaling = PerTensor | PerAxis | PerGroup | Block


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
            return x.movedim(self.axis, 0).reshape(self.shape[self.axis], -1)
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


def amax_scale(amax: torch.Tensor, fmt_max: float, margin: int = 0, power_of_two: bool = False) -> torch.Tensor:
    """Float32 scale ``amax * 2^margin / fmt_max`` (1 where amax is 0, so zeros stay zeros); with
    ``power_of_two`` the scale is rounded up to a power of two, exactly."""
    scale = amax * (2.0**margin) / fmt_max
    if power_of_two:
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
        scale = torch.where(torch.isfinite(amax), scale, amax)
    return torch.where(amax == 0, torch.ones_like(scale), scale)


class AmaxHistory:
    """Delayed scaling state: the amax of the last ``history_len`` steps (TransformerEngine's recipe).

    :meth:`amax` gives the amax to scale this step with (the history's max, or its most recent entry), falling back
    to the current tensor's amax on the first step; :meth:`record` appends this step's amax afterwards.
    """

    def __init__(self, history_len: int = 1024, algo: AmaxAlgo | str = AmaxAlgo.MAX) -> None:
        self.algo = parse_choice(AmaxAlgo, algo, "algo")
        self.history = torch.zeros(history_len, dtype=torch.float32)
        self.steps = 0

    def amax(self, current: torch.Tensor) -> torch.Tensor:
        if self.steps == 0:
            return current
        if self.algo == AmaxAlgo.MOST_RECENT:
            return self.history[(self.steps - 1) % len(self.history)].clone()
        return self.history[: min(self.steps, len(self.history))].max()

    def record(self, current: torch.Tensor) -> None:
        self.history[self.steps % len(self.history)] = current.detach().float().to(self.history.device)
        self.steps += 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "steps": torch.tensor(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.history = state["history"].clone()
        self.steps = int(state["steps"])
