"""Where models meet formats: quantized autograd functions, modules, and model conversion."""

from fewbit.nn.convert import dequantize_, quantize_, summary, weight_bytes
from fewbit.nn.fold import fold_batchnorm_
from fewbit.nn.modules import QActivation, QAdd, QConv1d, QConv2d, QLinear, QMatmul

__all__ = ["QActivation", "QAdd", "QConv1d", "QConv2d", "QLinear", "QMatmul", "dequantize_", "fold_batchnorm_",
           "quantize_", "summary", "weight_bytes"]
