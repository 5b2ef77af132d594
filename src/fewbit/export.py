"""Export a calibrated INT8 model to ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes, for onnxruntime.

Each quantized layer (QLinear, QConv1d/2d with the ``int8`` recipe: per-channel weights, per-tensor inputs with a
calibrated static amax, see :func:`fewbit.calibrate`) is written as::

    x -> [Clip(min=-amax)] -> QuantizeLinear(s_x, 0) -> DequantizeLinear(s_x, 0) --+
    W_int8 (initializer) -> DequantizeLinear(s_w, 0, axis=0) ---------------------+--> Gemm / MatMul / Conv (+ bias)

with ``s_x = amax / 127`` (float32, exactly fewbit's scale), ``s_w`` fewbit's per-output-channel weight scales and
``W_int8`` fewbit's own weight codes (so the weights are bit-identical). A runtime fuses ``DQ -> Conv/Gemm`` into
integer kernels. Layers that are float (identity recipe, or left in float by :func:`fewbit.ptq`) export as float.

**Narrow range.** fewbit's symmetric INT8 uses -127..127; ONNX's QuantizeLinear saturates to -128..127. The optional
``Clip(min=-amax)`` (``narrow_range=True``, the default) makes the runtime saturate at -127 as fewbit does, so codes
agree everywhere; without it, inputs below ``-127.5 * s_x`` (only in the clipped tail of a calibrated range) get
code -128 instead of -127, one step apart.

**Agreement.** Codes agree with fewbit's fake quantization except for rounding-tie cases of ``x / s``; the GEMMs
accumulate in a different order (integer or float32), so outputs agree with fewbit's fake-quant evaluation to about
1e-5 relative to the output scale (tests: max abs difference <= 1e-4 * max |output| + 1e-5 on an MLP and a
BN-folded CNN).

**Residual adds and concatenations** stay in float in the exported graph: fewbit quantizes the inputs of its
GEMM layers, so ``Add``/``Concat`` see dequantized float tensors, which onnxruntime executes correctly (in float).
A runtime that runs the add itself in INT8 (``QLinearAdd``) would need Q/DQ pairs on both add inputs with calibrated
scales; fewbit does not emit those. Fold BatchNorm (:func:`fewbit.fold_batchnorm_`) *before* quantizing and
calibrating, so the weight scales are those of the folded convolution the runtime executes.

Other formats (FP8, MX, INT4) and uncalibrated (dynamic) INT8 inputs are refused with a ValueError: ONNX's
QuantizeLinear needs a fixed scale, and onnxruntime runs INT8 only.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewbit.nn.convert import QHFConv1D
from fewbit.nn.modules import QConv1d, QConv2d, QLinear, QMatmul, _Quantized
from fewbit.qtensor import quantize
from fewbit.scaling import PerAxis, PerTensor, amax_scale

__all__ = ["export_onnx"]


def _check_int8(name: str, module: _Quantized) -> None:
    recipe = module.recipe
    w, x = recipe.weight, recipe.input
    if w is None or w.format.name != "int8" or not isinstance(w.scaling, PerAxis) or not w.symmetric:
        raise ValueError(f"export_onnx: layer {name!r} has weight spec {w}; ONNX export needs symmetric INT8 "
                         "per-output-channel weights (the 'int8' recipe)")
    if x is None or x.format.name != "int8" or not isinstance(x.scaling, PerTensor) or not x.symmetric:
        raise ValueError(f"export_onnx: layer {name!r} has input spec {x}; ONNX export needs symmetric INT8 "
                         "per-tensor inputs (the 'int8' recipe)")
    if x.scaling.amax is None:
        raise ValueError(f"export_onnx: layer {name!r} has a dynamic input scale; calibrate it first "
                         "(fewbit.calibrate or fewbit.ptq) so that QuantizeLinear gets a static scale")
    if x.scaling.margin or x.scaling.power_of_two:
        raise ValueError(f"export_onnx: layer {name!r}: margin/power_of_two input scaling is not supported")
    if module.recipe.compute_format is not None:
        raise ValueError(f"export_onnx: layer {name!r}: compute_format {module.recipe.compute_format!r} "
                         "is not supported")


class _QDQLayer(nn.Module):
    """Export view of one INT8 layer: fake-quantize ops that the exporter writes as Q/DQ pairs."""

    def __init__(self, module: _Quantized, narrow_range: bool) -> None:
        super().__init__()
        weight = module.weight.detach()
        self.kind = "linear" if isinstance(module, QLinear) else ("conv1d" if isinstance(module, QConv1d)
                                                                   else "conv2d")
        if isinstance(module, QHFConv1D):
            weight = weight.t()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)
        qweight = quantize(weight.reshape(weight.shape[0], -1).float(), module.recipe.weight.replace(axis=0))
        self.register_buffer("weight_scale", qweight.scale.reshape(-1).float())
        self.weight_codes = qweight.qdata  # uint8 two's complement codes of the int8 values
        spec = module.recipe.input
        amax = torch.tensor(spec.scaling.amax, dtype=torch.float32)
        self.register_buffer("input_scale", amax_scale(amax, spec.element_max).reshape(1))
        self.register_buffer("input_min", -amax.reshape(1))
        self.narrow_range = narrow_range
        if self.kind != "linear":
            self.options = (module.stride, module.padding, module.dilation, module.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.narrow_range:
            x = torch.clamp(x, min=self.input_min)
        zero = torch.zeros(1, dtype=torch.int32)
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, zero, -128, 127)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale,
                                                   torch.zeros_like(self.weight_scale, dtype=torch.int32), 0, -128,
                                                   127)
        if self.kind == "linear":
            return F.linear(x, w, self.bias)
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        return conv(x, w, self.bias, *self.options)


def _export_view(model: nn.Module, narrow_range: bool) -> tuple[nn.Module, dict[str, _QDQLayer]]:
    view = copy.deepcopy(model).eval()
    layers = {}
    for name, module in list(view.named_modules()):
        if not isinstance(module, _Quantized):
            continue
        if module.recipe.is_identity:
            replacement = module.to_float() if not isinstance(module, QMatmul) else module
        elif isinstance(module, QMatmul):
            raise ValueError(f"export_onnx: QMatmul {name!r} is quantized ({module.recipe.name}); activation x "
                             "activation products are not calibrated: keep them in float (quantize_(..., "
                             "layer_recipes={pattern: None}) or the fp32 recipe for QMatmul)")
        elif isinstance(module, QLinear | QConv1d | QConv2d):
            _check_int8(name, module)
            replacement = layers[name] = _QDQLayer(module, narrow_range)
        else:
            raise ValueError(f"export_onnx: layer {name!r} ({type(module).__name__}) has no ONNX export")
        if not name:
            return replacement, layers
        parent, _, child = name.rpartition(".")
        setattr(view.get_submodule(parent) if parent else view, child, replacement)
    return view, layers


def _fold_weight_quantizers(graph, layers: dict[str, _QDQLayer]) -> int:
    """Replace ``QuantizeLinear(float weight initializer)`` by an INT8 initializer holding fewbit's own codes, so
    that the file stores INT8 weights and the runtime never re-quantizes them. Returns how many were replaced."""
    import onnx
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    by_weight = {}
    for layer in layers.values():
        key = layer.weight.detach().numpy().tobytes()
        by_weight[key] = layer
    replaced = 0
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[0]])
        layer = by_weight.get(np.ascontiguousarray(weight, dtype=np.float32).tobytes())
        if layer is None:
            continue
        codes = layer.weight_codes.view(torch.int8).reshape(weight.shape).numpy()
        name = node.output[0]
        graph.node.remove(node)
        graph.initializer.append(onnx.numpy_helper.from_array(codes, name))
        replaced += 1
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return replaced


def export_onnx(model: nn.Module, example_input: torch.Tensor | tuple, path: str | os.PathLike | None = None, *,
                opset: int = 17, narrow_range: bool = True, input_names: list[str] | None = None,
                output_names: list[str] | None = None, dynamic_batch: bool = True):
    """Export ``model`` (calibrated INT8 layers, float elsewhere) to an ONNX QDQ model; returns the
    ``onnx.ModelProto`` and writes it to ``path`` when given. ``example_input``: a tensor or a tuple of the
    forward's positional arguments (float32). ``dynamic_batch`` makes dimension 0 of every input and output
    symbolic. See the module docstring for the graph, the tolerance and what is refused. The model is not changed
    (a copy is exported)."""
    import onnx

    view, layers = _export_view(model, narrow_range)
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    input_names = input_names or [f"input_{i}" if len(args) > 1 else "input" for i in range(len(args))]
    output_names = output_names or ["output"]
    dynamic_axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(view, args, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    replaced = _fold_weight_quantizers(proto.graph, layers)
    if replaced != len(layers):
        raise RuntimeError(f"export_onnx: {replaced} of {len(layers)} weight quantizers became INT8 initializers; "
                           "the exported graph does not have the expected QDQ form")
    onnx.checker.check_model(proto)
    if path is not None:
        from fewbit import atomic

        atomic.write_bytes(path, proto.SerializeToString())
    return proto
