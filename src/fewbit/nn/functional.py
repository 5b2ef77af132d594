"""Quantized linear, matmul and convolution as autograd functions (emulated: quantize operands, GEMM in float32).

For ``Y = X W^T`` with X (T, K), W (N, K), dY (T, N):

=========  ========================  =====================================================  ==================
GEMM       reduction dimension       operands quantized (role, blocked axis)                 result
=========  ========================  =====================================================  ==================
forward    K                         X (input, axis -1), W (weight, axis 1)                  Y = Xq Wq^T
dX         N                         dY (grad_output, axis -1), W (weight_backward, axis 0)  dX = dYq Wq'
dW         T (tokens)                dY (grad_output, axis 0), X (input_backward, axis 0)    dW = dYq'^T Xq'
=========  ========================  =====================================================  ==================

Backward operands are re-quantized from the saved high-precision tensors along their own reduction axis. A
per-tensor spec gives the same result along any axis, so its forward result is reused. Gradients pass straight
through the quantizers (straight-through estimator); for specs with a known clipping range (a static, calibrated
amax, or delayed per-tensor scaling, where values above the history's amax clip) the gradient is zeroed outside
that range (clipped STE).
For convolutions the forward blocks run along the input channels (activations: axis 1; weights: the flattened
C_in/groups * kh * kw of each output channel, the im2col reduction), dX along the output channels and dW along the
batch. Every layer follows the same rules: dY is quantized with the module's ``grad_output`` history (delayed
scaling), and per-tensor forward operands are reused by the backward GEMMs.

On CUDA with FP8 tensor cores a linear layer's forward GEMM with per-tensor FP8 operands runs as a real FP8 GEMM
(:mod:`fewbit.kernels.fp8_gemm`) on the same codes and scales as the emulation.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fewbit.formats import cast
from fewbit.kernels.fp8_gemm import fp8_gemm, fp8_gemm_eligible
from fewbit.qtensor import QuantSpec, fake_quantize, quantize
from fewbit.recipes import Recipe
from fewbit.scaling import AmaxHistory, Block, PerGroup, PerTensor


@functools.lru_cache(maxsize=1024)
def along(spec: QuantSpec, axis: int) -> QuantSpec:
    """``spec`` with its blocks (or groups) running along ``axis``; other scalings are returned unchanged."""
    if isinstance(spec.scaling, Block | PerGroup) and spec.scaling.axis != axis:
        return spec.replace(axis=axis)
    return spec


def quantize_operand(x: torch.Tensor, spec: QuantSpec | None, axis: int, recipe: Recipe,
                     history: AmaxHistory | None = None) -> torch.Tensor:
    """One GEMM operand: fake-quantized by ``spec`` along ``axis``, or rounded to the recipe's compute format."""
    if spec is None:
        return cast(x, recipe.compute_format) if recipe.compute_format else x
    if history is None and isinstance(spec.scaling, PerTensor) and spec.scaling.delayed:
        spec = current_scaling(spec)  # an operand without its own history (re-quantized for backward)
    return fake_quantize(x, along(spec, axis), history=history)


@functools.lru_cache(maxsize=256)
def current_scaling(spec: QuantSpec) -> QuantSpec:
    return spec.replace(delayed=False)


def _per_tensor(spec: QuantSpec | None) -> bool:
    return spec is None or isinstance(spec.scaling, PerTensor)


def _clip_mask(x: torch.Tensor, spec: QuantSpec | None, history: AmaxHistory | None) -> torch.Tensor | None:
    """Where the straight-through gradient is kept: inside the clipping range of a static (calibrated) or delayed
    per-tensor spec."""
    if spec is not None and isinstance(spec.scaling, PerTensor) and spec.scaling.amax is not None:
        return x.abs() <= spec.scaling.amax * 2.0 ** spec.scaling.margin
    if spec is None or history is None or history.steps == 0:
        return None
    return x.abs() <= history.amax(x.abs().amax()) * 2.0 ** spec.scaling.margin


class _State:
    """Per-module state the functions read: the delayed-scaling histories of the roles that keep one (the forward
    operands and grad_output; operands re-quantized for the backward GEMMs use current scaling)."""

    def __init__(self, recipe: Recipe) -> None:
        self.histories: dict[str, AmaxHistory] = {}
        for role in ("weight", "input", "grad_output"):
            spec = getattr(recipe, role)
            if spec is not None and isinstance(spec.scaling, PerTensor) and spec.scaling.delayed:
                self.histories[role] = AmaxHistory(spec.scaling.history_len, spec.scaling.algo)
        if "input" in self.histories:  # QMatmul's second activation operand keeps its own history
            spec = recipe.input
            self.histories["input_b"] = AmaxHistory(spec.scaling.history_len, spec.scaling.algo)

    def history(self, role: str) -> AmaxHistory | None:
        return self.histories.get(role)


