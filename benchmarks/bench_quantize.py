"""Fake-quantization throughput for every MX spec, per-tensor FP8 and per-channel INT8, beside memcpy and torchao.

    python -m benchmarks.bench_quantize [--rows 4096 --cols 4096] [--json out/bench_quantize.json]

Reports M elements/s on a float32 (rows, cols) tensor (16M elements by default) and ratios to ``x.clone()`` and to
torchao's ``to_mx`` (E4M3 and each spec's own element type), all measured in this run. Compilation happens in the
untimed warm-up and is reported separately.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table

import fewbit
from benchmarks.common import environment, time_it, write_json

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    mega = x.numel() / 1e6
    memcpy = mega / time_it(lambda: x.clone())
    ao = {name: mega / time_it(lambda f=fn: f(x), repeats=3) for name, fn in torchao_to_mx().items()}
    ao_e4m3 = ao.get("mxfp8_e4m3")

    rows = []
    for name in SPECS:
        start = time.perf_counter()
        fewbit.fake_quantize(x[:8], name)
        compile_s = time.perf_counter() - start
        fake = mega / time_it(lambda n=name: fewbit.fake_quantize(x, n))
        quant = mega / time_it(lambda n=name: fewbit.quantize(x, n), repeats=3)
        rows.append({"spec": name, "fake_quantize_melem_per_s": fake, "quantize_melem_per_s": quant,
                     "compile_s": compile_s, "vs_memcpy": fake / memcpy,
                     "vs_torchao_to_mx_e4m3": fake / ao_e4m3 if ao_e4m3 else None,
                     "torchao_to_mx_same_format_melem_per_s": ao.get(name)})

    console = Console(width=150)
    console.print(environment())
    title = (f"fewbit.fake_quantize throughput, ({args.rows}, {args.cols}) float32; memcpy {memcpy:.0f} M/s; "
             f"torchao to_mx E4M3 {ao_e4m3:.0f} M/s" if ao_e4m3 else f"memcpy {memcpy:.0f} M/s; torchao absent")
    table = Table(title=title)
    for col in ["spec", "fake_quantize M/s", "x memcpy", "x torchao E4M3", "quantize M/s", "torchao same fmt M/s",
                "compile s"]:
        table.add_column(col, justify="left" if col == "spec" else "right")
    for r in rows:
        ao_same = r["torchao_to_mx_same_format_melem_per_s"]
        table.add_row(r["spec"], f"{r['fake_quantize_melem_per_s']:.0f}", f"{r['vs_memcpy']:.2f}",
                      f"{r['vs_torchao_to_mx_e4m3']:.2f}" if r["vs_torchao_to_mx_e4m3"] else "-",
                      f"{r['quantize_melem_per_s']:.0f}", f"{ao_same:.0f}" if ao_same else "-",
                      f"{r['compile_s']:.2f}")
    console.print(table)
    write_json(args.json, {"environment": environment(), "shape": [args.rows, args.cols],
                           "memcpy_melem_per_s": memcpy, "torchao_to_mx_melem_per_s": ao, "rows": rows})


if __name__ == "__main__":
    main()
