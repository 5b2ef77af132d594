"""fewbit: train, quantize, sparsify and benchmark neural networks in few bits."""

from fewbit import formats, scaling
from fewbit.formats import Format, Overflow, Rounding, cast, decode, encode, pack, unpack
from fewbit.qtensor import QTensor, QuantSpec, fake_quantize, get_spec, load, quantize, spec_names
from fewbit.scaling import AmaxHistory, Block, PerAxis, PerGroup, PerTensor

__version__ = "0.1.0"

__all__ = [
    "AmaxHistory", "Block", "Format", "Overflow", "PerAxis", "PerGroup", "PerTensor", "QTensor", "QuantSpec",
    "Rounding", "cast", "decode", "encode", "fake_quantize", "formats", "get_spec", "load", "pack", "quantize",
    "scaling", "spec_names", "unpack",
]
