"""The LoadGen harness (fewbit.mlperf) with the real LoadGen and tiny settings: settings reloaded every run, the four
scenarios, accuracy mode against the workload's own evaluation, same bytes in both modes, and the faults (a
backend raising, an impossible target, Ctrl-C, a stray audit.config)."""

from __future__ import annotations

import _thread
import json
import os

import pytest
import torch

from fewbit.mlperf import backends, inference, logs
from fewbit.mlperf import settings as S
from fewbit.workloads import get

pytest.importorskip("mlperf_loadgen")

MLPERF_CONF_QSL_SEED = 2085463073848966840  # mlperf.conf's *.*.qsl_rng_seed


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cls = get("vision")
    workload = cls(cls.load_config("quick", ["source=digits", "width=0.25", "eval_batch_size=16"])).setup()
    model = workload.build_model().eval()
    return workload, model, workload.samples("test", 48)


def _settings(scenario, mode="performance", hints=None, **kw):
    hints = hints or S.Hints(single_latency_ns=100_000, multi_latency_ns=200_000, offline_qps=5_000.0,
                             server_qps=50.0)
    kw.setdefault("min_duration_ms", 200)
    return S.RunSettings(scenario, mode, "vision", hints, kw.pop("server_latency_ms", 1000.0), **kw)


def test_settings_are_loaded_every_run_in_one_process(tiny, tmp_path):
    workload, model, samples = tiny
    noop = backends.build("noop", workload, model)
    for k, (duration, qps) in enumerate([(150, 3000.0), (250, 7000.0)]):
        hints = S.Hints(single_latency_ns=1000, multi_latency_ns=2000, offline_qps=qps, server_qps=10.0)
        out = inference.run_loadgen(workload, samples, noop, _settings("Offline", hints=hints, min_duration_ms=duration,
                                                                       min_queries=10), tmp_path / f"r{k}")
        effective = out.detail.effective()
        assert effective["min_duration_ms"] == duration
        assert effective["target_qps"] == qps
        assert effective["qsl_rng_seed"] == MLPERF_CONF_QSL_SEED  # mlperf.conf applied again
        assert out.detail.errors == []  # no "Multiple conf files" error
        assert f"vision.Offline.min_duration = {duration}" in (tmp_path / f"r{k}" / "user.conf").read_text()


@pytest.mark.parametrize(("scenario", "backend_name"), [("SingleStream", "torch"), ("MultiStream", "noop"),
                                                         ("Server", "torch"), ("Offline", "torch")])
def test_every_scenario_is_valid(tiny, tmp_path, scenario, backend_name):
    """MultiStream needs 662 queries of 8 samples for its early-stopping p99: with the noop backend here, to keep
    the test short (the model's MultiStream run is in the README's table)."""
    workload, model, samples = tiny
    backend = backends.build(backend_name, workload, model)
    hints = inference.measure_hints(workload, samples, backend, 16)
    queries = {"SingleStream": 64, "MultiStream": 662, "Server": 662, "Offline": 64}[scenario]
    for _ in range(3):  # as fewbit bench does: a run that ended early because the warm-up guessed slow runs again
        settings = _settings(scenario, hints=hints, min_queries=queries, server_target_qps=400.0)
        out = inference.run_loadgen(workload, samples, backend, settings, tmp_path, max_batch=16 if scenario in
                                    ("Server", "Offline") else 8, max_wait_ms=2.0)
        if (hints := inference.corrected_hints(out, hints)) is None:
            break
    record = out.record()
    assert record["result"] == "VALID", record["reasons"]
    assert record["valid"] is True and record["errors"] == 0
    assert record["metric"] > 0 and record["metric_name"] == logs.METRICS[scenario][0]
    assert out.batches > 0 or backend.is_noop  # the model really ran
    assert (tmp_path / "mlperf_log_summary.txt").is_file()


def test_accuracy_mode_equals_the_workloads_evaluation(tiny, tmp_path):
    workload, model, samples = tiny
    backend = backends.build("torch", workload, model)
    out = inference.run_loadgen(workload, samples, backend, _settings("Offline", "accuracy"), tmp_path,
                                max_batch=workload.eval_batch_size)
    scored = inference.score_accuracy(workload, samples, out.folder)
    assert scored == workload.evaluate(model, "test", len(samples))  # the same batches: the same numbers
    assert len(logs.read_accuracy(out.folder)) == len(samples)


def test_same_bytes_for_the_same_sample_in_both_modes(tiny, tmp_path):
    workload, model, samples = tiny
    backend = backends.build("torch", workload, model)
    perf = inference.run_loadgen(workload, samples, backend, _settings("SingleStream", min_queries=64,
                                                                       accuracy_log_probability=1.0),
                                 tmp_path / "perf")
    acc = inference.run_loadgen(workload, samples, backend, _settings("SingleStream", "accuracy"), tmp_path / "acc")
    a, b = logs.read_accuracy(perf.folder), logs.read_accuracy(acc.folder)
    common = set(a) & set(b)
    assert len(common) >= 10
    assert all(a[i] == b[i] for i in common)
    assert perf.batches >= 64  # every query ran the model: nothing answered from a cache


