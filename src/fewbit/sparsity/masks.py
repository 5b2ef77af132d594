"""N:M masks as pure functions of tensors: patterns, criteria, row-wise and transposable masks, checks.

**Where the groups run.** N:M sparsity keeps at most N of every M consecutive weights along a layer's *reduction*
dimension, the dimension its GEMM sums over: ``in_features`` for a Linear, the input channels for a convolution,
at each kernel position (the implicit-GEMM layout cuSPARSELt and TensorRT use: NHWC, K = kh * kw * C with C
innermost). :func:`as_matrix` gives every weight as that ``(rows, K)`` matrix: a Linear's ``(out, in)`` weight as
it is, a convolution's ``(out, in, *kernel)`` as ``(out * prod(kernel), in)``, so one row is one output channel at
one kernel position and its groups run over input channels. :func:`from_matrix` is the inverse.

**Partial tail groups.** A reduction dimension that is not a multiple of M ends in a partial group of ``r < M``
weights. It is pruned as the hardware pads it: the group is filled up to M with zeros, and at most N of its ``r``
real weights are kept (2:4 with a tail of 3 keeps 2 of 3; a tail of 1 or 2 is kept whole). Nothing is skipped.

**Criteria.** ``magnitude``: |W|. ``wanda`` (Sun et al. 2023): |W_ij| * ||X_j||_2, the weight's magnitude times
the L2 norm of the input feature it multiplies over calibration activations (no weight update). Masks keep the N
highest scores of each group; ties go to the lower index (a stable sort), so a mask is a deterministic function of
the scores. A NaN score is refused (it has no rank).

**Transposable masks** (``transposable=True``): each M x M block of the matrix gets the mask with at most N kept
per row *and* per column that keeps the largest total score, so W and W^T are both N:M (the backward GEMM dX = dY W
runs sparse along W's other dimension). The optimum is found exactly by scoring every candidate block pattern at
once (for 2:4 the 90 4x4 0/1 matrices with two ones in each row and column); supported for M <= 4.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["CRITERIA", "Pattern", "as_matrix", "check_nm", "from_matrix", "is_nm", "magnitude_scores",
           "nm_mask", "parse_pattern", "transposable_mask", "wanda_scores"]

CRITERIA = ("magnitude", "wanda")


@dataclass(frozen=True)
class Pattern:
    """N:M: at most ``n`` of every ``m`` consecutive weights along the reduction dimension are non-zero."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or self.n < 1:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: N and M must be integers >= 1 (e.g. 2:4)")
        if self.n > self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m}: N={self.n} > M={self.m}; keep at most M of every M "
                             "(e.g. 2:4, 1:2, 4:8)")
        if self.n == self.m:
            raise ValueError(f"N:M pattern {self.n}:{self.m} keeps every weight (nothing pruned); use N < M, "
                             "e.g. 2:4")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        """The kept fraction of full groups, N / M."""
        return self.n / self.m

    @property
    def index_bits(self) -> int:
        """Bits of position metadata per kept value: ceil(log2 M) (2 for 2:4)."""
        return max(1, math.ceil(math.log2(self.m)))


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """A :class:`Pattern` from ``"N:M"`` (``"2:4"``, ``"1:2"``, ``"4:8"``) or a Pattern; a clear error otherwise."""
    if isinstance(pattern, Pattern):
        return pattern
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"N:M pattern {pattern!r}: expected 'N:M' with integers N < M, e.g. '2:4', '1:2', '4:8'")
    return Pattern(int(match.group(1)), int(match.group(2)))


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as the ``(rows, K)`` matrix whose rows are grouped along the reduction dimension K (see the
    module docstring): 2-D as is; ``(out, in, *kernel)`` as ``(out * prod(kernel), in)`` (a copy for convolutions).
    """
    if weight.dim() < 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: N:M masks need a matrix or a convolution weight "
                         "(at least 2 dimensions)")
    if weight.dim() == 2:
        return weight
    return weight.movedim(1, -1).reshape(-1, weight.shape[1])


def from_matrix(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`as_matrix`: the ``(rows, K)`` matrix back in the weight's ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape)
    moved = (shape[0], *shape[2:], shape[1])
    return matrix.reshape(moved).movedim(-1, 1)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32: the magnitude criterion."""
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 in ``weight``'s shape (float32). ``input_norms``: the L2 norm of each input channel
    over the calibration activations, one per input channel of the layer (``in_features``, or a convolution's
    ``in_channels``, which its ``groups`` split; the norm of a channel is shared by all its kernel positions)."""
    w = weight.detach().float().abs()
    norms = input_norms.detach().float().to(w.device)
    per_group = w.shape[1]
    if norms.numel() != per_group * groups or w.shape[0] % groups:
        raise ValueError(f"wanda_scores: {norms.numel()} input norms for a weight of shape {tuple(w.shape)} with "
                         f"groups={groups}; expected {per_group * groups} (one per input channel)")
    per_out = norms.view(groups, per_group).repeat_interleave(w.shape[0] // groups, dim=0)  # (out, in/groups)
    return w * per_out.view(*per_out.shape, *([1] * (w.dim() - 2)))


def _check_scores(scores: torch.Tensor) -> None:
    nan = int(torch.isnan(scores).sum())
    if nan:
        raise ValueError(f"{nan} NaN score(s) in a weight of shape {tuple(scores.shape)}: a NaN has no rank; "
                         "fix or zero the NaN weights before pruning")


def nm_mask(scores: torch.Tensor, pattern: str | Pattern = "2:4") -> torch.Tensor:
    """The N:M mask (bool, ``scores``' shape, True = kept) keeping the N highest scores of every group of M along
    the reduction dimension (rows of :func:`as_matrix`); ties to the lower index; a partial tail group keeps at
    most N of its weights. An empty tensor gives an empty mask."""
    p = parse_pattern(pattern)
    matrix = as_matrix(scores).float()
    _check_scores(matrix)
    rows, k = matrix.shape
    groups = -(-k // p.m)
    padded = torch.full((rows, groups * p.m), -math.inf, device=matrix.device)
    padded[:, :k] = matrix
    order = padded.view(rows, groups, p.m).argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros(rows, groups, p.m, dtype=torch.bool, device=matrix.device)
    keep.scatter_(-1, order[..., :p.n], True)
    return from_matrix(keep.view(rows, groups * p.m)[:, :k], scores.shape).contiguous()


@lru_cache(maxsize=8)
def _block_patterns(n: int, m: int) -> torch.Tensor:
    """Every m x m 0/1 matrix with n ones in each row and each column, flattened: (m*m, count) float32."""
    rows = [c for c in itertools.combinations(range(m), n)]
    found = []
    for choice in itertools.product(rows, repeat=m):
        counts = [0] * m
        for r in choice:
            for c in r:
                counts[c] += 1
        if all(c == n for c in counts):
            block = torch.zeros(m, m)
            for i, r in enumerate(choice):
                block[i, list(r)] = 1
            found.append(block.flatten())
    return torch.stack(found, dim=1)


def transposable_mask(scores: torch.Tensor, pattern: str | Pattern = "2:4") -> torch.Tensor:
    """A mask that is N:M along both dimensions of the ``(rows, K)`` matrix (see the module docstring): every
    M x M block holds the best of the block patterns with exactly N per row and column. Dimensions that are not
    multiples of M end in partial blocks (padded with -inf scores, so at most N per partial row or column)."""
    p = parse_pattern(pattern)
    if p.m > 4:
        raise ValueError(f"transposable masks: pattern {p} has M={p.m}; exact transposable masks are supported for "
                         "M <= 4 (2:4, 1:2, 1:4, 3:4); use transposable=False for larger M")
    matrix = as_matrix(scores).float()
    _check_scores(matrix)
    rows, k = matrix.shape
    br, bk = -(-rows // p.m), -(-k // p.m)
    real = torch.zeros(br * p.m, bk * p.m, dtype=torch.float64, device=matrix.device)
    real[:rows, :k] = matrix
    pad = torch.ones_like(real)
    pad[:rows, :k] = 0

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (blocks, m*m)
        return x.view(br, p.m, bk, p.m).permute(0, 2, 1, 3).reshape(br * bk, p.m * p.m)

    candidates = _block_patterns(p.n, p.m).to(device=matrix.device, dtype=torch.float64)  # (m*m, count)
    totals = blocks(real) @ candidates
    # In a partial block, prefer the patterns that put the fewest kept slots on padding, then the best score.
    on_pad = blocks(pad) @ candidates
    totals[on_pad > on_pad.min(dim=1, keepdim=True).values] = -math.inf
    best = candidates.t()[totals.argmax(dim=1)].bool()  # (blocks, m*m); argmax: first of equal totals
    keep = best.view(br, bk, p.m, p.m).permute(0, 2, 1, 3).reshape(br * p.m, bk * p.m)
    keep = keep[:rows, :k]
    return from_matrix(keep, scores.shape).contiguous()


def check_nm(tensor: torch.Tensor, pattern: str | Pattern = "2:4", transposable: bool = False) -> str | None:
    """None when ``tensor`` (a weight or a bool mask; non-zero = kept) has at most N non-zeros in every group of M
    along its reduction dimension (and, with ``transposable``, along the other dimension of its matrix too);
    otherwise where the first violation is, in words."""
    p = parse_pattern(pattern)
    matrix = as_matrix(tensor) != 0
    views = [("reduction", matrix)] + ([("transposed", matrix.t())] if transposable else [])
    for where, m in views:
        rows, k = m.shape
        groups = -(-k // p.m)
        padded = torch.zeros(rows, groups * p.m, dtype=torch.bool, device=m.device)
        padded[:, :k] = m
        counts = padded.view(rows, groups, p.m).sum(-1)
        bad = (counts > p.n).nonzero()
        if len(bad):
            r, g = (int(v) for v in bad[0])
            return (f"row {r} of the {where} matrix, group {g} (columns {g * p.m}..{min(k, (g + 1) * p.m) - 1}) "
                    f"has {int(counts[r, g])} non-zeros, more than {p.n}")
    return None


def is_nm(tensor: torch.Tensor, pattern: str | Pattern = "2:4", transposable: bool = False) -> bool:
    """True when ``tensor`` is N:M along its reduction dimension (see :func:`check_nm`)."""
    return check_nm(tensor, pattern, transposable) is None
