"""MLPerf Inference through the real LoadGen, for any workload: the query sample library, the system under test,
one LoadGen run, the Server QPS search, and the accuracy step.

**QSL** (:class:`SampleLibrary`): the workload's test split (``workload.samples("test", limit)``). LoadGen's load
callback puts each chosen sample's model inputs (``samples.inputs([i])``: decoded images, token ids, log-mel
features) in memory, untimed; the unload callback drops them.

**SUT** (:class:`SystemUnderTest`): LoadGen's issue callback only queues the samples (in the workload's own
evaluation order, :meth:`~fewbit.workloads.base.Samples.batches`) and returns. Worker threads batch them
dynamically, up to ``max_batch`` samples, waiting at most ``max_wait_ms`` for a batch to fill after its first
sample arrived (0: take what is there), collate them (:func:`collate`), run ``workload.predict`` on the backend,
encode each output (:func:`encode_output`) and answer with ``QuerySamplesComplete``. The workers spend their time
in torch / onnxruntime calls, which release the GIL, so LoadGen's own threads keep their schedule. Each response
buffer (an ``array.array``) lives until ``QuerySamplesComplete`` has returned. Nothing is cached by sample index:
every query runs the model (LoadGen's TEST04 audit catches a SUT that does otherwise). The ``noop`` backend answers
inside the issue callback, empty, to measure the harness.

In Offline accuracy mode every sample comes in one query, and with ``max_batch`` equal to the workload's
evaluation batch size the batches are exactly those ``fewbit eval`` reads: the scores agree bit for bit.

**Responses** (:func:`encode_output`, :func:`decode_output`): a tensor (vision's logits, float32) is one byte ``N``
and a ``.npy`` image of the array (dtype and shape included); anything else (translate's ``(translation, nll,
tokens)``, asr's ``(transcript, loss)``) is one byte ``J`` and its JSON in UTF-8 (floats written exactly, as
Python's repr); a tuple that holds a tensor (an hf encoder's ``(embedding, mlm nll, tokens)``) is ``T``, the count
of its parts and each part encoded so, after its length (little-endian). The same sample gives the same bytes in
performance and accuracy mode whenever the batch it runs in does not change the model's arithmetic (batch 1, or
batches of the same composition).

**Faults.** A backend that raises stops being called: the worker answers the failed batch and every later query
empty, so LoadGen finishes and writes its logs, and :func:`run_loadgen` then raises :class:`BackendError` naming
the first error and the log folder. Ctrl-C during a run does the same (the model is no longer called, LoadGen
completes its schedule with empty answers and closes its logs, at most its minimum duration later) and raises
:class:`RunInterrupted`. An impossible target (a latency bound no backend meets) is simply an INVALID run, with
LoadGen's reasons in the record.

**cwd independence.** LoadGen looks for an ``audit.config`` that overrides the settings; it is pointed at the run
folder, never the working directory, so a stray file in the cwd is ignored (the record notes it). An
``audit.config`` inside the run folder is refused: fewbit does not run compliance audits.
"""

from __future__ import annotations

import array
import collections
import contextlib
import io
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewbit.mlperf import logs
from fewbit.mlperf.backends import Backend
from fewbit.mlperf.settings import MULTISTREAM_SAMPLES, Hints, RunSettings
from fewbit.workloads.base import Samples, Workload, collate

AUDIT_FILE = "audit.config"


class BackendError(RuntimeError):
    """The backend raised during a LoadGen run; LoadGen's logs are kept in ``folder``."""

    def __init__(self, message: str, folder: Path) -> None:
        super().__init__(message)
        self.folder = folder


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a LoadGen run; LoadGen's (partial) logs are in ``folder``."""

    def __init__(self, folder: Path) -> None:
        super().__init__(f"interrupted; LoadGen's logs of the partial run are in {folder}")
        self.folder = folder


