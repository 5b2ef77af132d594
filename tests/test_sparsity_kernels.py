"""2:4 sparse kernels (torch's semi-structured sparsity) against the dense masked GEMM; on CPU, the clear refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fewbit import sparsity
from fewbit.sparsity.semi_structured import accelerate_, semi_structured_available

AVAILABLE, WHY = semi_structured_available()


@pytest.mark.skipif(AVAILABLE, reason="this machine has 2:4 kernels")
def test_without_2_4_hardware_accelerate_refuses_and_says_why():
    model = sparsity.sparsify_(nn.Sequential(nn.Linear(128, 64)))
    with pytest.raises(RuntimeError, match="2:4 sparsity saves storage only"):
        accelerate_(model)


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=f"needs 2:4 sparse kernels: {WHY}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 256), (256, 128), (768, 3072)])
def test_semi_structured_linear_matches_the_dense_masked_gemm(dtype, shape):
    torch.manual_seed(0)
    out_features, in_features = shape
    model = sparsity.sparsify_(nn.Sequential(nn.Linear(in_features, out_features))).to("cuda", dtype).eval()
    x = torch.randn(64, in_features, device="cuda", dtype=dtype)
    with torch.no_grad():
        reference = nn.functional.linear(x, model[0].weight.detach().clone(), model[0].bias)
        done = accelerate_(model)
        assert done == {"0": "2:4 sparse kernel"}
        assert type(model[0].weight).__name__.startswith("SparseSemiStructuredTensor")
        out = model(x)
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=f"needs 2:4 sparse kernels: {WHY}")
def test_layers_the_kernels_cannot_take_are_reported():
    model = sparsity.sparsify_(nn.Sequential(nn.Linear(100, 30), nn.Linear(30, 64)),
                               layer_patterns={"1": "1:4"}).to("cuda", torch.float16)
    done = accelerate_(model)
    assert "need multiples" in done["0"] and "2:4 only" in done["1"]
