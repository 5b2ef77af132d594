"""Rounding a float tensor onto a narrower format, by integer operations on its bit pattern.

Why integers: every step below is exact in any compiler (no float rounding, no fused multiply-add, no
reassociation), so the ``torch.compile``'d kernel and the eager run of the same function agree bit for bit.

The idea. For a non-negative IEEE float, the bit pattern read as an integer is monotone in the value, and inside
one binade of the *source* format (exponent field ``E``) the value grows linearly with the pattern. The target's
quantum (spacing of representable values) at a value ``v`` is ``2^(max(e(v), emin) - m)``, a power of two, which
in units of the source pattern is ``2^shift`` with

    shift = max(src_m - m, emin + src_bias + src_m - m - max(E, 1)).

Rounding the *pattern* to a multiple of ``2^shift`` (ties and carries included) is then the same as rounding the
*value* to the target's grid, as long as ``shift <= src_m``: a carry out of the mantissa bumps the exponent field,
which is the next binade's first value. Values below the target's smallest subnormal ("tiny", ``shift > src_m``)
round to 0 or to the smallest subnormal and are handled apart. The parity bit for ties is taken with the implicit
leading one in place, so that the tie between the smallest subnormal and twice it goes to twice it (even count).

Overflow and specials are decided on the magnitude afterwards; the sign is put back last.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from fewbit.choices import Overflow, Rounding  # the choices live on the ground floor; named here for callers


@dataclass(frozen=True)
class SourceLayout:
    """The IEEE layout of the float dtype the kernel computes in."""

    dtype: torch.dtype
    int_dtype: torch.dtype
    mbits: int
    bias: int

    @property
    def inf_bits(self) -> int:
        return ((1 << (self.int_dtype.itemsize * 8 - 1 - self.mbits)) - 1) << self.mbits

    @property
    def qnan_bits(self) -> int:
        return self.inf_bits | (1 << (self.mbits - 1))

    @property
    def sign_bit(self) -> int:
        return -(1 << (self.int_dtype.itemsize * 8 - 1))  # the sign bit as a negative signed integer

    def bits_of(self, value: float) -> int:
        """The bit pattern of a non-negative value that this dtype represents exactly."""
        return int(torch.tensor(value, dtype=self.dtype).view(self.int_dtype).item())


FLOAT32 = SourceLayout(torch.float32, torch.int32, mbits=23, bias=127)
FLOAT64 = SourceLayout(torch.float64, torch.int64, mbits=52, bias=1023)
SOURCES = {torch.float32: FLOAT32, torch.float64: FLOAT64}

# Positions in the parameter vector handed to the kernel (laid out by ElementParams.as_tensor, read by round_bits).
# Format facts travel as a tensor, not as Python constants, so one compiled kernel serves every format (no
# recompilation per format).
P_M, P_C, P_MINSUB, P_MAXPOS, P_MAXNEG, P_OVER_VALUE, P_FLAGS = range(7)
N_PARAMS = 7
# Flags (bit positions in P_FLAGS).
F_SIGNED_ZERO = 1  # -0 exists; when absent a zero result gets a + sign
F_NO_ZERO = 2  # no zero at all (e8m0): tiny values go to the smallest value, 0 and negatives to NaN
F_UNSIGNED_NAN = 4  # zero and negative inputs become NaN (e8m0)


@dataclass(frozen=True)
class ElementParams:
    """Everything :func:`round_bits` needs to know about the grid it rounds onto, by name.

    ``fewbit.formats.Format.element_params`` builds it from a format (the kernels know no formats);
    :meth:`as_tensor` lays it out as the integer vector the compiled kernels read. Values are plain floats,
    each exactly representable in the source dtype.
    """

    mbits: int  # mantissa bits of the grid (a signed n-bit integer rounds like a float with n - 2 of them)
    emin: int  # exponent of the grid's smallest normal value: below it the quantum stays 2^(emin - mbits)
    min_subnormal: float  # smallest positive value; smaller magnitudes round to 0 or to it
    max_positive: float  # largest finite value
    max_negative: float  # magnitude of the most negative finite value (0: no negative values)
    has_inf: bool  # nonfinite overflow gives +-inf ...
    has_nan: bool  # ... else NaN, else it saturates
    signed_zero: bool  # -0 exists; else a zero result is +0
    has_zero: bool  # False (e8m0): tiny values go to min_subnormal
    unsigned_nan: bool  # zero and negative inputs are NaN (e8m0: no sign, no zero)

    @functools.cache  # noqa: B019 - records are immutable and few (one per format and range)
    def as_tensor(self, src: SourceLayout) -> torch.Tensor:
        """The parameter vector (``src.int_dtype``, length ``N_PARAMS``) for values computed in ``src``.

        Shared, cached: do not modify it in place.
        """
        params = [0] * N_PARAMS
        params[P_M] = self.mbits
        # shift = max(src.mbits - m, C - max(E, 1)), see the module docstring.
        params[P_C] = self.emin + src.bias + src.mbits - self.mbits
        params[P_MINSUB] = src.bits_of(self.min_subnormal)
        params[P_MAXPOS] = src.bits_of(self.max_positive)
        params[P_MAXNEG] = src.bits_of(self.max_negative)
        params[P_OVER_VALUE] = src.inf_bits if self.has_inf else src.qnan_bits if self.has_nan else -1
        params[P_FLAGS] = ((F_SIGNED_ZERO if self.signed_zero else 0) | (0 if self.has_zero else F_NO_ZERO)
                           | (F_UNSIGNED_NAN if self.unsigned_nan else 0))
        return torch.tensor(params, dtype=src.int_dtype)


@dataclass(frozen=True)
class EncodingParams:
    """Everything :func:`encode_rounded` needs to turn values already on a format's grid into codes, by name.

    Built by ``fewbit.formats.Format.encoding_params``; :meth:`as_tensor` lays it out (int32, in field order) for
    the compiled kernel.
    """

    mbits: int  # mantissa bits kept (integers: magnitude bits)
    bias: int  # exponent bias of the format
    subnormal_scale: int  # 2^(mbits - emin): a subnormal value times this is its code; 0 without subnormals
    magnitude_bits: int  # bits below the sign bit (floats: ebits + mbits; integers: mbits)
    nan_code: int  # the canonical NaN code (0 where there is none)
    inf_code: int  # the code with an all-ones exponent field and zero mantissa (+inf where the format has it)
    is_int: bool  # two's complement integer codes instead of sign | exponent | mantissa
    signed: bool

    @functools.cache  # noqa: B019 - records are immutable and few (one per format)
    def as_tensor(self) -> torch.Tensor:
        """The parameter vector (int32) :func:`encode_rounded` reads. Shared, cached: do not modify it in place."""
        return torch.tensor([int(getattr(self, f.name)) for f in fields(self)], dtype=torch.int32)


def round_bits(
    bits: torch.Tensor,
    params: torch.Tensor,
    rounding: Rounding,
    src: SourceLayout,
    overflow: Overflow,
    random_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round float bit patterns ``bits`` (viewed as ``src.int_dtype``) onto the format described by ``params``
    (:meth:`ElementParams.as_tensor` for ``src``).

    Returns the bit patterns, in the same source layout, of the rounded values. ``random_bits`` (stochastic
    rounding only) holds independent uniform integers in ``[0, 2^src.mbits)``, one per element. This is the
    eager reference; :func:`round_bits_kernel` gives its compiled form.
    """
    one = torch.ones((), dtype=src.int_dtype)
    zero = torch.zeros((), dtype=src.int_dtype)
    flags = params[..., P_FLAGS]
    sign = bits & src.sign_bit
    a = bits & ~src.sign_bit  # magnitude pattern
    is_inf = a == src.inf_bits

    exp_field = a >> src.mbits
    unclamped_shift = params[..., P_C] - torch.clamp(exp_field, min=1)
    shift = torch.clamp(torch.maximum(unclamped_shift, src.mbits - params[..., P_M]), max=src.mbits + 1)
    # The significand as an integer: the implicit leading one is there for normal source values only.
    significand = (a & ((1 << src.mbits) - 1)) | torch.where(exp_field > 0, one << src.mbits, zero)

    if rounding == Rounding.NEAREST_EVEN:
        increment = ((one << shift) >> 1) - 1 + ((significand >> shift) & 1)
    elif rounding == Rounding.NEAREST_AWAY:
        increment = (one << shift) >> 1
    elif rounding == Rounding.TOWARD_ZERO:
        increment = zero
    else:
        assert random_bits is not None, "stochastic rounding needs random_bits"
        # The low `shift` bits of a uniform integer in [0, 2^mbits) are uniform in [0, 2^shift).
        increment = random_bits & ((one << torch.clamp(shift, max=src.mbits)) - 1)
    rounded = ((a + torch.clamp(increment, min=0)) >> shift) << shift

    # Below the smallest subnormal (when that is a normal source value): 0 or the smallest subnormal.
    minsub = params[..., P_MINSUB]
    tiny = (a < minsub) & (minsub >= (one << src.mbits))
    half_minsub = minsub - (one << src.mbits)  # one binade down
    if rounding == Rounding.NEAREST_EVEN:
        up = a > half_minsub
    elif rounding == Rounding.NEAREST_AWAY:
        up = a >= half_minsub
    elif rounding == Rounding.TOWARD_ZERO:
        up = torch.zeros_like(tiny)
    else:
        # P(up) = value / minsub, resolved to 2^-mbits: value / minsub * 2^mbits = significand >> (shift - mbits).
        up = random_bits < (significand >> torch.clamp(unclamped_shift - src.mbits, min=0, max=src.mbits + 1))
    rounded = torch.where(tiny, torch.where(up, minsub, zero), rounded)
    # A format without zero (e8m0) takes its smallest value instead.
    rounded = torch.where(((flags & F_NO_ZERO) != 0) & (rounded < minsub), minsub, rounded)

    # Overflow: beyond the largest finite magnitude of this sign, or an infinite input.
    limit = torch.where(sign != 0, params[..., P_MAXNEG], params[..., P_MAXPOS])
    over = (rounded > limit) | is_inf
    if overflow == Overflow.NONFINITE:
        over_value = params[..., P_OVER_VALUE]
        over_value = torch.where(over_value < 0, limit, over_value)
        # Toward zero never overflows a finite input (IEEE 754): it stops at the largest finite value.
        nonfinite = is_inf if rounding == Rounding.TOWARD_ZERO else over
        rounded = torch.where(over, torch.where(nonfinite, over_value, limit), rounded)
    else:
        rounded = torch.where(over, limit, rounded)

    # NaN stays NaN (with its sign); formats without sign or zero (e8m0) give NaN for x <= 0.
    nan_out = (a > src.inf_bits) | (((flags & F_UNSIGNED_NAN) != 0) & ((sign != 0) | (a == 0)))
    # A zero result keeps its sign only where the format has -0.
    sign = torch.where((rounded == 0) & ((flags & F_SIGNED_ZERO) == 0), zero, sign)
    return torch.where(nan_out, (bits & src.sign_bit) | src.qnan_bits, sign | rounded)


