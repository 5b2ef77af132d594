"""The workload framework end to end through the real command line: configs, train, eval, study, errors."""

from __future__ import annotations

import json
import re

import pytest

from fewbit import workloads
from fewbit.cli import main
from fewbit.workloads import runs

# A translate model small enough to train in a second; deterministic (one thread, fixed seed).
TINY = ["pairs=800", "vocab_size=100", "d_model=32", "heads=2", "d_ff=64", "encoder_layers=1", "decoder_layers=1",
        "steps=4", "batch_size=8", "warmup=2", "eval_limit=8", "threads=1"]
# Losses of the first four steps of TINY, from a reference run (torch 2.13.0 CPU, sentencepiece 0.2.x).
TINY_LOSSES = [5.6325907707214355, 5.583559036254883, 5.384016990661621, 5.215211391448975]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_train_then_eval_from_the_saved_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "translate", "--out", str(out), "--quiet", *TINY]) == 0
    assert _losses(out) == pytest.approx(TINY_LOSSES, rel=1e-5)
    record = json.loads((out / "run.json").read_text())
    assert record["workload"] == "translate" and record["recipe"]["name"] == "fp32"
    assert record["config"]["d_model"] == 32 and record["train"]["steps"] == 4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.model").is_file()
    capsys.readouterr()
    # The saved run evaluates to what training reported on the same split.
    assert main(["eval", "translate", "--checkpoint", str(out), "--split", "valid", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("bleu", "loss", "chrf", "exact"):
        assert metrics[key] == pytest.approx(record["valid"][key], rel=1e-5, abs=1e-9)
    # Directly cast to a recipe.
    assert main(["eval", "translate", "--checkpoint", str(out), "--recipe", "mxfp4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "mxfp4"


def test_training_under_a_recipe_is_deterministic_and_differs_from_fp32(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["train", "translate", "--recipe", "mxfp8", "--out", str(out), "--quiet", *TINY]) == 0
    assert _losses(a) == _losses(b)
    assert _losses(a) != pytest.approx(TINY_LOSSES, rel=1e-7)
    assert _losses(a) == pytest.approx(TINY_LOSSES, rel=0.02)  # MXFP8 stays close to fp32


def test_a_recipe_file_trains_and_eval_reproduces_the_runs_metric(tmp_path, capsys):
    from fewbit import recipes

    path = tmp_path / "my_recipe.yaml"  # MXFP8 weights and inputs, FP8 E5M2 gradients per tensor: not a preset
    path.write_text(recipes.Recipe(name="my_recipe", weight="mxfp8_e4m3", input="mxfp8_e4m3",
                                   grad_output="fp8_e5m2_tensor").to_yaml())
    out = tmp_path / "run"
    assert main(["train", "translate", "--recipe", str(path), "--out", str(out), "--quiet", *TINY]) == 0
    record = json.loads((out / "run.json").read_text())
    assert recipes.Recipe.from_dict(record["recipe"]) == recipes.get(path)  # the full recipe, not just its name
    assert _losses(out) != pytest.approx(TINY_LOSSES, rel=1e-7)
    capsys.readouterr()
    assert main(["eval", "translate", "--checkpoint", str(out), "--split", "valid", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["recipe"] == "my_recipe (as trained)"
    for key in ("bleu", "loss", "chrf", "exact"):
        assert again[key] == record["valid"][key]  # the same evaluation, bit for bit
    assert main(["eval", "translate", "--checkpoint", str(out), "--split", "valid", "--recipe", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != record["valid"]["loss"]  # the float model differs


def test_study_writes_table_json_report_and_plot(tmp_path, capsys):
    out = tmp_path / "study"
    argv = ["study", "translate", "--recipes", "mxfp8,mxfp4,int8", "--out", str(out), "--quiet", *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fewbit study: translate" in printed and "mxfp4" in printed
    result = json.loads((out / "results.json").read_text())
    rows = {r["recipe"]: r for r in result["results"]}
    assert list(rows) == ["fp32", "mxfp8", "mxfp4", "int8"]  # fp32 always first: the reference
    assert rows["fp32"]["delta"] == 0 and rows["fp32"]["bits_per_weight"] == 32
    assert rows["mxfp8"]["bits_per_weight"] == pytest.approx(8.25)
    assert rows["mxfp4"]["bits_per_weight"] == pytest.approx(4.25)
    assert rows["mxfp4"]["weight_bytes"] < rows["mxfp8"]["weight_bytes"] < rows["fp32"]["weight_bytes"]
    for r in rows.values():
        assert r["delta"] == pytest.approx(r["metric"] - rows["fp32"]["metric"])
        assert r["metric"] == r["metrics"]["bleu"]
    report = (out / "report.md").read_text()
    assert "| mxfp4 |" in report and "bleu_vs_bits.png" in report
    assert (out / "bleu_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The second study reuses the cached baseline instead of training again.
    assert main([*argv, "--recipes", "fp8"]) == 0
    assert "FP32 baseline: cached" in capsys.readouterr().out


def test_workloads_lists_sources_and_availability(capsys):
    assert main(["workloads", "--json"]) == 0
    listed = {w["name"]: w for w in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(workloads.names())
    sources = {s["name"]: s for s in listed["translate"]["sources"]}
    assert sources["numbers"]["available"] is True
    assert "sword-text-kjv" in sources["bible"]["install"]
    assert "quick" in listed["translate"]["configs"]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "nope"], r"unknown workload 'nope'; valid: translate, lm, vision, asr"),
    (["train", "translate", "--recipe", "fp9"], r"unknown recipe 'fp9'; valid: fp32, bf16"),
    (["train", "translate", "colour=red"], r"unknown config key 'colour' in overrides; valid keys: batch_size"),
    (["train", "translate", "steps=many"], r"config key 'steps': expected int, got 'many'"),
    (["train", "translate", "steps"], r"override 'steps' is not key=value"),
    (["train", "translate", "--config", "huge"], r"unknown config 'huge' for workload 'translate'; valid: gpu, quick"),
    (["train", "translate", "target=xx"], r"target language 'xx'; valid: fr, de, es"),
    (["study", "translate", "--recipes", "fp32,fp9"], r"unknown recipe 'fp9'"),
    (["eval", "translate", "--checkpoint", "/nonexistent"], r"not a fewbit run: no run.json"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_data_source_names_the_package(monkeypatch, capsys):
    from fewbit.workloads import translate

    unavailable = [workloads.Source("numbers", "number phrases", False, "pip install num2words")]
    monkeypatch.setattr(translate.Translate, "sources", classmethod(lambda cls: unavailable))
    assert main(["train", "translate", *TINY]) == 2
    assert "install it with: pip install num2words" in capsys.readouterr().err


def test_every_shipped_config_opens_with_its_command_and_loads():
    for name in workloads.names():
        cls = workloads.get(name)
        assert cls.config_names(), f"{name} ships no config"
        for config in cls.config_names():
            first = cls.config_path(config).read_text().splitlines()[0]
            assert first.startswith(f"# fewbit train {name} --config {config}"), first
            cls.load_config(config)


def test_config_from_a_yaml_path_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# fewbit train translate --config mine.yaml\nsteps: 7\nlr: 1\n")
    config = workloads.get("translate").load_config(str(path), ["batch_size=3"])
    assert (config.steps, config.lr, config.batch_size) == (7, 1.0, 3)
    assert workloads.get("translate").load_config(str(path), ["lr=3e-3"]).lr == 0.003  # YAML reads 3e-3 as text
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="a config is a mapping"):
        workloads.get("translate").load_config(str(path))


def test_load_refuses_a_run_of_another_workload(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "translate", "--out", str(out), "--quiet", *TINY]) == 0
    with pytest.raises(ValueError, match="holds a 'translate' run, not 'lm'"):
        runs.load(out, "lm")


def test_default_output_folder_names_the_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "translate", "--recipes", "int8", "--quiet", *TINY]) == 0
    assert (tmp_path / "fewbit-study" / "-".join(["translate", *TINY]) / "results.json").is_file()
