"""Number formats: facts, code tables, casts, encodings and packing, against independent references.

Every test is parametrized over the one list of formats (``fewbit.formats.names()``), so a new format gets the
whole suite.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fewbit
from fewbit import formats
from fewbit.kernels import cast as kernel
from tests.reference import ML_DTYPES, ml_dtypes_cast, ml_dtypes_code_values, slow_cast

ALL = formats.names()
SMALL = [n for n in ALL if formats.get(n).bits <= 8]
SMALL_FLOATS = [n for n in SMALL if not formats.get(n).is_int and n != "e8m0"]
ROUNDINGS = ["nearest_even", "nearest_away", "toward_zero"]
OVERFLOWS = ["saturate", "nonfinite"]
# The formats the exhaustive ml_dtypes comparison covers (ml_dtypes' float types narrower than float32).
ML_FLOATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "bf16", "fp16", "e8m0"]


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32) if x.dtype == torch.float32 else x.view(torch.int64)


def assert_same_values(ours: torch.Tensor, ref: torch.Tensor, inputs: torch.Tensor) -> None:
    """Bit-for-bit equality, except that any NaN matches any NaN."""
    nan_ours, nan_ref = torch.isnan(ours), torch.isnan(ref)
    bad = (nan_ours != nan_ref) | (~nan_ref & (bits_of(ours) != bits_of(ref)))
    if bad.any():
        idx = bad.nonzero()[:8, 0]
        raise AssertionError(
            f"{int(bad.sum())} mismatches; inputs {inputs[idx].tolist()} gave {ours[idx].tolist()}, "
            f"expected {ref[idx].tolist()}"
        )


# ---- facts ----------------------------------------------------------------------------------------------------

# Typed from the OCP specifications and IEEE 754 (independent of the derivation in fewbit.formats).
EXPECTED_FACTS = {  # name: (bits, max, min_normal, min_subnormal)
    "fp32": (32, 3.4028234663852886e38, 2.0**-126, 2.0**-149),
    "tf32": (19, (2 - 2.0**-10) * 2.0**127, 2.0**-126, 2.0**-136),
    "bf16": (16, (2 - 2.0**-7) * 2.0**127, 2.0**-126, 2.0**-133),
    "fp16": (16, 65504.0, 2.0**-14, 2.0**-24),
    "fp8_e5m2": (8, 57344.0, 2.0**-14, 2.0**-16),
    "fp8_e4m3": (8, 448.0, 2.0**-6, 2.0**-9),
    "fp6_e3m2": (6, 28.0, 0.25, 2.0**-4),
    "fp6_e2m3": (6, 7.5, 1.0, 2.0**-3),
    "fp4_e2m1": (4, 6.0, 1.0, 0.5),
    "e8m0": (8, 2.0**127, 2.0**-127, 2.0**-127),
    "int8": (8, 127.0, 1.0, 1.0),
    "uint8": (8, 255.0, 1.0, 1.0),
    "int4": (4, 7.0, 1.0, 1.0),
    "uint4": (4, 15.0, 1.0, 1.0),
}


def test_every_format_has_expected_facts():
    assert set(EXPECTED_FACTS) == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_facts(name):
    fmt = formats.get(name)
    bits, vmax, min_normal, min_sub = EXPECTED_FACTS[name]
    assert (fmt.bits, fmt.max, fmt.min_normal, fmt.min_subnormal) == (bits, vmax, min_normal, min_sub)
    assert fmt.binades == pytest.approx(math.log2(vmax / min_sub))
    if name in ML_DTYPES and not fmt.is_int:
        info = ml_dtypes.finfo(ML_DTYPES[name])
        assert float(info.max) == fmt.max
        assert float(info.smallest_normal) == fmt.min_normal
        assert float(info.eps) == fmt.eps
        if name != "e8m0":
            assert float(info.smallest_subnormal) == fmt.min_subnormal


def test_fp4_magnitudes():
    values = formats.get("fp4_e2m1").values
    assert values[:8].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert values[8:].tolist() == [-0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_lookup_and_unknown_name():
    assert formats.get("fp8_e4m3") is formats.get(formats.get("fp8_e4m3"))
    with pytest.raises(ValueError, match=r"unknown format 'fp7'.*fp8_e4m3.*int4"):
        formats.get("fp7")


# ---- code tables ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_every_code_decodes_like_ml_dtypes(name):
    fmt = formats.get(name)
    ours = formats.decode(torch.arange(fmt.num_codes, dtype=torch.uint8), fmt)
    ref = torch.from_numpy(ml_dtypes_code_values(name, fmt.bits))
    assert_same_values(ours, ref, torch.arange(fmt.num_codes))


@pytest.mark.parametrize("name", SMALL)
def test_encode_decode_round_trip_every_code(name):
    fmt = formats.get(name)
    codes = torch.arange(fmt.num_codes, dtype=torch.uint8)
    values = formats.decode(codes, fmt)
    finite = ~torch.isnan(values)
    assert torch.equal(formats.encode(values[finite], fmt, overflow="nonfinite"), codes[finite])
    if fmt.has_nan:  # every NaN code decodes to NaN and encodes to the canonical NaN of its sign
        assert torch.isnan(formats.decode(formats.encode(values[~finite], fmt), fmt)).all()


@pytest.mark.parametrize("name", SMALL)
def test_encode_matches_ml_dtypes_codes(name):
    fmt = formats.get(name)
    x = torch.randn(20000) * torch.exp2(torch.randint(-12, 12, (20000,)).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan])])
    if not fmt.has_nan:
        x = x[~torch.isnan(x)]
    codes = formats.encode(x, fmt, overflow="nonfinite")
    with np.errstate(all="ignore"):
        ref = x.numpy().astype(ML_DTYPES[name])
    if not fmt.is_int:
        ref_codes = torch.from_numpy(ref.view(np.uint8).copy())
        # ml_dtypes maps NaN and every overflow identically; NaN signs may differ, so compare NaN codes by value.
        same = codes == ref_codes
        both_nan = torch.isnan(formats.decode(codes, fmt)) & torch.isnan(formats.decode(ref_codes, fmt))
        assert (same | both_nan).all()


# ---- casts against ml_dtypes ----------------------------------------------------------------------------------


def all_16bit_patterns(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).float()


def fp32_test_values(name: str, n_random: int = 2_000_000, seed: int = 0) -> torch.Tensor:
    """Random bit patterns over every exponent, exact midpoints between neighbouring codes and their float32
    neighbours, subnormals, +-0, +-inf, NaN."""
    g = torch.Generator().manual_seed(seed)
    random_bits = torch.randint(-(1 << 31), (1 << 31) - 1, (n_random,), generator=g, dtype=torch.int32)
    pieces = [random_bits.view(torch.float32)]
    fmt = formats.get(name)
    if fmt.bits <= 8:
        grid = fmt.values[torch.isfinite(fmt.values)].double().unique()
    else:  # 16-bit formats: every value, from all bit patterns
        grid = all_16bit_patterns(torch.bfloat16 if name == "bf16" else torch.float16).double()
        grid = grid[torch.isfinite(grid)].unique()
    mid = ((grid[1:] + grid[:-1]) / 2).float()  # exact in float32 for every format narrower than float32
    assert torch.equal(mid.double(), (grid[1:] + grid[:-1]) / 2)
    up, down = torch.nextafter(mid, torch.tensor(math.inf)), torch.nextafter(mid, torch.tensor(-math.inf))
    top = torch.tensor([fmt.max], dtype=torch.float64)
    above = torch.tensor([fmt.max * (1 + k / 16) for k in range(1, 40)]).float()
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-149, -(2.0**-149), 2.0**-126])
    pieces += [mid, up, down, grid.float(), top.float(), above, -above, specials]
    pieces.append(torch.randint(1, 1 << 23, (10000,), generator=g, dtype=torch.int32).view(torch.float32))
    return torch.cat(pieces)


def expected_like_ml_dtypes(x: torch.Tensor, name: str, overflow: str) -> torch.Tensor:
    fmt = formats.get(name)
    if overflow == "saturate" and name != "e8m0":
        ref = ml_dtypes_cast(torch.clamp(x, fmt.min, fmt.max), name)  # clamp keeps NaN, maps inf to max
    else:
        ref = ml_dtypes_cast(x, name)
        if name == "e8m0" and overflow == "saturate":
            ref = torch.where(torch.isnan(ref) & (x > 0), torch.tensor(fmt.max), ref)
    if not fmt.has_nan:  # ml_dtypes turns NaN into +-0 for NaN-less formats; fewbit keeps NaN (documented)
        ref = torch.where(torch.isnan(x), x, ref)
    return ref


@pytest.mark.parametrize("overflow", OVERFLOWS)
@pytest.mark.parametrize("name", ML_FLOATS)
@pytest.mark.parametrize("source", ["fp16", "bf16"])
def test_cast_every_16bit_pattern_matches_ml_dtypes(name, source, overflow):
    x = all_16bit_patterns(torch.float16 if source == "fp16" else torch.bfloat16)
    assert_same_values(fewbit.cast(x, name, overflow=overflow), expected_like_ml_dtypes(x, name, overflow), x)


@pytest.mark.slow
@pytest.mark.parametrize("overflow", OVERFLOWS)
@pytest.mark.parametrize("name", ML_FLOATS)
def test_cast_fp32_values_match_ml_dtypes(name, overflow):
    x = fp32_test_values(name)
    assert x.numel() >= 2_000_000
    assert_same_values(fewbit.cast(x, name, overflow=overflow), expected_like_ml_dtypes(x, name, overflow), x)


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_integer_cast_matches_numpy_rint_and_clip(name):
    fmt = formats.get(name)
    x = torch.cat([torch.randn(100000) * 40, torch.arange(-300, 300, 0.5), torch.tensor([-0.0, 0.49, -0.5, 2.5])])
    ref = torch.from_numpy(np.clip(np.rint(x.numpy()), fmt.min, fmt.max).astype(np.float32)) + 0.0  # rint: even
    assert_same_values(fewbit.cast(x, name), ref, x)
    assert not torch.signbit(fewbit.cast(torch.tensor([-0.0, -0.2]), name)).any()  # integers have no -0


# ---- other rounding modes against the slow reference ------------------------------------------------------------


@pytest.mark.parametrize("overflow", OVERFLOWS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name", [n for n in SMALL if n != "e8m0"])
def test_cast_matches_slow_reference(name, rounding, overflow):
    fmt = formats.get(name)
    x = fp32_test_values(name, n_random=100_000, seed=1)
    x = torch.cat([x, fmt.values[torch.isfinite(fmt.values)] * 1.25, torch.randn(50000) * fmt.max / 3])
    values = fmt.values.numpy().astype(np.float64)
    ref = slow_cast(x.double().numpy(), values, rounding, overflow, has_inf=fmt.inf, has_nan=fmt.has_nan,
                    signed_zero=fmt.signed and not fmt.is_int, max_code_odd=bool(fmt.max_code & 1))
    assert_same_values(fewbit.cast(x, name, rounding=rounding, overflow=overflow),
                       torch.from_numpy(ref).float(), x)


def tf32_reference(x: np.ndarray, rounding: str) -> np.ndarray:
    """tf32 from the definition: 10 fraction bits at the value's exponent (fp32 range; subnormal step 2^-136)."""
    out = np.empty_like(x)
    for i, v in enumerate(x):
        if not np.isfinite(v) or v == 0:
            out[i] = v
            continue
        e = max(math.frexp(abs(v))[1] - 1, -126)
        step = math.ldexp(1.0, e - 10)
        q = abs(v) / step
        lo = math.floor(q)
        frac = q - lo
        if rounding == "toward_zero":
            n = lo
        elif rounding == "nearest_away":
            n = lo + (frac >= 0.5)
        else:
            n = lo + (frac > 0.5 or (frac == 0.5 and lo % 2 == 1))
        r = n * step
        out[i] = math.copysign(min(r, (2 - 2.0**-10) * 2.0**127) if rounding != "nearest_even" or r < 2.0**128
                               else math.inf, v)
    return out


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_tf32_matches_definition(rounding):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (20000,), generator=g, dtype=torch.int32).view(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() < 3e38)]
    ref = torch.from_numpy(tf32_reference(x.double().numpy(), rounding)).float()
    assert_same_values(fewbit.cast(x, "tf32", rounding=rounding), ref, x)


