"""A GPT decoder (decoder-only Transformer language model) in one readable file.

Token and learned position embeddings, ``layers`` pre-norm blocks (causal self-attention, then a GELU MLP, each
added to the residual stream), a final LayerNorm and an output head tied to the token embedding. The attention
products QK^T and PV go through :class:`~fewbit.QMatmul` and every projection is an ``nn.Linear``, so
``fewbit.quantize_`` reaches all GEMMs of the blocks. The tied head (``x @ E^T``) stays in float, like the embedding
it shares its weight with (``fewbit.summary`` lists the embeddings as kept in float).

Initialization follows GPT-2: weights N(0, 0.02), biases zero, and the two projections that write into the residual
stream scaled by 1/sqrt(2 * layers) so that its variance does not grow with depth. Logits of an untrained model are
then small, and its loss is close to ln(vocab_size), a uniform guess.

Shapes: B batch, T sequence length (<= block_size), C = d_model, H heads, D = C / H, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.nn.modules import QMatmul


@dataclass(frozen=True)
class GPTConfig:
    """Model shape. ``block_size``: the longest context (positions have learned embeddings up to it); ``d_ff``: the
    MLP's hidden width; ``dropout``: on embeddings, attention weights and both residual branches."""

    vocab_size: int = 256
    block_size: int = 128
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    d_ff: int = 512
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "d_model", "heads", "layers", "d_ff"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must lie in [0, 1)")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.scores = QMatmul()  # Q K^T
        self.mix = QMatmul()  # P V
        self.attn_dropout = nn.Dropout(config.dropout)
        causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", causal, persistent=False)  # (block, block), True where attention is allowed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        scores = self.scores(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        weights = self.attn_dropout(scores.masked_fill(~self.causal[:t, :t], float("-inf")).softmax(-1))
        return self.out(self.mix(weights, v).transpose(1, 2).reshape(b, t, c))  # (B, T, C)


class MLP(nn.Sequential):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__(nn.Linear(config.d_model, config.d_ff), nn.GELU(), nn.Linear(config.d_ff, config.d_model))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.d_model), nn.LayerNorm(config.d_model)
        self.attn, self.mlp = CausalSelfAttention(config), MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.block_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)
        for block in self.blocks:  # the projections that write into the residual stream
            for residual in (block.attn.out, block.mlp[2]):
                nn.init.normal_(residual.weight, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 -> logits (B, T, V) for the next token at every position; T <= block_size."""
        t = ids.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size={self.config.block_size}")
        position = torch.arange(t, device=ids.device)
        x = self.dropout(self.tokens(ids) + self.positions(position))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.tokens.weight.t()  # tied output head, (B, T, V)

    def loss(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of targets (B, T) given ids (B, T); targets are usually ids shifted
        left by one. Computed in float32 whatever the model's dtype."""
        logits = self(ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, n: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """ids (B, T) followed by ``n`` sampled tokens: (B, T + n). Each step reads the last ``block_size`` tokens.

        ``temperature`` divides the logits (0: always the most likely token); ``top_k`` samples among the k most
        likely tokens only. Dropout is off while sampling (the module's mode is restored after)."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 picks the most likely token)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k} must be >= 1 or None (no limit)")
        was_training = self.training
        self.eval()
        try:
            for _ in range(n):
                logits = self(ids[:, -self.config.block_size :])[:, -1].float()  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = logits.softmax(-1)
                    if generator is not None:  # sample where the generator lives
                        probs = probs.to(generator.device)
                    nxt = torch.multinomial(probs, 1, generator=generator).to(ids.device)  # (B, 1)
                ids = torch.cat([ids, nxt], dim=1)
        finally:
            self.train(was_training)
        return ids
