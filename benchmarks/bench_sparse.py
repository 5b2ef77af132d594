"""Dense vs 2:4 sparse GEMMs at several shapes, and the storage 2:4 saves.

    python -m benchmarks.bench_sparse [--batch 64] [--json out/bench_sparse.json]

On a CUDA GPU with 2:4 sparse tensor cores (compute capability 8.0+), each shape is a Linear layer of (out, in)
weights pruned 2:4 by magnitude: ``F.linear`` with the dense masked weight against ``F.linear`` with its
``torch.sparse.to_sparse_semi_structured`` form, in float16, timed in the same run (the ratio is dense time over
sparse time: above 1 the sparse kernel is faster; torch's BERT tutorial measured 1.38x for one linear on an A100).
The sparse output is checked against the dense one first.

On a CPU there is no 2:4 hardware (and no sparse kernel in torch): the benchmark says so and reports the storage
saving only, kept values plus 2-bit positions against the dense bytes, in float16 and int8 (56.25% and 62.5%).
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import environment, time_it, write_json
from fewbit.sparsity import compress, nm_mask
from fewbit.sparsity.semi_structured import semi_structured_available

# (out_features, in_features): BERT-base's attention and FFN projections, a square GEMM, a skinny one.
SHAPES = [(768, 768), (3072, 768), (768, 3072), (4096, 4096), (128, 4096)]


def storage_rows() -> list[dict]:
    rows = []
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features)
        mask = nm_mask(w.abs())
        row = {"shape": [out_features, in_features]}
        for name, dtype in (("fp16", torch.float16), ("int8", torch.int8)):
            c = compress(w.to(dtype) if dtype != torch.int8 else (w * 20).round().clamp(-127, 127).to(dtype),
                         "2:4", mask)
            row[f"{name}_dense"] = c.dense_bytes
            row[f"{name}_compressed"] = c.nbytes
        rows.append(row)
    return rows


def gemm_rows(batch: int) -> list[dict]:
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, device="cuda", dtype=torch.float16)
        w = w * nm_mask(w.abs()).to(w.dtype)
        sparse = to_sparse_semi_structured(w)
        x = torch.randn(batch, in_features, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(F.linear(x, sparse), F.linear(x, w), rtol=2e-2, atol=2e-2)
        dense_s = time_it(lambda x=x, w=w: F.linear(x, w), repeats=50, warmup=10)
        sparse_s = time_it(lambda x=x, s=sparse: F.linear(x, s), repeats=50, warmup=10)
        flops = 2 * batch * out_features * in_features
        rows.append({"shape": [out_features, in_features], "batch": batch, "dense_us": dense_s * 1e6,
                     "sparse_us": sparse_s * 1e6, "speedup": dense_s / sparse_s,
                     "dense_tflops": flops / dense_s / 1e12})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="rows of the activation (tokens)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    console = Console()
    env = environment()
    console.print(env)
    payload = {"environment": env, "storage": storage_rows()}
    table = Table(title="2:4 storage: kept values + 2-bit positions vs dense")
    for column in ("shape", "fp16 dense", "fp16 2:4", "ratio", "int8 dense", "int8 2:4", "ratio "):
        table.add_column(column, justify="right")
    for r in payload["storage"]:
        table.add_row("x".join(map(str, r["shape"])), f"{r['fp16_dense']:,}", f"{r['fp16_compressed']:,}",
                      f"{r['fp16_compressed'] / r['fp16_dense']:.2%}", f"{r['int8_dense']:,}",
                      f"{r['int8_compressed']:,}", f"{r['int8_compressed'] / r['int8_dense']:.2%}")
    console.print(table)
    ok, why = semi_structured_available()
    if not ok:
        payload["gemm"] = None
        payload["gemm_skipped"] = why
        console.print(f"No 2:4 GEMM timing here: {why}. On this machine 2:4 sparsity saves storage only; "
                      "it does not make the GEMM faster.")
    else:
        payload["gemm"] = gemm_rows(args.batch)
        table = Table(title=f"float16 GEMM, batch {args.batch}: dense vs 2:4 semi-structured")
        for column in ("shape", "dense us", "2:4 us", "dense / 2:4", "dense TFLOP/s"):
            table.add_column(column, justify="right")
        for r in payload["gemm"]:
            table.add_row("x".join(map(str, r["shape"])), f"{r['dense_us']:.1f}", f"{r['sparse_us']:.1f}",
                          f"{r['speedup']:.2f}x", f"{r['dense_tflops']:.1f}")
        console.print(table)
    write_json(args.json, payload)


if __name__ == "__main__":
    main()
