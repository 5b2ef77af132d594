"""CUDA checks: the emulation on GPU against the CPU reference, and real FP8 GEMMs against the emulation.
Skipped cleanly without a CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

import fewbit
from fewbit.kernels.fp8_gemm import fp8_gemm, fp8_gemm_available, fp8_gemm_reference

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


def emulated(fn):
    """``fn()`` with real FP8 GEMMs turned off (FEWBIT_SCALED_MM=0): the emulation."""
    import os

    os.environ["FEWBIT_SCALED_MM"] = "0"
    try:
        return fn()
    finally:
        del os.environ["FEWBIT_SCALED_MM"]


@pytest.mark.parametrize(("a_format", "b_format"), [("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e4m3")])
def test_fp8_gemm_matches_its_reference(a_format, b_format):
    if not fp8_gemm_available("cuda"):
        pytest.skip("no FP8 tensor cores (sm89+ needed)")
    a = fewbit.quantize(torch.randn(256, 1024, device="cuda"), fewbit.QuantSpec(a_format))
    b = fewbit.quantize(torch.randn(512, 1024, device="cuda"), fewbit.QuantSpec(b_format))
    bias = torch.randn(512, device="cuda")
    args = (a.qdata, a.scale, a_format, b.qdata, b.scale, b_format, bias)
    # Same FP8 codes and scales; only the accumulation order differs.
    torch.testing.assert_close(fp8_gemm(*args), fp8_gemm_reference(*args), rtol=1e-4, atol=1e-3)


def test_scaled_mm_forward_matches_emulation():
    layer = fewbit.QLinear(1024, 512, recipe="fp8_current").cuda()
    x = torch.randn(256, 1024, device="cuda")
    if not fp8_gemm_available(x.device):
        pytest.skip("no FP8 tensor cores (sm89+ needed)")
    real = layer(x)
    emulated_y = emulated(lambda: layer(x))
    # Same FP8 codes and scales; only the accumulation order differs.
    torch.testing.assert_close(real, emulated_y, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("recipe", ["fp8_current", "fp8"])
def test_scaled_mm_backward_equals_emulated_backward(recipe):
    """The real path's backward reuses the forward operands as the emulation does (delayed scaling included)."""
    if not fp8_gemm_available("cuda"):
        pytest.skip("no FP8 tensor cores (sm89+ needed)")
    x = torch.randn(256, 1024, device="cuda")
    dy = torch.randn(256, 512, device="cuda")

    def grads():
        torch.manual_seed(0)
        layer = fewbit.QLinear(1024, 512, recipe=recipe).cuda()
        for _ in range(2):  # two steps, so that delayed scaling reads its history
            layer.weight.grad = None
            xi = x.clone().requires_grad_()
            layer(xi).backward(dy)
        return xi.grad, layer.weight.grad

    real, emulation = grads(), emulated(grads)
    for r, e in zip(real, emulation, strict=True):
        assert torch.equal(r, e)


@pytest.mark.parametrize("workload", ["translate", "lm"])
def test_workload_trains_on_cuda_like_on_cpu(workload, tmp_path, monkeypatch):
    """A tiny config trained with device=cuda: same data, loss curve close to the CPU run, evaluation on CUDA."""
    from fewbit.workloads import get, runs

    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    tiny = {"translate": ["pairs=800", "vocab_size=100", "d_model=32", "heads=2", "d_ff=64", "encoder_layers=1",
                          "decoder_layers=1", "dropout=0", "eval_limit=16"],
            "lm": ["max_bytes=400000", "block_size=32", "d_model=32", "heads=2", "layers=1", "d_ff=64",
                   "eval_limit=3000"]}[workload]
    losses = {}
    for device in ("cpu", "cuda"):
        cls = get(workload)
        config = cls.load_config("quick", [*tiny, "steps=20", "batch_size=8", "warmup=2", f"device={device}"])
        result = runs.train(cls(config), out=tmp_path / device, progress=False)
        assert next(result.model.parameters()).device.type == device
        losses[device] = [json.loads(line)["loss"]
                          for line in (tmp_path / device / "metrics.jsonl").read_text().splitlines()]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-2)
