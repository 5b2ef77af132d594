"""Subword tokenizers trained with sentencepiece on a workload's training split, cached by corpus and settings.

Ids: 0 padding, 1 beginning of sentence, 2 end of sentence, 3 unknown; the rest are pieces.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from fewbit.atomic import write_bytes
from fewbit.workloads.data.cache import keyed_dir

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as error:
        raise ImportError("subword tokenizers need sentencepiece: pip install sentencepiece") from error
    return sentencepiece


@dataclass
class Tokenizer:
    """A trained sentencepiece model with fewbit's fixed special ids."""

    model_bytes: bytes

    def __post_init__(self) -> None:
        self._sp = _sentencepiece().SentencePieceProcessor(model_proto=self.model_bytes)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``, stopping at the first end-of-sentence and skipping padding and BOS."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(int(i))
        return self._sp.decode(out)


def train(texts: list[str], vocab_size: int = 512, model_type: str = "unigram") -> Tokenizer:
    """Train (or load from the cache) a tokenizer on ``texts``; the cache key covers the texts and settings."""
    if not texts:
        raise ValueError("cannot train a tokenizer on no text")
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    directory = keyed_dir("tokenizer", {"texts": digest, "vocab_size": vocab_size, "model_type": model_type})
    path = directory / "spm.model"
    if not path.exists():
        spm = _sentencepiece()
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK, character_coverage=1.0,
            hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
        write_bytes(path, model.getvalue())
    return Tokenizer(path.read_bytes())