def test_response_encoding_round_trips():
    logits = torch.randn(10)
    assert torch.equal(inference.decode_output(inference.encode_output(logits)), logits)
    text = ("dos mil, ñ", 0.1 + 0.2, 7)
    assert inference.decode_output(inference.encode_output(text)) == text
    with pytest.raises(ValueError, match="starts with"):
        inference.decode_output(b"Xabc")
    mixed = (torch.arange(6, dtype=torch.float32).reshape(2, 3), 1.25, 4)  # an encoder's (embedding, nll, tokens)
    back = inference.decode_output(inference.encode_output(mixed))
    assert torch.equal(back[0], mixed[0]) and back[1:] == (1.25, 4)


def test_collate_matches_the_workloads_own_batches():
    ids = [torch.tensor([[5, 6, 7]]), torch.tensor([[8]])]
    feats = [torch.ones(1, 2, 3), torch.ones(1, 2, 1)]
    lengths = [torch.tensor([3]), torch.tensor([1])]
    batch = inference.collate(list(zip(ids, feats, lengths, strict=True)))
    assert batch[0].tolist() == [[5, 6, 7], [8, 0, 0]]  # padded with token 0
    assert batch[1].shape == (2, 2, 3) and batch[1][1, :, 1:].abs().sum() == 0
    assert batch[2].tolist() == [3, 1]
    encoded = [{"input_ids": torch.tensor([[2, 9, 3]]), "mlm_labels": torch.tensor([[-100, 9, -100]])},
               {"input_ids": torch.tensor([[2, 3]]), "mlm_labels": torch.tensor([[-100, -100]])}]
    batch = inference.collate(encoded, {"input_ids": 7, "mlm_labels": -100})
    assert batch["input_ids"].tolist() == [[2, 9, 3], [2, 3, 7]]
    assert batch["mlm_labels"].tolist() == [[-100, 9, -100], [-100, -100, -100]]


def test_a_short_last_window_is_never_batched_with_full_ones():
    from fewbit.workloads.data.text import TokenWindows

    windows = TokenWindows("test", torch.arange(10), 4)  # windows [0..4], [4..8], tail [8, 9]
    assert len(windows) == 3
    assert windows.groups([2, 0, 2, 1]) == [[1, 3], [0, 2]]
    assert TokenWindows("test", torch.arange(9), 4).groups([0, 1]) == [[0, 1]]  # no tail: one group


class Failing(torch.nn.Module):
    """A model that raises on its third call."""

    def __init__(self, model, action):
        super().__init__()
        self.model, self.calls, self.action = model, 0, action

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            self.action()
        return self.model(x)


def _boom():
    raise RuntimeError("simulated backend failure")


def test_backend_raising_mid_run_ends_with_a_clear_error_and_logs(tiny, tmp_path):
    workload, model, samples = tiny
    backend = backends.Backend("torch", Failing(model, _boom), "fp32", "fails on its third batch")
    with pytest.raises(inference.BackendError, match="simulated backend failure") as caught:
        inference.run_loadgen(workload, samples, backend, _settings("SingleStream", min_queries=64), tmp_path)
    assert caught.value.folder == tmp_path
    summary = logs.read_summary(tmp_path)
    assert summary.result in ("VALID", "INVALID")  # LoadGen finished and wrote its logs
    assert logs.read_detail(tmp_path).values["result_query_count"] >= 64


def test_ctrl_c_leaves_a_readable_partial_log(tiny, tmp_path):
    workload, model, samples = tiny
    backend = backends.Backend("torch", Failing(model, _thread.interrupt_main), "fp32", "Ctrl-C on its third batch")
    with pytest.raises(inference.RunInterrupted) as caught:
        inference.run_loadgen(workload, samples, backend, _settings("SingleStream", min_queries=64), tmp_path)
    assert str(tmp_path) in str(caught.value)
    detail = logs.read_detail(tmp_path)
    assert detail.effective()["scenario"] == "SingleStream"
    # The model stops being called soon after Ctrl-C (the main thread sees it within its 0.1 s wait); LoadGen
    # finished its queries with empty answers.
    assert backend.model.calls < detail.values["result_query_count"]


def test_impossible_latency_bound_is_invalid_with_reasons(tiny, tmp_path):
    workload, model, samples = tiny
    noop = backends.build("noop", workload, model)
    out = inference.run_loadgen(workload, samples, noop, _settings("Server", server_latency_ms=1e-6,
                                                                   server_target_qps=1000.0, min_queries=64),
                                tmp_path)
    record = out.record()
    assert record["valid"] is False and record["result"] == "INVALID"
    assert any("Performance constraints" in r for r in record["reasons"]), record["reasons"]


