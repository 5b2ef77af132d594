"""N:M masks, the compressed storage form, sparsify_ / summary and masks saved with the model."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import fewbit
from fewbit import sparsity
from fewbit.sparsity import (
    as_matrix,
    check_nm,
    compress,
    compressed_bytes,
    from_matrix,
    load_compressed,
    nm_mask,
    parse_pattern,
    transposable_mask,
)
from fewbit.sparsity.storage import pack_bits, unpack_bits

PATTERNS = ["2:4", "1:2", "4:8", "1:4"]


@pytest.fixture(autouse=True)
def eager(monkeypatch):
    monkeypatch.setenv("FEWBIT_COMPILE", "0")  # tiny tensors: compiling would cost more than it saves


def reference_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Group by group in Python: the n largest of each m along each row (ties to the lower index)."""
    rows, k = scores.shape
    keep = torch.zeros(rows, k, dtype=torch.bool)
    for r in range(rows):
        for start in range(0, k, m):
            group = list(range(start, min(k, start + m)))
            ranked = sorted(group, key=lambda j: (-float(scores[r, j]), j))
            keep[r, ranked[:n]] = True
    return keep


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("k", [16, 13, 3, 1])
def test_mask_matches_a_group_by_group_reference_with_partial_tails(pattern, k):
    p = parse_pattern(pattern)
    scores = torch.rand(5, k, generator=torch.Generator().manual_seed(k))
    mask = nm_mask(scores, p)
    assert torch.equal(mask, reference_mask(scores, p.n, p.m))
    assert check_nm(mask, p) is None
    tail = k % p.m
    if tail:  # the partial tail group keeps min(tail, N): pruned as a group padded with zeros, never skipped
        assert int(mask[:, k - tail:].sum(1).max()) == min(tail, p.n)


def test_ties_go_to_the_lower_index_and_nan_is_refused():
    mask = nm_mask(torch.zeros(1, 4))
    assert mask.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="1 NaN score"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 2.0]]))


@pytest.mark.parametrize("bad, message", [
    ("4:2", r"N=4 > M=2"), ("2:2", "keeps every weight"), ("0:4", "N and M must be integers >= 1"),
    ("2/4", "expected 'N:M'"), ("two:four", "expected 'N:M'"), (24, "expected 'N:M'"),
])
def test_bad_patterns_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(bad)


def test_conv_weights_are_grouped_along_input_channels_at_each_kernel_position():
    w = torch.randn(6, 8, 3, 2)
    matrix = as_matrix(w)
    assert matrix.shape == (6 * 3 * 2, 8)
    assert torch.equal(matrix[0], w[0, :, 0, 0])  # one row: one output channel at one kernel position
    assert torch.equal(from_matrix(matrix, w.shape), w)
    mask = nm_mask(w.abs())
    for o, i, j in itertools.product(range(6), range(3), range(2)):
        column = w[o, :, i, j].abs()
        kept = mask[o, :, i, j]
        for g in range(2):
            group = column[4 * g:4 * g + 4]
            assert set(kept[4 * g:4 * g + 4].nonzero().flatten().tolist()) == set(group.topk(2).indices.tolist())


def test_wanda_scores_weigh_each_input_channel_by_its_norm():
    w = torch.ones(2, 4)
    norms = torch.tensor([1.0, 4.0, 2.0, 3.0])
    mask = nm_mask(sparsity.wanda_scores(w, norms))
    assert mask[0].tolist() == [False, True, False, True]
    conv = torch.ones(4, 2, 1, 1)  # groups=2: output channels 0-1 read inputs 0-1, 2-3 read inputs 2-3
    scores = sparsity.wanda_scores(conv, torch.tensor([1.0, 2.0, 3.0, 4.0]), groups=2)
    assert scores[:, :, 0, 0].tolist() == [[1, 2], [1, 2], [3, 4], [3, 4]]
    with pytest.raises(ValueError, match="expected 4"):
        sparsity.wanda_scores(w, torch.ones(3))