# -- responses ----------------------------------------------------------------------------------------------------
def encode_output(output: Any) -> bytes:
    """One model output as response bytes (module docstring): ``N`` + .npy for a tensor or array, ``J`` + JSON
    otherwise."""
    if isinstance(output, torch.Tensor | np.ndarray):
        array_ = output.detach().cpu().numpy() if isinstance(output, torch.Tensor) else output
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array_), allow_pickle=False)
        return b"N" + buffer.getvalue()
    if isinstance(output, tuple | list) and any(isinstance(o, torch.Tensor | np.ndarray) for o in output):
        parts = [encode_output(o) for o in output]  # a tuple holding a tensor: each part with its length
        return b"T" + struct.pack("<I", len(parts)) + b"".join(struct.pack("<Q", len(b)) + b for b in parts)
    return b"J" + json.dumps(output, separators=(",", ":")).encode()


def decode_output(data: bytes) -> Any:
    """The inverse of :func:`encode_output`: a tensor, or the JSON value (a top-level list becomes a tuple, as
    the workloads' predict returns them)."""
    kind, body = data[:1], data[1:]
    if kind == b"N":
        return torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False))
    if kind == b"J":
        value = json.loads(body.decode())
        return tuple(value) if isinstance(value, list) else value
    if kind == b"T":
        (count,), offset, parts = struct.unpack_from("<I", body), 4, []
        for _ in range(count):
            (size,) = struct.unpack_from("<Q", body, offset)
            parts.append(decode_output(body[offset + 8:offset + 8 + size]))
            offset += 8 + size
        return tuple(parts)
    raise ValueError(f"response of {len(data)} bytes starts with {kind!r}; fewbit responses start with b'N', b'J' "
                     "or b'T'")


# -- the query sample library -------------------------------------------------------------------------------------
class SampleLibrary:
    """LoadGen's QSL over ``samples``: the load callback keeps each chosen sample's inputs in memory."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples
        self.loaded: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, indices: Sequence[int]) -> None:
        for i in indices:
            if i not in self.loaded:
                self.loaded[i] = self.samples.inputs([i])

    def unload(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.loaded.pop(i, None)

    def batch(self, indices: Sequence[int]) -> Any:
        return self.samples.collate([self.loaded[i] for i in indices])


# -- the system under test ----------------------------------------------------------------------------------------
class SystemUnderTest:
    """LoadGen's SUT: queue in the issue callback, batch and run on ``workers`` threads (module docstring)."""

    def __init__(self, workload: Workload, backend: Backend, library: SampleLibrary, max_batch: int,
                 max_wait_ms: float = 0.0, workers: int = 1) -> None:
        if max_batch < 1 or workers < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch={max_batch} and workers={workers} must be >= 1, max_wait_ms={max_wait_ms} "
                             ">= 0")
        self.workload, self.backend, self.library = workload, backend, library
        self.max_batch, self.max_wait_s, self.workers = max_batch, max_wait_ms / 1e3, workers
        # The workload's evaluation order, so that Offline batches are the ones evaluation reads.
        order = [i for b in library.samples.batches(max_batch) for i in b]
        self.position = {index: p for p, index in enumerate(order)}
        self.pending: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.errors: list[str] = []
        self.stopped = False  # the model is no longer called (an error, or Ctrl-C)
        self.batches = 0
        self.closing = False
        self.threads: list[threading.Thread] = []

    # LoadGen's callbacks
    def issue(self, query_samples) -> None:
        import mlperf_loadgen as lg

        if self.backend.is_noop:
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in query_samples])
            return
        items = sorted(((q.id, q.index) for q in query_samples), key=lambda item: self.position[item[1]])
        with self.ready:
            self.pending.extend(items)
            self.ready.notify()

    def flush(self) -> None:
        pass

    # the workers
    def start(self) -> None:
        if self.backend.is_noop:
            return
        for k in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"fewbit-sut-{k}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self) -> None:
        with self.ready:
            self.closing = True
            self.ready.notify_all()
        for thread in self.threads:
            thread.join()

    def stop_model(self) -> None:
        """From now on answer every query at once, empty, without calling the model."""
        self.stopped = True

    def run_batch(self, indices: Sequence[int]) -> list[array.array]:
        """The encoded responses to the loaded samples at ``indices``, one buffer each (run under
        ``backend.running()``)."""
        outputs: list[Any] = [None] * len(indices)
        for group in self.library.samples.groups(indices):  # samples that may share a batch (not a short tail)
            answers = self.workload.predict(self.backend.model, self.library.batch([indices[p] for p in group]))
            if len(answers) != len(group):
                raise RuntimeError(f"predict returned {len(answers)} outputs for {len(group)} samples")
            for p, answer in zip(group, answers, strict=True):
                outputs[p] = answer
        return [array.array("B", encode_output(o)) for o in outputs]

    def _take(self) -> list[tuple[int, int]] | None:
        with self.ready:
            while not self.pending and not self.closing:
                self.ready.wait()
            if not self.pending:
                return None
            deadline = time.perf_counter() + self.max_wait_s
            while len(self.pending) < self.max_batch and not self.closing and not self.stopped:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.ready.wait(left)
            return [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]

    def _work(self) -> None:
        import mlperf_loadgen as lg

        with self.backend.running():
            while (items := self._take()) is not None:
                if self.stopped:
                    lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i, _ in items])
                    continue
                try:
                    buffers = self.run_batch([j for _, j in items])
                except Exception as error:  # the backend failed: keep LoadGen going, report after StartTest
                    self.errors.append(f"{type(error).__name__}: {error}")
                    self.stopped = True
                    lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i, _ in items])
                    continue
                responses = [lg.QuerySampleResponse(i, b.buffer_info()[0], len(b))
                             for (i, _), b in zip(items, buffers, strict=True)]
                lg.QuerySamplesComplete(responses)  # the buffers stay alive until this returns
                self.batches += 1


