"""``lm``: a GPT decoder trained on bytes of real text, scored by perplexity.

Data, by ``source`` (:mod:`fewbit.workloads.data.text`):

- ``stdlib`` (default, everywhere): the Python standard library's own source, about 10 MB of code, docstrings and
  comments. Every machine that runs fewbit has it, so the default needs no package and no download; its files
  split whole into train/valid/test.
- ``kjv``: the King James Bible (natural English prose, about 4 MB) from the Debian SWORD module, split by chapter.

Tokens are bytes (vocabulary 256): no tokenizer to train or ship, and perplexity, nats and bits per byte compare
across configs. The metric is the perplexity of the valid or test split read in non-overlapping windows of
``block_size`` tokens (:class:`fewbit.workloads.data.text.TokenWindows`); ``eval_limit`` caps the tokens read
(0: all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewbit.workloads.base import Model, Source, TrainSettings, Workload, limited, model_device, unwrap
from fewbit.workloads.data import bible, text
from fewbit.workloads.models.gpt import GPT, GPTConfig


@dataclass(frozen=True)
class LMConfig(TrainSettings):
    source: str = "stdlib"
    max_bytes: int = 0  # cap on the corpus over all splits (0: all of it)
    block_size: int = 128
    d_model: int = 128
    heads: int = 4
    layers: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in text.SOURCES:
            raise ValueError(f"source={self.source!r}; valid: {', '.join(text.SOURCES)}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={self.eval_batch_size} must be >= 1")
        self.gpt()  # the model's shape is checked when the config is read, not after the data is loaded

    def gpt(self) -> GPTConfig:
        return GPTConfig(vocab_size=text.VOCAB_SIZE, block_size=self.block_size, d_model=self.d_model,
                         heads=self.heads, layers=self.layers, d_ff=self.d_ff, dropout=self.dropout)


class LanguageModel(Workload):
    name = "lm"
    description = "GPT decoder on bytes of the Python standard library (or the KJV); perplexity"
    metric = "perplexity"
    higher_is_better = False
    secondary = "bits_per_byte"
    Config = LMConfig

    @classmethod
    def sources(cls) -> list[Source]:
        return [
            Source("stdlib", "the Python standard library's source, as bytes", True, "a Python with its stdlib"),
            Source("kjv", "the King James Bible, Debian SWORD module read with pysword", bible.available(),
                   "apt-get install sword-text-kjv sword-text-sparv && pip install pysword"),
        ]

    def _setup(self) -> None:
        c = self.config
        self.require_source(c.source)
        self.splits = text.load(text.TextCorpus(source=c.source, max_bytes=c.max_bytes, seed=c.data_seed))
        for split, tokens in self.splits.items():
            if tokens.numel() < c.block_size + 1:
                raise ValueError(f"the {split} split holds {tokens.numel()} bytes, fewer than one window of "
                                 f"block_size + 1 = {c.block_size + 1}; raise max_bytes or lower block_size")

    def info(self) -> dict:
        return {"source": self.config.source, **{f"{k}_bytes": int(v.numel()) for k, v in self.splits.items()}}

    def build_model(self) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)
        return GPT(c.gpt())

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return text.sample_batch(self.splits["train"], c.batch_size, c.block_size, step * 64 + micro, c.seed)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        ids, targets = batch
        return unwrap(model).loss(ids, targets)

    def samples(self, split: str, limit: int = 0) -> text.TokenWindows:
        """The split read once in non-overlapping windows; ``limit`` counts tokens (0: all)."""
        self.check_split(split)
        tokens = self.splits[split]
        return text.TokenWindows(split, tokens, self.config.block_size, limited(split, tokens.numel(), limit))

    def predict(self, model: Model, inputs: torch.Tensor) -> list[float]:
        """The negative log-likelihood (nats, summed) of each window's tokens after its first."""
        return text.window_nll(model, inputs)

    def score(self, outputs, references) -> dict[str, float]:
        return text.nll_metrics(outputs, references)

    def sample(self, model: nn.Module, prompt: str = "def ", n: int = 200, seed: int = 0) -> str:
        """``n`` bytes generated after ``prompt`` (top-k 40 sampling), as text."""
        ids = text.encode(prompt)[None].long().to(model_device(model))
        out = unwrap(model).generate(ids, n, top_k=40, generator=torch.Generator().manual_seed(seed))
        return text.decode(out[0])


__all__ = ["LMConfig", "LanguageModel"]
