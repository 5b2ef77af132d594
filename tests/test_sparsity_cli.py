"""``fewbit sparsify`` through the real command line on a tiny config: the JSON, the retrained run that ``fewbit
eval`` reads with its masks, exact 2:4 on every layer listed as pruned, and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fewbit import sparsity
from fewbit.cli import main
from fewbit.workloads import runs
from tests.test_ptq_cli import TINY_LM


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def test_lm_sparsify_json_retrained_run_and_exact_2_4(tmp_path, capsys):
    out = tmp_path / "sp"
    argv = ["sparsify", "lm", "--steps", "3", "--permute-time", "0.05", "--calib-batches", "2", "--recipe", "mxfp4",
            "--out", str(out), "--quiet", "--json", *TINY_LM]
    assert main(argv) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)  # stdout holds the JSON alone
    assert "fewbit sparsify: lm (2:4)" in captured.err
    assert set(record["one_shot"]) == {"magnitude", "wanda", "magnitude_permuted", "wanda_permuted"}
    for key in ("dense", "retrained", *(f"one_shot.{k}" for k in record["one_shot"])):
        entry = record[key] if "." not in key else record["one_shot"][key.split(".")[1]]
        assert set(entry) == {"fp32", "mxfp4"} and set(entry["fp32"]) == {"valid", "test"}
        assert entry["fp32"]["test"]["perplexity"] > 1
    assert record["pruned_layers"] == [f"blocks.0.{n}" for n in ("attn.qkv", "attn.out", "mlp.0", "mlp.2")]
    assert "embedding" in record["dense_layers"]["tokens"]
    assert record["permutation"]["blocks.0.mlp.2"]["applied"]
    assert record["bytes"]["compressed_fp16"] / record["bytes"]["dense_fp16"] == 0.5625
    assert record["retrain"]["steps"] == 3
    for name in ("sparsify.json", "report.md", "perplexity_sparsity.png"):
        assert (out / name).is_file()
    # The retrained run: `fewbit eval` reads it, masks included, and every pruned layer is exactly 2:4.
    run = runs.load(Path(record["run"]))
    assert sorted(sparsity.masks(run.model)) == sorted(record["pruned_layers"])
    for name in record["pruned_layers"]:
        w = run.model.get_submodule(name).weight
        assert sparsity.check_nm(w, "2:4") is None and float((w == 0).float().mean()) == 0.5
    assert main(["eval", "lm", "--checkpoint", record["run"], "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(record["retrained"]["fp32"]["test"]["perplexity"])


@pytest.mark.parametrize("argv, message", [
    (["sparsify", "lm", "--pattern", "4:2"], r"N=4 > M=2"),
    (["sparsify", "lm", "--pattern", "2-4"], r"expected 'N:M'"),
    (["sparsify", "lm", "--steps", "0"], r"steps=0; retrain at least 1 step"),
    (["sparsify", "lm", "--recipe", "fp12"], r"fp12"),
    (["sparsify", "lm", "colour=red"], r"unknown config key 'colour'"),
])
def test_bad_input_is_a_clear_error_before_any_training(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()  # nothing trained