# -- one LoadGen run ----------------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    """What one LoadGen run left: its folder, settings and parsed logs, and what the SUT saw."""

    folder: Path
    settings: RunSettings
    detail: logs.Detail
    summary: logs.Summary
    seconds: float
    batches: int
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.summary.result == "VALID"

    def record(self) -> dict[str, Any]:
        """The run as plain data: validity and LoadGen's reasons, the scenario metric, latencies, errors, the
        effective settings."""
        s = self.settings
        name, value, unit, higher = logs.scenario_metric(s.scenario, self.detail)
        performance = s.mode == "performance"
        return {
            "scenario": s.scenario, "mode": s.mode,
            "result": self.summary.result if performance else None,
            "valid": self.valid if performance else None,
            "reasons": self.summary.reasons if performance and not self.valid else [],
            "metric_name": name if performance else None, "metric": value if performance else None,
            "unit": unit, "higher_is_better": higher,
            "latency_ns": self.detail.latencies_ns() if performance else {},
            "errors": self.detail.values.get("num_errors", len(self.detail.errors)),
            "error_messages": self.detail.errors,
            "server_target_qps": s.target_qps if s.scenario == "Server" else None,
            "server_latency_ms": s.server_latency_ms if s.scenario == "Server" else None,
            "effective": self.detail.effective(),
            "official": s.official,
            "batches": self.batches, "seconds": round(self.seconds, 3),
            "folder": str(self.folder), "notes": self.notes,
        }