@pytest.mark.parametrize("pattern", ["2:4", "1:2", "1:4"])
def test_transposable_masks_are_nm_both_ways_and_optimal_per_block(pattern):
    p = parse_pattern(pattern)
    scores = torch.rand(8, 12, generator=torch.Generator().manual_seed(1))
    mask = transposable_mask(scores, p)
    assert check_nm(mask, p, transposable=True) is None
    # Each full block holds exactly N per row and column, the best such pattern (brute force over all of them).
    block = scores[:p.m, :p.m]
    rows = list(itertools.combinations(range(p.m), p.n))
    best = max(sum(float(block[i, j]) for i, row in enumerate(choice) for j in row)
               for choice in itertools.product(rows, repeat=p.m)
               if all(sum(j in row for row in choice) == p.n for j in range(p.m)))
    assert float(block[mask[:p.m, :p.m]].sum()) == pytest.approx(best)
    odd = transposable_mask(torch.rand(6, 7), p)  # partial blocks in both dimensions
    assert check_nm(odd, p, transposable=True) is None
    with pytest.raises(ValueError, match="M <= 4"):
        transposable_mask(scores, "4:8")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("pattern, shape", [("2:4", (16, 32)), ("1:2", (5, 7)), ("4:8", (3, 20)),
                                            ("2:4", (4, 6, 3, 3))])
def test_compressed_form_round_trips_exactly_through_safetensors(tmp_path, dtype, pattern, shape):
    w = (torch.randn(shape) * 50).to(dtype)
    mask = nm_mask(w.float().abs(), pattern)
    masked = torch.where(mask, w, torch.zeros((), dtype=dtype))
    c = compress(w, pattern, mask)
    assert torch.equal(c.decompress().view(torch.uint8), masked.contiguous().view(torch.uint8))  # bit for bit
    c.save(tmp_path / "w.safetensors")
    back = load_compressed(tmp_path / "w.safetensors")
    assert torch.equal(back.decompress().view(torch.uint8), masked.contiguous().view(torch.uint8))
    assert back.pattern == c.pattern and back.shape == c.shape


@pytest.mark.parametrize("dtype, ratio", [(torch.float16, 0.5625), (torch.bfloat16, 0.5625), (torch.int8, 0.625)])
def test_compressed_bytes_are_kept_values_plus_two_bit_positions(dtype, ratio):
    w = torch.randn(64, 128).to(dtype) if dtype != torch.int8 else torch.randint(-127, 128, (64, 128)).to(dtype)
    mask = nm_mask(w.float().abs())
    c = compress(w, "2:4", mask)
    assert c.nbytes == 64 * 64 * w.element_size() + 64 * 64 * 2 // 8
    assert c.nbytes / c.dense_bytes == ratio
    # MXFP4 values: 4 bits each plus an 8-bit scale per block of 32 kept values, and the same metadata.
    assert compressed_bytes(w.float(), "2:4", "mxfp4_e2m1", mask) == 64 * 64 // 2 + 64 * 2 + 64 * 64 // 4


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_position_bits_pack_little_endian_and_unpack(bits):
    for n in (0, 1, 7, 13, 100):
        values = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
        packed = pack_bits(values, bits)
        assert len(packed) == -(-n * bits // 8)
        assert torch.equal(unpack_bits(packed, bits, n), values)
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [5 | 3 << 3]


def test_compress_refuses_a_weight_that_is_not_nm():
    with pytest.raises(ValueError, match=r"group 0 .* has 3 non-zeros, more than 2"):
        compress(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


# ---- sparsify_ and summary ----------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.conv = nn.Conv1d(16, 24, 3, padding=1)
        self.norm = nn.LayerNorm(24)
        self.depthwise = nn.Conv1d(24, 24, 3, padding=1, groups=24)
        self.fc = nn.Linear(24, 13)  # 13 outputs, 24 inputs
        self.odd = nn.Linear(13, 6)  # reduction 13: a partial tail group of 1
        self.tied = nn.Linear(16, 10, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids).transpose(1, 2)  # (B, 16, T)
        x = self.depthwise(self.conv(x)).transpose(1, 2)  # (B, T, 24)
        return self.tied(self.embed(ids)).sum() + self.odd(self.fc(self.norm(x))).sum()


def test_summary_lists_every_layer_pruned_or_dense_with_the_reason():
    model = sparsity.sparsify_(Net())
    rows = {r.name: r for r in sparsity.summary(model).rows}
    assert [n for n, r in rows.items() if r.pruned] == ["conv", "fc", "odd"]
    assert "embedding" in rows["embed"].reason
    assert "normalization" in rows["norm"].reason
    assert "depthwise/grouped convolution: 1 input channel(s) per group" in rows["depthwise"].reason
    assert "weight shared with embed" in rows["tied"].reason
    for name in ("conv", "fc", "odd"):
        w = model.get_submodule(name).weight
        assert rows[name].nm and check_nm(w, "2:4") is None
    assert rows["fc"].sparsity == 0.5
    assert rows["odd"].sparsity == pytest.approx(1 - (3 * 2 + 1) / 13)  # 3 full groups keep 2, the tail keeps 1
    assert not model.embed.weight.eq(0).any()  # the tied embedding was not touched


def test_layer_patterns_filter_fn_min_weights_and_skip_first():
    model = sparsity.sparsify_(Net(), "2:4", layer_patterns={"fc": "1:4", "od*": None},
                               filter_fn=lambda m, name: name != "conv")
    rows = {r.name: r for r in sparsity.summary(model).rows}
    assert rows["fc"].pattern == "1:4" and rows["fc"].sparsity == 0.75
    assert rows["odd"].reason == "kept dense by layer_patterns ('od*')"
    assert rows["conv"].reason == "excluded by filter_fn"
    model = sparsity.sparsify_(Net(), min_weights=200, skip_first=True)
    rows = {r.name: r for r in sparsity.summary(model).rows}
    assert rows["conv"].reason == "first prunable layer, kept dense by choice (skip_first)"
    assert rows["odd"].reason == "too small: 78 weights < min_weights=200"
    assert rows["fc"].pruned


def test_nothing_to_prune_sparsifying_twice_and_bad_arguments_are_clear():
    with pytest.raises(ValueError, match=r"nothing to prune in Sequential. 0: embedding.*1: LayerNorm"):
        sparsity.sparsify_(nn.Sequential(nn.Embedding(4, 8), nn.LayerNorm(8)))
    model = sparsity.sparsify_(Net())
    with pytest.raises(ValueError, match=r"already sparsified \(3 layer\(s\) hold masks\); call .*densify_"):
        sparsity.sparsify_(model)
    sparsity.densify_(model)
    sparsity.sparsify_(model, "1:4")  # pruning again, to another pattern, after densify_
    assert {r.pattern for r in sparsity.summary(model).rows if r.pruned} == {"1:4"}
    with pytest.raises(ValueError, match="criterion='obs'; valid: magnitude, wanda"):
        sparsity.sparsify_(Net(), criterion="obs")
    with pytest.raises(ValueError, match="needs calibration="):
        sparsity.sparsify_(Net(), criterion="wanda")
    with pytest.raises(ValueError, match="N=8 > M=4"):
        sparsity.sparsify_(Net(), "8:4")


def test_wanda_keeps_the_weights_on_loud_inputs():
    layer = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0.9, 0.2, 0.1]]))
    x = torch.tensor([[0.1, 0.1, 10.0, 10.0]])
    model = sparsity.sparsify_(nn.Sequential(copy.deepcopy(layer)), criterion="wanda", calibration=[x])
    assert model[0].weight.ne(0).tolist() == [[False, False, True, True]]
    model = sparsity.sparsify_(nn.Sequential(copy.deepcopy(layer)))
    assert model[0].weight.ne(0).tolist() == [[True, True, False, False]]


