"""fewbit: train, quantize, sparsify and benchmark neural networks in few bits."""

from fewbit import formats, recipes, scaling
from fewbit.formats import Format, Overflow, Rounding, cast, decode, encode, pack, unpack
from fewbit.nn import QConv1d, QConv2d, QLinear, QMatmul, dequantize_, quantize_, summary
from fewbit.qtensor import QTensor, QuantSpec, fake_quantize, get_spec, load, quantize, spec_names
from fewbit.recipes import Recipe
from fewbit.scaling import AmaxHistory, Block, PerAxis, PerGroup, PerTensor

__version__ = "0.1.0"

__all__ = [
    "AmaxHistory",
    "Block",
    "Format",
    "Overflow",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "QConv1d",
    "QConv2d",
    "QLinear",
    "QMatmul",
    "QTensor",
    "QuantSpec",
    "Recipe",
    "Rounding",
    "cast",
    "decode",
    "dequantize_",
    "encode",
    "fake_quantize",
    "formats",
    "get_spec",
    "load",
    "pack",
    "quantize",
    "quantize_",
    "recipes",
    "scaling",
    "spec_names",
    "summary",
    "unpack",
]
