"""Reading LoadGen's logs: the detail log's ``:::MLLOG`` records, the summary, and the accuracy log.

- ``mlperf_log_detail.txt``: one JSON record per ``:::MLLOG`` line; :func:`read_detail` keeps the last value of
  each key (the ``effective_*`` settings, the ``result_*`` figures) and the messages of records marked as errors
  or warnings.
- ``mlperf_log_summary.txt``: :func:`read_summary` takes the ``Result is : VALID`` line, the satisfied / not
  satisfied checks under it and LoadGen's recommendations (the reasons of an INVALID run).
- ``mlperf_log_accuracy.json``: a JSON list of ``{"seq_id", "qsl_idx", "data": hex bytes}``; a sample issued
  more than once (performance-mode logging, or a padded accuracy run) appears once per issue.
  :func:`read_accuracy` decodes the hex and keeps one entry per ``qsl_idx``, refusing two different answers for
  one sample.

:func:`scenario_metric` names each scenario's metric as MLPerf reports it: SingleStream the early-stopping
estimate of the 90th percentile latency, MultiStream that of the 99th percentile per-query latency (both in
milliseconds), Server the completed samples per second, Offline the samples per second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DETAIL = "mlperf_log_detail.txt"
SUMMARY = "mlperf_log_summary.txt"
ACCURACY = "mlperf_log_accuracy.json"

# scenario -> (metric name, detail-log key, unit, scale from the key's unit, higher is better)
METRICS: dict[str, tuple[str, str, str, float, bool]] = {
    "SingleStream": ("p90 latency (early stopping)", "early_stopping_latency_ss", "ms", 1e-6, False),
    "MultiStream": ("p99 latency (early stopping)", "early_stopping_latency_ms", "ms", 1e-6, False),
    "Server": ("completed samples/s", "result_completed_samples_per_sec", "samples/s", 1.0, True),
    "Offline": ("samples/s", "result_samples_per_second", "samples/s", 1.0, True),
}


@dataclass
class Detail:
    """The detail log: each key's last value, and the error and warning messages."""

    values: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def effective(self) -> dict[str, Any]:
        """The ``effective_*`` settings LoadGen ran with, without the prefix."""
        return {k[len("effective_"):]: v for k, v in self.values.items() if k.startswith("effective_")}

    def latencies_ns(self) -> dict[str, float]:
        """The latency percentiles of the run (``"p50"`` ... ``"p99.9"``, plus min, mean and max), nanoseconds; per
        query for MultiStream."""
        out = {}
        for key, value in self.values.items():
            if key.startswith("result_") and key.endswith("percentile_latency_ns") and "per_query" not in key:
                out["p" + key.split("_")[1].rstrip("0").rstrip(".")] = float(value)
        for name in ("min", "mean", "max"):
            if f"result_{name}_latency_ns" in self.values:
                out[name] = float(self.values[f"result_{name}_latency_ns"])
        return out


def read_detail(folder: str | Path) -> Detail:
    """The detail log of the run in ``folder``; a missing file is a FileNotFoundError naming it. Lines that are not
    complete records (a run killed mid-write) are skipped."""
    path = Path(folder) / DETAIL
    detail = Detail()
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            record = json.loads(line[len(":::MLLOG "):])
        except json.JSONDecodeError:
            continue
        key, value = record.get("key"), record.get("value")
        detail.values[key] = value
        meta = record.get("metadata") or {}
        if meta.get("is_error"):
            detail.errors.append(f"{key}: {value}")
        elif meta.get("is_warning"):
            detail.warnings.append(f"{key}: {value}")
    return detail


@dataclass
class Summary:
    """The summary log: ``VALID``/``INVALID`` (None when the run did not finish), the checks LoadGen lists under
    the result (``{"Min duration satisfied": True, ...}``) and its recommendations."""

    result: str | None
    checks: dict[str, bool]
    recommendations: list[str]

    @property
    def reasons(self) -> list[str]:
        """Why the run is INVALID: the failed checks, then LoadGen's recommendations."""
        return [f"{name.replace(' satisfied', '')} not satisfied" for name, ok in self.checks.items() if not ok] + \
            self.recommendations


def read_summary(folder: str | Path) -> Summary:
    """The summary log of the run in ``folder`` (result None when LoadGen did not write one)."""
    path = Path(folder) / SUMMARY
    if not path.is_file():
        return Summary(None, {}, [])
    result, checks, recommendations = None, {}, []
    in_recommendations = False
    for raw in path.read_text(errors="replace").splitlines():
        line = raw.strip()
        if line.startswith("Result is :"):
            result = line.split(":", 1)[1].strip()
        elif line.endswith((": Yes", ": NO", ":Yes", ":NO")) and "satisfied" in line:
            name, value = line.rsplit(":", 1)
            checks[name.strip()] = value.strip() == "Yes"
        elif line.startswith("Recommendations:"):
            in_recommendations = True
        elif in_recommendations and line.startswith("* "):
            recommendations.append(line[2:].strip())
        elif in_recommendations:
            in_recommendations = False
    return Summary(result, checks, recommendations)


def scenario_metric(scenario: str, detail: Detail) -> tuple[str, float | None, str, bool]:
    """(name, value, unit, higher is better) of the scenario's metric from the detail log; the value is None when
    the log lacks it (an unfinished run) or when it is an early-stopping estimate and early stopping was not met
    (LoadGen then writes 0)."""
    name, key, unit, scale, higher = METRICS[scenario]
    value = detail.values.get(key)
    if key.startswith("early_stopping") and detail.values.get("early_stopping_met") is False:
        value = None
    return name, (float(value) * scale if value is not None else None), unit, higher


def read_accuracy(folder: str | Path) -> dict[int, bytes]:
    """``qsl_idx -> response bytes`` from the accuracy log in ``folder``, one entry per sample. A sample answered
    twice with different bytes is a ValueError (the SUT is not deterministic, or it cached answers by index)."""
    path = Path(folder) / ACCURACY
    text = path.read_text().strip()
    entries = json.loads(text) if text else []
    out: dict[int, bytes] = {}
    for entry in entries:
        index, data = int(entry["qsl_idx"]), bytes.fromhex(entry["data"])
        if index in out and out[index] != data:
            raise ValueError(f"{path}: sample {index} was answered twice with different bytes ({len(out[index])} "
                             f"and {len(data)} bytes); the same sample must give the same response")
        out[index] = data
    return out


__all__ = [
    "ACCURACY",
    "DETAIL",
    "METRICS",
    "SUMMARY",
    "Detail",
    "Summary",
    "read_accuracy",
    "read_detail",
    "read_summary",
    "scenario_metric",
]