def run_loadgen(workload: Workload, samples: Samples, backend: Backend, settings: RunSettings, folder: str | Path,
                *, max_batch: int = 1, max_wait_ms: float = 0.0, workers: int = 1,
                performance_samples: int = 1024) -> RunOutcome:
    """One LoadGen run of ``backend`` on ``samples`` with ``settings``; logs in ``folder`` (created first).
    ``performance_samples``: the QSL's performance sample count (at most the number of samples). Raises
    :class:`BackendError` or :class:`RunInterrupted` after LoadGen has closed its logs (module docstring)."""
    import mlperf_loadgen as lg

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / AUDIT_FILE).exists():
        raise ValueError(f"{folder / AUDIT_FILE} exists: LoadGen would let it override the settings; fewbit bench "
                         "does not run compliance audits, remove the file")
    notes = []
    if Path(AUDIT_FILE).exists():
        notes.append(f"ignored {Path(AUDIT_FILE).resolve()}: LoadGen reads the audit config from the run folder")
    for stale in (logs.DETAIL, logs.SUMMARY, logs.ACCURACY):
        (folder / stale).unlink(missing_ok=True)
    test_settings = settings.test_settings(folder)
    library = SampleLibrary(samples)
    sut = SystemUnderTest(workload, backend, library, max_batch, max_wait_ms, workers)
    output = lg.LogOutputSettings()
    output.outdir = str(folder)
    output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = output
    sut_handle = lg.ConstructSUT(sut.issue, sut.flush)
    qsl_handle = lg.ConstructQSL(len(library), min(performance_samples, len(library)), library.load, library.unload)
    failure: list[BaseException] = []
    # The end of the run is an Event, not Thread.join/is_alive: a KeyboardInterrupt inside Thread.join (CPython
    # 3.11) can make is_alive() report a running thread as finished, and destroying the SUT under a running
    # LoadGen crashes it.
    done = threading.Event()

    def start() -> None:
        try:
            lg.StartTestWithLogSettings(sut_handle, qsl_handle, test_settings, log_settings,
                                        str(folder / AUDIT_FILE))
        except BaseException as error:  # surfaced in the calling thread
            failure.append(error)
        finally:
            done.set()

    interrupted = False
    started = time.perf_counter()
    sut.start()
    runner = threading.Thread(target=start, name="fewbit-loadgen", daemon=True)
    with _stdout_to_stderr():  # LoadGen prints its warnings to file descriptor 1; --json keeps stdout for the JSON
        runner.start()
        while not done.is_set():
            try:
                done.wait(0.1)
            except KeyboardInterrupt:  # stop calling the model; LoadGen finishes with empty answers
                interrupted = True
                sut.stop_model()
                with sut.ready:
                    sut.ready.notify_all()
    seconds = time.perf_counter() - started
    runner.join()
    sut.close()
    lg.DestroyQSL(qsl_handle)
    lg.DestroySUT(sut_handle)
    if failure:
        raise failure[0]
    if interrupted:
        raise RunInterrupted(folder)
    if sut.errors:
        raise BackendError(f"backend {backend.name} raised during the {settings.scenario} run: {sut.errors[0]}; "
                           f"every query was answered so that LoadGen could finish; its logs are in {folder}",
                           folder)
    return RunOutcome(folder, settings, logs.read_detail(folder), logs.read_summary(folder), seconds, sut.batches,
                      notes)


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at 2 for the duration (what C++ code writes to stdout goes to stderr)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (an embedded interpreter): nothing to redirect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# -- warm-up, search, accuracy ------------------------------------------------------------------------------------
def measure_hints(workload: Workload, samples: Samples, backend: Backend, max_batch: int,
                  repeats: int = 3) -> Hints:
    """LoadGen's hints from a short warm-up on the first samples through the SUT's own batch path (collate,
    predict, encode; it also compiles a ``compile`` backend): after one untimed call each, the best of ``repeats``
    timings of one sample, of one MultiStream query and of one batch of ``max_batch``.

    Then made safe: LoadGen generates queries for the expected latency, so a latency hint is half the measured one
    (a faster SUT would run out of queries and the run would be INVALID), and the Offline QPS hint 1.5 times the
    measured one (too few samples would end the run before its minimum duration). The Server search starts at
    half the best per-sample rate measured (one sample alone, or one batch). The ``noop`` backend is timed
    building its empty responses."""
    if backend.is_noop:
        import mlperf_loadgen as lg

        count = 20_000
        t0 = time.perf_counter()
        [lg.QuerySampleResponse(i, 0, 0) for i in range(count)]
        per_sample = (time.perf_counter() - t0) / count
        return Hints(single_latency_ns=1_000, multi_latency_ns=2_000, offline_qps=1 / per_sample,
                     server_qps=0.1 / per_sample)
    library = SampleLibrary(samples)
    sut = SystemUnderTest(workload, backend, library, max(max_batch, MULTISTREAM_SAMPLES))
    n = len(samples)

    def best(count: int) -> float:
        indices = [i % n for i in range(count)]
        library.load(sorted(set(indices)))
        times = []
        with backend.running():
            sut.run_batch(indices)  # untimed: first calls allocate, pick kernels, compile
            for _ in range(repeats):
                t0 = time.perf_counter()
                sut.run_batch(indices)
                times.append(time.perf_counter() - t0)
        return min(times)

    single = best(1)
    multi = best(MULTISTREAM_SAMPLES)
    batch = max_batch if max_batch > 1 else MULTISTREAM_SAMPLES
    offline = batch / best(batch)
    rate = max(1 / single, MULTISTREAM_SAMPLES / multi, offline)
    return Hints(single_latency_ns=max(1, int(single * 1e9 / 2)), multi_latency_ns=max(1, int(multi * 1e9 / 2)),
                 offline_qps=offline * 1.5, server_qps=0.5 * rate)