def test_fp64_input_is_rounded_once():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(100000, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-140, 120, (100000,), generator=g).double())
    assert_same_values(fewbit.cast(x, "fp32"), x.float().double(), x)
    # A float64 value just above an fp8 midpoint must round up, although float32 would round it onto the midpoint.
    mid = 1.0 + 1 / 16  # midpoint of 1 and 1.125 in fp8_e4m3
    assert fewbit.cast(torch.tensor([mid + 2.0**-40], dtype=torch.float64), "fp8_e4m3").item() == 1.125
    assert fewbit.cast(torch.tensor([mid + 2.0**-40]), "fp8_e4m3").item() == 1.0  # float32 input: it is the tie
    x8 = x[x.abs() < 400]
    values = formats.get("fp8_e4m3").values.numpy().astype(np.float64)
    ref = slow_cast(x8.numpy(), values, "nearest_even", "saturate", has_inf=False, has_nan=True, signed_zero=True,
                    max_code_odd=False)
    assert_same_values(fewbit.cast(x8, "fp8_e4m3"), torch.from_numpy(ref), x8)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_keep_their_dtype(name, dtype):
    fmt = formats.get(name)
    x = (torch.randn(5000) * 8).to(dtype)
    container = formats.get("bf16" if dtype == torch.bfloat16 else "fp16")
    if fmt.max > container.max or fmt.min_subnormal < container.min_subnormal:
        with pytest.raises(ValueError, match="do not all fit"):
            fewbit.cast(x, name)
        return
    out = fewbit.cast(x, name)
    assert out.dtype == dtype
    assert_same_values(out.float(), fewbit.cast(x.float(), name), x)


