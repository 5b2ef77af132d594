"""E8M0 scale arithmetic, all in one place: the shared exponent of an MX block, and E8M0 codes to float32.

An E8M0 code ``c`` (0..254) means ``2^(c - 127)``; 255 is NaN; there is no zero and no sign. Every function here
works on the float32 *bit patterns* (exponent field ``(bits >> 23) & 0xFF``, mantissa ``bits & 0x7FFFFF``), never
through ``log2`` on floats, so the results are exact and the compiled and eager runs agree bit for bit.

The scale modes (:class:`~fewbit.choices.ScaleMode`) and their edge cases (NaN, inf, all-zero blocks, float32
subnormals) are described for users in :mod:`fewbit.scaling`; below is how each is computed from the bits, with
``emax`` the exponent of the element format's largest power of two (fp8_e4m3: 8, MXINT8: 0):

- ``floor``: ``exp(amax) - emax`` where ``exp`` is the exponent field minus 127;
- ``ceil``: the same, plus one when amax's mantissa is non-zero (amax not a power of two);
- ``even``: ``floor`` of amax rounded (ties away) to the element's ``elem_mbits`` mantissa bits, by adding half
  an element quantum to the bits and keeping the exponent field;
- ``rceil``: ``ceil(log2(amax / elem_max))`` with the division rounded in float32 (as the hardware does), the
  ceiling read off the quotient's bits.

The unbiased exponent is clamped to [-127, 127] (rceil) or [-127, 128] (the others: 128, from an inf or from a
scale above 2^127, becomes the NaN code 255).
"""

from __future__ import annotations

import torch

from fewbit.choices import ScaleMode

E8M0_BIAS = 127  # code 127 is 2^0
E8M0_NAN = 255  # the one NaN code


def mx_scale_codes(amax: torch.Tensor, mode: ScaleMode, emax_elem: int, elem_max: float, elem_mbits: int
                   ) -> torch.Tensor:
    """E8M0 scale codes (int32, 0..255) for float32 block maxima ``amax``, exactly by the bits (see module doc).

    A NaN amax gives the NaN code 255.
    """
    bits = amax.view(torch.int32)
    if mode == ScaleMode.RCEIL:
        descale = amax / elem_max  # float32 division, rounded to nearest even, as the hardware recipe does
        dbits = descale.view(torch.int32)
        exp_field = dbits >> 23
        mantissa = dbits & 0x7FFFFF
        # ceil(log2(d)) for normal d: e + (mantissa != 0); for subnormal d (exp field 0) it is at most -126,
        # below the clamp at -127 once d <= 2^-127, and exactly -126 for d in (2^-127, 2^-126).
        ceil_log2 = torch.where(exp_field > 0, exp_field - 127 + (mantissa != 0).to(torch.int32),
                                torch.where(mantissa > (1 << 22), -126, -127))
        ceil_log2 = torch.where(descale == 0, -127, ceil_log2)
        unbiased = torch.clamp(ceil_log2, -E8M0_BIAS, E8M0_BIAS)  # inf -> exp field 255 -> 128 -> 127
    else:
        if mode == ScaleMode.EVEN:  # round amax to the element's mantissa width first (ties away), keep exponent
            bits = (bits + (1 << (23 - elem_mbits - 1))) & 0x7F800000
        exp_field = (bits >> 23) & 0xFF
        log2 = exp_field - 127
        if mode == ScaleMode.CEIL:
            log2 = log2 + ((bits & 0x7FFFFF) > 0).to(torch.int32)
        unbiased = torch.clamp(log2 - emax_elem, -E8M0_BIAS, E8M0_BIAS + 1)  # 128 becomes the NaN code 255
    codes = unbiased + E8M0_BIAS
    return torch.where(torch.isnan(amax), E8M0_NAN, codes)


def mx_block_codes(xg: torch.Tensor, *, mode: ScaleMode, emax: int, elem_max: float, elem_mbits: int
                   ) -> torch.Tensor:
    """E8M0 scale codes (int32, shape (G, 1)) of the float32 rows of ``xg`` (G, block_size): the shared exponent.

    The row amax is taken from the bit patterns (non-negative floats order like their patterns; NaN patterns are
    the largest, so a NaN anywhere in a row gives that row the NaN code).
    """
    amax_bits = (xg.view(torch.int32) & 0x7FFFFFFF).amax(dim=1, keepdim=True)
    return mx_scale_codes(amax_bits.view(torch.float32), mode, emax, elem_max, elem_mbits)


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """2^(code - 127) as float32 (2^-127 is a float32 subnormal), NaN for 0xFF."""
    codes = codes.to(torch.int32)
    bits = torch.where(codes == 0, 1 << 22, codes << 23)
    return torch.where(codes == E8M0_NAN, 0x7FC00000, bits).view(torch.float32)


def e8m0_reciprocal(codes: torch.Tensor) -> torch.Tensor:
    """2^(127 - code) as float32 (exact for every code; 2^-127 for code 254; NaN for 0xFF)."""
    codes = codes.to(torch.int32)
    bits = torch.where(codes == 254, 1 << 22, (254 - codes) << 23)
    return torch.where(codes == E8M0_NAN, 0x7FC00000, bits).view(torch.float32)
