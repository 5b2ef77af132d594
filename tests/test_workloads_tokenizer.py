"""Subword tokenizers: trained on the number corpus, round trip, fixed special ids, cached."""

from __future__ import annotations

import pytest

from fewbit.workloads.data import numbers, tokenizer
from fewbit.workloads.data.numbers import NumberCorpus


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


def test_round_trip_and_special_ids(tmp_path):
    corpus = numbers.generate(NumberCorpus(pairs=2000, seed=2))
    texts = [s for s, _ in corpus["train"]] + [t for _, t in corpus["train"]]
    tok = tokenizer.train(texts, vocab_size=300)
    assert 100 < tok.vocab_size <= 300
    for src, tgt in corpus["test"][:50]:
        for text in (src, tgt):
            ids = tok.encode(text, bos=True)
            assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS
            assert tok.decode([*ids, tokenizer.PAD, 7, 8]) == text  # stops at EOS
    assert len(tok.encode("ciento veintitrés")) < len("ciento veintitrés")  # subwords, not characters
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 1
    again = tokenizer.train(texts, vocab_size=300)
    assert again.model_bytes == tok.model_bytes


def test_no_text_is_an_error():
    with pytest.raises(ValueError, match="no text"):
        tokenizer.train([])
