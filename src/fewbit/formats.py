"""Number formats as data, and exact casts, encodings and bit packing for them.

A :class:`Format` is one small frozen record (exponent bits, mantissa bits, bias, and which codes are inf / NaN).
Every other fact — largest and smallest values, epsilon, the full table of values for formats of 8 bits or fewer,
dynamic range in binades — is derived from that record by :meth:`Format.value_of_code`, the definition of what a
code means. Nothing is typed twice.

Casts (:func:`cast`) round a float32 / bfloat16 / float16 / float64 tensor onto a format and return a tensor of the
same dtype that holds exactly the values the format represents. The reference for every cast is ml_dtypes; the
rules for rounding, overflow, NaN, infinities, -0 and subnormals are in the README's "Numerics" section and in
:class:`~fewbit.choices.Rounding` and :class:`~fewbit.choices.Overflow`.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass

import torch

from fewbit.choices import Overflow, Rounding, parse_choice
from fewbit.kernels import cast as _kernel

__all__ = [
    "Format",
    "NanEncoding",
    "Overflow",
    "Rounding",
    "cast",
    "decode",
    "encode",
    "get",
    "names",
    "pack",
    "packed_nbytes",
    "unpack",
]


class NanEncoding(str, enum.Enum):
    """Which codes of a float format mean NaN."""

    IEEE = "ieee"  # every code with the top exponent and a non-zero mantissa (the top exponent is not finite)
    TOP_CODE = "top_code"  # only the all-ones magnitude code (S.1111.111 for fp8_e4m3; 0xFF for e8m0)
    NONE = "none"  # no NaN code at all (fp6, fp4, integers)


@dataclass(frozen=True)
class Format:
    """One element number format.

    Floats: value of a code with sign ``s``, exponent field ``E`` and mantissa field ``M``:
    ``(-1)^s * 2^(E - bias) * (1 + M / 2^mbits)`` for ``E >= 1`` (or for every ``E`` when ``subnormals`` is
    False), and ``(-1)^s * 2^(1 - bias) * (M / 2^mbits)`` for ``E == 0`` (subnormals and zero).
    Integers (``ebits == 0``): two's complement when ``signed``, plain binary otherwise; ``mbits`` counts the
    magnitude bits (7 for int8).
    """

    name: str
    ebits: int
    mbits: int
    bias: int = 0
    signed: bool = True
    inf: bool = False
    nan: NanEncoding = NanEncoding.NONE
    subnormals: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.ebits < 0 or self.mbits < 0 or self.ebits + self.mbits == 0:
            raise ValueError(f"format {self.name!r}: ebits={self.ebits}, mbits={self.mbits}; need ebits, mbits >= 0 "
                             "and at least one of them positive")
        if self.is_int and (self.inf or self.nan != NanEncoding.NONE):
            raise ValueError(f"format {self.name!r}: integer formats have no inf or NaN codes")
        if self.inf and self.nan != NanEncoding.IEEE:
            raise ValueError(f"format {self.name!r}: infinities need the IEEE top exponent, so nan must be 'ieee'")

    # ---- the definition -----------------------------------------------------------------------------------
    @property
    def is_int(self) -> bool:
        return self.ebits == 0

    @property
    def bits(self) -> int:
        """Bits per element (tf32: 19, stored in a 32-bit container)."""
        return int(self.signed) + self.ebits + self.mbits

    @property
    def num_codes(self) -> int:
        return 1 << self.bits

    def value_of_code(self, code: int) -> float:
        """The value a code means, from the definition (the one place where codes get their meaning)."""
        if not 0 <= code < self.num_codes:
            raise ValueError(f"code {code} is outside {self.name}'s {self.num_codes} codes")
        if self.is_int:
            if self.signed and code >= 1 << self.mbits:
                return float(code - self.num_codes)
            return float(code)
        magnitude_bits = self.ebits + self.mbits
        negative = self.signed and (code >> magnitude_bits) & 1
        magnitude = code & ((1 << magnitude_bits) - 1)
        exp_field, mant_field = magnitude >> self.mbits, magnitude & ((1 << self.mbits) - 1)
        top_exp = (1 << self.ebits) - 1
        if self.nan == NanEncoding.IEEE and exp_field == top_exp:
            value = math.inf if mant_field == 0 and self.inf else math.nan
        elif self.nan == NanEncoding.TOP_CODE and magnitude == (1 << magnitude_bits) - 1:
            value = math.nan
        elif exp_field == 0 and self.subnormals:
            value = math.ldexp(mant_field, 1 - self.bias - self.mbits)
        else:
            value = math.ldexp((1 << self.mbits) + mant_field, exp_field - self.bias - self.mbits)
        return -value if negative else value

    # ---- derived facts --------------------------------------------------------------------------------------
    @property
    def max_code(self) -> int:
        """Code of the largest finite positive value."""
        if self.is_int:
            return (1 << self.mbits) - 1
        magnitude_bits = self.ebits + self.mbits
        if self.nan == NanEncoding.IEEE:
            return (((1 << self.ebits) - 1) << self.mbits) - 1
        if self.nan == NanEncoding.TOP_CODE:
            return (1 << magnitude_bits) - 2
        return (1 << magnitude_bits) - 1

    @property
    def max(self) -> float:
        """Largest finite value, e.g. fp8_e4m3: (1 + 6/8) * 2^(15 - 7) = 448."""
        return self.value_of_code(self.max_code)

    @property
    def min(self) -> float:
        """Most negative finite value (-max for sign-magnitude floats, -128 for int8, 0 or 2^-127 unsigned)."""
        if self.is_int:
            return -float(1 << self.mbits) if self.signed else 0.0
        return -self.max if self.signed else self.value_of_code(0)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (integers: 1)."""
        if self.is_int:
            return 1.0
        return self.value_of_code(1 << self.mbits if self.subnormals else 0)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equal to min_normal when there are no subnormals)."""
        if self.is_int or not self.subnormals or self.mbits == 0:
            return self.min_normal
        return self.value_of_code(1)

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        return math.frexp(self.max)[1] - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return math.frexp(self.min_normal)[1] - 1

    @property
    def precision(self) -> int:
        """Significant bits (implicit leading one included); for integers, the magnitude bits."""
        return self.mbits if self.is_int else self.mbits + 1

    @property
    def eps(self) -> float:
        """Machine epsilon: the gap between 1 and the next value (integers: 1)."""
        return 1.0 if self.is_int else math.ldexp(1.0, -self.mbits)

    @property
    def binades(self) -> float:
        """Dynamic range in binades: log2(max / min_subnormal)."""
        return math.log2(self.max / self.min_subnormal)

    @property
    def has_nan(self) -> bool:
        return self.nan != NanEncoding.NONE

    @property
    def has_zero(self) -> bool:
        return self.is_int or self.subnormals

    @functools.cached_property
    def values(self) -> torch.Tensor:
        """Every code's value as float32, indexed by code (NaN for NaN codes). Formats of 8 bits or fewer."""
        if self.bits > 8:
            raise ValueError(f"{self.name} has {self.num_codes} codes; value tables exist for formats of "
                             "8 bits or fewer")
        return torch.tensor([self.value_of_code(c) for c in range(self.num_codes)], dtype=torch.float32)

    def as_dict(self) -> dict:
        """Every fact about the format, for JSON output."""
        return {
            "name": self.name, "bits": self.bits, "ebits": self.ebits, "mbits": self.mbits, "bias": self.bias,
            "signed": self.signed, "kind": "int" if self.is_int else "float", "max": self.max, "min": self.min,
            "min_normal": self.min_normal, "min_subnormal": self.min_subnormal, "eps": self.eps,
            "emax": self.emax, "emin": self.emin, "binades": self.binades, "inf": self.inf,
            "nan": self.nan.value, "num_codes": self.num_codes, "description": self.description,
        }

    # ---- kernel parameters ----------------------------------------------------------------------------------
    @functools.cache  # noqa: B019 - formats are immutable singletons
    def element_params(self, *, symmetric: bool = False) -> _kernel.ElementParams:
        """The grid :func:`fewbit.kernels.cast.round_bits` rounds onto for this format, as a named record.

        ``symmetric``: the negative limit is ``-max`` (narrow-range integers: int8 saturates at -127, not -128;
        floats are symmetric already).
        """
        if self.is_int:
            # A signed n-bit integer rounds like a float with (n - 2) mantissa bits whose normal range starts at
            # 2^(n-2): the quantum is 1 everywhere below 2^(n-1), and 2^(n-1) itself is on the grid.
            mbits = emin = self.mbits - 1
        else:
            mbits, emin = self.mbits, self.emin
        max_negative = (self.max if symmetric else -self.min) if self.signed else 0.0
        return _kernel.ElementParams(
            mbits=mbits, emin=emin, min_subnormal=self.min_subnormal, max_positive=self.max,
            max_negative=max_negative, has_inf=self.inf, has_nan=self.has_nan,
            signed_zero=self.signed and not self.is_int, has_zero=self.has_zero,
            unsigned_nan=not self.signed and not self.is_int,
        )

    def kernel_params(self, src: _kernel.SourceLayout) -> torch.Tensor:
        """The parameter vector that :func:`fewbit.kernels.cast.round_bits` reads, for source layout ``src``
        (:meth:`element_params` laid out as a tensor; shared, do not modify it in place)."""
        return self.element_params().as_tensor(src)

    @functools.cache  # noqa: B019 - formats are immutable singletons
    def encoding_params(self) -> _kernel.EncodingParams:
        """What :func:`fewbit.kernels.cast.encode_rounded` needs to turn this format's values into its codes."""
        top = ((1 << self.ebits) - 1) << self.mbits
        nan_code = {NanEncoding.IEEE: top | (1 << max(self.mbits - 1, 0)),
                    NanEncoding.TOP_CODE: (1 << (self.ebits + self.mbits)) - 1, NanEncoding.NONE: 0}[self.nan]
        return _kernel.EncodingParams(
            mbits=self.mbits, bias=self.bias,
            subnormal_scale=2 ** (self.mbits - self.emin) if self.subnormals and not self.is_int else 0,
            magnitude_bits=self.mbits if self.is_int else self.ebits + self.mbits,
            nan_code=nan_code, inf_code=top, is_int=self.is_int, signed=self.signed,
        )

    def __str__(self) -> str:
        return self.name


_FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("fp32", 8, 23, 127, inf=True, nan=NanEncoding.IEEE, description="IEEE 754 binary32"),
        Format("tf32", 8, 10, 127, inf=True, nan=NanEncoding.IEEE,
               description="TensorFloat-32: fp32 range, fp16 precision; stored in 32 bits"),
        Format("bf16", 8, 7, 127, inf=True, nan=NanEncoding.IEEE, description="bfloat16"),
        Format("fp16", 5, 10, 15, inf=True, nan=NanEncoding.IEEE, description="IEEE 754 binary16"),
        Format("fp8_e5m2", 5, 2, 15, inf=True, nan=NanEncoding.IEEE, description="OCP FP8 E5M2 (IEEE-like)"),
        Format("fp8_e4m3", 4, 3, 7, nan=NanEncoding.TOP_CODE,
               description="OCP FP8 E4M3: no inf, NaN only S.1111.111"),
        Format("fp6_e3m2", 3, 2, 3, description="OCP MX FP6 E3M2: no inf, no NaN"),
        Format("fp6_e2m3", 2, 3, 1, description="OCP MX FP6 E2M3: no inf, no NaN"),
        Format("fp4_e2m1", 2, 1, 1, description="OCP MX FP4 E2M1: no inf, no NaN"),
        Format("e8m0", 8, 0, 127, signed=False, nan=NanEncoding.TOP_CODE, subnormals=False,
               description="OCP MX scale: powers of two 2^-127..2^127, NaN 0xFF, no zero, no sign"),
        Format("int8", 0, 7, description="8-bit two's complement integer"),
        Format("uint8", 0, 8, signed=False, description="8-bit unsigned integer"),
        Format("int4", 0, 3, description="4-bit two's complement integer"),
        Format("uint4", 0, 4, signed=False, description="4-bit unsigned integer"),
    ]
}


