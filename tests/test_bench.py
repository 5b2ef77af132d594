"""``fewbit bench`` end to end on a tiny saved run, with the real LoadGen and tiny settings: the record, accuracy
mode against ``fewbit eval`` on the same model, recipe and limit, the Server search, the sweep table and plot."""

from __future__ import annotations

import json

import pytest

from fewbit import bench, cli
from fewbit.report import bench as render
from fewbit.workloads import get, runs

pytest.importorskip("mlperf_loadgen")

TINY = ["source=digits", "width=0.25", "steps=3", "batch_size=16", "eval_batch_size=16", "warmup=1"]
QUICK = ["--limit", "32", "--min-duration-ms", "200", "--min-queries", "64"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cls = get("vision")
    out = tmp_path_factory.mktemp("run")
    runs.train(cls(cls.load_config("quick", TINY)), "fp32", out=out, progress=False)
    return out


def _cli_json(capsys, argv):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_record_and_accuracy_equal_to_fewbit_eval(checkpoint, tmp_path, capsys, recipe="fp32"):
    record = _cli_json(capsys, ["bench", "vision", "--checkpoint", str(checkpoint), "--scenario", "Offline",
                                "--recipe", recipe, "--out", str(tmp_path), "--json", *QUICK])
    for key in ("scenario", "valid", "metric_name", "metric", "accuracy", "accuracy_ok"):
        assert key in record
    assert record["scenario"] == "Offline" and record["valid"] is True and record["metric"] > 0
    evaluated = _cli_json(capsys, ["eval", "vision", "--checkpoint", str(checkpoint), "--recipe", recipe,
                                   "--limit", "32", "--json"])
    assert record["accuracy"] == evaluated["accuracy"]  # LoadGen's accuracy log scores as fewbit eval does
    assert record["accuracy_equals_eval"] is True
    assert record["accuracy_ok"] is True and record["fp32_accuracy"] == record["accuracy"]
    for name in ("bench.json", "performance/mlperf_log_summary.txt", "accuracy/mlperf_log_accuracy.json",
                 "performance/user.conf"):
        assert (tmp_path / name).is_file(), name


def test_bench_ort_accuracy_equals_the_onnx_file_evaluated(checkpoint, tmp_path):
    from fewbit.export import onnx_runner

    record = bench.run("vision", "SingleStream", "fp32", "ort", checkpoint=checkpoint, out=tmp_path, limit=32,
                       min_duration_ms=200, min_queries=64, progress=False)
    assert record["valid"] is True and record["metric_name"].startswith("p90")
    loaded = runs.load(checkpoint)
    assert record["accuracy"] == loaded.workload.evaluate(onnx_runner(record["onnx"]), "test", 32)["accuracy"]


def test_bench_server_search_finds_a_valid_target(checkpoint, tmp_path):
    record = bench.run("vision", "Server", backend="noop", mode="performance", checkpoint=checkpoint, out=tmp_path,
                       limit=32, min_duration_ms=200, search_trials=3, progress=False)
    assert len(record["server_search"]) >= 1
    assert record["valid"] is True, record["server_search"]
    valid = [t["target_qps"] for t in record["server_search"] if t["result"] == "VALID"]
    assert record["server_target_qps"] == max(valid)
    assert record["accuracy"] is None  # noop answers nothing to score


def test_sweep_table_skips_what_does_not_apply(checkpoint, tmp_path):
    result = bench.sweep("vision", "Offline", ["fp32", "bf16"], ["ort", "ort_int8"], out=tmp_path,
                         checkpoint=checkpoint, limit=32, min_duration_ms=200, min_queries=64, progress=False)
    by_pair = {(r["recipe"], r["backend"]): r for r in result["records"]}
    assert set(by_pair) == {("fp32", "ort"), ("bf16", "ort"), ("int8", "ort_int8")}
    assert "cannot be exported" in by_pair["bf16", "ort"]["skipped"]
    assert "fewbit ptq vision" in by_pair["int8", "ort_int8"]["skipped"]
    assert by_pair["fp32", "ort"]["valid"] is True and by_pair["fp32", "ort"]["accuracy"] is not None
    text = (tmp_path / "report.md").read_text()
    assert "| fp32 | ort | Offline | VALID |" in text and "skipped" in text
    assert (tmp_path / render.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    assert render.table(result).row_count == 3


def test_bench_refuses_bad_arguments_before_loading(capsys):
    assert cli.main(["bench", "vision", "--scenario", "Batch"]) == 2
    assert "scenario='Batch'" in capsys.readouterr().err
    assert cli.main(["bench", "vision", "--backend", "tensorrt"]) == 2
    assert "backend='tensorrt'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode='fast'"):
        bench.run("vision", mode="fast")


def test_compile_backend_accuracy_equals_eager(checkpoint, tmp_path, capsys):
    """``--backend compile`` runs torch.compile's module (compiled in the untimed warm-up); its accuracy-mode
    score is the eager model's ``fewbit eval`` (inductor may reorder float sums, so equal to 1e-6)."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:  # .ci/run installs g++
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    record = _cli_json(capsys, ["bench", "vision", "--checkpoint", str(checkpoint), "--scenario", "Offline",
                                "--backend", "compile", "--mode", "both", "--out", str(tmp_path), "--json", *QUICK])
    assert record["backend"] == "compile" and record["valid"] is True and record["errors"] == 0
    assert "torch.compile" in record["backend_description"]
    evaluated = _cli_json(capsys, ["eval", "vision", "--checkpoint", str(checkpoint), "--limit", "32", "--json"])
    assert record["accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-6)
