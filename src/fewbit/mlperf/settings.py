"""LoadGen settings for one run: the per-workload table, the quick and official durations, and the user.conf.

**Where the settings come from.** LoadGen's own ``mlperf.conf`` is compiled into the ``mlperf_loadgen`` extension
(the wheel ships no separate file); ``TestSettings.FromConfig("", model, scenario, 0)`` loads that copy. Every run
then writes its own ``user.conf`` into its output folder and loads it with ``FromConfig(user_conf, model,
scenario, 2)``. Both calls are made on a fresh ``TestSettings`` every run: a single ``FromConfig(user_conf, ...)``
applies mlperf.conf only on its first call in a process, so a second run in the same process would silently lose
mlperf.conf's seeds (the detail log shows ``effective_qsl_rng_seed`` 0); and ``conf_type`` 1 for the user.conf
logs "Multiple conf files are used" as an error from the second run on, where 2 loads the same settings quietly.
The model name in both files is the workload's name (``vision``), so mlperf.conf's ``*`` rules apply: 600 s
minimum duration everywhere, MultiStream 662 queries and 8 samples per query, its RNG seeds, p90 / p99
percentiles.

**user.conf** holds what the rules leave to the submitter, in LoadGen's units (milliseconds, whole numbers for
latencies): the Server latency bound from :data:`TARGETS`, the expected latencies and QPS (the hints), and in the
quick mode shorter durations and query counts. LoadGen reads user.conf latencies as whole milliseconds, so the
hints below a millisecond (a fast model on a small batch) are also set on the ``TestSettings``' nanosecond fields
after loading; the detail log's ``effective_*`` lines show what a run used.

**Quick and official.** ``official=False`` (the default): :data:`QUICK_MIN_DURATION_MS` and
:data:`QUICK_MIN_QUERIES` per scenario, so a run takes seconds on a 2-core CPU (LoadGen still marks a run VALID or
INVALID against those settings; it is not a submission), and at most :data:`QUICK_MAX_DURATION_MS` (a run cut
there is INVALID for too few queries). ``official=True`` writes no duration or count, so mlperf.conf's rules
stand.

**The table** (:data:`TARGETS`): per workload the Server latency bound and the accuracy target, a relative
tolerance against the FP32 model's metric on the same samples (0.01: within 1%, the "99% of FP32" rule, in
whichever direction is worse for the metric). Unknown workloads (``hf``, a new one) get :data:`DEFAULT_TARGET`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

SCENARIOS = ("SingleStream", "MultiStream", "Server", "Offline")
MODES = ("performance", "accuracy")
LOADGEN_MODES = {"performance": "PerformanceOnly", "accuracy": "AccuracyOnly"}
MULTISTREAM_SAMPLES = 8  # mlperf.conf's *.MultiStream.samples_per_query


@dataclass(frozen=True)
class Target:
    """What a workload is held to: the Server scenario's p99 latency bound (milliseconds) and the accuracy
    tolerance relative to the FP32 metric (0.01: at most 1% worse). ``reference``: the MLPerf benchmark whose bound
    is borrowed, for the documentation."""

    server_latency_ms: float
    accuracy_tolerance: float = 0.01
    reference: str = ""


TARGETS: dict[str, Target] = {
    "vision": Target(15.0, 0.01, "resnet50: 15 ms, 99% of FP32"),
    "translate": Target(250.0, 0.01, "GNMT (v0.5): 250 ms, 99% of FP32"),
    "asr": Target(1000.0, 0.01, "rnnt: 1000 ms, 99% of FP32"),
    "lm": Target(130.0, 0.01, "bert: 130 ms, 99% of FP32"),
}
DEFAULT_TARGET = Target(100.0, 0.01, "default for workloads without an entry")

QUICK_MIN_DURATION_MS = 1000
QUICK_MAX_DURATION_MS = 60_000  # a quick run stops here even if its query count is not reached (then INVALID)
# LoadGen's early stopping needs 64 queries for a p90 estimate (SingleStream) and 662 for a p99 one (MultiStream,
# Server) even when no query is over the bound.
QUICK_MIN_QUERIES = {"SingleStream": 64, "MultiStream": 662, "Server": 662, "Offline": 256}


def target(workload: str) -> Target:
    """The workload's entry of :data:`TARGETS`, or :data:`DEFAULT_TARGET`."""
    return TARGETS.get(workload, DEFAULT_TARGET)


def check_scenario(scenario: str) -> str:
    """``scenario`` in LoadGen's spelling; case-insensitive (``offline``, ``singlestream``, ``single-stream``)."""
    key = scenario.replace("-", "").replace("_", "").lower()
    for name in SCENARIOS:
        if name.lower() == key:
            return name
    raise ValueError(f"scenario={scenario!r}; valid: {', '.join(SCENARIOS)}")


@dataclass(frozen=True)
class Hints:
    """LoadGen's expectations, measured by a warm-up (:func:`fewbit.mlperf.inference.measure_hints`): latency of one
    sample and of one MultiStream query (nanoseconds), samples per second at the Offline batch size, and the
    Server target QPS a search starts from."""

    single_latency_ns: int
    multi_latency_ns: int
    offline_qps: float
    server_qps: float

    def __post_init__(self) -> None:
        if self.single_latency_ns < 1 or self.multi_latency_ns < 1 or not self.offline_qps > 0 \
                or not self.server_qps > 0:
            raise ValueError(f"hints must be positive, got {self}")


