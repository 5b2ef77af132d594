"""The ``vision`` and ``asr`` workloads through the real command line: pinned losses, eval, study, errors."""

from __future__ import annotations

import json
import shutil

import pytest

from fewbit.cli import main
from fewbit.workloads.data import images

VISION = ["valid_size=200", "train_limit=512", "width=0.5", "blocks=1", "steps=4", "batch_size=16", "warmup=2",
          "eval_limit=64", "threads=1"]
ASR = ["train_utterances=24", "valid_utterances=6", "test_utterances=6", "width=16", "repeat=1", "steps=4",
       "batch_size=4", "warmup=2", "threads=1"]
# Losses of the first four steps, from reference runs (torch 2.13.0 CPU; Debian's dataset-fashion-mnist and espeak-ng).
# MobileNet-v2 at batch 16 amplifies the CPU's float reassociation in its backward (depthwise convolutions,
# BatchNorm over 1x1 maps): two x86 machines agree on its first two losses to 1e-7 but are 2e-5 apart at the
# third step and 1.7% at the fourth. Only its first two are pinned across machines; the rest must repeat exactly.
PINNED_STEPS = {"resnet": 4, "mobilenet_v2": 2}
VISION_LOSSES = {"resnet": [2.298271656036377, 2.2996203899383545, 2.275831937789917, 2.293743848800659],
                 "mobilenet_v2": [2.323641777038574, 2.463618755340576, 2.62648868560791, 2.570903778076172]}
# The asr losses were pinned on an AMD EPYC (AVX2); an Intel Xeon (AVX-512) agrees on the first two to 3e-7 and
# is 1.6e-4 and 1.7e-4 apart (relative) at the third and fourth steps, so those two are held to 1e-3.
ASR_LOSSES = [11.70105266571045, 11.290493965148926, 11.837072372436523, 9.157681465148926]

needs_fashion = pytest.mark.skipif(images.available_source() != "fashion-mnist",
                                   reason="needs apt-get install dataset-fashion-mnist")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs apt-get install espeak-ng")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


@needs_fashion
@pytest.mark.parametrize("model", ["resnet", "mobilenet_v2"])
def test_vision_trains_with_pinned_losses_and_evaluates(model, tmp_path, capsys):
    out = tmp_path / model
    assert main(["train", "vision", "--model", model, "--out", str(out), "--quiet", *VISION]) == 0
    pinned = PINNED_STEPS[model]
    assert _losses(out)[:pinned] == pytest.approx(VISION_LOSSES[model][:pinned], rel=1e-5)
    if pinned < len(VISION_LOSSES[model]):  # the rest: the same on a second run, bit for bit
        again = tmp_path / f"{model}-again"
        assert main(["train", "vision", "--model", model, "--out", str(again), "--quiet", *VISION]) == 0
        assert _losses(again) == _losses(out) and len(_losses(out)) == len(VISION_LOSSES[model])
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["model"] == model and record["data"]["source"] == "fashion-mnist"
    assert record["data"]["train_images"] == 512 and record["data"]["test_images"] == 10000
    capsys.readouterr()
    assert main(["eval", "vision", "--checkpoint", str(out), "--split", "valid", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] == pytest.approx(record["valid"]["accuracy"])
    assert metrics["images"] == 64


def test_vision_truncated_dataset_names_the_fix(tmp_path, monkeypatch, capsys):
    root = tmp_path / "fashion"
    root.mkdir()
    for name in images.FASHION_MNIST_FILES.values():
        (root / name).write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x05")  # a header, then nothing
    monkeypatch.setenv(images.ROOT_VARIABLE, str(root))
    assert main(["train", "vision", "source=fashion-mnist", *VISION]) == 2
    err = capsys.readouterr().err
    assert "fewbit: error:" in err and "dataset-fashion-mnist" in err


@needs_espeak
def test_asr_trains_with_pinned_losses_evaluates_and_studies(tmp_path, capsys):
    out = tmp_path / "asr"
    assert main(["train", "asr", "--out", str(out), "--quiet", *ASR]) == 0
    losses = _losses(out)
    assert losses[:2] == pytest.approx(ASR_LOSSES[:2], rel=1e-4) and losses[2:] == pytest.approx(ASR_LOSSES[2:],
                                                                                                   rel=1e-3)
    record = json.loads((out / "run.json").read_text())
    assert record["data"]["engine"] == "espeak-ng" and record["data"]["test_utterances"] == 6
    assert record["valid"]["utterances"] == 6
    capsys.readouterr()
    assert main(["eval", "asr", "--checkpoint", str(out), "--split", "valid", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)  # the saved run scores as training reported
    assert (again["wer"], again["cer"], again["loss"]) == pytest.approx(
        (record["valid"]["wer"], record["valid"]["cer"], record["valid"]["loss"]), rel=1e-6)
    assert main(["eval", "asr", "--checkpoint", str(out), "--recipe", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "int8"
    study = tmp_path / "study"
    assert main(["study", "asr", "--recipes", "mxfp8", "--out", str(study), "--quiet", *ASR]) == 0
    rows = [r["recipe"] for r in json.loads((study / "results.json").read_text())["results"]]
    assert rows == ["fp32", "mxfp8"] and (study / "wer_vs_bits.png").is_file()


def test_asr_without_a_synthesizer_names_the_package(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["train", "asr", *ASR]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert main(["workloads", "--json"]) == 0
    listed = {w["name"]: w for w in json.loads(capsys.readouterr().out)}
    assert [s["available"] for s in listed["asr"]["sources"]] == [False, False]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "vision", "--model", "vgg"], r"model='vgg'; valid: resnet, mobilenet_v2"),
    (["train", "vision", "source=cifar"], r"source='cifar'; valid: auto, fashion-mnist, digits"),
    (["train", "asr", "engine=say"], r"engine='say'; valid: auto, espeak-ng, flite"),
    (["train", "asr", "optimizer=lamb"], r"optimizer='lamb'; valid: adamw, sgd"),
    (["train", "vision", "--modle", "resnet"], r"unknown config key 'modle' in overrides; valid keys: "),
])
def test_bad_input(argv, message, capsys):
    import re

    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
