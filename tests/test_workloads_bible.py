"""The English-Spanish Bible corpus: aligned verses, clean text, splits by chapter, cache, and the errors that name
what to install. Tests that read the Bibles skip when pysword or the Debian SWORD modules are missing."""

from __future__ import annotations

from collections import defaultdict

import pytest

from fewbit.workloads.data import bible
from fewbit.workloads.data.bible import BibleCorpus

needs_bible = pytest.mark.skipif(not bible.available(), reason="needs pysword and the Debian packages "
                                 "sword-text-kjv sword-text-sparv")


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pairs():
    return {reference: (en, es) for reference, en, es in bible.verse_pairs()} if bible.available() else {}


@needs_bible
def test_verses_are_aligned_and_clean(pairs):
    assert 31_000 <= len(pairs) <= 31_102  # 31,102 verses in the KJV versification, a few empty in Spanish
    assert pairs["John 3:16"] == (
        "For God so loved the world, that he gave his only begotten Son, that whosoever believeth in him should not "
        "perish, but have everlasting life.",
        "Porque de tal manera amó Dios al mundo, que ha dado á su Hijo unigénito, para que todo aquel que en él "
        "cree, no se pierda, mas tenga vida eterna.")
    assert pairs["Gen 1:1"] == ("In the beginning God created the heaven and the earth.",
                                "En el principio crió Dios los cielos y la tierra.")  # "EN" in the module
    assert pairs["Ps 119:9"][1].startswith("¿Con qué limpiará el joven")  # acrostic letter "BETH" removed
    assert pairs["Exod 6:3"][0].endswith("but by my name JEHOVAH was I not known to them.")  # no "\nd" code
    assert pairs["Rev 22:21"][1] == "La gracia de nuestro Señor Jesucristo sea con todos vosotros. Amén."
    for en, es in pairs.values():
        for side in (en, es):
            assert side and side == side.strip() and not any(c in side for c in "<>¶\\\t\n"), side


@needs_bible
def test_splits_are_whole_chapters_without_shared_verses(pairs):
    corpus = bible.load()
    english = {split: [en for en, _ in split_pairs] for split, split_pairs in corpus.items()}
    assert not set(english["train"]) & set(english["valid"]) and not set(english["train"]) & set(english["test"])
    assert not set(english["valid"]) & set(english["test"])
    total = sum(len(v) for v in english.values())
    assert 30_900 < total <= len(pairs)
    for split in ("valid", "test"):
        assert len(english[split]) / total == pytest.approx(0.05, abs=0.02)
    split_of = {en: split for split, texts in english.items() for en in texts}
    chapter_splits = defaultdict(set)
    for reference, (en, _) in pairs.items():
        if split_of.get(en) in ("valid", "test"):  # train keeps repeats, so map verses to valid/test only
            chapter_splits[reference.rsplit(":", 1)[0]].add(split_of[en])
    assert chapter_splits and all(len(s) == 1 for s in chapter_splits.values())


@needs_bible
def test_cached_reused_and_keyed(tmp_path, monkeypatch):
    first = bible.load()
    cached = list((tmp_path / "cache").glob("bible-*"))
    assert len(cached) == 1 and (cached[0] / "test.tsv").exists()
    assert "KJV" in (cached[0] / "params.json").read_text()  # keyed by the modules' names and versions too

    def unreadable():
        raise AssertionError("the cached corpus should have been read")

    monkeypatch.setattr(bible, "verse_pairs", unreadable)
    assert bible.load() == first
    monkeypatch.undo()
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    short = bible.load(BibleCorpus(max_chars=60))
    assert len(list((tmp_path / "cache").glob("bible-*"))) == 2
    assert all(len(en) <= 60 and len(es) <= 60 for split in short.values() for en, es in split)
    assert 1000 < sum(map(len, short.values())) < sum(map(len, first.values())) / 4


@needs_bible
def test_english_text_is_split_like_the_pairs():
    text = bible.english_text()
    corpus = bible.load()
    lines = {split: set(t.splitlines()) for split, t in text.items()}
    for split in ("valid", "test"):
        assert {en for en, _ in corpus[split]} <= lines[split]
    assert sum(len(t.splitlines()) for t in text.values()) == pytest.approx(31_100, abs=10)
    assert "For God so loved the world" in text["train"] + text["valid"] + text["test"]


def test_missing_modules_name_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("SWORD_PATH", str(tmp_path))
    monkeypatch.setattr(bible, "SEARCH_PATHS", ())
    assert not bible.available()
    if bible._have_pysword():
        with pytest.raises(FileNotFoundError, match="apt-get install sword-text-kjv sword-text-sparv"):
            bible.load()


def test_missing_pysword_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(bible, "_have_pysword", lambda: False)
    assert not bible.available()
    with pytest.raises(ImportError, match="pip install pysword"):
        bible.load()


def test_bad_parameters():
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        BibleCorpus(valid_percent=60, test_percent=40)
    with pytest.raises(ValueError, match="max_chars=-1"):
        BibleCorpus(max_chars=-1)
