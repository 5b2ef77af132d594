"""Property-based tests: for arbitrary shapes (empty, odd, not a multiple of the block), dtypes, strides, special
values and options, every public verb either matches its reference or raises one of fewbit's documented errors
(ValueError / TypeError with a message), never an internal one (IndexError, KeyError, a RuntimeError from torch).

References: ``slow_cast`` (tests/reference.py, from the definition of rounding) for casts; the verbs' own inverses
(``decode(encode(cast(x))) == cast(x)``, ``unpack(pack(c)) == c``) and ``dequantize(quantize(x)) ==
fake_quantize(x)`` bit for bit. The kernels run eagerly here (``FEWBIT_COMPILE=0``): the compiled runs equal the
eager ones (tests/test_kernels.py, test_qtensor.py), and compiling every drawn combination would take minutes.

Profiles: ``fewbit`` (default: derandomized, so a run is reproducible, about 40 s on 2 cores) and ``fewbit-thorough``
(2,500 examples a test); choose with ``HYPOTHESIS_PROFILE=fewbit-thorough``.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fewbit
from fewbit import formats
from fewbit.qtensor import QuantSpec
from fewbit.scaling import AmaxHistory, Block, PerAxis, PerGroup, PerTensor
from tests.reference import slow_cast

settings.register_profile("fewbit", max_examples=250, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fewbit-thorough", parent=settings.get_profile("fewbit"), max_examples=2500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fewbit"))

DOCUMENTED_ERRORS = (ValueError, TypeError)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = [n for n in formats.names() if formats.get(n).bits <= 8]
ROUNDINGS = ["nearest_even", "nearest_away", "toward_zero", "stochastic"]
OVERFLOWS = ["saturate", "nonfinite"]
SPECIALS = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, 2.0**-126, 6e-8, 65504.0,
            448.0, 449.0, 3e38, -3e38, 0.5, 1.5, 2.5, -2.5]


@pytest.fixture(autouse=True, scope="module")
def eager_kernels():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEWBIT_COMPILE", "0")
        yield


def bits_of(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t.view(torch.int32)


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit for bit, except that any NaN matches any NaN; shapes and dtypes equal."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    nan_ours, nan_ref = torch.isnan(ours), torch.isnan(ref)
    assert torch.equal(nan_ours, nan_ref)
    assert torch.equal(bits_of(ours)[~nan_ref], bits_of(ref)[~nan_ref])


# ---- strategies ------------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple) | st.sampled_from([(0,), (3, 0), (2, 33),
                                                                                            (1, 64), (65,)])
values = st.sampled_from(SPECIALS) | st.floats(width=32, allow_nan=True, allow_infinity=True) \
    | st.floats(-1000, 1000, width=32)


@st.composite
def tensors(draw, dtypes=DTYPES):
    """A float tensor of a drawn shape, dtype and layout (contiguous, strided by 2, or transposed)."""
    shape = draw(shapes)
    dtype = draw(st.sampled_from(dtypes))
    strided = draw(st.sampled_from(["contiguous", "step", "transposed"]))
    full = list(shape)
    if strided == "step" and full:
        full[-1] *= 2
    if strided == "transposed" and len(full) >= 2:
        full[-1], full[-2] = full[-2], full[-1]
    n = math.prod(full)
    data = draw(st.lists(values, min_size=n, max_size=n))
    x = torch.tensor(data, dtype=torch.float32).reshape(full).to(dtype)  # 16-bit: out of range becomes inf
    if strided == "step" and full:
        x = x[..., ::2]
    if strided == "transposed" and len(full) >= 2:
        x = x.transpose(-1, -2)
    assert tuple(x.shape) == shape
    return x


# ---- cast, encode / decode ---------------------------------------------------------------------------------------


@given(x=tensors(), name=st.sampled_from(formats.names()), rounding=st.sampled_from(ROUNDINGS),
       overflow=st.sampled_from(OVERFLOWS), seed=st.integers(0, 2**16))
def test_cast_matches_reference_or_raises(x, name, rounding, overflow, seed):
    fmt = formats.get(name)
    generator = torch.Generator().manual_seed(seed)
    try:
        out = formats.cast(x, name, rounding, overflow, generator)
    except DOCUMENTED_ERRORS as error:
        assert str(error)
        assert x.dtype != torch.float32  # float32 input is accepted by every format
        return
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.dtype == torch.float32 and fmt.bits <= 8 and name != "e8m0" and rounding != "stochastic":
        table = fmt.values.numpy().astype(np.float64)
        ref = slow_cast(x.double().numpy().reshape(-1), table, rounding, overflow, has_inf=fmt.inf,
                        has_nan=fmt.has_nan, signed_zero=fmt.signed and not fmt.is_int,
                        max_code_odd=bool(fmt.max_code & 1))
        assert_same(out.reshape(-1), torch.from_numpy(ref).float())
    if rounding != "stochastic":  # values of the format stay put
        again = formats.cast(out, name, rounding, overflow)
        if name == "e8m0":  # known: 2^-127 (a float32 subnormal) -> 2^-126 under nearest_away, see test_hardening
            keep = out.float().abs() >= 2.0**-126
            again, out = again[keep], out[keep]
        assert_same(again, out)


@given(x=tensors(), name=st.sampled_from(SMALL), rounding=st.sampled_from(ROUNDINGS),
       overflow=st.sampled_from(OVERFLOWS))
def test_decode_of_encode_is_the_cast(x, name, rounding, overflow):
    generator = lambda: torch.Generator().manual_seed(7)  # noqa: E731 - the same random bits for both
    try:
        codes = formats.encode(x, name, rounding, overflow, generator())
    except DOCUMENTED_ERRORS as error:
        assert str(error)
        return
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert (codes.reshape(-1).long() < formats.get(name).num_codes).all()
    cast = formats.cast(x.float(), name, rounding, overflow, generator())
    assert_same(formats.decode(codes, name), cast)


@given(data=st.data(), name=st.sampled_from([n for n in SMALL if formats.get(n).bits in (4, 6, 8)]),
       shape=shapes, out_of_range=st.booleans())
def test_unpack_of_pack_is_identity(data, name, shape, out_of_range):
    fmt = formats.get(name)
    n = math.prod(shape)
    high = 255 if out_of_range else fmt.num_codes - 1
    codes = torch.tensor(data.draw(st.lists(st.integers(0, high), min_size=n, max_size=n)),
                         dtype=torch.uint8).reshape(shape)
    try:
        packed = formats.pack(codes, name)
    except ValueError as error:
        assert (codes >= fmt.num_codes).any() and "valid range" in str(error)
        return
    assert packed.numel() == formats.packed_nbytes(n, fmt.bits)
    assert torch.equal(formats.unpack(packed, name, n), codes.reshape(-1))
    numel = data.draw(st.integers(-3, n + 8))
    try:
        part = formats.unpack(packed, name, numel)
    except ValueError as error:
        assert str(error) and (numel < 0 or formats.packed_nbytes(numel, fmt.bits) > packed.numel())
        return
    assert torch.equal(part[: min(numel, n)], codes.reshape(-1)[: min(numel, n)])


# ---- quantize / dequantize / fake_quantize -----------------------------------------------------------------------

ELEMENTS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4"]


@st.composite
def specs(draw):
    fmt = draw(st.sampled_from(ELEMENTS))
    kind = draw(st.sampled_from(["tensor", "delayed", "static", "axis", "group", "block"]))
    axis = draw(st.integers(-3, 2))
    size = draw(st.sampled_from([1, 2, 3, 8, 32]))
    if kind == "tensor":
        scaling = PerTensor(margin=draw(st.integers(-4, 4)), power_of_two=draw(st.booleans()))
    elif kind == "delayed":
        scaling = PerTensor(delayed=True, history_len=draw(st.integers(1, 4)),
                            algo=draw(st.sampled_from(["max", "most_recent"])))
    elif kind == "static":
        scaling = PerTensor(amax=draw(st.sampled_from([1e-30, 0.5, 3.0, 1e30])))
    elif kind == "axis":
        scaling = PerAxis(axis)
    elif kind == "group":
        scaling = PerGroup(size, axis)
    else:
        scaling = Block(size, axis, draw(st.sampled_from(["floor", "rceil", "ceil", "even"])))
    overflow = "saturate" if kind == "block" else draw(st.sampled_from(OVERFLOWS))
    return QuantSpec(fmt, scaling, draw(st.sampled_from(ROUNDINGS)), overflow, draw(st.booleans()))


def _run(verb, x, spec, history_amax):
    history = None
    if isinstance(spec.scaling, PerTensor) and spec.scaling.delayed:
        history = AmaxHistory(spec.scaling.history_len, spec.scaling.algo)
        if history_amax is not None:
            history.record(torch.tensor(history_amax))
    return verb(x, spec, history=history, generator=torch.Generator().manual_seed(3)), history


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(x=tensors(), spec=specs(), history_amax=st.none() | st.sampled_from([0.0, 1.0, 1e30, math.inf]))
def test_dequantize_of_quantize_is_fake_quantize(x, spec, history_amax):
    try:
        fake, history = _run(fewbit.fake_quantize, x, spec, history_amax)
    except DOCUMENTED_ERRORS as error:
        assert str(error)
        return
    assert fake.shape == x.shape and fake.dtype == x.dtype
    if history is not None:
        assert history.skipped == (history_amax == math.inf) + (x.numel() > 0 and not torch.isfinite(x).all())
    try:
        q, _ = _run(fewbit.quantize, x, spec, history_amax)
    except ValueError as error:  # documented: NaN onto a format without a NaN code (float scales)
        assert "NaN" in str(error) and torch.isnan(x).any() and not spec.format.has_nan
        return
    if not spec.is_mx:
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
        if spec.overflow == "saturate" and x.dtype == torch.float32:  # finite in, finite out
            assert torch.isfinite(fake[torch.isfinite(x)]).all()
    assert_same(q.dequantize(), fake)
