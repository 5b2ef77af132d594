"""Fake-quantization and quantization throughput for every MX spec, per-tensor FP8 and per-channel INT8, beside memcpy
and torchao.

    python -m benchmarks.bench_quantize [--rows 4096 --cols 4096] [--rounds 5] [--threads 1 --clock thread]
        [--json out/bench_quantize.json]

Reports M elements/s on a float32 (rows, cols) tensor (16M elements by default) and ratios to ``x.clone()`` (memcpy)
and to torchao's ``to_mx`` (E4M3 and each spec's own element type). Everything is measured in this run, in rounds
that visit every configuration in turn (so a busy neighbour slows all of them alike); each round takes the median of
``--repeats`` calls after ``--warmup`` untimed ones, and the table shows the median over the rounds with its spread
(half the range, in percent). The first call of each spec (compilation, or building the native kernel) is untimed and
reported apart. ``--clock thread`` times the calling thread's CPU time instead of wall time: with ``--threads 1`` it
stays steady on a machine shared with other jobs. The printed targets are the project's stated goals for the MX
specs; a MISS is reported, never raised.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import fewbit
from benchmarks.common import CLOCKS, environment, interleaved, median_spread, write_json

SPECS = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "fp8_e4m3_tensor",
         "fp8_e5m2_tensor", "int8_channel", "int4_group128"]


def torchao_to_mx():
    """torchao's ``to_mx`` per element dtype, or {} when torchao is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
            from torchao.prototype.mx_formats.mx_tensor import to_mx
    except ImportError:
        return {}
    dtypes = {"mxfp8_e4m3": torch.float8_e4m3fn, "mxfp8_e5m2": torch.float8_e5m2, "mxfp6_e3m2": DTYPE_FP6_E3M2,
              "mxfp6_e2m3": DTYPE_FP6_E2M3, "mxfp4_e2m1": torch.float4_e2m1fn_x2}
    return {name: (lambda x, d=dtype: to_mx(x, d, 32)) for name, dtype in dtypes.items()}


# The project's stated targets for every MX spec's fake_quantize: (measure, least allowed ratio).
TARGETS = [("vs_memcpy", 0.7), ("vs_torchao_to_mx_e4m3", 2.5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--specs", nargs="+", default=SPECS, help=f"specs (default: {' '.join(SPECS)})")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, each over every configuration in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration and round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time (default), or the "
                        "calling thread's CPU time (with --threads 1: steady on a machine shared with other jobs)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    mega = x.numel() / 1e6
    fns: dict[str, Callable[[], object]] = {"memcpy": lambda: x.clone()}
    fns.update({f"torchao {name}": (lambda f=fn: f(x)) for name, fn in torchao_to_mx().items()})
    first_s = {}
    for name in args.specs:
        start = time.perf_counter()
        fewbit.fake_quantize(x[:8], name)
        first_s[name] = time.perf_counter() - start
        fns[f"fake {name}"] = lambda n=name: fewbit.fake_quantize(x, n)
        fns[f"quantize {name}"] = lambda n=name: fewbit.quantize(x, n)
        fewbit.quantize(x[:8], name)
    times = interleaved(fns, args.rounds, args.repeats, args.warmup, args.clock)
    rate = {key: mega / median_spread(t)[0] for key, t in times.items()}
    spread = {key: median_spread(t)[1] for key, t in times.items()}
    memcpy = rate["memcpy"]
    ao = {key.removeprefix("torchao "): r for key, r in rate.items() if key.startswith("torchao ")}
    ao_e4m3 = ao.get("mxfp8_e4m3")

    rows = []
    for name in args.specs:
        fake, quant = rate[f"fake {name}"], rate[f"quantize {name}"]
        rows.append({"spec": name, "fake_quantize_melem_per_s": fake, "fake_spread_pct": spread[f"fake {name}"],
                     "quantize_melem_per_s": quant, "quantize_spread_pct": spread[f"quantize {name}"],
                     "first_call_s": first_s[name], "vs_memcpy": fake / memcpy, "quantize_vs_memcpy": quant / memcpy,
                     "vs_torchao_to_mx_e4m3": fake / ao_e4m3 if ao_e4m3 else None,
                     "torchao_to_mx_same_format_melem_per_s": ao.get(name)})

    console = Console(width=160)
    console.print(environment())
    ao_text = f"torchao to_mx E4M3 {ao_e4m3:.0f} M/s (±{spread['torchao mxfp8_e4m3']:.0f}%)" if ao_e4m3 \
        else "torchao absent"
    title = (f"fewbit fake_quantize / quantize throughput, ({args.rows}, {args.cols}) float32, median of {args.rounds} "
             f"interleaved rounds ({torch.get_num_threads()} threads, {args.clock} clock); memcpy {memcpy:.0f} M/s "
             f"(±{spread['memcpy']:.0f}%); {ao_text}")
    table = Table(title=title)
    for col in ["spec", "fake_quantize M/s", "±%", "x memcpy", "x torchao E4M3", "quantize M/s", "±%",
                "x memcpy", "torchao same fmt M/s", "first call s"]:
        table.add_column(col, justify="left" if col == "spec" else "right")
    for r in rows:
        ao_same = r["torchao_to_mx_same_format_melem_per_s"]
        table.add_row(r["spec"], f"{r['fake_quantize_melem_per_s']:.0f}", f"{r['fake_spread_pct']:.0f}",
                      f"{r['vs_memcpy']:.2f}",
                      f"{r['vs_torchao_to_mx_e4m3']:.2f}" if r["vs_torchao_to_mx_e4m3"] else "-",
                      f"{r['quantize_melem_per_s']:.0f}", f"{r['quantize_spread_pct']:.0f}",
                      f"{r['quantize_vs_memcpy']:.2f}", f"{ao_same:.0f}" if ao_same else "-",
                      f"{r['first_call_s']:.2f}")
    console.print(table)
    targets = []
    for r in rows:
        if not r["spec"].startswith("mx"):
            continue
        for key, limit in TARGETS:
            ratio = r[key]
            ok = ratio is not None and ratio >= limit
            targets.append({"spec": r["spec"], "measure": key, "limit": limit, "ratio": ratio, "pass": ok})
    for key, limit in TARGETS:
        mine = [t for t in targets if t["measure"] == key]
        missed = [t["spec"] for t in mine if not t["pass"]]
        shown = ", ".join(f"{t['spec']} {t['ratio']:.2f}" if t["ratio"] is not None else f"{t['spec']} -"
                          for t in mine)
        verdict = "[green]PASS[/green]" if mine and not missed else f"[red]MISS[/red] ({', '.join(missed)})"
        console.print(f"target: MX fake_quantize {key.removeprefix('vs_')} >= {limit}x: {shown} {verdict}")
    write_json(args.json, {"environment": environment(), "clock": args.clock, "shape": [args.rows, args.cols],
                           "rounds": args.rounds,
                           "repeats": args.repeats, "warmup": args.warmup, "memcpy_melem_per_s": memcpy,
                           "torchao_to_mx_melem_per_s": ao, "rows": rows, "targets": targets,
                           "round_s": times})


if __name__ == "__main__":
    main()