def corrected_hints(outcome: RunOutcome, hints: Hints) -> Hints | None:
    """Hints from what a run measured, when the run is INVALID only because it ended before its minimum duration
    (LoadGen generated too few queries for a SUT faster than its hints said); None otherwise. Offline: 3 times
    the measured samples per second (a busy CPU's throughput moves by that much); SingleStream / MultiStream: a
    quarter of the measured mean latency."""
    failed = [name for name, ok in outcome.summary.checks.items() if not ok]
    if outcome.valid or failed != ["Min duration satisfied"]:
        return None
    scenario, values = outcome.settings.scenario, outcome.detail.values
    if scenario == "Offline" and values.get("result_samples_per_second"):
        return replace(hints, offline_qps=3 * float(values["result_samples_per_second"]))
    mean = values.get("result_mean_latency_ns")
    if scenario == "SingleStream" and mean:
        return replace(hints, single_latency_ns=max(1, int(mean / 4)))
    if scenario == "MultiStream" and mean:
        return replace(hints, multi_latency_ns=max(1, int(mean / 4)))
    return None


def search_server_qps(run: Callable[..., RunOutcome], start_qps: float, trials: int = 6,
                      precision: float = 0.1, longer: int = 4) -> tuple[RunOutcome | None, list[dict[str, Any]]]:
    """The highest target QPS whose Server run is VALID: doubling from ``start_qps`` until a run is INVALID (or
    halving until one is VALID), then bisecting, at most ``trials`` runs, stopping when the bracket is within
    ``precision`` (relative). ``run(qps, trial)`` does one run. A run whose latencies are within the bound but
    whose queries are too few for LoadGen's early-stopping estimate (its p99 close to the bound) is run again at the
    same target with ``longer`` times the queries and duration, ``run(qps, trial, longer)``, once per target: more
    queries, not a lower target, is what LoadGen asks for. Returns the best VALID outcome (None if none was) and
    every trial's (qps, result, metric, scale)."""
    best: RunOutcome | None = None
    low, high = 0.0, None
    qps, trail, scale = start_qps, [], 1
    for trial in range(trials):
        outcome = run(qps, trial) if scale == 1 else run(qps, trial, scale)
        trail.append({"target_qps": qps, "result": outcome.summary.result,
                      "metric": logs.scenario_metric("Server", outcome.detail)[1],
                      "p99_ms": outcome.detail.latencies_ns().get("p99", float("nan")) / 1e6, "scale": scale})
        checks = outcome.summary.checks
        within = checks.get("Performance constraints satisfied", False)
        if not outcome.valid and within and checks.get("Early stopping satisfied") is False and scale == 1 \
                and longer > 1:
            scale = longer  # the same target again, longer
            continue
        scale = 1
        if outcome.valid:
            low = qps
            best = outcome
        elif within:
            low = max(low, qps)  # within the bound but too short (max duration): a low target, not a high one
        else:
            high = qps
        if high is not None and low > 0 and high / low <= 1 + precision:
            break
        qps = qps * 2 if high is None else (qps / 2 if low == 0 else (low + high) / 2)
    return best, trail


def score_accuracy(workload: Workload, samples: Samples, folder: str | Path) -> dict[str, float]:
    """The workload's metrics of the responses in the accuracy log in ``folder``: decoded, one per sample, scored
    with ``workload.score`` against the references. Every sample must be there (an accuracy-mode run)."""
    responses = logs.read_accuracy(folder)
    missing = [i for i in range(len(samples)) if i not in responses]
    if missing:
        raise ValueError(f"{Path(folder) / logs.ACCURACY} lacks {len(missing)} of {len(samples)} samples (first: "
                         f"{missing[:5]}); score an accuracy-mode run")
    outputs = [decode_output(responses[i]) for i in range(len(samples))]
    return workload.score(outputs, samples.references(range(len(samples))))


__all__ = ["BackendError", "RunInterrupted", "RunOutcome", "SampleLibrary", "SystemUnderTest", "collate",
           "corrected_hints",
           "decode_output", "encode_output", "measure_hints", "run_loadgen", "score_accuracy", "search_server_qps"]
