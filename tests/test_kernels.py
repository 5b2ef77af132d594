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