def test_16bit_input_with_a_wider_format_is_unchanged_or_refused():
    x = torch.randn(100).to(torch.bfloat16)
    assert torch.equal(fewbit.cast(x, "fp32"), x)
    assert torch.equal(fewbit.cast(x, "tf32"), x)
    with pytest.raises(ValueError, match=r"fp16 values do not all fit in torch.bfloat16.*x.float\(\)"):
        fewbit.cast(x, "fp16")


# ---- compiled kernel against its eager reference ---------------------------------------------------------------


@pytest.mark.parametrize("overflow", OVERFLOWS)
@pytest.mark.parametrize("rounding", [*ROUNDINGS, "stochastic"])
def test_compiled_kernel_equals_eager_reference(rounding, overflow):
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (200_000,), generator=g, dtype=torch.int32)
    random_bits = torch.randint(0, 1 << 23, x.shape, generator=g, dtype=torch.int32)
    run = kernel.round_bits_kernel(kernel.Rounding(rounding), kernel.FLOAT32, kernel.Overflow(overflow))
    for name in ALL:
        params = formats.get(name).kernel_params(kernel.FLOAT32)
        rb = random_bits if rounding == "stochastic" else None
        assert torch.equal(run(x, params, rb), run.eager(x, params, rb)), name


# ---- stochastic rounding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in SMALL if n != "e8m0"])
def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours(name):
    fmt = formats.get(name)
    g = torch.Generator().manual_seed(5)
    finite = fmt.values[torch.isfinite(fmt.values)].unique()
    # Points strictly between neighbours, including the subnormal range and the gap next to zero.
    lo, hi = finite[:-1], finite[1:]
    frac = torch.tensor([0.1, 0.37, 0.5, 0.9])
    x = (lo[:, None] + (hi - lo)[:, None] * frac[None, :]).reshape(-1)
    draws = 4000
    xs = x.repeat(draws)
    out = fewbit.cast(xs, name, rounding="stochastic", generator=g).view(draws, -1)
    lower = lo[:, None].expand(-1, 4).reshape(-1)
    upper = hi[:, None].expand(-1, 4).reshape(-1)
    assert ((out == lower) | (out == upper)).all()
    p_up = (x - lower) / (upper - lower)
    mean_up = (out == upper).double().mean(0)
    # Binomial standard error with 4000 draws is at most 0.0079; allow 6 sigma per point.
    assert (mean_up - p_up.double()).abs().max() < 6 * 0.0079
    # Mean error over every draw of every point: unbiased within a tight bound.
    err = (out.double() - x.double()) / (upper - lower).double()
    assert abs(err.mean().item()) < 4 * 0.5 / math.sqrt(err.numel())


