"""CUDA checks: the emulation on GPU against the CPU reference, and real FP8 GEMMs against the emulation.
Skipped cleanly without a CUDA device."""

from __future__ import annotations

import pytest
import torch

import fewbit
from fewbit.nn.functional import scaled_mm_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp4_e2m1", "int8", "e8m0"])
def test_cuda_cast_matches_cpu(name):
    x = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), dtype=torch.int32).view(torch.float32)
    cpu = fewbit.cast(x, name)
    gpu = fewbit.cast(x.cuda(), name).cpu()
    nan = torch.isnan(cpu)
    assert torch.equal(torch.isnan(gpu), nan)
    assert torch.equal(cpu[~nan].view(torch.int32), gpu[~nan].view(torch.int32))


@pytest.mark.parametrize("name", fewbit.spec_names())
def test_cuda_fake_quantize_matches_cpu(name):
    x = torch.randn(256, 1024)
    kw = (lambda: {"history": fewbit.AmaxHistory()}) if "delayed" in name else dict
    cpu = fewbit.fake_quantize(x, name, **kw())
    gpu = fewbit.fake_quantize(x.cuda(), name, **kw()).cpu()
    assert torch.equal(cpu.view(torch.int32), gpu.view(torch.int32))


def test_scaled_mm_forward_matches_emulation():
    layer = fewbit.QLinear(1024, 512, recipe="fp8_current").cuda()
    x = torch.randn(256, 1024, device="cuda")
    if not scaled_mm_available(x, layer.recipe):
        pytest.skip("no FP8 tensor cores (sm89+ needed)")
    real = layer(x)
    import os

    os.environ["FEWBIT_SCALED_MM"] = "0"
    try:
        emulated = layer(x)
    finally:
        del os.environ["FEWBIT_SCALED_MM"]
    # Same FP8 codes and scales; only the accumulation order differs.
    torch.testing.assert_close(real, emulated, rtol=1e-4, atol=1e-3)
