"""Channel permutations for N:M sparsity (Pool and Yu, NeurIPS 2021): reorder a layer's input channels so that the
N:M mask keeps more of the weights' magnitude.

An N:M mask only sees which channels share a group of M: the order inside a group does not matter. So the search is
over partitions of the K input channels into groups of M, maximizing the *kept score*, the sum over rows and groups
of the N largest scores (|W| for magnitude pruning; any non-negative score matrix works, Wanda's included).

:func:`search_permutation` is an iterated local search on the CPU, vectorized over all candidate moves:

1. **Channel swaps.** With the N-th and the top N-1 scores of each group with one channel left out, the kept score
   of every group with every other channel swapped in is one broadcasted ``max`` (kept(g - a + c) = top_{N-1}(g - a)
   + max(c, nth_N(g - a)) per row), so the gain of all K^2 swaps is computed at once; the best non-overlapping
   improving swaps are applied together, until none improves.
2. **Group pairs.** For every pair of groups, every split of their 2M channels into two groups (35 for M = 4) is
   scored at once and the best improvement taken: the move of apex's stripe-group search restricted to two groups,
   over all pairs instead of a sampled few.
3. **Kicks.** From the best partition, a few random channels are swapped and steps 1-2 run again; kept only if
   better, until ``time_limit`` seconds or ``rounds`` rounds.

The result is deterministic for a given ``seed`` and ``rounds`` (``time_limit=None``). On the 64 x 128 uniform
matrix the issue quotes (plain 2:4 keeps about 2852 of the 3060 that unstructured 50% keeps), apex's exhaustive
stripe groups recover 35.5-36.6% of that gap; see ``tests/test_sparsity_permute.py`` and the README for what this
search recovers. A tail group (K not a multiple of M) is kept in place: its channels may be swapped with others,
but the padding stays at the end.

Applying a permutation to a model (:func:`permute_input_channels_`) permutes the consumer's input channels and,
to keep the network's function, the producer's output channels, its bias, and every per-channel layer between them
(BatchNorm, a depthwise convolution, elementwise activations): see :mod:`fewbit.sparsity.graph`.
"""

from __future__ import annotations

import itertools
import math
import time
from functools import lru_cache

import torch

from fewbit.sparsity.masks import Pattern, as_matrix, parse_pattern

__all__ = ["kept_score", "search_permutation"]