def encode_rounded(values: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Codes (uint8) of float32 values already on a format's grid; ``params`` from :meth:`EncodingParams.as_tensor`."""
    bits = values.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    # In EncodingParams' field order.
    m, bias, sub_scale, magnitude_bits, nan_code, inf_code, is_int, signed = (params[i] for i in range(8))
    # Normal values: drop the mantissa bits the format lacks and re-bias the exponent field.
    normal = (magnitude >> (23 - m)) - ((127 - bias) << m)
    # Subnormal values: the count of smallest subnormals (an exact power-of-two scaling).
    subnormal = (values.abs() * sub_scale.to(torch.float32)).to(torch.int32)
    min_normal_bits = torch.where(sub_scale > 0, (127 - bias + 1) << 23, torch.zeros_like(bias))
    code = torch.where(magnitude < min_normal_bits, subnormal, normal)
    code = torch.where(magnitude > 0x7F800000, nan_code, torch.where(magnitude == 0x7F800000, inf_code, code))
    sign = torch.where((bits < 0) & (signed != 0), 1 << magnitude_bits, 0)
    float_code = code | sign
    # Integers: two's complement in the low bits.
    int_code = values.to(torch.int32) & ((1 << (magnitude_bits + signed)) - 1)
    return torch.where(is_int != 0, int_code, float_code).to(torch.uint8)


@functools.cache
def round_bits_kernel(rounding: Rounding, src: SourceLayout, overflow: Overflow) -> Callable:
    """:func:`round_bits` specialised to one rounding, source layout and overflow rule, compiled.

    The mode arguments are baked in as constants (one compiled kernel per combination, shapes dynamic); the
    format travels in the ``params`` tensor, so every format shares the kernel.
    """

    def kernel(bits: torch.Tensor, params: torch.Tensor, random_bits: torch.Tensor | None = None) -> torch.Tensor:
        return round_bits(bits, params, rounding, src, overflow, random_bits)

    return fast(specialise(kernel, f"round_bits_{rounding.value}_{src.int_dtype}_{overflow.value}"))


@functools.cache
def native_round_kernel(dtype: torch.dtype, max_value: float, overflow: Overflow) -> Callable:
    """Round-to-nearest-even through torch's own conversion to ``dtype`` (bf16, fp16, fp8), compiled.

    Faster than :func:`round_bits` where torch has the dtype; the tests hold both to the same ml_dtypes
    reference. ``saturate`` clamps first (NaN passes through the clamp, +-inf become +-max).
    """

    def kernel(x: torch.Tensor) -> torch.Tensor:
        if overflow == Overflow.SATURATE:
            x = torch.clamp(x, -max_value, max_value)
        return x.to(dtype).to(torch.float32)

    # Inductor drops a down-then-up cast pair unless told to emulate it; here the rounding is the whole point.
    return fast(specialise(kernel, f"native_round_{str(dtype).replace('torch.', '')}_{overflow.value}"),
                emulate_precision_casts=True)


@functools.cache
def integer_round_kernel(low: float, high: float) -> Callable:
    """Round to the nearest integer, ties to even (``torch.round``), clamp to ``[low, high]``, compiled.

    Adding +0.0 turns -0 into +0 (integers have no negative zero); NaN passes through.
    """

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x), low, high) + 0.0

    return fast(specialise(kernel, f"integer_round_{int(-low)}_{int(high)}"))


