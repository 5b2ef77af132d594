"""Where models meet formats: quantized autograd functions, the quantized-module protocol, and model conversion
(a registry of float layer types, ``quantize_``, ``summary``)."""

from fewbit.nn.convert import (
    LayerRow,
    ModelSummary,
    conversion_for,
    dequantize_,
    mark_skipped,
    quantize_,
    register_conversion,
    replace_module,
    skipped_layers,
    summary,
    weight_bytes,
)
from fewbit.nn.fold import fold_batchnorm_
from fewbit.nn.modules import (
    QActivation,
    QAdd,
    QConv1d,
    QConv2d,
    QLinear,
    QMatmul,
    QuantizedModule,
    frozen_weights,
    quantized_layers,
)

__all__ = ["LayerRow", "ModelSummary", "QActivation", "QAdd", "QConv1d", "QConv2d", "QLinear", "QMatmul",
           "QuantizedModule", "conversion_for", "dequantize_", "fold_batchnorm_", "frozen_weights", "mark_skipped",
           "quantize_", "quantized_layers", "register_conversion", "replace_module", "skipped_layers", "summary",
           "weight_bytes"]
