"""fewbit's LoadGen harness against a raw LoadGen no-op SUT, in the same run: what the harness itself costs.

    python -m benchmarks.bench_loadgen_overhead [--rounds 3] [--duration-ms 1000] [--server-qps 20000]
                                                [--json out/bench_loadgen_overhead.json]

- ``raw``: LoadGen's Python bindings with the smallest SUT there is: the issue callback answers every sample at
  once with an empty ``QuerySampleResponse`` (the MLPerf reference's no-op SUT), a QSL whose callbacks do nothing;
- ``fewbit noop``: :func:`fewbit.mlperf.inference.run_loadgen` with the ``noop`` backend on the vision workload's
  test split (digits, so no data install is needed): fewbit's settings (mlperf.conf + a user.conf), QSL (the load
  callback puts every sample's inputs in memory), SUT, and log parsing.

Offline: samples per second (both with the same expected-QPS hint and minimum duration; the default hint, 3M
samples/s, is above what either reaches on a 2-core CPU, so that no run ends before its minimum duration). Server:
both at ``--server-qps`` with a 15 ms bound: completed samples per second and whether the run is VALID. Every run
is its own Python process (the measured part, an Offline query of millions of samples answered from Python, is
slowed by whatever an earlier run in the same process left in memory: in one process the second run of a pair
measured 0.5-0.7x the first, whichever it was), and each round swaps which of the two goes first; the table shows
every round and the median ratio fewbit / raw. Target: at least 0.8. The numbers are reported, never raised.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import environment


def raw_run(scenario: str, folder: Path, duration_ms: int, offline_qps: float, server_qps: float) -> dict:
    import mlperf_loadgen as lg

    from fewbit.mlperf import logs

    folder.mkdir(parents=True, exist_ok=True)
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_duration_ms = duration_ms
    settings.min_query_count = 662 if scenario == "Server" else 256
    settings.offline_expected_qps = offline_qps
    settings.server_target_qps = server_qps
    settings.server_target_latency_ns = 15_000_000

    def issue(query_samples):
        lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in query_samples])

    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(1024, 1024, lambda s: None, lambda s: None)
    output = lg.LogOutputSettings()
    output.outdir = str(folder)
    output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = output
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings, str(folder / "audit.config"))
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)
    detail, summary = logs.read_detail(folder), logs.read_summary(folder)
    return {"result": summary.result, "metric": logs.scenario_metric(scenario, detail)[1]}


def fewbit_run(workload, samples, scenario: str, folder: Path, duration_ms: int, offline_qps: float,
               server_qps: float) -> dict:
    from fewbit.mlperf import backends, inference
    from fewbit.mlperf import settings as S

    noop = backends.build("noop", workload, None)
    hints = S.Hints(single_latency_ns=1000, multi_latency_ns=2000, offline_qps=offline_qps, server_qps=server_qps)
    run_settings = S.RunSettings(scenario, "performance", "vision", hints, 15.0, server_target_qps=server_qps,
                                 min_duration_ms=duration_ms, min_queries=662 if scenario == "Server" else 256)
    record = inference.run_loadgen(workload, samples, noop, run_settings, folder).record()
    return {"result": record["result"], "metric": record["metric"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration-ms", type=int, default=1000)
    parser.add_argument("--offline-qps", type=float, default=3_000_000, help="Offline expected-QPS hint")
    parser.add_argument("--server-qps", type=float, default=20_000)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", nargs=3, metavar=("WHO", "SCENARIO", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.duration_ms, args.offline_qps, args.server_qps)
    if args.one:  # one run in this process (the parent starts one process per run), its record on stdout
        who, scenario, folder = args.one
        if who == "raw":
            print(json.dumps(raw_run(scenario, Path(folder), *common)))
        else:
            from fewbit.workloads import get

            cls = get("vision")
            workload = cls(cls.load_config("quick", ["source=digits"])).setup()
            print(json.dumps(fewbit_run(workload, workload.samples("test", 0), scenario, Path(folder), *common)))
        return

    def one(who: str, scenario: str, folder: Path) -> dict:
        command = [sys.executable, "-m", "benchmarks.bench_loadgen_overhead", "--one", who, scenario, str(folder),
                   "--duration-ms", str(args.duration_ms), "--offline-qps", str(args.offline_qps),
                   "--server-qps", str(args.server_qps)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if done.returncode != 0:
            raise RuntimeError(f"{who} {scenario} run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in ("Offline", "Server"):
            for k in range(args.rounds):
                order = ("raw", "fewbit") if k % 2 == 0 else ("fewbit", "raw")
                result = {who: one(who, scenario, Path(tmp) / f"{who}-{scenario}-{k}") for who in order}
                raw, ours = result["raw"], result["fewbit"]
                rows.append({"scenario": scenario, "round": k, "raw": raw, "fewbit": ours,
                             "ratio": ours["metric"] / raw["metric"] if raw["metric"] else None})
    print(json.dumps(environment()))
    print(f"{'scenario':<9} {'round':>5} {'raw samples/s':>14} {'raw':>8} {'fewbit samples/s':>17} {'fewbit':>8} "
          f"{'ratio':>6}")
    for r in rows:
        print(f"{r['scenario']:<9} {r['round']:>5} {r['raw']['metric']:>14.0f} {r['raw']['result']:>8} "
              f"{r['fewbit']['metric']:>17.0f} {r['fewbit']['result']:>8} {r['ratio']:>6.2f}")
    summary = {}
    for scenario in ("Offline", "Server"):
        ratios = [r["ratio"] for r in rows if r["scenario"] == scenario and r["ratio"]]
        summary[scenario] = statistics.median(ratios)
        print(f"{scenario}: median fewbit / raw = {summary[scenario]:.2f} (target >= 0.8: "
              f"{'met' if summary[scenario] >= 0.8 else 'NOT met'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"environment": environment(), "rows": rows, "median_ratio": summary},
                                              indent=2))


if __name__ == "__main__":
    main()
