"""Fused quantize / fake-quantize passes over a (groups, group_size) float32 tensor.

Each function below is plain torch (the reference); :func:`mx_kernel` and :func:`scaled_kernel` return it
compiled and specialised to one element format, scale rule and rounding mode, so that amax, scale, rounding,
encoding and (for fake quantization) the dequantizing multiply run as one fused loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from fewbit.kernels.cast import FLOAT32, Overflow, Rounding, encode_rounded, fast, round_bits, specialise
from fewbit.scaling import ScaleMode, e8m0_reciprocal, e8m0_to_float, mx_scale_codes


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


@functools.cache
def mx_kernel(fake: bool, mode: ScaleMode, emax: int, elem_max: float, elem_mbits: int, fixed_point: int,
              rounding: Rounding) -> Callable:
    """Compiled MX pass. ``fake``: returns dequantized float32 values; else (codes uint8, scale codes uint8)."""
    options = dict(mode=mode, emax=emax, elem_max=elem_max, elem_mbits=elem_mbits, fixed_point=fixed_point,
                   rounding=rounding)

    def fake_quantize(xg, elem_params, random_bits=None):
        rounded, codes = mx_round(xg, elem_params, random_bits, **options)
        if fixed_point:
            rounded = rounded * (1.0 / (1 << fixed_point))
        return rounded * e8m0_to_float(codes)

    def quantize(xg, elem_params, enc_params, random_bits=None):
        rounded, codes = mx_round(xg, elem_params, random_bits, **options)
        return encode_rounded(rounded, enc_params), codes.to(torch.uint8)

    fn = fake_quantize if fake else quantize
    name = f"mx_{fn.__name__}_{mode.value}_e{emax}_m{elem_mbits}_max{elem_max:g}_fx{fixed_point}_{rounding.value}"
    return fast(specialise(fn, name.replace(".", "p").replace("-", "n")))


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
