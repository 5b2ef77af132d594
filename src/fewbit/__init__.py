"""fewbit: train, quantize, sparsify and benchmark neural networks in few bits."""

from fewbit import formats
from fewbit.formats import Format, Overflow, Rounding, cast, decode, encode, pack, unpack

__version__ = "0.1.0"

__all__ = ["Format", "Overflow", "Rounding", "cast", "decode", "encode", "formats", "pack", "unpack"]
