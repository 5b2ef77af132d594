"""ONNX export of calibrated INT8 models (QuantizeLinear / DequantizeLinear), run with onnxruntime on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fewbit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def _run(proto, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _check_agreement(model, proto, x):
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = _run(proto, x)
    # Documented tolerance (fewbit.export): codes agree; only the accumulation order differs.
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max() + 1e-5
    return np.abs(got - expected).max()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("method", ["max", "percentile_99.9", "entropy"])
def test_mlp_matches_fake_quant(method):
    model = _mlp()
    fewbit.calibrate(model, [torch.randn(64, 8) for _ in range(4)], method, recipe="int8")
    proto = fewbit.export_onnx(model, torch.randn(2, 8))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    x = torch.randn(300, 8) * 3  # wider than the calibration data: the clipped tails are exercised
    _check_agreement(model, proto, x)


def test_weights_are_fewbits_int8_codes_with_per_channel_scales():
    model = _mlp()
    fewbit.calibrate(model, [torch.randn(64, 8)], "max", recipe="int8")
    proto = fewbit.export_onnx(model, torch.randn(2, 8))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    int8 = [v for v in init.values() if v.dtype == np.int8]
    assert len(int8) == 3
    q = fewbit.quantize(model[2].weight.detach(), "int8_channel")
    assert any(v.shape == q.qdata.shape and np.array_equal(v, q.qdata.view(torch.int8).numpy()) for v in int8)
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
          and init[n.input[0]].dtype == np.int8]
    assert all(any(a.name == "axis" and a.i == 0 for a in n.attribute) for n in dq)
    scale = model[0].recipe.input.scaling.amax / 127
    assert any(v.dtype == np.float32 and v.shape == (1,) and v[0] == np.float32(scale) for v in init.values())


def test_bn_folded_cnn_matches_fake_quant(tmp_path):
    model = _cnn()
    fewbit.fold_batchnorm_(model)
    fewbit.calibrate(model, [torch.randn(32, 1, 8, 8) for _ in range(3)], "entropy", recipe="int8")
    path = tmp_path / "cnn.onnx"
    fewbit.export_onnx(model, torch.randn(2, 1, 8, 8), path)
    proto = onnx.load(str(path))
    assert [n.op_type for n in proto.graph.node].count("Conv") == 2
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    _check_agreement(model, proto, torch.randn(64, 1, 8, 8) * 2)


def test_layers_left_in_float_export_as_float():
    model = _mlp()
    fewbit.quantize_(model, "int8", layer_recipes={"4": None})
    fewbit.calibrate(model, [torch.randn(64, 8)], "max")
    proto = fewbit.export_onnx(model, torch.randn(2, 8))
    assert [n.op_type for n in proto.graph.node].count("QuantizeLinear") == 2
    _check_agreement(model, proto, torch.randn(50, 8))


def test_export_refuses_what_onnx_cannot_run():
    model = fewbit.quantize_(_mlp(), "int8")
    with pytest.raises(ValueError, match="dynamic input scale; calibrate it first"):
        fewbit.export_onnx(model, torch.randn(2, 8))
    model = fewbit.quantize_(_mlp(), "fp8_current")
    with pytest.raises(ValueError, match="symmetric INT8"):
        fewbit.export_onnx(model, torch.randn(2, 8))
