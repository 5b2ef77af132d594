"""The vision workload on a machine without Fashion-MNIST: the loud fallback to scikit-learn's 8x8 digits works
with the quick config (its valid split derived from the source), through `fewbit train` and `fewbit ptq`."""

from __future__ import annotations

import json

import pytest

from fewbit.cli import main
from fewbit.workloads.data import images

QUICK = ["steps=3", "batch_size=16", "warmup=1", "threads=1"]  # the quick config, only shorter


@pytest.fixture(autouse=True)
def no_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv(images.ROOT_VARIABLE, str(tmp_path / "no-fashion-mnist"))  # an empty place to look
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def test_the_source_is_hidden():
    assert images.available_source() == "digits"


def test_train_and_eval_fall_back_to_digits(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vision", "--out", str(out), "--quiet", *QUICK]) == 0
    printed = capsys.readouterr()
    assert "WARNING: Fashion-MNIST is not installed" in printed.err  # loud, where people look
    assert "falling back to scikit-learn's 8x8 digits" in printed.err
    record = json.loads((out / "run.json").read_text())
    data = record["data"]
    assert data["source"] == "digits" and data["image_shape"] == [1, 8, 8]
    assert data["valid_images"] == (1797 - 360) // 12 and data["train_images"] == 1797 - 360 - data["valid_images"]
    assert main(["eval", "vision", "--checkpoint", str(out), "--split", "valid", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"] == pytest.approx(record["valid"]["accuracy"])


def test_ptq_falls_back_to_digits(tmp_path, capsys):
    out = tmp_path / "ptq"
    assert main(["ptq", "vision", "--out", str(out), "--quiet", "--json", "--calib-batches", "2",
                 "--methods", "max", *QUICK]) == 0
    printed = capsys.readouterr()
    record = json.loads(printed.out)
    assert "falling back to scikit-learn's 8x8 digits" in printed.err
    assert record["workload"] == "vision" and record["recipe"] == "int8"
    assert record["calibration"]["batches"] == 2 and record["chosen_calibrator"] == "max"
    assert record["test"]["float"]["images"] == 360.0 and (out / "ptq.json").is_file()
    baseline = json.loads((tmp_path / record["checkpoint"] / "run.json").read_text())
    assert baseline["data"]["source"] == "digits"


def test_an_explicit_valid_size_too_large_for_the_digits_is_a_clear_error(capsys):
    assert main(["train", "vision", "--quiet", "valid_size=5000", *QUICK]) == 2
    assert "valid_size=5000 leaves no training images (the digits training split has 1437)" in capsys.readouterr().err
