"""Shared helpers for fewbit's command-line benchmarks: environment header, timing, result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# What time_it measures: wall time (the default), or the CPU time of the calling thread ("thread": with one torch
# thread, what a quiet machine's wall time would be, steady on a machine shared with other jobs, which only delay
# the thread; it does not count other threads, so it is meant for --threads 1).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def time_it(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, clock: str = "wall") -> float:
    """Median time of ``fn()`` in seconds by ``clock`` (:data:`CLOCKS`), after ``warmup`` untimed calls
    (compilation happens there)."""
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(now() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, repeats: int, warmup: int,
                clock: str = "wall") -> dict[str, list[float]]:
    """Per name, the ``time_it`` of its callable in each of ``rounds`` rounds; every round visits every callable in
    turn, so a slow spell of a shared machine hits all of them alike instead of one configuration."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_it(fn, repeats=repeats, warmup=warmup, clock=clock))
    return times


def median_spread(times: list[float]) -> tuple[float, float]:
    """The median of per-round times and the spread around it: half the range, in percent of the median."""
    median = statistics.median(times)
    return median, 50 * (max(times) - min(times)) / median


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
