"""Export a calibrated INT8 model to ONNX with QuantizeLinear / DequantizeLinear (QDQ) nodes, for onnxruntime.

Each quantized layer (QLinear, QConv1d/2d with the ``int8`` recipe: per-channel weights, per-tensor inputs with a
calibrated static amax, see :func:`fewbit.calibrate`) is written as::

    x -> [Clip(min=-amax)] -> QuantizeLinear(s_x, 128) -> DequantizeLinear(s_x, 128) --+
    W_int8 (initializer) -> DequantizeLinear(s_w, 0, axis=0) -------------------------+--> Gemm / MatMul / Conv
                                                                                            (+ float bias)

with ``s_x = amax / 127`` (float32, exactly fewbit's scale), ``s_w`` fewbit's per-output-channel weight scales and
``W_int8`` fewbit's own weight codes (so the weights are bit-identical). Each input of a :class:`~fewbit.nn.QAdd`
(the residual adds of fewbit's CNNs) gets the same ``[Clip] -> Q -> DQ`` with its own calibrated scale. Layers that
are float (identity recipe, or left in float by :func:`fewbit.ptq`) export as float.

**Activations as uint8.** fewbit's symmetric INT8 activation codes ``-127..127`` are written as uint8 with zero
point 128 (codes ``1..255``): the same values, ``(q - 128) * s_x``, in the type onnxruntime's x86 integer
convolutions take (its QDQ fusion makes QLinearConv there only for uint8 activations). Scales and zero points are
scalars (onnxruntime fuses QLinearAdd only then).

**Narrow range.** fewbit saturates at -127, ONNX's QuantizeLinear at the type's limit. The ``Clip(min=-amax)``
(``narrow_range=True``, the default) makes the runtime saturate at -127 as fewbit does, so codes agree everywhere;
without it, inputs below ``-127.5 * s_x`` (only in the clipped tail of a calibrated range) get code -128, one step
below fewbit's.

**Arranged for integer kernels.** A runtime fuses ``DQ -> Conv -> Q`` into QLinearConv and ``DQ, DQ -> Add -> Q``
into QLinearAdd only when the op's output goes straight into a QuantizeLinear. Two exact rewrites after the export
arrange that:

1. *Identical quantizers of one tensor become one.* A tensor read by several quantized layers (a ResNet block's
   output feeds the next block's convolution and its shortcut add) has the same calibrated range in each (the same
   values give the same histogram), hence the same ``Clip -> Q``; one copy remains.
2. *A quantizer moves above the clamps that feed it.* In ``y -> Relu / Clip / Max(constant) -> QuantizeLinear``
   the quantizer moves to ``y`` and the clamps run on its uint8 codes as one ``Clip``. Quantization is monotone, so
   it commutes with clamps: ``Q(clamp(y, lo, hi)) = clamp(Q(y), Q(lo), Q(hi))``, the same codes.

onnxruntime (1.32, CPU) then runs the convolutions as QLinearConv, the residual adds as QLinearAdd and MatMuls
(Linear layers on 3-D inputs) as MatMulIntegerToFloat; it rounds the float biases to int32 on the accumulator's
grid ``s_x * s_w`` itself. Convolutions whose output is not quantized next (before a global average pool) and Gemm
(Linear layers on 2-D inputs) run in float on the dequantized operands.

**Agreement** with fewbit's fake-quant evaluation (``model(x)`` after calibration). Codes agree except where a value
lies within rounding error of a rounding boundary, and there a one-step difference propagates through the later
layers (deep networks with random weights amplify it most):

- the graph as written (onnxruntime with ``GraphOptimizationLevel.ORT_DISABLE_ALL``, every op run in float as
  written) differs only by the float accumulation order: tests hold max |difference| <= 1e-4 * max |output| + 1e-5
  on an MLP, a BN-folded CNN and two-block ResNet and MobileNet-v2;
- onnxruntime's integer kernels (its default optimization level) also round each bias to int32 (off by up to
  ``s_x * s_w / 2``) and requantize each int32 accumulator with a float multiplier: tests hold 0.05 * max |output|
  and 95% equal top-1 classes on the same models. On the full random-weight ResNet and MobileNet-v2 of
  ``benchmarks/bench_int8_onnx.py`` the mean |difference| is about 3% and 9% of the mean |output|, below INT8's own
  error there (fake quant against FP32: 4% and 12%); on the translation encoder 1e-4.

Fold BatchNorm (:func:`fewbit.fold_batchnorm_`) *before* quantizing and calibrating, so the weight scales are those
of the folded convolution the runtime executes. Other formats (FP8, MX, INT4) and uncalibrated (dynamic) INT8
inputs are refused with a ValueError: ONNX's QuantizeLinear needs a fixed scale, and onnxruntime runs INT8 only.
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

from fewbit.nn import (
    QActivation,
    QConv1d,
    QConv2d,
    QLinear,
    QMatmul,
    QuantizedModule,
    quantized_layers,
    replace_module,
)
from fewbit.nn.modules import RECIPE_ONLY
from fewbit.qtensor import quantize
from fewbit.scaling import PerAxis, PerTensor, amax_scale

__all__ = ["export_onnx"]

# fewbit's symmetric int8 activation code q is the uint8 code q + 128 (see the module docstring).
ACTIVATION_ZERO_POINT = 128


def _check_input(name: str, module: QuantizedModule) -> None:
    x = module.recipe.input
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


def _check_weight(name: str, module: QuantizedModule) -> None:
    w = module.recipe.weight
    if w is None or w.format.name != "int8" or not isinstance(w.scaling, PerAxis) or not w.symmetric:
        raise ValueError(f"export_onnx: layer {name!r} has weight spec {w}; ONNX export needs symmetric INT8 "
                         "per-output-channel weights (the 'int8' recipe)")


class _QDQInput(nn.Module):
    """Export view of one static per-tensor input quantizer: ``[Clip(min=-amax)] -> Q -> DQ`` (uint8, zero point
    128: the values of fewbit's symmetric int8)."""

    def __init__(self, module: QuantizedModule, narrow_range: bool) -> None:
        super().__init__()
        spec = module.recipe.input
        amax = torch.tensor(spec.scaling.amax, dtype=torch.float32)
        # Scalars (not shape [1]): onnxruntime fuses QLinearAdd only with scalar scales and zero points.
        self.register_buffer("input_scale", amax_scale(amax, spec.element_max).reshape(()))
        self.register_buffer("input_min", -amax.reshape(()))
        self.narrow_range = narrow_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.narrow_range:
            x = torch.clamp(x, min=self.input_min)
        zero = torch.tensor(ACTIVATION_ZERO_POINT, dtype=torch.int32)
        return torch.fake_quantize_per_tensor_affine(x, self.input_scale, zero, 0, 255)


class _QDQLayer(nn.Module):
    """Export view of one INT8 layer: fake-quantize ops that the exporter writes as Q/DQ pairs."""

    def __init__(self, module: QuantizedModule, narrow_range: bool) -> None:
        super().__init__()
        self.kind = "linear" if isinstance(module, QLinear) else ("conv1d" if isinstance(module, QConv1d)
                                                                   else "conv2d")
        # The float layer's weight: (out, in) for a linear (also for a layer storing it transposed, as GPT-2's
        # Conv1D does), (out, in / groups, *kernel) for a convolution.
        weight = module.weight_matrix().detach()
        if self.kind != "linear":
            weight = weight.reshape(module.weight.shape)
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().float(), requires_grad=False)
        qweight = quantize(weight.reshape(weight.shape[0], -1).float(), module.recipe.weight.replace(axis=0))
        self.register_buffer("weight_scale", qweight.scale.reshape(-1).float())
        self.weight_codes = qweight.qdata  # uint8 two's complement codes of the int8 values
        self.quantize_input = _QDQInput(module, narrow_range)
        if self.kind != "linear":
            self.options = (module.stride, module.padding, module.dilation, module.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
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
    for name, module in list(quantized_layers(view)):
        if module.recipe.is_identity:
            replacement = module.to_float() if not isinstance(module, RECIPE_ONLY) else module
        elif isinstance(module, QMatmul):
            raise ValueError(f"export_onnx: QMatmul {name!r} is quantized ({module.recipe.name}); activation x "
                             "activation products are not calibrated: keep them in float (quantize_(..., "
                             "layer_recipes={pattern: None}) or the fp32 recipe for QMatmul)")
        elif isinstance(module, QActivation):
            _check_input(name, module)
            replacement = _QDQInput(module, narrow_range)
        elif isinstance(module, QLinear | QConv1d | QConv2d):
            _check_weight(name, module)
            _check_input(name, module)
            replacement = layers[name] = _QDQLayer(module, narrow_range)
        else:
            raise ValueError(f"export_onnx: layer {name!r} ({type(module).__name__}) has no ONNX export")
        if not name:
            return replacement, layers
        replace_module(view, name, replacement)
    return view, layers


# ---- the graph ----------------------------------------------------------------------------------------------------


def _constants(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of ``graph`` by name: initializers, the outputs of Constant nodes, and Identity copies of
    either (the exporter shares equal initializers, such as the scales of one tensor's quantizers, that way)."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # in topological order: an Identity's input is known before the Identity
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def _replace_nodes(graph, nodes: list) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def _remove_unused_constants(graph) -> None:
    """Drop initializers and Constant nodes that nothing reads any more."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] not in used:
            graph.node.remove(node)
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


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
    _remove_unused_constants(graph)
    return replaced


_MERGEABLE = ("Max", "Min", "Clip", "Relu", "QuantizeLinear", "DequantizeLinear")


def _merge_duplicate_quantizers(graph) -> None:
    """Rewrite 1 (module docstring): nodes of the same op on the same tensor with equal constant operands and
    attributes (the quantizers of one tensor) become one."""
    constants = _constants(graph)
    graph_outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    kept = []
    for node in graph.node:  # in topological order: a node's inputs are renamed before it is looked at
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        if node.op_type in _MERGEABLE and not graph_outputs.intersection(node.output):
            operands = tuple(("constant", constants[n].dtype.str, constants[n].shape, constants[n].tobytes())
                             if n in constants else ("tensor", n) for n in node.input)
            key = (node.op_type, operands, tuple(a.SerializeToString() for a in node.attribute))
            if key in seen:
                renamed.update(zip(node.output, seen[key], strict=True))
                continue
            seen[key] = list(node.output)
        kept.append(node)
    _replace_nodes(graph, kept)


def _clamp_bounds(node, constants: dict[str, np.ndarray]) -> tuple[float, float] | None:
    """``(lo, hi)`` when ``node`` clamps its first input to constant bounds (Relu, Clip, Max or Min with a constant
    scalar), else None."""
    def scalar(name: str) -> float | None:
        value = constants.get(name)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type == "Clip" and not node.attribute:  # opset >= 11: bounds as optional inputs
        bounds = [scalar(n) if n else default for n, default in
                  zip([*node.input[1:], "", ""][:2], (-np.inf, np.inf), strict=True)]
        return None if None in bounds else (bounds[0], bounds[1])
    if node.op_type in ("Max", "Min") and len(node.input) == 2 and node.input[0] not in constants:
        bound = scalar(node.input[1])
        if bound is None:
            return None
        return (bound, np.inf) if node.op_type == "Max" else (-np.inf, bound)
    return None


def _uint8_code(value: float, scale: np.ndarray, zero: np.ndarray) -> np.uint8:
    """QuantizeLinear of one value (infinities saturate), as the runtime computes it: round(x / s) + zero point."""
    with np.errstate(over="ignore", invalid="ignore"):
        code = np.rint(np.float32(value) / np.float32(scale.reshape(-1)[0])) + float(zero.reshape(-1)[0])
    return np.uint8(np.clip(code, 0, 255))


def _quantize_before_clamps(graph) -> int:
    """Rewrite 2 (module docstring): ``y -> clamps -> QuantizeLinear`` becomes ``y -> QuantizeLinear -> Clip`` on
    the codes (exact: see the module docstring). Returns how many quantizers moved."""
    from onnx import helper, numpy_helper

    constants = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    moved = 0
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]:
        source, chain = q.input[0], []
        while source in producer and readers.get(source) == 1 and source not in graph_outputs:
            bounds = _clamp_bounds(producer[source], constants)
            if bounds is None:
                break
            chain.append((producer[source], bounds))
            source = producer[source].input[0]
        scale = constants.get(q.input[1])
        zero = constants.get(q.input[2]) if len(q.input) > 2 else None
        if not chain or scale is None or scale.size != 1 or zero is None or zero.dtype != np.uint8:
            continue
        lo, hi = -np.inf, np.inf
        for _, (a, b) in reversed(chain):  # in execution order: clamp(clamp(x, lo, hi), a, b)
            lo, hi = min(max(lo, a), b), min(max(hi, a), b)
        for node, _ in chain:
            nodes.remove(node)
        at = nodes.index(q)
        codes = f"{q.output[0]}_before_clamps"
        code_lo, code_hi = (_uint8_code(v, scale, zero) for v in (lo, hi))
        if code_lo == 0 and code_hi == 255:  # the clamps cut nothing the codes can hold
            nodes[at] = helper.make_node("QuantizeLinear", [source, *q.input[1:]], list(q.output), name=q.name)
        else:
            bound_names = [f"{q.output[0]}_clamp_min", f"{q.output[0]}_clamp_max"]
            graph.initializer.extend(numpy_helper.from_array(np.array(v, dtype=np.uint8), n)
                                     for v, n in zip((code_lo, code_hi), bound_names, strict=True))
            nodes[at:at + 1] = [helper.make_node("QuantizeLinear", [source, *q.input[1:]], [codes], name=q.name),
                                helper.make_node("Clip", [codes, *bound_names], list(q.output),
                                                 name=f"{q.name}_clamps")]
        moved += 1
    _replace_nodes(graph, nodes)
    return moved


def export_onnx(model: nn.Module, example_input: torch.Tensor | tuple, path: str | os.PathLike | None = None, *,
                opset: int = 17, narrow_range: bool = True, input_names: list[str] | None = None,
                output_names: list[str] | None = None, dynamic_batch: bool = True):
    """Export ``model`` (calibrated INT8 layers, float elsewhere) to an ONNX QDQ model; returns the
    ``onnx.ModelProto`` and writes it to ``path`` when given. ``example_input``: a tensor or a tuple of the
    forward's positional arguments. ``dynamic_batch`` makes dimension 0 of every input and output symbolic. See
    the module docstring for the graph, the tolerance and what is refused. The model is not changed (a copy is
    exported). A model without quantized layers (the float model itself) exports as a plain FP32 graph: what
    ``fewbit bench --backend ort`` runs."""
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
    _merge_duplicate_quantizers(proto.graph)
    _quantize_before_clamps(proto.graph)
    _remove_unused_constants(proto.graph)
    onnx.checker.check_model(proto)
    if path is not None:
        from fewbit import atomic

        atomic.write_bytes(path, proto.SerializeToString())
    return proto


def onnx_runner(path: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session of the model at ``path`` as a plain callable: a float32 tensor batch in, a float32
    tensor out (graph optimizations on, so the integer kernels run fused). ``threads`` > 0 caps intra-op threads.
    It is what :meth:`fewbit.workloads.base.Workload.evaluate` and an inference harness call."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {input_name: x.detach().float().cpu().numpy()})
        return torch.from_numpy(out)

    run.session = session
    return run