def _fp8_gemm_fits(x2: torch.Tensor, weight: torch.Tensor, recipe: Recipe) -> bool:
    """Whether ``x2 (T, K) @ weight (N, K)^T`` can run as a real FP8 GEMM: both forward operands per-tensor
    scaled (one scale each, as ``torch._scaled_mm`` takes) and :func:`~fewbit.kernels.fp8_gemm.fp8_gemm_eligible`."""
    specs = (recipe.input, recipe.weight)
    if any(s is None or not isinstance(s.scaling, PerTensor) for s in specs):
        return False
    return fp8_gemm_eligible(x2.device, recipe.input.format.name, recipe.weight.format.name, x2.shape[-1],
                             weight.shape[0])


class QLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, state: _State, weight_q: torch.Tensor | None):
        x2 = x.reshape(-1, x.shape[-1])
        in_mask = _clip_mask(x2, recipe.input, state.history("input"))
        if weight_q is None and _fp8_gemm_fits(x2, weight, recipe):
            # Real FP8 GEMM on the codes. The backward reuses the dequantized operands, equal bit for bit to the
            # emulation's fake-quantized ones, so both paths compute the same gradients.
            xq_codes = quantize(x2, recipe.input, history=state.history("input"))
            wq_codes = quantize(weight, recipe.weight, history=state.history("weight"))
            y = fp8_gemm(xq_codes.qdata, xq_codes.scale, recipe.input.format.name, wq_codes.qdata, wq_codes.scale,
                         recipe.weight.format.name, bias)
            xq, weight_q = xq_codes.dequantize(), wq_codes.dequantize()
        else:
            xq = quantize_operand(x2, recipe.input, -1, recipe, state.history("input"))
            if weight_q is None:
                weight_q = quantize_operand(weight, recipe.weight, 1, recipe, state.history("weight"))
            y = F.linear(xq, weight_q, bias)
        # Only the operands a backward GEMM reuses are kept (per-tensor specs: the same along any axis); blocked
        # specs are re-quantized along their backward axis from x2 and weight, so holding their forward form
        # would only hold memory.
        xq_keep = xq if recipe.input_backward == recipe.input and _per_tensor(recipe.input) else None
        wq_keep = weight_q if recipe.weight_backward == recipe.weight and _per_tensor(recipe.weight) else None
        ctx.save_for_backward(x2, weight, xq_keep, wq_keep, in_mask)
        ctx.recipe, ctx.state, ctx.x_shape, ctx.has_bias = recipe, state, x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, xq, weight_q, in_mask = ctx.saved_tensors
        recipe, state = ctx.recipe, ctx.state
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        g_spec = recipe.grad_output
        dyq_n = quantize_operand(dy2, g_spec, -1, recipe, state.history("grad_output"))
        dyq_t = dyq_n if _per_tensor(g_spec) else quantize_operand(dy2, g_spec, 0, recipe)
        if ctx.needs_input_grad[0]:
            wq_n = weight_q if weight_q is not None else quantize_operand(weight, recipe.weight_backward, 0, recipe)
            dx = dyq_n @ wq_n
            if in_mask is not None:
                dx = dx * in_mask
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            xq_t = xq if xq is not None else quantize_operand(x2, recipe.input_backward, 0, recipe)
            dw = dyq_t.t() @ xq_t
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None


