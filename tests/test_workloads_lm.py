"""The ``lm`` workload through the real command line: train, eval, study, pinned losses, errors."""

from __future__ import annotations

import json
import math

import pytest

from fewbit import workloads
from fewbit.cli import main
from fewbit.workloads.data import bible

# A GPT small enough to train in a second; deterministic (one thread, fixed seed).
TINY = ["max_bytes=400000", "block_size=32", "d_model=32", "heads=2", "layers=1", "d_ff=64", "steps=4",
        "batch_size=4", "warmup=2", "eval_limit=3000", "threads=1"]
# Losses of the first four steps of TINY on the KJV (Debian sword-text-kjv), from a reference run (torch 2.13.0 CPU).
# The KJV is pinned rather than the standard library, whose bytes differ between Python versions.
KJV_LOSSES = [5.523211479187012, 5.471373081207275, 5.366008758544922, 5.238991737365723]

needs_kjv = pytest.mark.skipif(not bible.available(), reason="needs apt-get install sword-text-kjv sword-text-sparv")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_on_the_standard_library_then_eval_the_saved_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["train", "lm", "--out", str(out), "--quiet", *TINY]) == 0
    assert _losses(a) == _losses(b)  # deterministic
    assert abs(_losses(a)[0] - math.log(256)) < 0.2  # an untrained model guesses bytes uniformly
    record = json.loads((a / "run.json").read_text())
    assert record["workload"] == "lm" and record["config"]["source"] == "stdlib"
    assert record["data"]["train_bytes"] > 10 * record["data"]["valid_bytes"] > 0
    valid = record["valid"]
    assert valid["tokens"] == 2999 and valid["perplexity"] == pytest.approx(math.exp(valid["nll"]))
    assert valid["bits_per_byte"] == pytest.approx(valid["nll"] / math.log(2))
    capsys.readouterr()
    assert main(["eval", "lm", "--checkpoint", str(a), "--split", "valid", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(valid["perplexity"], rel=1e-6)
    assert main(["eval", "lm", "--checkpoint", str(a), "--recipe", "mxfp4", "--json"]) == 0
    cast = json.loads(capsys.readouterr().out)
    assert cast["recipe"] == "mxfp4" and cast["perplexity"] != valid["perplexity"]


@needs_kjv
def test_kjv_losses_are_pinned(tmp_path):
    out = tmp_path / "kjv"
    assert main(["train", "lm", "--out", str(out), "--quiet", "source=kjv", *TINY]) == 0
    assert _losses(out) == pytest.approx(KJV_LOSSES, rel=1e-5)


def test_study_lm_reports_perplexity_lower_is_better(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "lm", "--recipes", "mxfp8,mxfp4", "--out", str(out), "--quiet", *TINY]) == 0
    rows = {r["recipe"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert list(rows) == ["fp32", "mxfp8", "mxfp4"]
    for r in rows.values():
        assert r["metric"] == r["metrics"]["perplexity"]
        assert r["delta"] == pytest.approx(r["metric"] - rows["fp32"]["metric"])
    assert (out / "perplexity_vs_bits.png").is_file()
    assert "lower is better" in (out / "report.md").read_text()


def test_bad_input(capsys):
    assert main(["train", "lm", "source=wiki"]) == 2
    assert "source='wiki'; valid: stdlib, kjv" in capsys.readouterr().err
    assert main(["train", "lm", "block_size=0"]) == 2
    assert "block_size=0" in capsys.readouterr().err


def test_missing_kjv_names_the_package(monkeypatch, capsys):
    from fewbit.workloads import lm

    monkeypatch.setattr(lm.bible, "available", lambda: False)
    assert main(["train", "lm", "source=kjv", *TINY]) == 2
    assert "install it with: apt-get install sword-text-kjv" in capsys.readouterr().err
    listed = {w["name"]: w for w in _workloads_json(capsys)}
    assert {s["name"]: s["available"] for s in listed["lm"]["sources"]} == {"stdlib": True, "kjv": False}


def _workloads_json(capsys):
    assert main(["workloads", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_lm_is_registered():
    assert "lm" in workloads.names() and workloads.get("lm").metric == "perplexity"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_config_without_cuda_is_a_clear_error(capsys):
    assert main(["train", "lm", "--config", "gpu", "steps=1"]) == 2
    assert "device='cuda' but torch sees no CUDA device here; use device=cpu" in capsys.readouterr().err
