"""The compiled fast paths: no recompilation per shape, and an exact eager fallback when compiling fails."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import fewbit
from fewbit.kernels import cast as kernel


def test_new_shapes_do_not_recompile():
    fewbit.fake_quantize(torch.randn(3, 64), "mxfp6_e3m2")
    fewbit.fake_quantize(torch.randn(5, 96), "mxfp6_e3m2")  # the second shape marks the size dynamic
    fewbit.cast(torch.randn(33), "fp6_e3m2")
    fewbit.cast(torch.randn(34), "fp6_e3m2")
    before = counters["stats"]["unique_graphs"]
    for rows, cols in [(7, 32), (100, 320), (1, 4096), (513, 64)]:
        fewbit.fake_quantize(torch.randn(rows, cols), "mxfp6_e3m2")
        fewbit.cast(torch.randn(rows * cols), "fp6_e3m2")
    assert counters["stats"]["unique_graphs"] == before


def test_compile_failure_falls_back_to_exact_eager(monkeypatch):
    def broken(fn, **options):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken)
    run = kernel.fast(lambda bits, params: kernel.round_bits(bits, params, kernel.Rounding.NEAREST_EVEN,
                                                             kernel.FLOAT32, kernel.Overflow.SATURATE))
    x = torch.randn(1000)
    params = fewbit.formats.get("fp8_e4m3").kernel_params(kernel.FLOAT32)
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        out = run(x.view(torch.int32), params)
    assert torch.equal(out.view(torch.float32), fewbit.cast(x, "fp8_e4m3"))
    out_again = run(x.view(torch.int32), params)  # no second warning: it stays eager
    assert torch.equal(out_again, out)


def test_compile_can_be_disabled(monkeypatch):
    monkeypatch.setenv("FEWBIT_COMPILE", "0")
    assert not kernel.compile_enabled()
    x = torch.randn(100)
    assert torch.equal(fewbit.cast(x, "fp4_e2m1"), fewbit.formats.decode(fewbit.encode(x, "fp4_e2m1"), "fp4_e2m1"))


# ---- E8M0 scale arithmetic ------------------------------------------------------------------------------------


def test_e8m0_codes_decode_as_the_format_defines_them():
    from fewbit.kernels.e8m0 import e8m0_reciprocal, e8m0_to_float

    codes = torch.arange(256, dtype=torch.int32)
    expected = fewbit.formats.get("e8m0").values  # from Format.value_of_code, the definition
    values = e8m0_to_float(codes)
    assert torch.equal(torch.isnan(values), torch.isnan(expected))
    finite = ~torch.isnan(expected)
    assert torch.equal(values[finite].view(torch.int32), expected[finite].view(torch.int32))
    # 2^(127 - c) * 2^(c - 127) == 1 exactly for every finite code (both factors are float32 values, 2^-127 too).
    assert torch.equal(e8m0_reciprocal(codes)[finite] * values[finite], torch.ones(255))
    assert torch.isnan(e8m0_reciprocal(codes)[255])


# ---- the kernel-parameter records -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_symmetric_integer_params_saturate_at_minus_max(name):
    fmt = fewbit.formats.get(name)
    narrow = fmt.element_params(symmetric=True).as_tensor(kernel.FLOAT32)
    full = fmt.kernel_params(kernel.FLOAT32)
    assert narrow[kernel.P_MAXNEG] == narrow[kernel.P_MAXPOS] == full[kernel.P_MAXPOS]
    assert full[kernel.P_MAXNEG] == kernel.FLOAT32.bits_of(-fmt.min)  # -128 for int8
    x = torch.tensor([-1000.0, -fmt.max - 0.75, 1000.0])
    out = kernel.round_bits(x.view(torch.int32), narrow, kernel.Rounding.NEAREST_EVEN, kernel.FLOAT32,
                            kernel.Overflow.SATURATE).view(torch.float32)
    assert out.tolist() == [-fmt.max, -fmt.max, fmt.max]


# ---- the real FP8 GEMM's reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("formats_ab", [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e4m3")])
def test_fp8_gemm_reference_equals_the_emulated_gemm(formats_ab):
    """The reference the real FP8 GEMM is held to (tests/test_gpu.py) is the layers' emulation, bit for bit."""
    import torch.nn.functional as F

    from fewbit.kernels.fp8_gemm import fp8_gemm_reference

    a_format, b_format = formats_ab
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(24, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    a, b = fewbit.quantize(x, fewbit.QuantSpec(a_format)), fewbit.quantize(w, fewbit.QuantSpec(b_format))
    reference = fp8_gemm_reference(a.qdata, a.scale, a_format, b.qdata, b.scale, b_format, bias)
    emulated = F.linear(fewbit.fake_quantize(x, fewbit.QuantSpec(a_format)),
                        fewbit.fake_quantize(w, fewbit.QuantSpec(b_format)), bias)
    assert torch.equal(reference.view(torch.int32), emulated.view(torch.int32))


def test_fp8_gemm_eligibility(monkeypatch):
    from fewbit.kernels import fp8_gemm

    assert not fp8_gemm.fp8_gemm_available("cpu")
    assert not fp8_gemm.fp8_gemm_eligible("cpu", "fp8_e4m3", "fp8_e4m3", 64, 64)
    monkeypatch.setattr(fp8_gemm, "fp8_gemm_available", lambda device: True)
    assert fp8_gemm.fp8_gemm_eligible("cuda", "fp8_e4m3", "fp8_e5m2", 64, 32)
    assert not fp8_gemm.fp8_gemm_eligible("cuda", "fp8_e4m3", "int8", 64, 32)  # both operands must be FP8
    assert not fp8_gemm.fp8_gemm_eligible("cuda", "fp8_e4m3", "fp8_e4m3", 40, 32)  # K not a multiple of 16
    assert not fp8_gemm.fp8_gemm_eligible("cuda", "fp8_e4m3", "fp8_e4m3", 64, 24)  # N not a multiple of 16
    monkeypatch.undo()
    monkeypatch.setenv("FEWBIT_SCALED_MM", "0")
    assert not fp8_gemm.fp8_gemm_enabled()


def test_same_bits_is_exact_on_every_path():
    from fewbit.kernels import native

    x = torch.randn(64, 33)
    x[0, 0], x[1, 1] = float("nan"), -0.0
    assert native.same_bits(x, x.clone())  # NaN equals the same NaN pattern (torch.equal of the values says no)
    for index in (0, x.numel() - 1):  # the first and the last byte compared
        y = x.clone()
        y.view(-1).view(torch.int32)[index] ^= 1  # the lowest mantissa bit
        assert not native.same_bits(x, y)
    z = x.clone()
    z[1, 1] = 0.0
    assert not native.same_bits(x, z)  # -0 differs from +0
    assert not native.same_bits(x, x.double()) and not native.same_bits(x, x.reshape(33, 64))
    # Non-contiguous: the torch fallback, with the same answers.
    assert native.same_bits(x.t(), x.clone().t()) and not native.same_bits(x.t(), z.t())
    assert native.same_bits(x[:0], x[:0].clone())
    assert native.same_bits(torch.arange(5), torch.arange(5)) and not native.same_bits(torch.arange(5), torch.zeros(5))