def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
            state: _State | None = None, weight_q: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the recipe's quantization of X, W and (in backward) dY. ``weight_q``: a cached
    quantized weight (eval mode)."""
    if recipe.is_identity:
        return F.linear(x, weight, bias)
    return QLinearFunction.apply(x, weight, bias, recipe, state or _State(recipe), weight_q)


class QMatmulFunction(torch.autograd.Function):
    """``A @ B`` with both operands activations (attention's QK^T and PV): both use the ``input`` role."""

    @staticmethod
    def forward(ctx, a, b, recipe: Recipe, state: _State):
        aq = quantize_operand(a, recipe.input, -1, recipe, state.history("input"))
        bq = quantize_operand(b, recipe.input, -2, recipe, state.history("input_b"))
        ctx.save_for_backward(a, b, aq, bq)
        ctx.recipe, ctx.state = recipe, state
        return aq @ bq

    @staticmethod
    def backward(ctx, dy):
        a, b, aq, bq = ctx.saved_tensors
        recipe = ctx.recipe
        g, i = recipe.grad_output, recipe.input_backward
        reuse = i == recipe.input and _per_tensor(i)
        dyq_n = quantize_operand(dy, g, -1, recipe, ctx.state.history("grad_output"))
        dyq_m = dyq_n if _per_tensor(g) else quantize_operand(dy, g, -2, recipe)
        da = db = None
        if ctx.needs_input_grad[0]:  # dA = dY B^T: reduction over N (last axis of dY and of B)
            da = dyq_n @ (bq if reuse else quantize_operand(b, i, -1, recipe)).transpose(-1, -2)
            da = da.sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:  # dB = A^T dY: reduction over M (second-to-last axis of A and of dY)
            db = (aq if reuse else quantize_operand(a, i, -2, recipe)).transpose(-1, -2) @ dyq_m
            db = db.sum_to_size(b.shape)
        return da, db, None, None


def qmatmul(a: torch.Tensor, b: torch.Tensor, recipe: Recipe, state: _State | None = None) -> torch.Tensor:
    if recipe.is_identity:
        return a @ b
    return QMatmulFunction.apply(a, b, recipe, state or _State(recipe))


class QActivationFunction(torch.autograd.Function):
    """One activation fake-quantized by the ``input`` spec (per tensor); the gradient passes straight through,
    zeroed where a static or delayed range clipped the value (clipped STE, as for a GEMM's input)."""

    @staticmethod
    def forward(ctx, x, recipe: Recipe, state: _State):
        mask = _clip_mask(x, recipe.input, state.history("input"))
        ctx.save_for_backward(mask)
        return quantize_operand(x, recipe.input, 1, recipe, state.history("input"))

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        return (dy if mask is None else dy * mask), None, None


def qactivation(x: torch.Tensor, recipe: Recipe, state: _State | None = None) -> torch.Tensor:
    """``x`` fake-quantized by the recipe's ``input`` spec; ``x`` itself under an identity recipe."""
    if recipe.is_identity:
        return x
    return QActivationFunction.apply(x, recipe, state or _State(recipe))


def _weight_as_gemm(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight (O, C/g, *k) as the (O, C/g * prod(k)) matrix of the im2col GEMM."""
    return weight.reshape(weight.shape[0], -1)


class QConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, state: _State, options: tuple, weight_q):
        stride, padding, dilation, groups = options
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        in_mask = _clip_mask(x, recipe.input, state.history("input"))
        xq = quantize_operand(x, recipe.input, 1, recipe, state.history("input"))
        if weight_q is None:
            weight_q = quantize_operand(_weight_as_gemm(weight), recipe.weight, 1, recipe,
                                        state.history("weight")).reshape(weight.shape)
        # As for a linear layer, a per-tensor operand is reused by the backward GEMM that wants the same spec (for
        # delayed scaling: quantized with the history's scale, as in the forward); only those are kept.
        xq_keep = xq if recipe.input_backward == recipe.input and _per_tensor(recipe.input) else None
        wq_keep = weight_q if recipe.weight_backward == recipe.weight and _per_tensor(recipe.weight) else None
        ctx.save_for_backward(x, weight, xq_keep, wq_keep, in_mask)
        ctx.recipe, ctx.state, ctx.options = recipe, state, options
        return conv(xq, weight_q, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy):
        x, weight, xq, weight_q, in_mask = ctx.saved_tensors
        recipe, state = ctx.recipe, ctx.state
        stride, padding, dilation, groups = ctx.options
        grad = torch.nn.grad
        conv_input, conv_weight = (grad.conv1d_input, grad.conv1d_weight) if x.dim() == 3 else \
            (grad.conv2d_input, grad.conv2d_weight)
        g = recipe.grad_output
        dx = dw = db = None
        # dY once per step with the grad_output history (delayed scaling), whichever gradients are needed, so that
        # the history advances as a linear layer's does.
        dyq_c = quantize_operand(dy, g, 1, recipe, state.history("grad_output"))
        if ctx.needs_input_grad[0]:  # reduction over the output channels
            wq = weight_q if weight_q is not None else quantize_operand(weight, recipe.weight_backward, 0, recipe)
            dx = conv_input(x.shape, wq, dyq_c, stride, padding, dilation, groups)
            if in_mask is not None:
                dx = dx * in_mask
        if ctx.needs_input_grad[1]:  # reduction over the batch (and positions)
            dyq_b = dyq_c if _per_tensor(g) else quantize_operand(dy, g, 0, recipe)
            xq = xq if xq is not None else quantize_operand(x, recipe.input_backward, 0, recipe)
            dw = conv_weight(xq, weight.shape, dyq_b, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            db = dy.sum(dim=[d for d in range(dy.dim()) if d != 1])
        return dx, dw, db, None, None, None, None


def qconv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: Recipe,
          stride, padding, dilation, groups, state: _State | None = None,
          weight_q: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv1d`` / ``F.conv2d`` (by ``x.dim()``) with the recipe's quantization. Padding must be numeric or
    'valid'/'same' as torch accepts."""
    if recipe.is_identity:
        conv = F.conv1d if x.dim() == 3 else F.conv2d
        return conv(x, weight, bias, stride, padding, dilation, groups)
    return QConvFunction.apply(x, weight, bias, recipe, state or _State(recipe),
                               (stride, padding, dilation, groups), weight_q)
