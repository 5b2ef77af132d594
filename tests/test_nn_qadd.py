"""QAdd (residual adds with quantized inputs) and QActivation, and their use in the CNN workloads' models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fewbit
from fewbit import recipes
from fewbit.nn import QActivation, QAdd
from fewbit.workloads.models import cnn
from tests.test_workloads_models import tiny_cnn


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, 5, 5, generator=g) * 3, torch.randn(4, 8, 5, 5, generator=g)


def test_float_qadd_is_exactly_a_plus_b_forward_and_backward():
    a, b = (t.requires_grad_() for t in _pair())
    out = QAdd()(a, b)
    assert torch.equal(out, a + b)
    out.square().sum().backward()
    assert torch.equal(a.grad, 2 * (a + b).detach()) and torch.equal(b.grad, a.grad)


def test_int8_qadd_quantizes_each_input_with_its_own_scale():
    a, b = _pair()
    add = fewbit.quantize_(nn.Sequential(QAdd()), "int8")[0]
    expected = fewbit.fake_quantize(a, "int8_tensor") + fewbit.fake_quantize(b, "int8_tensor")
    assert torch.equal(add(a, b), expected)  # dynamic (current) per-tensor scaling before calibration
    assert not torch.equal(add(a, b), a + b)


def test_calibrated_qadd_has_static_ranges_and_a_clipped_straight_through_gradient():
    model = nn.Sequential(QAdd())
    batches = [_pair(seed) for seed in range(3)]

    class Wrapper(nn.Module):  # calibrate's default forward passes one tensor; the add takes two
        def __init__(self):
            super().__init__()
            self.add = model[0]

        def forward(self, pair):
            return self.add(*pair)

    wrapper = Wrapper()
    calibration = fewbit.calibrate(wrapper, [[pair] for pair in batches], "max", recipe="int8")
    assert set(calibration.histograms) == {"add.a", "add.b"}
    amax_a = max(float(p[0].abs().max()) for p in batches)
    amax_b = max(float(p[1].abs().max()) for p in batches)
    add = model[0]
    assert add.a.recipe.input.scaling.amax == amax_a and add.b.recipe.input.scaling.amax == amax_b
    a, b = (t * 2 for t in _pair(7))  # beyond the calibrated ranges
    a.requires_grad_()
    b.requires_grad_()
    out = add(a, b)
    static = fewbit.fake_quantize(a.detach(), "int8_tensor", amax=amax_a) + \
        fewbit.fake_quantize(b.detach(), "int8_tensor", amax=amax_b)
    assert torch.equal(out, static)
    out.sum().backward()
    assert torch.equal(a.grad, (a.detach().abs() <= amax_a).float())  # zero where the static range clipped
    assert torch.equal(b.grad, (b.detach().abs() <= amax_b).float())


@pytest.mark.parametrize("recipe", [r for r in recipes.names() if r not in ("int8",)])
def test_qadd_stays_float_under_recipes_without_per_tensor_integer_inputs(recipe):
    a, b = _pair()
    add = fewbit.quantize_(nn.Sequential(QAdd()), recipe)[0]
    assert add.a.recipe.is_identity and add.b.recipe.is_identity
    assert torch.equal(add(a, b), a + b)


def test_qactivation_round_trips_to_float():
    module = QActivation("int8")
    assert module.recipe.name == "int8"
    assert module.to_float() is module and module.recipe.is_identity


def _old_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CNNs' forward as written before their adds became QAdd modules: plain ``+``."""
    x = model.stem(x)
    for block in model.blocks:
        if isinstance(block, cnn.BasicBlock):
            x = block.relu(block.body(x) + block.shortcut(x))
        else:
            x = x + block.body(x) if block.residual else block.body(x)
    if isinstance(model, cnn.MobileNetV2):
        return model.head(model.dropout(model.head_conv(x).mean(dim=(2, 3))))
    return model.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("name", cnn.MODELS)
def test_float_cnns_compute_bit_identically_to_plain_adds(name):
    model = tiny_cnn(name)
    for m in model.modules():  # non-zero residual branches, so that the adds matter
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
    x = torch.randn(6, 1, 12, 12)
    for mode in (True, False):
        model.train(mode)
        torch.manual_seed(0)
        got = model(x)
        torch.manual_seed(0)
        assert torch.equal(got, _old_forward(model, x))
    assert not any("add" in key for key in model.state_dict())  # saved runs load as before
    adds = [m for m in model.modules() if isinstance(m, QAdd)]
    blocks = [m for m in model.modules() if isinstance(m, cnn.BasicBlock) or getattr(m, "residual", False)]
    assert adds and len(adds) == len(blocks)