def test_stray_audit_config_in_the_cwd_is_ignored(tiny, tmp_path, monkeypatch):
    workload, model, samples = tiny
    monkeypatch.chdir(tmp_path)
    (tmp_path / "audit.config").write_text("*.*.mode = 1\n*.*.min_duration = 5\n")  # would make it AccuracyOnly
    noop = backends.build("noop", workload, model)
    out = inference.run_loadgen(workload, samples, noop, _settings("Offline", min_queries=100), tmp_path / "run")
    assert out.detail.effective()["test_mode"] == "PerformanceOnly"
    assert out.detail.effective()["min_duration_ms"] == 200
    assert any("ignored" in note for note in out.notes)
    (tmp_path / "run" / "audit.config").write_text("*.*.mode = 1\n")
    with pytest.raises(ValueError, match="audit"):
        inference.run_loadgen(workload, samples, noop, _settings("Offline"), tmp_path / "run")


def test_read_accuracy_deduplicates_and_refuses_conflicts(tmp_path):
    entries = [{"seq_id": 0, "qsl_idx": 3, "data": "0a0b"}, {"seq_id": 1, "qsl_idx": 3, "data": "0a0b"},
               {"seq_id": 2, "qsl_idx": 1, "data": "ff"}]
    (tmp_path / logs.ACCURACY).write_text(json.dumps(entries))
    assert logs.read_accuracy(tmp_path) == {3: b"\x0a\x0b", 1: b"\xff"}
    entries.append({"seq_id": 3, "qsl_idx": 1, "data": "fe"})
    (tmp_path / logs.ACCURACY).write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="sample 1 was answered twice"):
        logs.read_accuracy(tmp_path)


class _Outcome:
    def __init__(self, valid, qps):
        self.valid = valid
        self.summary = logs.Summary("VALID" if valid else "INVALID", {}, [])
        self.detail = logs.Detail({"result_completed_samples_per_sec": qps, "result_99.00_percentile_latency_ns": 1})


def test_server_search_brackets_the_highest_valid_qps():
    capacity = 730.0
    tried = []

    def run(qps, trial):
        tried.append(qps)
        return _Outcome(qps <= capacity, qps)

    best, trail = inference.search_server_qps(run, 100.0, trials=12, precision=0.05)
    assert best is not None and capacity / 1.05 <= best.detail.values["result_completed_samples_per_sec"] <= capacity
    assert tried[:4] == [100.0, 200.0, 400.0, 800.0] and len(trail) == len(tried)
    best, _ = inference.search_server_qps(lambda q, t: _Outcome(False, q), 100.0, trials=3)
    assert best is None


def test_server_search_runs_longer_when_early_stopping_needs_more_queries():
    """Within the bound but too few queries for the p99 estimate: the same target again with 4x the queries (what
    LoadGen's summary asks for), not a lower target."""
    calls = []

    def run(qps, trial, scale=1):
        calls.append((qps, scale))
        outcome = _Outcome(scale > 1 and qps <= 150, qps)
        if not outcome.valid and qps <= 150:  # p99 under the bound, early-stopping estimate not yet
            outcome.summary = logs.Summary("INVALID", {"Performance constraints satisfied": True,
                                                       "Early stopping satisfied": False}, [])
        return outcome

    best, trail = inference.search_server_qps(run, 100.0, trials=6)
    assert calls[:3] == [(100.0, 1), (100.0, 4), (200.0, 1)]
    assert best is not None and trail[1]["scale"] == 4 and trail[1]["result"] == "VALID"
    assert all(scale == 1 for qps, scale in calls if qps > 150)  # over the bound: never lengthened


def test_settings_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="scenario='Batch'"):
        S.check_scenario("Batch")
    assert S.check_scenario("single-stream") == "SingleStream"
    with pytest.raises(ValueError, match="mode='fast'"):
        _settings("Offline", "fast")
    assert S.target("hf") == S.DEFAULT_TARGET and S.target("vision").server_latency_ms == 15.0


def test_backend_choices_and_unavailable_fp8(tiny, tmp_path):
    workload, model, _ = tiny
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        backends.build("tensorrt", workload, model)
    with pytest.raises(ValueError, match="fewbit ptq vision --recipe int8 --onnx"):
        backends.build("ort_int8", workload, model)
    with pytest.raises(ValueError, match="cannot be exported"):
        backends.build("ort", workload, model, "bf16", folder=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(backends.BackendUnavailable, match="CUDA"):
            backends.build("fp8", workload, model, "fp8_current")


def test_ort_fp32_backend_matches_torch(tiny, tmp_path):
    workload, model, samples = tiny
    ort = backends.build("ort", workload, model, folder=tmp_path)
    assert os.path.isfile(ort.onnx)
    x = samples.inputs(range(8))
    with torch.no_grad():
        torch.testing.assert_close(ort.model(x), model(x), atol=1e-4, rtol=1e-4)


def test_an_unmet_early_stopping_estimate_is_no_metric():
    from fewbit.mlperf.logs import Detail, scenario_metric

    met = Detail(values={"early_stopping_met": True, "early_stopping_latency_ss": 4_000_000})
    assert scenario_metric("SingleStream", met)[1] == 4.0  # ms
    unmet = Detail(values={"early_stopping_met": False, "early_stopping_latency_ss": 0})
    assert scenario_metric("SingleStream", unmet)[1] is None  # LoadGen's 0 is not a latency
    assert scenario_metric("Offline", Detail(values={"result_samples_per_second": 10.0}))[1] == 10.0