def _topn_sum(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the ``n`` largest along the last dimension (a sort: faster than topk on short rows)."""
    return groups.sort(dim=-1).values[..., -n:].sum(-1)


def kept_score(scores: torch.Tensor, pattern: str | Pattern = "2:4",
               permutation: torch.Tensor | None = None) -> float:
    """The total score an N:M mask keeps of ``scores`` (a weight's |W|, or any non-negative matrix in the layout
    of :func:`~fewbit.sparsity.masks.as_matrix`) with its input channels in ``permutation``'s order."""
    p = parse_pattern(pattern)
    matrix = as_matrix(scores).double().abs()
    if permutation is not None:
        matrix = matrix[:, permutation]
    rows, k = matrix.shape
    padded = torch.zeros(rows, -(-k // p.m) * p.m, dtype=matrix.dtype)
    padded[:, :k] = matrix
    return float(_topn_sum(padded.view(rows, -1, p.m), p.n).sum())


@lru_cache(maxsize=8)
def _splits(m: int) -> torch.Tensor:
    """Index lists (count, 2m): the first m of each row form one group, the rest the other; each unordered split of
    2m items into two groups of m once."""
    out = []
    for first in itertools.combinations(range(2 * m), m):
        if 0 not in first:
            continue
        rest = [i for i in range(2 * m) if i not in first]
        out.append(list(first) + rest)
    return torch.tensor(out)


class _Search:
    def __init__(self, matrix: torch.Tensor, p: Pattern, generator: torch.Generator) -> None:
        self.p = p
        self.rows, self.k = matrix.shape
        self.groups = -(-self.k // p.m)
        self.width = self.groups * p.m
        padded = torch.zeros(self.rows, self.width, dtype=torch.float64)
        padded[:, :self.k] = matrix
        self.columns = padded.t().contiguous()  # (width, rows): column c's scores
        self.matrix = padded  # (rows, width)
        self.movable = torch.arange(self.width) < self.k  # padding columns stay where they are
        self.generator = generator

    def total(self, order: torch.Tensor) -> float:
        return float(self.group_scores(order).sum())

    def group_scores(self, order: torch.Tensor) -> torch.Tensor:
        g = self.columns[order].view(self.groups, self.p.m, self.rows)
        return _topn_sum(g.transpose(1, 2), self.p.n).sum(-1)  # (groups,)

    def swap_pass(self, order: torch.Tensor) -> bool:
        """Apply the best non-overlapping improving swaps; True when any was applied."""
        p, m = self.p, self.p.m
        g = self.columns[order].view(self.groups, m, self.rows)  # (G, M, R)
        current = _topn_sum(g.transpose(1, 2), p.n).sum(-1)  # (G,)
        # Leave-one-out statistics of each position x: the group without its channel at slot i.
        others = torch.stack([torch.cat([g[:, :i], g[:, i + 1:]], dim=1) for i in range(m)], dim=1)  # (G, M, M-1, R)
        ordered = others.sort(dim=2, descending=True).values
        top = ordered[:, :, : p.n - 1].sum(2).reshape(self.width, self.rows)  # (W, R)
        nth = ordered[:, :, p.n - 1].reshape(self.width, self.rows)  # (W, R)
        base = top.sum(1) - current.repeat_interleave(m)  # (W,)
        cols = self.columns[order]  # (W, R): the channel at each position
        gain = torch.empty(self.width, self.width, dtype=torch.float64)
        chunk = max(1, (1 << 22) // max(1, self.width * self.rows))
        for start in range(0, self.width, chunk):
            stop = min(self.width, start + chunk)
            # D[x, y]: the change of x's group when the channel at position y replaces the one at x.
            gain[start:stop] = torch.maximum(cols[None, :, :], nth[start:stop, None, :]).sum(-1) \
                + base[start:stop, None]
        gain = gain + gain.t()
        group_of = torch.arange(self.width) // m
        movable = self.movable[order]
        invalid = (group_of[:, None] == group_of[None, :]) | ~movable[:, None] | ~movable[None, :]
        gain[invalid] = -math.inf
        upper = torch.triu(torch.ones_like(gain, dtype=torch.bool), 1)
        gain[~upper] = -math.inf
        values, flat = gain.flatten().sort(descending=True)
        improving = values > 1e-12 * max(1.0, float(current.sum()))
        if not bool(improving[0]):
            return False
        used: set[int] = set()
        for f in flat[improving].tolist():
            x, y = divmod(f, self.width)
            gx, gy = x // m, y // m
            if gx in used or gy in used:
                continue
            used.update((gx, gy))
            order[x], order[y] = order[y].clone(), order[x].clone()
            if len(used) >= self.groups - 1:
                break
        return True

    def pair_pass(self, order: torch.Tensor) -> bool:
        """For every pair of groups, the best split of their channels; apply the best non-overlapping improving
        ones. True when any was applied."""
        p, m = self.p, self.p.m
        movable = self.movable[order].view(self.groups, m)
        free = movable.all(1)  # a group holding padding is left to the swaps
        ids = free.nonzero().flatten().tolist()
        if len(ids) < 2:
            return False
        pairs = torch.tensor(list(itertools.combinations(ids, 2)))
        splits = _splits(m)
        current = self.group_scores(order)
        positions = order.view(self.groups, m)
        best_gain = torch.empty(len(pairs), dtype=torch.float64)
        best_split = torch.empty(len(pairs), dtype=torch.int64)
        chunk = max(1, (1 << 22) // (len(splits) * 2 * m * self.rows))
        for start in range(0, len(pairs), chunk):
            pr = pairs[start:start + chunk]
            union = torch.cat([positions[pr[:, 0]], positions[pr[:, 1]]], dim=1)  # (P, 2M) channel ids
            arranged = self.matrix[:, union[:, splits]].view(self.rows, len(pr), len(splits), 2, m)  # (R, P, S, 2, M)
            kept = _topn_sum(arranged, p.n).sum(-1).sum(0)  # (P, S): both groups of each split, all rows
            gains = kept - (current[pr[:, 0]] + current[pr[:, 1]])[:, None]  # (P, S)
            best_gain[start:start + len(pr)], best_split[start:start + len(pr)] = gains.max(dim=1)
        values, index = best_gain.sort(descending=True)
        improving = values > 1e-12 * max(1.0, float(current.sum()))
        if not bool(improving[0]):
            return False
        used: set[int] = set()
        for i in index[improving].tolist():
            g1, g2 = pairs[i].tolist()
            if g1 in used or g2 in used:
                continue
            used.update((g1, g2))
            union = torch.cat([positions[g1], positions[g2]])[splits[best_split[i]]]
            order[g1 * m:(g1 + 1) * m] = union[:m]
            order[g2 * m:(g2 + 1) * m] = union[m:]
        return True

    def local_search(self, order: torch.Tensor, deadline: float | None) -> torch.Tensor:
        while deadline is None or time.perf_counter() < deadline:
            if self.swap_pass(order):
                continue
            if not self.pair_pass(order):
                break
        return order

    def kick(self, order: torch.Tensor, swaps: int) -> torch.Tensor:
        order = order.clone()
        movable = self.movable[order].nonzero().flatten()
        for _ in range(swaps):
            x, y = movable[torch.randint(len(movable), (2,), generator=self.generator)].tolist()
            order[x], order[y] = order[y].clone(), order[x].clone()
        return order


def search_permutation(weight: torch.Tensor, pattern: str | Pattern = "2:4", *, scores: torch.Tensor | None = None,
                       time_limit: float | None = 2.0, rounds: int = 200, seed: int = 0) -> torch.Tensor:
    """A permutation of ``weight``'s input channels (a LongTensor of length K: new channel i is old channel
    ``perm[i]``, so ``weight[:, perm]`` is the permuted Linear weight) that raises the magnitude an N:M mask keeps
    (see the module docstring). ``scores``: what to keep instead of |weight| (e.g. Wanda's scores, same shape).

    The search stops after ``rounds`` kick-and-search rounds or ``time_limit`` seconds, whichever comes first
    (``time_limit=None``: ``rounds`` only, deterministic for a ``seed``). The result never keeps less than the
    identity. A matrix with fewer than two groups of M has nothing to permute: the identity is returned."""
    p = parse_pattern(pattern)
    matrix = as_matrix((weight if scores is None else scores).detach()).double().abs().cpu()
    if not torch.isfinite(matrix).all():
        raise ValueError("search_permutation: the weight has NaN or infinite values; fix them before pruning")
    k = matrix.shape[1]
    if k <= p.m:
        return torch.arange(k)
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    search = _Search(matrix, p, torch.Generator().manual_seed(seed))
    identity = torch.arange(search.width)
    best = search.local_search(identity.clone(), deadline)
    best_score = search.total(best)
    swaps = max(2, search.groups // 8)
    for _ in range(rounds):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        candidate = search.local_search(search.kick(best, swaps), deadline)
        score = search.total(candidate)
        if score > best_score:
            best, best_score = candidate, score
    if best_score <= search.total(identity):
        return torch.arange(k)
    return best[best < k]
