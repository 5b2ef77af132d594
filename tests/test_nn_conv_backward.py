"""Linear and convolution layers follow one set of backward rules under delayed scaling (the ``fp8`` recipe).

dY is quantized with the module's ``grad_output`` amax history, once per step, whichever gradients are needed; the
backward GEMMs reuse the per-tensor forward operands, which were quantized with the ``input`` and ``weight``
histories. Each step is checked bit for bit against per-tensor fake quantization written from its definition with
ml_dtypes (tests/reference.py), fed the amax the history must give: the current one on the first step, the
largest of the previous steps' afterwards.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewbit import recipes
from fewbit.nn.modules import QConv1d, QConv2d, QLinear
from tests.reference import per_tensor_fake_quantize

KINDS = ["linear", "conv1d", "conv2d"]
# Operand magnitudes per step, shrinking: from the second step on the history's amax (the first step's) is 8x or
# 64x the current one, so scaling by the history and scaling by the current amax give different codes.
MAGNITUDES = [8.0, 1.0, 0.125]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def seeded(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def layer_and_gemms(kind: str):
    """A layer under the fp8 recipe, its input shape, and its three GEMMs as functions of quantized operands."""
    recipe = recipes.get("fp8")
    if kind == "linear":
        layer = QLinear(32, 16, recipe=recipe)
        return layer, (8, 32), (
            lambda xq, wq, b: F.linear(xq, wq, b),
            lambda x_shape, wq, dyq: dyq @ wq,
            lambda xq, w_shape, dyq: dyq.t() @ xq,
        )
    dims = int(kind[-2])
    conv_cls, q_cls = (nn.Conv1d, QConv1d) if dims == 1 else (nn.Conv2d, QConv2d)
    conv_fn = F.conv1d if dims == 1 else F.conv2d
    grad_input = torch.nn.grad.conv1d_input if dims == 1 else torch.nn.grad.conv2d_input
    grad_weight = torch.nn.grad.conv1d_weight if dims == 1 else torch.nn.grad.conv2d_weight
    layer = q_cls.from_float(conv_cls(4, 6, 3, padding=1), recipe)
    return layer, (2, 4, *(7,) * dims), (
        lambda xq, wq, b: conv_fn(xq, wq, b, 1, 1),
        lambda x_shape, wq, dyq: grad_input(x_shape, wq, dyq, 1, 1),
        lambda xq, w_shape, dyq: grad_weight(xq, w_shape, dyq, 1, 1),
    )


def amax_for_step(amaxes: list[float], step: int) -> float:
    """The amax delayed scaling (history of 1024 steps, algo ``max``) uses at ``step``."""
    return amaxes[step] if step == 0 else max(amaxes[:step])


@pytest.mark.parametrize("input_grad", [True, False], ids=["dx_and_dw", "dw_only"])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_quantizes_grad_output_with_its_history_like_linear(kind, input_grad):
    layer, x_shape, (forward, grad_input, grad_weight) = layer_and_gemms(kind)
    w_shape = tuple(layer.weight.shape)
    with torch.no_grad():
        layer.bias.zero_()
    xs = [seeded(*x_shape, seed=10 + s) * m for s, m in enumerate(MAGNITUDES)]
    ws = [seeded(*w_shape, seed=20 + s) * 0.3 * m for s, m in enumerate(MAGNITUDES)]
    y_shape = forward(xs[0], ws[0], None).shape
    dys = [seeded(*y_shape, seed=30 + s) * m for s, m in enumerate(MAGNITUDES)]
    amax = {role: [float(t.abs().max()) for t in ts] for role, ts in (("x", xs), ("w", ws), ("dy", dys))}

    for step in range(len(MAGNITUDES)):
        with torch.no_grad():
            layer.weight.copy_(ws[step])
        layer.weight.grad = None
        x = xs[step].clone().requires_grad_(input_grad)
        y = layer(x)
        y.backward(dys[step])

        xq = per_tensor_fake_quantize(xs[step], "fp8_e4m3", amax_for_step(amax["x"], step))
        wq = per_tensor_fake_quantize(ws[step], "fp8_e4m3", amax_for_step(amax["w"], step))
        dyq = per_tensor_fake_quantize(dys[step], "fp8_e5m2", amax_for_step(amax["dy"], step))
        assert torch.equal(bits(y), bits(forward(xq, wq, layer.bias.detach()))), f"y, step {step}"
        assert torch.equal(bits(layer.weight.grad), bits(grad_weight(xq, w_shape, dyq))), f"dW, step {step}"
        if input_grad:
            assert torch.equal(bits(x.grad), bits(grad_input(x_shape, wq, dyq))), f"dX, step {step}"


@pytest.mark.parametrize("kind", KINDS)
def test_grad_output_history_advances_once_per_step(kind):
    layer, x_shape, _ = layer_and_gemms(kind)
    for step in range(3):
        layer(seeded(*x_shape, seed=step)).square().sum().backward()  # the input needs no gradient: dW only
    histories = layer._state.histories
    assert histories["input"].steps == histories["weight"].steps == histories["grad_output"].steps == 3
