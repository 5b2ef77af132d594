"""``translate``: a Transformer encoder-decoder translating English into another language, scored with BLEU.

Data, by ``source``:

- ``numbers`` (default, everywhere): number phrases generated with num2words (:mod:`fewbit.workloads.data.numbers`),
  English to ``target`` = fr, de or es.
- ``bible``: English-Spanish verse pairs (KJV and Reina-Valera) read from the Debian SWORD modules
  (:mod:`fewbit.workloads.data.bible`); ``target`` must be es.

One sentencepiece vocabulary is trained on both sides of the training split. The metric is corpus BLEU
(sacrebleu, its default 13a tokenization) of greedy (``beam=1``) or beam-search translations; evaluations also
report chrF, the share of sentences translated exactly, and the teacher-forced loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewbit.workloads.base import (
    Model,
    Samples,
    Source,
    TrainSettings,
    Workload,
    batch_generator,
    installed,
    limited,
    model_device,
    unwrap,
)
from fewbit.workloads.data import numbers, tokenizer
from fewbit.workloads.data.tokenizer import BOS, EOS, PAD
from fewbit.workloads.models.transformer import Seq2SeqTransformer, TransformerConfig

SOURCES = ("numbers", "bible")


@dataclass(frozen=True)
class TranslateConfig(TrainSettings):
    source: str = "numbers"
    target: str = "es"
    pairs: int = 24000  # number phrases drawn (numbers source)
    max_number: int = 1_000_000  # cardinals are drawn log-uniformly below this (numbers source)
    vocab_size: int = 1000
    d_model: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 512
    dropout: float = 0.1
    label_smoothing: float = 0.1
    max_len: int = 96  # tokens per side; longer pairs are dropped
    beam: int = 1  # 1: greedy decoding
    length_penalty: float = 0.6
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in SOURCES:
            raise ValueError(f"source={self.source!r}; valid: {', '.join(SOURCES)}")
        if self.source == "bible" and self.target != "es":
            raise ValueError(f"the bible source is English-Spanish; target={self.target!r} needs source=numbers")
        if self.beam < 1:
            raise ValueError(f"beam={self.beam} must be >= 1 (1 is greedy decoding)")


def _bible():
    from fewbit.workloads.data import bible

    return bible


class Translate(Workload):
    name = "translate"
    description = "Transformer encoder-decoder, English to fr/de/es; BLEU (sacrebleu)"
    metric = "bleu"
    higher_is_better = True
    secondary = "loss"  # teacher-forced cross-entropy per target token: moves before BLEU does
    Config = TranslateConfig

    @classmethod
    def sources(cls) -> list[Source]:
        have_numbers, have_bible = installed("num2words"), _bible().available()
        return [
            Source("numbers", "number phrases generated with num2words (en to fr/de/es)", have_numbers,
                   "pip install num2words"),
            Source("bible", "English-Spanish Bible verses, Debian SWORD modules read with pysword", have_bible,
                   "apt-get install sword-text-kjv sword-text-sparv && pip install pysword"),
        ]

    def _setup(self) -> None:
        c = self.config
        self.require_source(c.source)
        if c.source == "numbers":
            corpus = numbers.load(numbers.NumberCorpus(target=c.target, pairs=c.pairs, seed=c.data_seed,
                                                         max_cardinal=c.max_number))
        else:
            corpus = _bible().load()
        if "tokenizer.model" in self.saved_artifacts:  # a saved run's own vocabulary
            self.tokenizer = tokenizer.Tokenizer(self.saved_artifacts["tokenizer.model"])
        else:
            self.tokenizer = tokenizer.train([s for pair in corpus["train"] for s in pair], c.vocab_size)
        self.splits: dict[str, list[tuple[list[int], list[int], str]]] = {}
        self.dropped = 0
        for split, pairs in corpus.items():
            rows = []
            for src, tgt in pairs:
                s, t = self.tokenizer.encode(src), self.tokenizer.encode(tgt, bos=True)
                if len(s) > c.max_len or len(t) > c.max_len:
                    self.dropped += 1
                    continue
                rows.append((s, t, tgt))
            if not rows:
                raise ValueError(f"the {split} split is empty after dropping pairs over max_len={c.max_len}")
            self.splits[split] = rows

    def info(self) -> dict:
        return {"source": self.config.source, "target": self.config.target, "vocab": self.tokenizer.vocab_size,
                "dropped_over_max_len": self.dropped, **{f"{k}_pairs": len(v) for k, v in self.splits.items()}}

    def build_model(self) -> nn.Module:
        c = self.config
        torch.manual_seed(c.seed)
        return Seq2SeqTransformer(TransformerConfig(
            vocab_size=self.tokenizer.vocab_size, d_model=c.d_model, heads=c.heads, encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers, d_ff=c.d_ff, dropout=c.dropout, max_len=c.max_len + 1))

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.splits["train"]
        pick = torch.randint(len(rows), (self.config.batch_size,), generator=batch_generator(self.config.seed,
                                                                                             step, micro))
        chosen = [rows[i] for i in pick.tolist()]
        return _pad([r[0] for r in chosen]), _pad([r[1] for r in chosen])

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        src, tgt = batch
        return unwrap(model).loss(src, tgt, label_smoothing=self.config.label_smoothing)

    def artifacts(self) -> dict[str, bytes]:
        return {"tokenizer.model": self.tokenizer.model_bytes}

    def samples(self, split: str, limit: int = 0) -> PairSamples:
        self.check_split(split)
        rows = self.splits[split]
        return PairSamples(split, rows[:limited(split, len(rows), limit)])

    def predict(self, model: Model, inputs: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[str, float, int]]:
        """Per sentence: (translation, teacher-forced negative log-likelihood of the reference in nats, reference
        tokens). ``inputs`` = (source ids, reference ids), both padded; decoding reads only the source, the
        reference is there for the teacher-forced loss. Greedy (``beam=1``) or beam search, at most ``max_len``
        tokens and at most twice the longest source plus 8."""
        c = self.config
        net = unwrap(model)
        device = model_device(model)
        src, tgt = (t.to(device) for t in inputs)
        logits = net(src, tgt[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), tgt[:, 1:], ignore_index=PAD, reduction="none")  # (B, T)
        counts = (tgt[:, 1:] != PAD).sum(-1)
        longest = int((src != PAD).sum(-1).max())
        limit_len = min(c.max_len + 1, 2 * longest + 8)
        out = (net.greedy(src, max_len=limit_len) if c.beam == 1 else
               net.beam_search(src, beam=c.beam, max_len=limit_len, length_penalty=c.length_penalty))
        return [(self.tokenizer.decode(ids), loss, n)
                for ids, loss, n in zip(out.tolist(), nll.sum(-1).tolist(), counts.tolist(), strict=True)]

    def score(self, outputs, references) -> dict[str, float]:
        """Corpus BLEU and chrF (sacrebleu), the share translated exactly, and the teacher-forced loss per
        reference token (and its exp, ``ppl``)."""
        import sacrebleu

        hyps = [o[0] for o in outputs]
        loss = sum(o[1] for o in outputs) / max(sum(o[2] for o in outputs), 1)
        return {
            "bleu": sacrebleu.corpus_bleu(hyps, [list(references)]).score,
            "chrf": sacrebleu.corpus_chrf(hyps, [list(references)]).score,
            "exact": sum(h == r for h, r in zip(hyps, references, strict=True)) / len(references),
            "loss": loss,
            "ppl": math.exp(min(loss, 50.0)),
            "sentences": float(len(references)),
        }

    def examples(self, model: nn.Module, n: int = 3, split: str = "test") -> list[tuple[str, str, str]]:
        """(source, reference, translation) for the first ``n`` sentences of a split."""
        rows = self.splits[split][:n]
        model.eval()
        out = unwrap(model).greedy(_pad([r[0] for r in rows]).to(model_device(model)), max_len=self.config.max_len + 1)
        return [(self.tokenizer.decode(r[0]), r[2], self.tokenizer.decode(ids))
                for r, ids in zip(rows, out.tolist(), strict=True)]


@dataclass
class PairSamples(Samples):
    """Sentence pairs: (source ids, reference ids with BOS and EOS, reference text) per row."""

    split: str
    rows: list[tuple[list[int], list[int], str]]

    def __len__(self) -> int:
        return len(self.rows)

    def inputs(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(source ids (B, S), reference ids (B, T)), padded with PAD."""
        return _pad([self.rows[i][0] for i in indices]), _pad([self.rows[i][1] for i in indices])

    def references(self, indices) -> list[str]:
        return [self.rows[i][2] for i in indices]

    def batches(self, batch_size: int) -> list[list[int]]:
        """Sentences of similar source length together (less padding)."""
        order = sorted(range(len(self.rows)), key=lambda i: len(self.rows[i][0]))
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])


__all__ = ["BOS", "EOS", "PairSamples", "Translate", "TranslateConfig"]
