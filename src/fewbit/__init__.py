"""fewbit: train, quantize, sparsify and benchmark neural networks in few bits."""

from fewbit import formats, recipes, scaling, sparsity
from fewbit.calibrate import Calibration, PTQReport, calibrate, ptq
from fewbit.choices import Overflow, Rounding
from fewbit.export import export_onnx
from fewbit.formats import Format, cast, decode, encode, pack, unpack
from fewbit.nn import (
    QConv1d,
    QConv2d,
    QLinear,
    QMatmul,
    QuantizedModule,
    dequantize_,
    fold_batchnorm_,
    quantize_,
    quantized_layers,
    replace_module,
    summary,
)
from fewbit.qtensor import QTensor, QuantSpec, fake_quantize, get_spec, load, quantize, spec_names
from fewbit.recipes import Recipe
from fewbit.scaling import AmaxHistory, Block, PerAxis, PerGroup, PerTensor
from fewbit.sparsity import sparsify_

__version__ = "0.1.0"


def __getattr__(name: str):
    # fewbit.qat lives with the training loop (fewbit.train), imported on first use like the rest of fewbit.train.
    if name == "qat":
        from fewbit.train.qat import qat

        return qat
    # fewbit.study(model, evaluate=fn, recipes=[...]) is the study verb's module, which is callable (its
    # model_study). The verbs stand above everything imported here, so they load on first use: `import fewbit`
    # stays at the library's floor (the runs layer reads fewbit.__version__).
    if name == "study":
        import importlib

        return importlib.import_module("fewbit.study")
    raise AttributeError(f"module 'fewbit' has no attribute {name!r}")


__all__ = [
    "AmaxHistory",
    "Block",
    "Calibration",
    "Format",
    "Overflow",
    "PTQReport",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QMatmul",
    "QTensor",
    "QuantSpec",
    "QuantizedModule",
    "Recipe",
    "Rounding",
    "calibrate",
    "cast",
    "decode",
    "dequantize_",
    "encode",
    "export_onnx",
    "fake_quantize",
    "fold_batchnorm_",
    "formats",
    "get_spec",
    "load",
    "pack",
    "ptq",
    "qat",
    "quantize",
    "quantize_",
    "quantized_layers",
    "recipes",
    "replace_module",
    "scaling",
    "sparsify_",
    "sparsity",
    "spec_names",
    "study",
    "summary",
    "unpack",
]
