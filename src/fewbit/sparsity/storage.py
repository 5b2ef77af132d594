"""The compressed storage form of an N:M sparse weight: kept values plus position metadata.

Every group of M weights along the reduction dimension (rows of :func:`~fewbit.sparsity.masks.as_matrix`) is
stored as its N kept values, in position order, and N positions of ``ceil(log2 M)`` bits each (2 bits for 2:4),
packed little-endian into a byte stream. A group with fewer than N kept weights is filled up with zero values at
unused positions, and a partial tail group is padded to M, as a sparse kernel pads it. So a 2:4 matrix of R x K
half-precision weights takes R * K/2 * 2 bytes of values and R * K/2 * 2 bits of metadata, 1.125 bytes per dense
weight instead of 2: 56.25% of dense; int8 62.5%. (The layout is fewbit's; a GPU kernel reorders the metadata
into its own tile layout, which holds the same bits.)

``CompressedNM.decompress()`` gives the masked weight back bit for bit, and ``save``/``load`` round-trip the form
exactly through safetensors.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from fewbit.atomic import write_bytes
from fewbit.sparsity.masks import Pattern, as_matrix, check_nm, from_matrix, parse_pattern

__all__ = ["CompressedNM", "compress", "compressed_bytes", "load_compressed", "pack_bits", "unpack_bits"]

FORMAT = "fewbit.nm_compressed.v1"


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers below 2^bits (any shape) as a little-endian bit stream in uint8 (value i in bits
    ``bits*i .. bits*i + bits - 1``); the last byte is zero-padded."""
    flat = values.reshape(-1).to(torch.int64)
    if 8 % bits == 0:  # whole values per byte (2 bits: four per byte), no bit stream needed
        per = 8 // bits
        flat = torch.cat([flat, flat.new_zeros(-len(flat) % per)]).view(-1, per)
        return (flat << (bits * torch.arange(per, device=flat.device))).sum(-1).to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-len(stream) % 8)])
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.view(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``count`` values (int64)."""
    if 8 % bits == 0:
        per = 8 // bits
        shifts = bits * torch.arange(per, device=packed.device)
        return ((packed.to(torch.int64)[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    stream = (packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


@dataclass(frozen=True)
class CompressedNM:
    """An N:M sparse weight as stored: ``values`` ``(rows, groups * N)`` in the weight's dtype, ``metadata`` the
    packed positions (uint8), the ``pattern``, the weight's ``shape``."""

    values: torch.Tensor
    metadata: torch.Tensor
    pattern: Pattern
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes as stored: values at their dtype plus the packed metadata."""
        return self.values.numel() * self.values.element_size() + self.metadata.numel()

    @property
    def dense_bytes(self) -> int:
        """Bytes of the same weight stored dense, at the values' dtype."""
        return math.prod(self.shape) * self.values.element_size()

    def positions(self) -> torch.Tensor:
        """The kept positions within each group, ``(rows, groups, N)`` int64."""
        rows, kept = self.values.shape
        return unpack_bits(self.metadata, self.pattern.index_bits, rows * kept).view(rows, -1, self.pattern.n)

    def decompress(self) -> torch.Tensor:
        """The dense weight (pruned positions zero), in ``shape`` and the values' dtype."""
        p = self.pattern
        rows, kept = self.values.shape
        groups = kept // p.n
        dense = torch.zeros(rows, groups, p.m, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_(-1, self.positions(), self.values.view(rows, groups, p.n))
        k = self.shape[1]
        return from_matrix(dense.view(rows, groups * p.m)[:, :k], self.shape).contiguous()

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically): ``values``, ``metadata`` and the pattern and shape as JSON."""
        from safetensors.torch import save

        meta = {"format": FORMAT, "pattern": str(self.pattern), "shape": json.dumps(list(self.shape))}
        tensors = {"values": self.values.detach().cpu().contiguous(), "metadata": self.metadata.cpu().contiguous()}
        write_bytes(path, save(tensors, metadata=meta))


def load_compressed(path: str | os.PathLike) -> CompressedNM:
    """A :class:`CompressedNM` written by :meth:`CompressedNM.save`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fewbit compressed N:M weight (format {meta.get('format')!r}, expected "
                             f"{FORMAT!r})")
        return CompressedNM(values=f.get_tensor("values"), metadata=f.get_tensor("metadata"),
                            pattern=parse_pattern(meta["pattern"]), shape=tuple(json.loads(meta["shape"])))


def compress(weight: torch.Tensor, pattern: str | Pattern = "2:4", mask: torch.Tensor | None = None
             ) -> CompressedNM:
    """The compressed form of ``weight * mask`` (``mask``: bool, True = kept; default: ``weight != 0``), which
    must be N:M along the reduction dimension (else a ValueError names the first group that is not)."""
    p = parse_pattern(pattern)
    weight = weight.detach()
    kept = (weight != 0) if mask is None else mask.to(torch.bool)
    if kept.shape != weight.shape:
        raise ValueError(f"compress: mask of shape {tuple(kept.shape)} for a weight of shape {tuple(weight.shape)}")
    problem = check_nm(kept, p)
    if problem is not None:
        raise ValueError(f"compress: the weight is not {p} along its reduction dimension: {problem}")
    matrix, keep = as_matrix(weight), as_matrix(kept)
    rows, k = matrix.shape
    groups = -(-k // p.m)
    padded = torch.zeros(rows, groups * p.m, dtype=weight.dtype, device=weight.device)
    padded[:, :k] = matrix
    pkeep = torch.zeros(rows, groups * p.m, dtype=torch.bool, device=weight.device)
    pkeep[:, :k] = keep
    # Kept positions first (in position order), then the unused ones, which fill groups with fewer than N kept.
    rank = (~pkeep).view(rows, groups, p.m).to(torch.int64) * p.m + torch.arange(p.m, device=weight.device)
    positions = rank.argsort(dim=-1)[..., :p.n].sort(dim=-1).values
    values = torch.gather(padded.view(rows, groups, p.m), -1, positions)
    values = torch.where(torch.gather(pkeep.view(rows, groups, p.m), -1, positions), values,
                         torch.zeros((), dtype=values.dtype, device=values.device))
    return CompressedNM(values=values.reshape(rows, groups * p.n).contiguous(),
                        metadata=pack_bits(positions, p.index_bits), pattern=p, shape=tuple(weight.shape))


def compressed_bytes(weight: torch.Tensor, pattern: str | Pattern = "2:4", spec=None, mask=None) -> int:
    """Bytes of ``weight`` stored compressed: the kept values at the weight's dtype, or quantized by ``spec`` (a
    :class:`~fewbit.QuantSpec` or its name: codes and scales of the ``(rows, groups * N)`` values matrix, as
    :func:`fewbit.quantize` stores it), plus the position metadata."""
    c = compress(weight, pattern, mask)
    if spec is None:
        return c.nbytes
    from fewbit.qtensor import quantize

    return quantize(c.values.float(), spec).nbytes + c.metadata.numel()
