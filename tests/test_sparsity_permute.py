"""Channel permutations: the search on one matrix (the 64 x 128 anchor) and their application to a model, which must
leave the dense function unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewbit import sparsity
from fewbit.sparsity import kept_score, search_permutation
from fewbit.sparsity.graph import Chain, find_chain, permute_chain_


def test_search_beats_random_permutations_and_apex_on_the_uniform_anchor():
    w = torch.rand(64, 128, generator=torch.Generator().manual_seed(0))
    plain = kept_score(w)
    unstructured = float(w.flatten().topk(w.numel() // 2).values.sum())
    perm = search_permutation(w, time_limit=None, rounds=3, seed=0)
    assert sorted(perm.tolist()) == list(range(128))
    recovered = (kept_score(w, permutation=perm) - plain) / (unstructured - plain)
    g = torch.Generator().manual_seed(1)
    best_random = max(kept_score(w, permutation=torch.randperm(128, generator=g)) for _ in range(200))
    assert recovered > (best_random - plain) / (unstructured - plain)
    assert recovered > 0.366  # apex's exhaustive stripe groups of 12: 36.6% (REFERENCE.md section 6)


def test_search_is_deterministic_handles_tails_and_never_loses():
    w = torch.rand(16, 22, generator=torch.Generator().manual_seed(2))  # a partial tail group of 2
    a = search_permutation(w, time_limit=None, rounds=2, seed=3)
    assert torch.equal(a, search_permutation(w, time_limit=None, rounds=2, seed=3))
    assert sorted(a.tolist()) == list(range(22))
    assert kept_score(w, permutation=a) >= kept_score(w)
    assert torch.equal(search_permutation(torch.rand(4, 4)), torch.arange(4))  # one group: nothing to permute
    with pytest.raises(ValueError, match="NaN or infinite"):
        search_permutation(torch.tensor([[float("nan")] * 8]))


def _double(model):
    return model.double().eval()


@pytest.mark.parametrize("build, example", [
    (lambda: nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.1), nn.LayerNorm(32), nn.Linear(32, 8)),
     lambda: torch.randn(5, 12)),
    (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                           nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                           nn.Conv2d(16, 8, 1)),
     lambda: torch.randn(2, 3, 6, 6)),
])
def test_permuting_a_chain_leaves_the_dense_function_unchanged(build, example):
    torch.manual_seed(0)
    model = build()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    model = _double(model)
    x = example().double()
    consumer = str(len(model) - 1)
    chain = find_chain(model, consumer)
    assert isinstance(chain, Chain) and chain.producer == "0"
    reference = model(x)
    perm = torch.randperm(model[0].out_channels if isinstance(model[0], nn.Conv2d) else 32)
    permuted = copy.deepcopy(model)
    permute_chain_(permuted, chain, perm)
    assert not torch.equal(permuted[0].weight, model[0].weight)
    torch.testing.assert_close(permuted(x), reference, rtol=1e-12, atol=1e-12)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(x + self.body(x))


def test_where_the_graph_cannot_be_permuted_the_summary_says_so_per_layer():
    torch.manual_seed(0)
    model = Residual().double()
    x = torch.randn(3, 16, dtype=torch.float64)
    dense = copy.deepcopy(model)
    sparsity.sparsify_(model, permute=True, permute_time=0.2)
    rows = {r.name: r for r in sparsity.summary(model).rows}
    assert rows["body.2"].permutation["applied"] and rows["body.2"].permutation["producer"] == "body.0"
    assert rows["body.2"].permutation["kept_after"] >= rows["body.2"].permutation["kept_before"]
    assert "first compute layer of the Sequential body" in rows["body.0"].permutation["reason"]
    assert "not inside an nn.Sequential" in rows["head"].permutation["reason"]
    assert all(r.nm for r in rows.values() if r.pruned)
    assert isinstance(find_chain(nn.Sequential(nn.Conv1d(8, 8, 1, groups=2)), "0"), str)
    assert model(x).shape == dense(x).shape