def names() -> list[str]:
    """Names of every built-in format, widest first."""
    return list(_FORMATS)


def get(fmt: str | Format) -> Format:
    """Look a format up by name (a :class:`Format` is returned as is)."""
    if isinstance(fmt, Format):
        return fmt
    try:
        return _FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(_FORMATS)}") from None


# ---- cast ---------------------------------------------------------------------------------------------------

_TORCH_FORMATS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Formats whose round-to-nearest-even cast runs through torch's own conversion, where that measured faster than
# the bit kernel (fp8 measured slower: 261 and 176 M/s against 362 and 330 M/s on 2 cores). Same tests as the kernel.
_NATIVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _contains(outer: Format, inner: Format) -> bool:
    """Whether every finite value of ``inner`` is a value of ``outer`` (both floats or integers)."""
    return (
        outer.precision >= inner.precision
        and outer.max >= inner.max
        and outer.min <= inner.min
        and outer.min_subnormal <= inner.min_subnormal
        and (outer.signed or not inner.signed)
    )


def _check_input(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{what} expects a float tensor (float32, bfloat16, float16 or float64), got {x.dtype}; "
            "convert with x.float() first" + (" (complex values have no format)" if x.is_complex() else "")
        )
    if x.dtype not in (torch.float32, torch.float64, *_TORCH_FORMATS):
        raise TypeError(f"{what} expects float32, bfloat16, float16 or float64, got {x.dtype}; "
                        "convert with x.float() first")


