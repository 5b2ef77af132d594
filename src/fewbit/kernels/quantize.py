"""Fused quantize / fake-quantize passes over a (groups, group_size) float32 tensor.

Each function below is plain torch (the reference); :func:`mx_kernel` and :func:`scaled_kernel` return it
compiled and specialised to one element format, scale rule and rounding mode, so that amax, scale, rounding,
encoding and (for fake quantization) the dequantizing multiply run as one fused loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fewbit.kernels.cast import (
    FLOAT32,
    N_PARAMS,
    P_C,
    P_FLAGS,
    P_M,
    P_MAXNEG,
    P_MAXPOS,
    P_MINSUB,
    P_OVER_VALUE,
    Overflow,
    Rounding,
    encode_rounded,
    fast,
    round_bits,
    specialise,
)
from fewbit.scaling import ScaleMode, e8m0_reciprocal, mx_scale_codes


def mx_round(xg: torch.Tensor, elem_params: torch.Tensor, random_bits: torch.Tensor | None, *, mode: ScaleMode,
             emax: int, elem_max: float, elem_mbits: int, fixed_point: int, rounding: Rounding
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """MX: per-row E8M0 scale codes and the elements rounded onto the element grid (in element units)."""
    amax = xg.abs().amax(dim=1, keepdim=True)  # NaN propagates
    codes = mx_scale_codes(amax, mode, emax, elem_max, elem_mbits)
    scaled = xg * e8m0_reciprocal(codes)  # exact: multiplying by a power of two
    if fixed_point:  # MX integers: an implicit 2^-fixed_point on the element (MXINT8: 1.6 fixed point)
        scaled = scaled * float(1 << fixed_point)
    rounded = round_bits(scaled.view(torch.int32), elem_params, rounding, FLOAT32, Overflow.SATURATE, random_bits)
    return rounded.view(torch.float32), codes


def mx_row_grid(xbits: torch.Tensor, elem_params: torch.Tensor, *, mode: ScaleMode, emax: int, elem_max: float,
                elem_mbits: int, fixed_point: int) -> torch.Tensor:
    """Per row of float32 bit patterns: the parameter vector of the row's scaled element grid (the element grid
    times the block scale 2^e), shape (rows, 1, N_PARAMS), with the E8M0 code in an extra last column."""
    magnitude = xbits & 0x7FFFFFFF
    amax_bits = magnitude.amax(dim=1, keepdim=True)  # non-negative floats order like their bit patterns; NaN top
    codes = mx_scale_codes(amax_bits.view(torch.float32), mode, emax, elem_max, elem_mbits)
    e = codes - 127 - fixed_point  # the row's exponent shift, in element units
    p = elem_params
    minsub_exp = (p[P_MINSUB] >> 23) - 127 + e  # the element's smallest step is a normal power of two
    minsub_row = torch.where(minsub_exp >= -126, (minsub_exp + 127) << 23, 1 << torch.clamp(minsub_exp + 149, 0, 22))

    def scaled_limit(limit_bits):
        exp_field = (limit_bits >> 23) + e
        return torch.where(exp_field > 254, 0x7F800000, limit_bits + (e << 23))

    columns = [p[P_M].expand_as(e), p[P_C] + e, minsub_row, scaled_limit(p[P_MAXPOS]), scaled_limit(p[P_MAXNEG]),
               p[P_OVER_VALUE].expand_as(e), p[P_FLAGS].expand_as(e), codes]
    assert len(columns) == N_PARAMS + 1
    return torch.stack(columns, dim=-1)


def mx_apply_grid(xbits: torch.Tensor, grid: torch.Tensor, random_bits: torch.Tensor | None, *, rounding: Rounding
                  ) -> torch.Tensor:
    """Round each row of ``xbits`` onto its scaled grid (from :func:`mx_row_grid`); NaN-scale rows become NaN."""
    out = round_bits(xbits, grid[..., :N_PARAMS], rounding, FLOAT32, Overflow.SATURATE, random_bits)
    return torch.where(grid[..., N_PARAMS] == 255, 0x7FC00000, out)


def mx_fake_bits(xbits: torch.Tensor, elem_params: torch.Tensor, random_bits: torch.Tensor | None, *,
                 mode: ScaleMode, emax: int, elem_max: float, elem_mbits: int, fixed_point: int, rounding: Rounding
                 ) -> torch.Tensor:
    """MX fake quantization in the integer domain: each row of float32 bit patterns is rounded directly onto its
    block's scaled element grid, so no float multiply or division runs.

    Exact because every scaled grid is a float32 grid: its smallest step is at least 2^-149 and its largest value
    either a normal float32 or beyond float32's range (an inf block, whose saturation value is then inf).
    """
    grid = mx_row_grid(xbits, elem_params, mode=mode, emax=emax, elem_max=elem_max, elem_mbits=elem_mbits,
                       fixed_point=fixed_point)
    return mx_apply_grid(xbits, grid, random_bits, rounding=rounding)


@functools.cache
def mx_kernel(fake: bool, mode: ScaleMode, emax: int, elem_max: float, elem_mbits: int, fixed_point: int,
              rounding: Rounding) -> Callable:
    """Compiled MX pass. ``fake``: takes float32 bit patterns and returns the dequantized values' bit patterns;
    else takes float32 values and returns (element codes uint8, scale codes uint8)."""
    options = dict(mode=mode, emax=emax, elem_max=elem_max, elem_mbits=elem_mbits, fixed_point=fixed_point,
                   rounding=rounding)

    def fake_quantize(xbits, elem_params, random_bits=None):
        return mx_fake_bits(xbits, elem_params, random_bits, **options)

    if fake:
        return fast(specialise(fake_quantize, "mx_fake_" + name_suffix(mode, emax, elem_mbits, elem_max,
                                                                       fixed_point, rounding)))

    def quantize(xg, elem_params, enc_params, random_bits=None):
        rounded, codes = mx_round(xg, elem_params, random_bits, **options)
        return encode_rounded(rounded, enc_params), codes.to(torch.uint8)

    return fast(specialise(quantize, "mx_quantize_" + name_suffix(mode, emax, elem_mbits, elem_max, fixed_point,
                                                                   rounding)))


def name_suffix(mode: ScaleMode, emax: int, elem_mbits: int, elem_max: float, fixed_point: int, rounding: Rounding
                ) -> str:
    name = f"{mode.value}_e{emax}_m{elem_mbits}_max{elem_max:g}_fx{fixed_point}_{rounding.value}"
    return name.replace(".", "p").replace("-", "n")


def _row_amax(xbits: torch.Tensor) -> torch.Tensor:
    """Per-row max of |x| as float32 (G, 1), from the bit patterns: one read, no temporary |x| tensor."""
    return (xbits & 0x7FFFFFFF).amax(dim=1, keepdim=True).view(torch.float32)


row_amax = fast(_row_amax)


def scaled_round(xg: torch.Tensor, scale: torch.Tensor, elem_params: torch.Tensor, random_bits: torch.Tensor | None,
                 rounding: Rounding, overflow: Overflow) -> torch.Tensor:
    """Elements ``xg / scale`` rounded onto the element grid (float32 scale per row)."""
    scaled = (xg / scale).contiguous()
    return round_bits(scaled.view(torch.int32), elem_params, rounding, FLOAT32, overflow, random_bits).view(
        torch.float32)


@functools.cache
def scaled_kernel(fake: bool, rounding: Rounding, overflow: Overflow) -> Callable:
    """Compiled pass for float32 scales (per tensor, per axis, per group)."""

    def fake_quantize(xg, scale, elem_params, random_bits=None):
        return scaled_round(xg, scale, elem_params, random_bits, rounding, overflow) * scale

    def quantize(xg, scale, elem_params, enc_params, random_bits=None):
        return encode_rounded(scaled_round(xg, scale, elem_params, random_bits, rounding, overflow), enc_params)

    fn = fake_quantize if fake else quantize
    return fast(specialise(fn, f"scaled_{fn.__name__}_{rounding.value}_{overflow.value}"))