def test_stochastic_rounding_reproducible_with_generator():
    x = torch.randn(10000)
    a = fewbit.cast(x, "fp8_e5m2", rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = fewbit.cast(x, "fp8_e5m2", rounding="stochastic", generator=torch.Generator().manual_seed(7))
    c = fewbit.cast(x, "fp8_e5m2", rounding="stochastic", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stochastic_rounding_below_smallest_subnormal():
    minsub = formats.get("fp8_e4m3").min_subnormal
    x = torch.full((200_000,), minsub * 0.3)
    out = fewbit.cast(x, "fp8_e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(9))
    assert set(out.unique().tolist()) <= {0.0, minsub}
    assert (out == minsub).double().mean().item() == pytest.approx(0.3, abs=0.005)


# ---- properties -------------------------------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(finite_floats, min_size=1, max_size=64))
@pytest.mark.parametrize("name", ALL)
def test_properties(name, values):
    fmt = formats.get(name)
    x = torch.tensor(values, dtype=torch.float32)
    y = fewbit.cast(x, name)
    assert_same_values(fewbit.cast(y, name), y, x)  # idempotent
    if fmt.min == -fmt.max:  # sign-symmetric formats (not int8's -128, not unsigned ones)
        assert_same_values(fewbit.cast(-x, name), -y, x)
    order = torch.argsort(x)  # monotone
    ys = y[order]
    ys = ys[~torch.isnan(ys)]
    assert (ys[1:] >= ys[:-1]).all()
    if fmt.bits <= 8:  # every result is in the value set
        table = fmt.values[~torch.isnan(fmt.values)]
        finite_y = y[~torch.isnan(y)]
        assert torch.isin(finite_y, table).all()


# ---- specials ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_specials(name):
    fmt = formats.get(name)
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30])
    sat = fewbit.cast(x, name, overflow="saturate")
    non = fewbit.cast(x, name, overflow="nonfinite")
    assert torch.isnan(sat[0]) and torch.isnan(non[0])  # NaN stays NaN in every format
    if name == "e8m0":  # no sign, no zero: x <= 0 is NaN
        assert torch.isnan(sat[2:5]).all() and sat[1].item() == fmt.max and torch.isnan(non[1])
        return
    assert sat[1].item() == fmt.max and sat[2].item() == fmt.min  # saturate: inf -> +-max
    expected_inf = math.inf if fmt.inf else math.nan if fmt.has_nan else fmt.max
    big = non[5:6] if fmt.max < 1e30 else non[1:2]  # 1e30 overflows the narrow formats only
    if math.isnan(expected_inf):
        assert torch.isnan(non[1]) and torch.isnan(big).all()
    else:
        assert non[1].item() == expected_inf and big.item() == expected_inf
    if fmt.max >= 1e30:
        assert non[5].item() == sat[5].item() and math.isfinite(sat[5].item())
    assert torch.signbit(sat[4]).item() == (not fmt.is_int)  # -0 kept for floats, +0 for integers
    # Toward zero never overflows a finite input, whatever the overflow rule.
    toward = fewbit.cast(x[5:], name, rounding="toward_zero", overflow="nonfinite")
    assert torch.equal(toward, fewbit.cast(x[5:], name, rounding="toward_zero"))


def test_ml_dtypes_documented_examples():
    x = torch.tensor([460.0, 464.0, 465.0, 480.0])
    out = fewbit.cast(x, "fp8_e4m3", overflow="nonfinite")
    assert out[:2].tolist() == [448.0, 448.0] and torch.isnan(out[2:]).all()  # 464 is the tie, to even (448)
    assert fewbit.cast(x, "fp8_e4m3").tolist() == [448.0] * 4


def test_empty_and_non_contiguous():
    assert fewbit.cast(torch.empty(0, 3), "fp8_e4m3").shape == (0, 3)
    x = torch.randn(64, 32)
    assert torch.equal(fewbit.cast(x.t(), "fp4_e2m1"), fewbit.cast(x.t().contiguous(), "fp4_e2m1"))
    assert fewbit.encode(torch.empty(0), "fp4_e2m1").shape == (0,)


# ---- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"unknown rounding 'round'.*nearest_even.*stochastic"):
        fewbit.cast(x, "fp8_e4m3", rounding="round")
    with pytest.raises(ValueError, match=r"unknown overflow 'clip'.*saturate.*nonfinite"):
        fewbit.cast(x, "fp8_e4m3", overflow="clip")
    with pytest.raises(TypeError, match=r"float tensor.*torch.int64.*x.float\(\)"):
        fewbit.cast(torch.arange(4), "fp8_e4m3")
    with pytest.raises(TypeError, match="complex"):
        fewbit.cast(torch.randn(4, dtype=torch.complex64), "fp8_e4m3")
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        fewbit.cast([1.0, 2.0], "fp8_e4m3")
    with pytest.raises(ValueError, match="no NaN code"):
        fewbit.encode(torch.tensor([math.nan]), "fp4_e2m1")
    with pytest.raises(ValueError, match="8-bit codes"):
        fewbit.encode(x, "bf16")
    with pytest.raises(ValueError, match="out of range for fp4_e2m1"):
        fewbit.decode(torch.tensor([17], dtype=torch.uint8), "fp4_e2m1")
    with pytest.raises(TypeError, match="uint8"):
        fewbit.decode(torch.tensor([1]), "fp4_e2m1")


# ---- packing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 6, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 1001])
def test_pack_round_trip(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)
    packed = fewbit.pack(codes, bits)
    assert packed.numel() == {4: (n + 1) // 2, 6: 3 * ((n + 3) // 4), 8: n}[bits]
    assert torch.equal(fewbit.unpack(packed, bits, n), codes)


def test_pack_byte_layout():
    nibbles = torch.tensor([0x1, 0x2, 0x3], dtype=torch.uint8)
    assert fewbit.pack(nibbles, "fp4_e2m1").tolist() == [0x21, 0x03]  # element 0 in the low nibble
    sixes = torch.tensor([0b000001, 0b000010, 0b000011, 0b111111], dtype=torch.uint8)
    # Little-endian bit stream: bits 0-5 element 0, bits 6-11 element 1, ...
    word = 1 | (2 << 6) | (3 << 12) | (63 << 18)
    assert fewbit.pack(sixes, "fp6_e3m2").tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    with pytest.raises(ValueError, match="fewer than"):
        fewbit.unpack(torch.zeros(1, dtype=torch.uint8), 4, 3)
    with pytest.raises(ValueError, match="4-, 6- and 8-bit"):
        fewbit.pack(nibbles, "bf16")