@dataclass(frozen=True)
class RunSettings:
    """One LoadGen run: the scenario, the mode, the model name LoadGen's files use, the hints, the Server target QPS
    and latency bound, and quick or official durations. ``min_duration_ms`` / ``min_queries`` / ``max_duration_ms``
    override the quick values (tests use tiny ones); ``accuracy_log_probability`` logs that fraction of the
    performance-mode responses too (1.0: every one, to compare with accuracy mode); ``performance_samples`` is the
    QSL's performance sample count (how many samples the load callback puts in memory)."""

    scenario: str
    mode: str
    model: str
    hints: Hints
    server_latency_ms: float
    server_target_qps: float | None = None
    official: bool = False
    min_duration_ms: int | None = None
    min_queries: int | None = None
    max_duration_ms: int = 0
    accuracy_log_probability: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scenario", check_scenario(self.scenario))
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; valid: {', '.join(MODES)}")
        if not self.server_latency_ms > 0:
            raise ValueError(f"server_latency_ms={self.server_latency_ms}; the latency bound must be > 0 ms")
        if self.server_target_qps is not None and not self.server_target_qps > 0:
            raise ValueError(f"server_target_qps={self.server_target_qps}; it must be > 0")
        if not 0 <= self.accuracy_log_probability <= 1:
            raise ValueError(f"accuracy_log_probability={self.accuracy_log_probability}; it is a probability")

    def with_qps(self, qps: float) -> RunSettings:
        return replace(self, server_target_qps=qps)

    @property
    def target_qps(self) -> float:
        """The Server target QPS: the given one, else the hint's (the search refines it)."""
        return self.server_target_qps or self.hints.server_qps

    def user_conf(self) -> str:
        """The text of this run's user.conf (see the module docstring)."""
        m, s = self.model, self.scenario
        lines = [f"# fewbit bench: {s}, {self.mode}, {'official' if self.official else 'quick'} settings"]
        if s == "SingleStream":
            lines.append(f"{m}.{s}.target_latency = {_whole_ms(self.hints.single_latency_ns)}")
        elif s == "MultiStream":
            lines.append(f"{m}.{s}.target_latency = {_whole_ms(self.hints.multi_latency_ns)}")
        elif s == "Server":
            lines.append(f"{m}.{s}.target_latency = {_whole_ms(self.server_latency_ms * 1e6)}")
            lines.append(f"{m}.{s}.target_qps = {self.target_qps:.6g}")
        else:
            lines.append(f"{m}.{s}.target_qps = {self.hints.offline_qps:.6g}")
        if not self.official:
            duration = QUICK_MIN_DURATION_MS if self.min_duration_ms is None else self.min_duration_ms
            queries = QUICK_MIN_QUERIES[s] if self.min_queries is None else self.min_queries
            lines.append(f"{m}.{s}.min_duration = {duration}")
            lines.append(f"{m}.{s}.min_query_count = {queries}")
        max_duration = self.max_duration_ms or (0 if self.official else QUICK_MAX_DURATION_MS)
        if max_duration and self.mode == "performance":  # accuracy mode answers every sample, however long
            lines.append(f"{m}.{s}.max_duration = {max_duration}")
        return "\n".join(lines) + "\n"

    def test_settings(self, folder: Path):
        """A ``mlperf_loadgen.TestSettings`` loaded from mlperf.conf and ``folder/user.conf`` (written first), with
        the sub-millisecond hints and the mode set on it."""
        import mlperf_loadgen as lg

        user_conf = Path(folder) / "user.conf"
        user_conf.write_text(self.user_conf())
        settings = lg.TestSettings()
        for path, conf_type in (("", 0), (str(user_conf), 2)):
            if settings.FromConfig(path, self.model, self.scenario, conf_type) != 0:
                raise RuntimeError(f"LoadGen refused {'mlperf.conf' if not path else path} for model "
                                   f"{self.model!r}, scenario {self.scenario}; see the message above")
        settings.scenario = getattr(lg.TestScenario, self.scenario)
        settings.mode = getattr(lg.TestMode, LOADGEN_MODES[self.mode])
        settings.single_stream_expected_latency_ns = self.hints.single_latency_ns
        settings.multi_stream_expected_latency_ns = self.hints.multi_latency_ns
        settings.server_target_latency_ns = round(self.server_latency_ms * 1e6)
        if self.accuracy_log_probability:
            settings.accuracy_log_probability = self.accuracy_log_probability
            settings.accuracy_log_rng_seed = 20261201
        return settings


def _whole_ms(ns: float) -> int:
    """Milliseconds rounded up, at least 1 (user.conf's latencies are whole milliseconds)."""
    return max(1, math.ceil(ns / 1e6))


__all__ = ["DEFAULT_TARGET", "SCENARIOS", "TARGETS", "Hints", "RunSettings", "Target", "check_scenario", "target"]