def specialise(fn: Callable, name: str) -> Callable:
    """A copy of the closure ``fn`` with a code object of its own, named ``name``.

    Dynamo caches compiled graphs per code object. Closures made by one factory share a code object, so without
    this they would share one cache (and its size limit), and a constant that differs between them (a bit width)
    would be promoted to a symbolic integer on recompilation, changing integer arithmetic into float arithmetic.
    """
    code = fn.__code__.replace(co_name=name, co_qualname=name) if hasattr(fn.__code__, "co_qualname") \
        else fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    return copy


def compile_enabled() -> bool:
    """Whether fast paths use ``torch.compile`` (set ``FEWBIT_COMPILE=0`` to run every kernel eagerly)."""
    return os.environ.get("FEWBIT_COMPILE", "1") != "0"


_compile_failed: set[str] = set()


def fast(fn: Callable, **inductor_options) -> Callable:
    """Wrap ``fn`` so that it runs ``torch.compile``'d (dynamic shapes, one compile per call signature).

    Falls back to eager, with one warning, when compiling is unavailable (no C++ compiler, unsupported platform)
    or disabled with ``FEWBIT_COMPILE=0``. The eager run of ``fn`` is the reference the compiled run must match.
    """
    # Shapes are marked dynamic per call (below) rather than with dynamic=True, which would also turn the
    # constants baked into ``fn`` (bit widths, masks) into symbols and lose integer typing.
    # cpp.dynamic_threads: parallelise every loop (the size hint from the first call may be small).
    compiled = torch.compile(fn, options={"cpp.dynamic_threads": True, **inductor_options})

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not compile_enabled() or fn.__qualname__ in _compile_failed:
            return fn(*args, **kwargs)
        # Detached: a view would make Dynamo guard on its base's sizes (and specialise a base of size 1).
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() >= 1:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        try:
            return compiled(*args, **kwargs)
        except Exception as error:
            _compile_failed.add(fn.__qualname__)
            warnings.warn(
                f"fewbit: torch.compile failed for {fn.__qualname__} ({type(error).__name__}: {error}); "
                "running it eagerly (exact, slower). Set FEWBIT_COMPILE=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args, **kwargs)

    run.eager = fn  # type: ignore[attr-defined]
    return run
