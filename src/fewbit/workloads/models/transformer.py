"""A Transformer encoder-decoder for translation, in one readable file.

Pre-norm blocks, sinusoidal positions, one shared vocabulary with tied input and output embeddings. The attention
products QK^T and PV go through :class:`~fewbit.QMatmul`, and every projection is an ``nn.Linear``, so
``fewbit.quantize_`` reaches all GEMMs of the model. Shapes: B batch, S source length, T target length, C model
width, H heads, D = C / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.nn.modules import QMatmul
from fewbit.workloads.data.tokenizer import BOS, EOS, PAD


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    d_model: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    max_len: int = 128

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.scores = QMatmul()  # Q K^T
        self.mix = QMatmul()  # P V
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) attends to memory (B, S, C); mask (B or 1, 1, T or 1, S) is True where attention is allowed."""
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(memory).view(b, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, S, D)
        scores = self.scores(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
        weights = self.dropout(scores.masked_fill(~mask, float("-inf")).softmax(-1))
        return self.out(self.mix(weights, v).transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class FeedForward(nn.Sequential):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(nn.Linear(config.d_model, config.d_ff), nn.ReLU(), nn.Dropout(config.dropout),
                         nn.Linear(config.d_ff, config.d_model))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.attn, self.ff = Attention(config), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.dropout(self.attn(h, h, mask))
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(config.d_model) for _ in range(3))
        self.self_attn, self.cross_attn, self.ff = Attention(config), Attention(config), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, y, memory, self_mask, memory_mask):
        h = self.norm1(y)
        y = y + self.dropout(self.self_attn(h, h, self_mask))
        y = y + self.dropout(self.cross_attn(self.norm2(y), memory, memory_mask))
        return y + self.dropout(self.ff(self.norm3(y)))


def sinusoids(length: int, width: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return table  # (L, C)


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model, padding_idx=PAD)
        self.register_buffer("positions", sinusoids(config.max_len, config.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        # Embeddings at std C^-1/2: scaled by sqrt(C) on input they have unit size, and the tied output
        # projection starts with logits of unit size (a uniform prediction, loss about log V).
        nn.init.normal_(self.embed.weight, std=config.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_len={self.config.max_len}")
        return self.dropout(self.embed(ids) * math.sqrt(self.config.d_model) + self.positions[: ids.shape[1]])

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) token ids -> memory (B, S, C) and the source mask (B, 1, 1, S)."""
        mask = (src != PAD)[:, None, None, :]
        x = self._embed(src)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x), mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """tgt_in (B, T) ids starting with BOS -> logits (B, T, V) for the next token at every position."""
        t = tgt_in.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()[None, None]  # (1, 1, T, T)
        y = self._embed(tgt_in)
        for layer in self.decoder:
            y = layer(y, memory, causal, memory_mask)
        return self.dec_norm(y) @ self.embed.weight.t()  # tied output projection

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, mask = self.encode(src)
        return self.decode(tgt_in, memory, mask)

    def loss(self, src: torch.Tensor, tgt: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of tgt (B, T) = [BOS, tokens..., EOS, PAD...] predicted from its shifted self."""
        logits = self(src, tgt[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt[:, 1:].reshape(-1),
                               ignore_index=PAD, label_smoothing=label_smoothing)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int = 64) -> torch.Tensor:
        """(B, <= max_len) generated ids, BOS first; finished rows are padded after their EOS."""
        memory, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), BOS, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(max_len - 1):
            nxt = self.decode(out, memory, mask)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == EOS
            if done.all():
                break
        return out

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam: int = 4, max_len: int = 64, length_penalty: float = 0.6
                    ) -> torch.Tensor:
        """Beam search per sentence; scores are log-probabilities divided by ((5 + length) / 6)^length_penalty.
        Returns (B, <= max_len) ids like :meth:`greedy` (with ``beam=1`` it equals greedy)."""
        results = []
        for i in range(src.shape[0]):
            memory, mask = self.encode(src[i : i + 1])
            beams = [([BOS], 0.0)]
            finished: list[tuple[list[int], float]] = []
            for _ in range(max_len - 1):
                seqs = torch.tensor([s for s, _ in beams], device=src.device)
                logp = self.decode(seqs, memory.expand(len(beams), -1, -1), mask).float()[:, -1].log_softmax(-1)
                candidates = []
                for (seq, score), row in zip(beams, logp, strict=True):
                    top = row.topk(beam)
                    candidates += [([*seq, int(t)], score + float(v)) for v, t in zip(top.values, top.indices,
                                                                                      strict=True)]
                candidates.sort(key=lambda c: -c[1])
                beams = []
                for seq, score in candidates:
                    (finished if seq[-1] == EOS else beams).append((seq, score))
                    if len(beams) == beam:
                        break
                if len(finished) >= beam or not beams:
                    break
            pool = finished or beams
            best = max(pool, key=lambda c: c[1] / ((5 + len(c[0])) / 6) ** length_penalty)
            results.append(best[0])
        width = max(len(r) for r in results)
        return torch.tensor([r + [PAD] * (width - len(r)) for r in results], device=src.device)
