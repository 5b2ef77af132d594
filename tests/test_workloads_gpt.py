"""The GPT decoder: causality, a uniform start, that it learns, sampling, and that quantize_ reaches its GEMMs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fewbit
from fewbit.nn.modules import QLinear, QMatmul
from fewbit.workloads.models.gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=32, block_size=16, d_model=32, heads=4, layers=2, d_ff=64, dropout=0.0)


def model(seed=0, config=CONFIG):
    torch.manual_seed(seed)
    return GPT(config).eval()


def test_earlier_logits_do_not_see_later_tokens():
    m = model()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = m(ids)
    assert logits.shape == (2, 12, 32)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % 32
    after = m(changed)
    torch.testing.assert_close(after[:, :7], logits[:, :7], rtol=0, atol=0)
    assert not torch.allclose(after[:, 7:], logits[:, 7:])
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_untrained_loss_is_a_uniform_guess():
    config = GPTConfig(vocab_size=256, block_size=64, d_model=64, heads=4, layers=2, d_ff=128)
    ids = torch.randint(0, 256, (8, 65), generator=torch.Generator().manual_seed(0))
    loss = model(config=config).loss(ids[:, :-1], ids[:, 1:]).item()
    assert loss == pytest.approx(math.log(256), abs=0.1)


def test_overfits_a_short_sequence():
    torch.manual_seed(0)
    m = GPT(CONFIG).train()
    sequence = torch.randint(0, 32, (1, 17), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = m.loss(sequence[:, :-1], sequence[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses[::10]
    greedy = m.generate(sequence[:, :1], 16, temperature=0)
    assert torch.equal(greedy, sequence)  # recites the sequence from its first token
    assert m.training  # generate restores the mode


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    m = model(1)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    samples = [m.generate(prompt, 30, temperature=1.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert samples[0].shape == (2, 33) and torch.equal(samples[0], samples[1])  # 33 > block_size: the window slides
    assert torch.equal(samples[0][:, :3], prompt)
    top1 = m.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, m.generate(prompt, 10, temperature=0))
    with pytest.raises(ValueError, match="temperature"):
        m.generate(prompt, 1, temperature=-1)


def test_quantize_reaches_every_linear_and_attention_matmul():
    m = model()
    reference = m(torch.arange(16)[None] % 32)
    fewbit.quantize_(m, "mxfp8")
    linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
    matmuls = [mod for mod in m.modules() if isinstance(mod, QMatmul)]
    assert len(linears) == 4 * CONFIG.layers and all(isinstance(mod, QLinear) for mod in linears)
    assert len(matmuls) == 2 * CONFIG.layers
    assert all(mod.recipe.name == "mxfp8" for mod in linears + matmuls)
    skipped = m.__dict__["_fewbit_skipped"]
    assert skipped and all("Embedding" in r or "LayerNorm" in r for r in skipped.values())
    quantized = m(torch.arange(16)[None] % 32)
    assert 0 < (quantized - reference).norm() < 0.1 * reference.norm()


def test_bad_configs():
    with pytest.raises(ValueError, match="multiple of heads"):
        GPTConfig(d_model=30, heads=4)
    with pytest.raises(ValueError, match="layers=0 must be a positive integer"):
        GPTConfig(layers=0)
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        GPTConfig(dropout=1.0)
