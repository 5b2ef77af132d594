"""The translation Transformer: masking, decoding, quantizable attention, and that it learns."""

from __future__ import annotations

import pytest
import torch

import fewbit
from fewbit.nn.modules import QMatmul
from fewbit.workloads.data.tokenizer import BOS, EOS, PAD
from fewbit.workloads.models.transformer import Seq2SeqTransformer, TransformerConfig

CONFIG = TransformerConfig(vocab_size=20, d_model=32, heads=4, encoder_layers=1, decoder_layers=1, d_ff=64,
                           dropout=0.0, max_len=16)


def model(seed=0):
    torch.manual_seed(seed)
    return Seq2SeqTransformer(CONFIG).eval()


def test_causal_and_padding_masks():
    m = model()
    src = torch.tensor([[5, 6, 7, EOS, PAD, PAD]])
    tgt = torch.tensor([[BOS, 8, 9, 10]])
    logits = m(src, tgt)
    assert logits.shape == (1, 4, 20)
    changed_future = m(src, torch.tensor([[BOS, 8, 11, 12]]))
    torch.testing.assert_close(changed_future[:, :2], logits[:, :2])  # positions 0-1 do not see tokens 2-3
    longer_padding = m(torch.tensor([[5, 6, 7, EOS, PAD, PAD, PAD, PAD]]), tgt)
    torch.testing.assert_close(longer_padding, logits, rtol=1e-5, atol=1e-5)  # padding is invisible


def test_beam_of_one_is_greedy_and_too_long_input_is_refused():
    m = model(1)
    src = torch.tensor([[5, 6, 7, EOS], [9, 9, EOS, PAD]])
    greedy = m.greedy(src, max_len=8)
    beam = m.beam_search(src, beam=1, max_len=8, length_penalty=0.0)
    for g, b in zip(greedy, beam, strict=True):
        assert g[g != PAD].tolist() == b[b != PAD].tolist()
    with pytest.raises(ValueError, match="exceeds max_len=16"):
        m(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


def test_quantize_reaches_every_gemm():
    m = fewbit.quantize_(model(), "mxfp8")
    matmuls = [mod for mod in m.modules() if isinstance(mod, QMatmul)]
    assert len(matmuls) == 6 and all(mm.recipe.name == "mxfp8" for mm in matmuls)
    skipped = m.__dict__["_fewbit_skipped"]
    assert all("Embedding" in r or "LayerNorm" in r for r in skipped.values())


def test_learns_to_reverse():
    torch.manual_seed(0)
    m = Seq2SeqTransformer(CONFIG).train()
    optimizer = torch.optim.Adam(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        body = torch.randint(4, 20, (32, 5), generator=g)
        src = torch.cat([body, torch.full((32, 1), EOS)], 1)
        tgt = torch.cat([torch.full((32, 1), BOS), body.flip(1), torch.full((32, 1), EOS)], 1)
        loss = m.loss(src, tgt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] < 2 * torch.log(torch.tensor(20.0)).item()  # starts near a uniform guess
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0]
    m.eval()
    body = torch.randint(4, 20, (8, 5), generator=g)
    out = m.greedy(torch.cat([body, torch.full((8, 1), EOS)], 1), max_len=8)
    assert (out[:, 1:6] == body.flip(1)).float().mean() > 0.8
