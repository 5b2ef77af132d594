"""``fewbit ptq`` through the real command line on tiny configs: the JSON and the files it writes, and errors."""

from __future__ import annotations

import json
import re

import pytest

from fewbit.calibrate import METHODS
from fewbit.cli import main
from tests.test_workloads_cli import TINY as TINY_TRANSLATE

TINY_LM = ["steps=6", "layers=1", "d_model=32", "heads=2", "d_ff=64", "eval_limit=2000", "max_bytes=400000",
           "block_size=32", "batch_size=4", "threads=1"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FEWBIT_COMPILE", "0")


def _within(record: dict) -> bool:
    """The documented rule, from the record's own numbers."""
    margin = record["tolerance"] * abs(record["float_metric"])
    if record["higher_is_better"]:
        return record["final_metric"] >= record["float_metric"] - margin
    return record["final_metric"] <= record["float_metric"] + margin


def _ptq_json(argv: list[str], capsys) -> dict:
    assert main(["ptq", *argv, "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)  # stdout holds the JSON and nothing else
    assert "PTQ (" in captured.err  # the report went to stderr
    return record


def test_translate_from_the_cached_baseline_then_from_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "ptq"
    record = _ptq_json(["translate", "--calib-batches", "4", "--out", str(out), "--quiet", *TINY_TRANSLATE], capsys)
    assert json.loads((out / "ptq.json").read_text()) == record
    assert (record["workload"], record["metric"], record["recipe"], record["split"]) == ("translate", "bleu",
                                                                                       "int8", "valid")
    assert record["higher_is_better"] is True and record["tolerance"] == 0.01
    assert record["tolerance_rule"].startswith("bleu >= fp32 bleu - 0.01 * |fp32 bleu|")
    assert record["within_tolerance"] == _within(record)
    assert list(record["calibrator_metrics"]) == list(METHODS)  # int8: every calibrator
    best = max(record["calibrator_metrics"].values())
    assert record["calibrator_metrics"][record["chosen_calibrator"]] == best == record["calibrated_metric"]
    assert record["steps"][0] == {"step": "float", "metric": record["float_metric"], "float_layers": []}
    assert record["steps"][-1]["metric"] == record["final_metric"]
    assert record["calibration"] == {"first_step": 4, "batches": 4, "examples": 32, "methods": list(METHODS)}
    assert record["calibration_batches"] == 4
    assert record["config"]["d_model"] == 32 and record["limit"] == 8
    for model in ("float", "quantized"):
        assert set(record["test"][model]) >= {"bleu", "loss"}
    # The FP32 model is the cached baseline `fewbit study` uses; its valid BLEU is the float metric.
    baseline = json.loads((tmp_path / "cache").joinpath(*_relative(record["checkpoint"], tmp_path / "cache"),
                                                        "run.json").read_text())
    assert baseline["valid"]["bleu"] == pytest.approx(record["float_metric"], abs=1e-9)
    report = (out / "report.md").read_text()
    assert "# fewbit ptq: translate, int8" in report and "| test |" in report and "Chosen: **" in report

    again = _ptq_json(["translate", "--checkpoint", record["checkpoint"], "--methods", "max,percentile-99.99",
                       "--calib-batches", "4", "--out", str(tmp_path / "again"), "--quiet"], capsys)
    assert list(again["calibrator_metrics"]) == ["max", "percentile_99.99"]
    assert again["float_metric"] == record["float_metric"]
    assert again["calibrator_metrics"]["max"] == record["calibrator_metrics"]["max"]  # deterministic


def _relative(path: str, root) -> tuple[str, ...]:
    from pathlib import Path

    return Path(path).relative_to(root).parts


def test_lm_lower_is_better_leaves_the_most_sensitive_layers_in_float(tmp_path, capsys, monkeypatch):
    from fewbit.nn import QuantizedModule
    from fewbit.workloads.lm import LanguageModel

    # INT8 moves the perplexity of a tiny model by about 1e-5, either way. To exercise the sensitivity fallback
    # deterministically, each quantized layer costs 1% of perplexity here, and two of them more.
    extra = {"blocks.0.mlp.0": 0.05, "blocks.0.attn.qkv": 0.03}
    evaluate = LanguageModel.evaluate

    def costly(self, model, split="valid", limit=None):
        metrics = evaluate(self, model, split, limit)
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedModule) and not m.recipe.is_identity]
        metrics["perplexity"] *= 1 + sum(0.01 + extra.get(n, 0.0) for n in quantized)
        return metrics

    monkeypatch.setattr(LanguageModel, "evaluate", costly)
    out = tmp_path / "ptq"
    assert main(["ptq", "lm", "--calib-batches", "2", "--methods", "max,mse", "--tolerance", "0.02",
                 "--max-float-layers", "2", "--out", str(out), "--quiet", *TINY_LM]) == 0
    printed = capsys.readouterr().out
    assert "fewbit ptq: lm (int8), perplexity" in printed and "wrote" in printed
    record = json.loads((out / "ptq.json").read_text())
    assert record["higher_is_better"] is False and record["metric"] == "perplexity"
    assert record["tolerance_rule"].startswith("perplexity <= fp32 perplexity + 0.02 * |fp32 perplexity|")
    assert record["chosen_calibrator"] == min(["max", "mse"], key=lambda m: record["calibrator_metrics"][m])
    sensitivity = list(record["sensitivity"].values())
    assert sensitivity == sorted(sensitivity, reverse=True)  # worst (highest perplexity) first
    assert list(record["sensitivity"])[:2] == ["blocks.0.mlp.0", "blocks.0.attn.qkv"]
    assert record["float_layers"] == ["blocks.0.mlp.0", "blocks.0.attn.qkv"]  # capped at 2
    # The 4 quantized layers left (out, mlp.2 and the two attention products) cost 4%: beyond the 2% tolerance.
    assert record["final_metric"] == pytest.approx(record["float_metric"] * 1.04, rel=1e-3)
    assert record["within_tolerance"] is False and _within(record) is False
    assert record["steps"][-1] == {"step": "2 layer(s) in float", "metric": record["final_metric"],
                                   "float_layers": record["float_layers"]}
    assert any("QMatmul" in reason for reason in record["skipped"].values())  # attention products stay dynamic
    assert record["test"]["quantized"]["perplexity"] > record["test"]["float"]["perplexity"] > 1
    report = (out / "report.md").read_text()
    assert "## Sensitivity" in report and "**not** within" in report


@pytest.mark.parametrize(("argv", "message"), [
    (["nope"], r"unknown workload 'nope'; valid: translate"),
    (["translate", "--recipe", "fp9"], r"unknown recipe 'fp9'; valid: fp32, bf16"),
    (["translate", "--recipe", "mxfp8"], r"recipe 'mxfp8'.*Use one of: fp8, fp8_current, int8"),
    (["translate", "--methods", "max,kl"], r"unknown calibration method 'kl'; valid: max, percentile_99.9, "),
    (["translate", "--recipe", "fp8_current", "--methods", "entropy"], r"leave 'entropy' out of methods"),
    (["translate", "--calib-batches", "0"], r"calib_batches=0; calibration needs at least 1 batch"),
    (["translate", "--tolerance", "-0.1"], r"tolerance=-0.1; it must be a relative tolerance >= 0"),
    (["translate", "colour=red"], r"unknown config key 'colour' in overrides; valid keys: batch_size"),
    (["translate", "--checkpoint", "/nonexistent", "steps=3"], r"a checkpoint brings its own config"),
    (["translate", "--checkpoint", "/nonexistent"], r"not a fewbit run: no run.json"),
])
def test_bad_input_is_a_clear_error_before_any_training(argv, message, tmp_path, capsys):
    assert main(["ptq", *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # nothing was trained or prepared


@pytest.mark.skipif(__import__("fewbit.workloads.data.images", fromlist=["x"]).available_source() != "fashion-mnist",
                    reason="needs apt-get install dataset-fashion-mnist")
def test_vision_exports_to_onnx_and_onnxruntime_scores_it(tmp_path, capsys):
    from tests.test_workloads_vision_asr import VISION

    path = tmp_path / "int8.onnx"
    record = _ptq_json(["vision", "--onnx", str(path), "--methods", "max", "--limit", "256", "--out",
                        str(tmp_path / "out"), "--quiet", *[v for v in VISION if not v.startswith("eval_limit")],
                        "steps=30"], capsys)
    onnx = record["onnx"]
    assert path.is_file() and onnx["path"] == str(path) and onnx["test"]["images"] == 256
    assert onnx["fake_quant_test"] == record["test"]["quantized"]["accuracy"]
    assert onnx["difference"] == pytest.approx(onnx["test"]["accuracy"] - onnx["fake_quant_test"])
    assert abs(onnx["difference"]) <= 2.0  # integer kernels round differently (fewbit.export); measured 0.0-0.1
    assert "onnxruntime INT8" in (tmp_path / "out" / "report.md").read_text()


def test_onnx_refused_where_the_model_is_not_one_forward(capsys):
    assert main(["ptq", "translate", "--onnx", "x.onnx", *TINY_TRANSLATE]) == 2
    assert "export works for: vision" in capsys.readouterr().err


def test_qat_fine_tunes_when_ptq_ends_beyond_tolerance(tmp_path, capsys, monkeypatch):
    from fewbit.nn import QuantizedModule
    from fewbit.workloads.lm import LanguageModel

    # Each quantized layer costs 1% of perplexity (as above), so with no layer allowed in float PTQ ends beyond
    # tolerance, deterministically, and --qat fine-tunes: 10% of the 40 steps.
    evaluate = LanguageModel.evaluate

    def costly(self, model, split="valid", limit=None):
        metrics = evaluate(self, model, split, limit)
        quantized = [m for m in model.modules() if isinstance(m, QuantizedModule) and not m.recipe.is_identity]
        metrics["perplexity"] *= 1 + 0.01 * len(quantized)
        return metrics

    monkeypatch.setattr(LanguageModel, "evaluate", costly)
    record = _ptq_json(["lm", "--qat", "--tolerance", "0.01", "--max-float-layers", "0", "--methods", "max",
                        "--out", str(tmp_path / "out"), "--quiet", *TINY_LM, "steps=40"], capsys)
    qat = record["qat"]
    assert qat["steps"] == 4 and qat["lr"] == pytest.approx(0.01 * record["config"]["lr"])
    assert qat["metric_before"] == record["calibrator_metrics"]["max"]
    assert record["final_metric"] == qat["metric_after"] == record["steps"][-1]["metric"]
    assert record["steps"][-1]["step"] == "qat" and record["within_tolerance"] is _within(record) is False
    assert "Quantization-aware fine-tuning (4 steps" in (tmp_path / "out" / "report.md").read_text()
    # Within tolerance, --qat does nothing.
    relaxed = _ptq_json(["lm", "--qat", "--tolerance", "0.5", "--methods", "max", "--out", str(tmp_path / "r"),
                         "--quiet", *TINY_LM, "steps=40"], capsys)
    assert relaxed["qat"] is None and relaxed["within_tolerance"]