def cast(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str | Rounding = "nearest_even",
    overflow: str | Overflow = "saturate",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Round ``x`` onto format ``fmt``; return a tensor of ``x``'s dtype holding exactly the format's values.

    ``x``: float32, float64 (exact: no intermediate rounding to float32), bfloat16 or float16. A 16-bit input is
    accepted when every value of ``fmt`` fits its dtype, or when ``fmt`` is wider than the dtype (then the result
    equals ``x``, infinities included, since the format's max is no value of the dtype); otherwise the error
    says to pass float32.

    Rounding: ``nearest_even`` (default), ``nearest_away``, ``toward_zero``, ``stochastic`` (unbiased; pass a
    seeded ``torch.Generator`` to reproduce it; probabilities are resolved to 2^-23 for float32 input).
    Overflow: ``saturate`` (to +-max, also for +-inf inputs) or ``nonfinite`` (+-inf where the format has it,
    else NaN where it has it, else saturate); ``toward_zero`` never turns a finite input into inf.
    Specials: NaN stays NaN for every format (even fp6/fp4/int, which have no NaN code, so a NaN never hides);
    -0 stays -0 for float formats, becomes +0 for integers; subnormals of the format are kept, smaller values
    round to 0 or the smallest subnormal. e8m0 (no zero, no sign): values <= 0 give NaN, tiny values give 2^-127.
    """
    fmt = get(fmt)
    rounding = parse_choice(Rounding, rounding, "rounding")
    overflow = parse_choice(Overflow, overflow, "overflow")
    _check_input(x, "cast")
    if x.dtype in (torch.bfloat16, torch.float16):
        container = get(_TORCH_FORMATS[x.dtype])
        if fmt != container and _contains(fmt, container):
            # The format holds every value of x's dtype, but its max is no value of that dtype: identity, and
            # infinities stay infinite.
            return x.clone()
        if not _contains(container, fmt):
            raise ValueError(
                f"{fmt.name} values do not all fit in {x.dtype} (e.g. its max {fmt.max!r}); "
                f"cast a float32 tensor instead: cast(x.float(), {fmt.name!r})"
            )
        return cast(x.float(), fmt, rounding, overflow, generator).to(x.dtype)
    if x.numel() == 0:
        return x.clone()
    native = _NATIVE_DTYPES.get(fmt.name)
    if native is not None and x.dtype == torch.float32 and rounding == Rounding.NEAREST_EVEN:
        return _kernel.native_round_kernel(native, fmt.max, overflow)(x.contiguous())
    if fmt.is_int and x.dtype == torch.float32 and rounding == Rounding.NEAREST_EVEN:
        return _kernel.integer_round_kernel(fmt.min, fmt.max)(x.contiguous())
    src = _kernel.SOURCES[x.dtype]
    random_bits = None
    if rounding == Rounding.STOCHASTIC:
        random_bits = torch.randint(0, 1 << src.mbits, x.shape, generator=generator, dtype=src.int_dtype,
                                    device=x.device).reshape(-1)
    params = fmt.kernel_params(src).to(x.device)
    kernel = _kernel.round_bits_kernel(rounding, src, overflow)
    bits = kernel(x.contiguous().view(src.int_dtype).reshape(-1), params, random_bits)
    return bits.view(x.dtype).view(x.shape)


# ---- codes --------------------------------------------------------------------------------------------------


_encode_fast = _kernel.fast(_kernel.encode_rounded)


def encode(
    x: torch.Tensor,
    fmt: str | Format,
    rounding: str | Rounding = "nearest_even",
    overflow: str | Overflow = "saturate",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes (uint8, one per element, OCP bit layout) of ``x`` rounded onto ``fmt`` as by :func:`cast`.

    Layout: floats are sign | exponent | mantissa from the most significant used bit down (fp4: ``s e e m`` in
    the low nibble); integers are two's complement in the low ``bits`` bits. NaN becomes the format's canonical
    NaN (0x7F / 0xFF for fp8_e4m3, exponent all ones and mantissa 10..0 for fp8_e5m2, 0xFF for e8m0); a NaN for
    a format with no NaN code (fp6, fp4, integers) raises ``ValueError``. For formats of 8 bits or fewer only.
    """
    fmt = get(fmt)
    if fmt.bits > 8:
        raise ValueError(f"encode gives 8-bit codes; {fmt.name} has {fmt.bits} bits. Use "
                         "cast(x, fmt) and a torch dtype view instead (e.g. x.to(torch.bfloat16).view(torch.int16))")
    _check_input(x, "encode")
    rounded = cast(x.float() if x.dtype != torch.float32 else x, fmt, rounding, overflow, generator)
    if not fmt.has_nan:
        nans = int(torch.isnan(rounded).sum())
        if nans:
            raise ValueError(f"{nans} NaN value(s) cannot be encoded in {fmt.name}, which has no NaN code; "
                             "remove them or choose a format with NaN (fp8_e4m3, fp8_e5m2)")
    if rounded.numel() == 0:
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    return _encode_fast(rounded.contiguous(), fmt.encoding_params().as_tensor().to(x.device))


def decode(codes: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Values (float32) of uint8 ``codes`` of ``fmt``; every NaN code decodes to NaN. Inverse of :func:`encode`."""
    fmt = get(fmt)
    if fmt.bits > 8:
        raise ValueError(f"decode reads 8-bit codes; {fmt.name} has {fmt.bits} bits")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"decode expects a torch.uint8 tensor of codes, got {got}")
    if fmt.bits < 8 and codes.numel() and int(codes.max()) >= fmt.num_codes:
        raise ValueError(f"code {int(codes.max())} is out of range for {fmt.name} ({fmt.num_codes} codes); "
                         "were the codes packed? unpack them first")
    return fmt.values.to(codes.device)[codes.long()]


# ---- bit packing --------------------------------------------------------------------------------------------


def _code_bits(fmt_or_bits: str | Format | int) -> tuple[int, int]:
    """(bits per code, number of valid codes) for a format or a plain bit width."""
    if isinstance(fmt_or_bits, bool) or not isinstance(fmt_or_bits, int | str | Format):
        raise TypeError(f"expected a format or a code width in bits (4, 6, 8), got {fmt_or_bits!r}")
    if isinstance(fmt_or_bits, int):
        bits, num_codes = fmt_or_bits, 1 << fmt_or_bits if 0 < fmt_or_bits <= 8 else 0
    else:
        fmt = get(fmt_or_bits)
        bits, num_codes = fmt.bits, fmt.num_codes
    if bits not in (4, 6, 8):
        raise ValueError(f"packing supports 4-, 6- and 8-bit codes, got {bits}")
    return bits, num_codes


def _check_numel(numel: object) -> int:
    if isinstance(numel, bool) or not isinstance(numel, int):
        raise TypeError(f"unpack numel={numel!r}; expected a non-negative int (the number of codes packed)")
    if numel < 0:
        raise ValueError(f"unpack numel={numel}; expected a non-negative int (the number of codes packed)")
    return numel


def pack(codes: torch.Tensor, fmt_or_bits: str | Format | int) -> torch.Tensor:
    """Pack uint8 codes densely into a 1-D uint8 tensor (the input is flattened in row-major order).

    4-bit: two codes per byte, element 2i in the low nibble and 2i+1 in the high nibble (an odd count gets a zero
    high nibble). 6-bit: four codes per three bytes, as a little-endian bit stream: element i occupies bits 6i to
    6i+5 of the 24-bit little-endian group (padded with zero codes to a multiple of four). 8-bit: a copy.
    A code outside the format's range (``>= 2^bits``) raises ValueError instead of spilling into its neighbour.
    """
    bits, num_codes = _code_bits(fmt_or_bits)
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise TypeError(f"pack expects torch.uint8 codes, got {got}")
    flat = codes.reshape(-1)
    if bits == 8:
        return flat.clone()
    bad = flat >= num_codes
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"pack: code {int(flat[index])} at flat index {index} is outside the valid range "
                         f"0..{num_codes - 1} of {fmt_or_bits} ({bits}-bit codes); were these codes meant for "
                         "another format? encode values with fewbit.encode(x, fmt)")
    per_group = 2 if bits == 4 else 4
    pad = (-flat.numel()) % per_group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 4:
        pairs = flat.view(-1, 2)
        return (pairs[:, 0] & 0xF) | (pairs[:, 1] << 4)
    c = flat.view(-1, 4).to(torch.int32)
    word = c[:, 0] | (c[:, 1] << 6) | (c[:, 2] << 12) | (c[:, 3] << 18)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).reshape(-1).to(torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes :func:`pack` gives for ``numel`` codes of ``bits`` bits (6-bit codes go in groups of four)."""
    return 3 * math.ceil(numel / 4) if bits == 6 else math.ceil(numel * bits / 8)


def unpack(packed: torch.Tensor, fmt_or_bits: str | Format | int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a 1-D uint8 tensor.

    ``numel`` must be a non-negative int that the packed bytes hold (ValueError / TypeError otherwise).
    """
    bits, _ = _code_bits(fmt_or_bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise TypeError(f"unpack expects torch.uint8 bytes, got {got}")
    numel = _check_numel(numel)
    needed = packed_nbytes(numel, bits)
    if packed.numel() < needed:
        raise ValueError(f"{packed.numel()} packed bytes hold fewer than numel={numel} {bits}-bit codes "
                         f"({needed} bytes needed); pass the numel the codes were packed with")
    packed = packed.reshape(-1)
    if bits == 8:
        return packed[:numel].clone()
    if bits == 4:
        return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel]
    b = packed[:needed].view(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    codes = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