def test_masks_save_and_reload_exactly_and_foreign_masks_are_refused(tmp_path):
    torch.manual_seed(0)
    model = sparsity.sparsify_(Net())
    sparsity.save_masks(model, tmp_path / "m.safetensors")
    fresh = Net()
    fresh.load_state_dict(model.state_dict())
    sparsity.load_masks(fresh, tmp_path / "m.safetensors")
    for name, mask in sparsity.masks(model).items():
        assert torch.equal(sparsity.masks(fresh)[name], mask)
    assert sparsity.summary(fresh).to_dict() == sparsity.summary(model).to_dict()
    other = Net()
    other.fc = nn.Linear(24, 12)
    with pytest.raises(ValueError, match=r"the mask for 'fc' has shape \(13, 24\), its weight here \(12, 24\)"):
        sparsity.load_masks(other, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="a mask for layer 'conv', which Sequential does not have"):
        sparsity.load_masks(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="already has masks"):
        sparsity.load_masks(fresh, tmp_path / "m.safetensors")


@pytest.mark.parametrize("recipe", ["bf16", "fp16", "fp8", "mxfp8", "mxfp6", "mxfp4", "int8", "w4a16", "mxint8"])
def test_quantized_layers_keep_the_masks_and_the_zeros(recipe):
    torch.manual_seed(0)
    model = sparsity.sparsify_(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv1d(32, 16, 1)))
    before = sparsity.masks(model)
    fewbit.quantize_(model, recipe)
    assert sparsity.masks(model).keys() == before.keys()
    for name, mask in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, fewbit.QuantizedModule)
        quantized = layer.quantized_weight(layer.weight_matrix()) if layer.recipe.weight is not None else None
        if quantized is not None:
            assert not quantized.reshape(mask.shape)[~mask].any()  # zeros stay zeros in the format
    assert all(r.nm for r in sparsity.summary(model).rows if r.pruned)
