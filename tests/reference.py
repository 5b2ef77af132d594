"""Independent references for the tests: ml_dtypes, and slow casts written from the definition of rounding.

Nothing here imports fewbit's kernels; the slow references use only a format's table of values (which the tests
check against ml_dtypes separately) and float64 numpy arithmetic.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch

# fewbit format name -> the ml_dtypes / numpy dtype that implements it.
ML_DTYPES = {
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "e8m0": ml_dtypes.float8_e8m0fnu,
    "int8": np.int8,
    "uint8": np.uint8,
    "int4": ml_dtypes.int4,
    "uint4": ml_dtypes.uint4,
}


def ml_dtypes_cast(x: torch.Tensor, name: str) -> torch.Tensor:
    """x (float32) rounded by ml_dtypes (round to nearest even, non-saturating) and read back as float32."""
    with np.errstate(all="ignore"):
        return torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32))


def ml_dtypes_code_values(name: str, bits: int) -> np.ndarray:
    """The value ml_dtypes gives every code (sub-byte types hold one code per byte in the low bits)."""
    codes = np.arange(1 << bits, dtype=np.uint8)
    dtype = ML_DTYPES[name]
    if np.dtype(dtype).kind in "iu":  # integers: two's complement in the low bits, sign-extended
        values = codes.astype(np.int64)
        if np.dtype(dtype).kind == "i" or name == "int4":
            values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
        return values.astype(np.float32)
    return codes.view(dtype).astype(np.float32)


def slow_cast(x: np.ndarray, values: np.ndarray, rounding: str, overflow: str, *, has_inf: bool, has_nan: bool,
              signed_zero: bool, max_code_odd: bool) -> np.ndarray:
    """Round float64 ``x`` onto the finite value set ``values`` (a format's table), from the definitions.

    - nearest_even / nearest_away: the nearer neighbour; ties to the neighbour whose code is even (the table index
      parity of a float format's code equals its mantissa's last bit) / away from zero.
    - toward_zero: the neighbour of smaller magnitude. stochastic is not covered here.
    - Overflow: nearest modes overflow when |x| exceeds max by at least half a top-binade step (a tie overflows
      when max's code is odd); toward_zero never overflows a finite x. saturate -> +-max, nonfinite -> inf / NaN
      where the format has them. NaN -> NaN. Zero results keep the sign of x where the format has -0.
    """
    finite = np.unique(values[np.isfinite(values)].astype(np.float64))  # sorted, -0 merged with +0
    # Parity of each value's code: for floats the mantissa's last bit; for a sign-magnitude table the code of -v
    # has the same low bits as the code of v, so parity is a property of |v|.
    parity = {}
    for code, v in enumerate(values):
        if np.isfinite(v):
            parity.setdefault(float(abs(v)), code & 1)
    vmax, vmin = finite[-1], finite[0]
    ax = np.abs(x)
    out = np.empty_like(x)
    hi_idx = np.clip(np.searchsorted(finite, x, side="left"), 0, len(finite) - 1)
    lo_idx = np.clip(np.searchsorted(finite, x, side="right") - 1, 0, len(finite) - 1)
    lo, hi = finite[lo_idx], finite[hi_idx]
    exact = lo == hi
    d_lo, d_hi = x - lo, hi - x
    if rounding == "toward_zero":
        pick = np.where(x >= 0, lo, hi)
    elif rounding == "nearest_away":
        pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(x >= 0, hi, lo)))
    elif rounding == "nearest_even":
        lo_even = np.array([parity[abs(v)] == 0 for v in lo])
        pick = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(lo_even, lo, hi)))
    else:
        raise ValueError(rounding)
    out[:] = np.where(exact, lo, pick)
    # Beyond the table: overflow on either side.
    gap = vmax - finite[-2] if vmax > 0 else 0.0  # spacing below max; the next (unrepresentable) step is the same
    for side, limit in ((1, vmax), (-1, vmin)):
        beyond = side * x > side * limit
        if not beyond.any():
            continue
        distance = side * x - side * limit
        if rounding == "toward_zero":
            over = np.zeros_like(beyond)
        elif rounding == "nearest_away":
            over = distance >= gap / 2
        else:
            over = (distance > gap / 2) | ((distance == gap / 2) & max_code_odd)
        over |= np.isinf(x)
        nonfinite_value = side * math.inf if has_inf else math.nan if has_nan else limit
        value = np.where(over & (overflow == "nonfinite"), nonfinite_value, limit)
        out = np.where(beyond, value, out)
    out = np.where(np.isnan(x), np.nan, out)
    if signed_zero:
        out = np.where(out == 0, np.copysign(0.0, x), out)
    else:
        out = np.where(out == 0, 0.0, out)
    del ax
    return out


def per_tensor_fake_quantize(x: torch.Tensor, name: str, amax: float) -> torch.Tensor:
    """x (float32) fake-quantized onto ``name`` with one scale ``amax / max`` (float32), saturating, by ml_dtypes.

    The scaled values are clipped to +-max (the largest finite value ml_dtypes gives the format) and rounded to
    nearest even by ml_dtypes, then multiplied back by the scale: per-tensor scaling written from its definition,
    for any amax (the current tensor's, or a delayed history's).
    """
    fmt_max = float(ml_dtypes.finfo(ML_DTYPES[name]).max)
    scale = torch.tensor(amax, dtype=torch.float32) / torch.tensor(fmt_max, dtype=torch.float32)
    scaled = torch.clamp(x.detach().float() / scale, -fmt_max, fmt_max)
    return ml_dtypes_cast(scaled, name) * scale
