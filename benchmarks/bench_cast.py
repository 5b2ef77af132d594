"""Throughput of ``fewbit.cast`` for every format, beside torch's native FP8 round trip and ml_dtypes.

    python benchmarks/bench_cast.py [--numel 16777216] [--json out/bench_cast.json]

Reports M elements/s (float32 in, float32 out) and ratios to the baselines measured in the same run:
memcpy (``x.clone()``), torch's ``x.to(torch.float8_e4m3fn).float()`` round trip, and ml_dtypes'
``x.astype(dtype).astype(float32)`` for the same format (for integers, numpy's ``rint``, ``clip`` and ``astype``,
since ``astype`` alone truncates and wraps). Compilation happens in the untimed warm-up and is
reported separately.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import fewbit
from benchmarks.common import environment, time_it, write_json

try:
    import ml_dtypes

    ML = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp8_e5m2": ml_dtypes.float8_e5m2,
          "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp6_e3m2": ml_dtypes.float6_e3m2fn,
          "fp6_e2m3": ml_dtypes.float6_e2m3fn, "fp4_e2m1": ml_dtypes.float4_e2m1fn,
          "e8m0": ml_dtypes.float8_e8m0fnu}
except ImportError:  # the comparison column is left empty
    ML = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0)) * 4
    xn = x.numpy()
    mega = args.numel / 1e6
    memcpy = mega / time_it(lambda: x.clone())
    native = {name: mega / time_it(lambda d=dtype: x.to(d).float())
              for name, dtype in [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]}

    rows = []
    for name in fewbit.formats.names():
        start = time.perf_counter()
        fewbit.cast(x[:4096], name)
        compile_s = time.perf_counter() - start
        ours = mega / time_it(lambda n=name: fewbit.cast(x, n))
        ml = None
        fmt = fewbit.formats.get(name)
        with np.errstate(all="ignore"):
            if name in ML:
                ml = mega / time_it(lambda d=ML[name]: xn.astype(d).astype(np.float32), repeats=3, warmup=1)
            elif fmt.is_int:  # numpy's astype truncates and wraps; the same operation is rint, clip, astype
                ml = mega / time_it(lambda f=fmt: np.clip(np.rint(xn), f.min, f.max).astype(np.float32),
                                    repeats=3, warmup=1)
        rows.append({"format": name, "melem_per_s": ours, "compile_s": compile_s, "ml_dtypes_melem_per_s": ml,
                     "vs_ml_dtypes": ours / ml if ml else None, "vs_memcpy": ours / memcpy,
                     "vs_torch_native_fp8": ours / native[name] if name in native else None})

    console = Console(width=140)
    console.print(environment())
    table = Table(title=f"fewbit.cast throughput, {args.numel:,} float32 elements "
                        f"(memcpy {memcpy:.0f} M/s; torch native fp8 round trip: e4m3 {native['fp8_e4m3']:.0f}, "
                        f"e5m2 {native['fp8_e5m2']:.0f} M/s)")
    for col in ["format", "fewbit M/s", "x memcpy", "x torch native", "ml_dtypes M/s", "x ml_dtypes", "compile s"]:
        table.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        table.add_row(r["format"], f"{r['melem_per_s']:.0f}", f"{r['vs_memcpy']:.2f}",
                      f"{r['vs_torch_native_fp8']:.2f}" if r["vs_torch_native_fp8"] else "-",
                      f"{r['ml_dtypes_melem_per_s']:.0f}" if r["ml_dtypes_melem_per_s"] else "-",
                      f"{r['vs_ml_dtypes']:.1f}" if r["vs_ml_dtypes"] else "-", f"{r['compile_s']:.2f}")
    console.print(table)
    write_json(args.json, {"environment": environment(), "numel": args.numel, "memcpy_melem_per_s": memcpy,
                           "torch_native_melem_per_s": native, "rows": rows})


if __name__ == "__main__":
    main()
