"""The number-phrase parallel corpus: deterministic, split without overlap, cached atomically."""

from __future__ import annotations

import pytest

from fewbit.workloads.data import numbers
from fewbit.workloads.data.numbers import NumberCorpus


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


SMALL = NumberCorpus(pairs=3000, seed=3)


def test_splits_do_not_overlap_and_have_the_requested_shares():
    corpus = numbers.generate(SMALL)
    sources = {split: {src for src, _ in pairs} for split, pairs in corpus.items()}
    assert not sources["train"] & sources["valid"] and not sources["train"] & sources["test"]
    assert not sources["valid"] & sources["test"]
    total = sum(len(s) for s in sources.values())
    assert len(sources["test"]) / total == pytest.approx(0.05, abs=0.015)
    assert len(sources["valid"]) / total == pytest.approx(0.05, abs=0.015)
    assert all(len(pairs) == len(sources[split]) for split, pairs in corpus.items())  # no duplicates


def test_pairs_are_real_translations():
    """Every pair is num2words of one number in both languages (checked against the whole small number space)."""
    from num2words import num2words

    spec = NumberCorpus(target="fr", pairs=600, seed=1, max_cardinal=1000, max_ordinal=100, years=(1990, 2000))
    expected = {}
    for kind, values in (("cardinal", range(0, 1000)), ("ordinal", range(1, 101)), ("year", range(1990, 2000))):
        for n in values:
            expected.setdefault(num2words(n, lang="en", to=kind), set()).add(num2words(n, lang="fr", to=kind))
    corpus = numbers.generate(spec)
    pairs = [pair for split in corpus.values() for pair in split]
    assert len(pairs) > 150  # 600 draws from a space of about 1,100 phrases, duplicates dropped
    for src, tgt in pairs:
        assert tgt in expected[src], (src, tgt)
    assert any(src.endswith(("th", "st", "nd", "rd")) for src, _ in pairs)  # ordinals occur
    assert any(src.startswith("nineteen ninety") for src, _ in pairs)  # years occur


def test_deterministic_and_cached(tmp_path):
    first = numbers.load(SMALL)
    cached = list((tmp_path / "cache").glob("numbers-*"))
    assert len(cached) == 1 and (cached[0] / "train.tsv").exists() and (cached[0] / "params.json").exists()
    assert numbers.load(SMALL) == first == numbers.generate(SMALL)
    other = numbers.load(NumberCorpus(pairs=3000, seed=4))
    assert other != first and len(list((tmp_path / "cache").glob("numbers-*"))) == 2


def test_truncated_cache_file_is_reported(tmp_path):
    numbers.load(SMALL)
    train = next((tmp_path / "cache").glob("numbers-*")) / "train.tsv"
    train.write_text("only one field\n")
    with pytest.raises(ValueError, match=r"expected 'source<TAB>target'.*delete"):
        numbers.load(SMALL)


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"target language 'it'.*fr, de, es"):
        NumberCorpus(target="it")
    with pytest.raises(ValueError, match="at least 100"):
        NumberCorpus(pairs=10)
