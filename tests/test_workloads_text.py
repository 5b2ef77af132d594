"""The byte-level text corpus: the standard library split by file, the cap, the cache, training batches and the
windowed evaluation (checked against a direct sum over every token)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fewbit.workloads.data import bible, text
from fewbit.workloads.data.text import TextCorpus


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def fake_library(tmp_path, monkeypatch):
    """A small standard library with a file in every excluded kind of folder."""
    root = tmp_path / "lib"
    files = {f"mod{i:02d}.py": f"# module {i}\nx = {i}\n" for i in range(40)}
    files |= {"pkg/__init__.py": "", "pkg/core.py": "def f():\n    return 1\n", "notes.txt": "not python\n"}
    files |= {f"{folder}/excluded.py": "EXCLUDED\n" for folder in sorted(text.EXCLUDED_FOLDERS)}
    files |= {"pkg/tests/test_core.py": "EXCLUDED\n", "site-packages/other/m.py": "EXCLUDED\n"}
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    monkeypatch.setattr(text, "stdlib_root", lambda: root)
    return root


def test_files_split_without_overlap_and_exclusions(fake_library):
    spec = TextCorpus(valid_percent=20, test_percent=20)
    files = text.stdlib_files(spec)
    listed = [f for names in files.values() for f in names]
    assert sorted(listed) == sorted([f"mod{i:02d}.py" for i in range(40)] + ["pkg/__init__.py", "pkg/core.py"])
    assert all(files[s] for s in text.SPLITS)  # 42 files at 20 % each: every split has some
    assert text.stdlib_files(spec) == files  # deterministic
    data = text.generate(spec)
    for split, names in files.items():
        assert data[split] == b"".join((fake_library / f).read_bytes() + b"\n" for f in names)
        assert b"EXCLUDED" not in data[split]
    assert text.stdlib_files(TextCorpus(valid_percent=20, test_percent=20, seed=1)) != files


def test_max_bytes_keeps_every_split_share(fake_library):
    spec = TextCorpus(valid_percent=20, test_percent=20)
    full = text.generate(spec)
    total = sum(map(len, full.values()))
    capped = text.generate(TextCorpus(valid_percent=20, test_percent=20, max_bytes=total // 2))
    assert sum(map(len, capped.values())) <= total // 2
    for split in text.SPLITS:
        assert full[split].startswith(capped[split])
        assert len(capped[split]) == pytest.approx(len(full[split]) / 2, abs=1)


def test_real_standard_library_is_cached_and_keyed_by_python_version(tmp_path):
    spec = TextCorpus(max_bytes=300_000)
    first = text.load(spec)
    assert all(t.dtype == torch.uint8 and t.dim() == 1 for t in first.values())
    assert sum(t.numel() for t in first.values()) == pytest.approx(300_000, abs=3)
    assert first["valid"].numel() / 300_000 == pytest.approx(0.05, abs=0.04)  # by file, so only roughly 5 %
    (directory,) = (tmp_path / "cache").glob("text-*")
    assert sys.version.split()[0] in (directory / "params.json").read_text()
    files = json.loads((directory / "files.json").read_text())
    names = [set(files[s]) for s in text.SPLITS]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]
    everything = set().union(*names)
    assert "os.py" in everything and not any("/test/" in f or f.startswith("test/") for f in everything)
    again = text.load(spec)
    assert all(torch.equal(first[s], again[s]) for s in text.SPLITS)
    assert len(list((tmp_path / "cache").glob("text-*"))) == 1
    text.load(TextCorpus(max_bytes=300_000, seed=1))
    assert len(list((tmp_path / "cache").glob("text-*"))) == 2


def test_sample_batch_is_a_function_of_seed_and_step():
    tokens = torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x, y = text.sample_batch(tokens, batch_size=8, block_size=16, step=3)
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):  # each row is a contiguous slice of the corpus
        window = torch.cat([row_x, row_y[-1:]]).to(torch.uint8)
        starts = [i for i in range(tokens.numel() - 16) if torch.equal(tokens[i : i + 17], window)]
        assert starts
    assert torch.equal(text.sample_batch(tokens, 8, 16, step=3)[0], x)
    assert not torch.equal(text.sample_batch(tokens, 8, 16, step=4)[0], x)
    assert not torch.equal(text.sample_batch(tokens, 8, 16, step=3, seed=1)[0], x)
    with pytest.raises(ValueError, match="block_size"):
        text.sample_batch(tokens[:10], 2, 16, step=0)


class Bigram(torch.nn.Module):
    """Logits that depend only on the previous token: its evaluation must equal a direct sum over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 3

    def forward(self, ids):
        return self.table[ids]


@pytest.mark.parametrize("n", [1 + 4 * 16, 1 + 4 * 16 + 7, 1000])  # whole windows, a tail, several batches
def test_evaluate_predicts_every_token_once(n):
    tokens = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    model = Bigram().train()
    result = text.evaluate(model, tokens, block_size=16, batch_size=3)
    logp = model.table.log_softmax(-1)
    direct = -logp[tokens[:-1].long(), tokens[1:].long()].mean().item()
    assert result["tokens"] == n - 1
    assert result["nll"] == pytest.approx(direct, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(direct), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(direct / math.log(2), rel=1e-5)
    assert model.training  # mode restored
    limited = text.evaluate(model, tokens, block_size=16, max_tokens=33)
    assert limited["tokens"] == 32


def test_uniform_model_costs_eight_bits_per_byte():
    tokens = text.encode("byte-level: é is two bytes")
    assert text.decode(tokens) == "byte-level: é is two bytes" and tokens.numel() == 27
    result = text.evaluate(lambda ids: torch.zeros(*ids.shape, 256), tokens, block_size=8)
    assert result["bits_per_byte"] == pytest.approx(8.0) and result["perplexity"] == pytest.approx(256.0)


@pytest.mark.skipif(not bible.available(), reason="needs pysword and the Debian package sword-text-kjv")
def test_kjv_source():
    corpus = text.load(TextCorpus(source="kjv", max_bytes=400_000))
    train = text.decode(corpus["train"])
    assert "LORD" in train and "<" not in train
    assert sum(t.numel() for t in corpus.values()) == pytest.approx(400_000, abs=3)


def test_bad_parameters():
    with pytest.raises(ValueError, match=r"text source 'wiki'; valid: stdlib, kjv"):
        TextCorpus(source="wiki")
    with pytest.raises(ValueError, match="max_bytes=-1"):
        TextCorpus(max_bytes=-1)
    with pytest.raises(ValueError, match="strictly between 0 and 100"):
        TextCorpus(valid_percent=0, test_percent=0)
