"""Measure fewbit's reference convergence points: FP32 runs to a workload's quality target, written into
``src/fewbit/mlperf/rcps.json`` (per workload and global batch size) with how they were made.

    python -m benchmarks.ttq_reference lm --runs 5 --seed 1000

The seeds (``--seed`` .. ``--seed + runs - 1``) differ from ``fewbit ttq``'s defaults (0 ..) so that a recipe's runs
are not the reference's own. Every run must converge.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

from fewbit.mlperf import training

RCP_PATH = Path(__file__).resolve().parent.parent / "src" / "fewbit" / "mlperf" / training.RCP_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(training.TARGETS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default="fewbit-rcp")
    args = parser.parse_args(argv)
    goal = training.target_for(args.workload)
    runs = []
    for i in range(args.runs):
        seed = args.seed + i
        run = training.run_to_target(args.workload, "fp32", seed=seed, target=goal,
                                     log_path=Path(args.out) / args.workload / f"result_{i}.txt")
        print(f"seed {seed}: {run.status} {run.reason}; {run.seconds:.1f} s, {run.samples_to_target} samples",
              flush=True)
        runs.append(run)
    made = {"command": "python -m benchmarks.ttq_reference " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": [r.seed for r in runs], "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M UTC"), "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{platform.processor() or 'cpu'}", "torch": torch.__version__, "recipe": "fp32"}
    entry = training.rcp_entry(runs, goal, made)
    data = json.loads(RCP_PATH.read_text()) if RCP_PATH.is_file() else {}
    data.setdefault(args.workload, {})[str(runs[0].global_batch_size)] = entry
    RCP_PATH.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {RCP_PATH}: {args.workload} at global batch size {runs[0].global_batch_size}: "
          f"{entry['samples_to_target']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
