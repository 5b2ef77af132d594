"""INT8 inference on onnxruntime (the QDQ model fewbit exports) against onnxruntime FP32 and PyTorch FP32.

    python -m benchmarks.bench_int8_onnx [--models resnet,mobilenet_v2,encoder] [--batches 64,1] [--threads 2]
                                         [--json out/bench_int8_onnx.json]

Models, with random weights (speed does not depend on them): fewbit's ResNet (16/32/64 channels, 2 blocks per stage)
and MobileNet-v2 (width 1, 512 head channels) at Fashion-MNIST's shape 1x28x28, and the encoder of the translation
Transformer of ``translate``'s quick config (d_model 128, 4 heads, 2 layers, d_ff 512) on 32-token inputs.
BatchNorm scales are drawn in [0.5, 1] (the models' initialisation zeroes the last one of each residual branch) and
its statistics are those of random inputs, as after training. Per model, in the same run:

- ``torch fp32``: the float model in eval mode under ``torch.inference_mode()``;
- ``ort fp32``: the float model exported to ONNX (the same exporter, opset 17), run by onnxruntime;
- ``ort int8``: BatchNorm folded, ``fewbit.quantize_(model, "int8")`` (attention's activation products left in
  float), calibrated (max, 4 batches), exported by ``fewbit.export_onnx`` and run by onnxruntime, which fuses the
  QDQ graph into integer kernels (the optimized graph's op counts are reported: ``QLinearConv``, ``QLinearAdd``,
  ``MatMulIntegerToFloat``... beside the float ops left).

Both sessions use ``GraphOptimizationLevel.ORT_ENABLE_ALL`` and ``--threads`` intra-op threads, as torch does.
``int8 vs fake quant`` is the mean |difference| over the outputs relative to their mean |value| (fewbit.export
explains where they differ), beside the same measure of INT8 itself (fake quant against FP32): random-weight deep
networks amplify small perturbations, so both grow with depth. Timing runs in rounds that visit every
configuration in turn (a busy neighbour slows all alike); each round takes the median of ``--repeats`` calls after
``--warmup``, and the table shows the median over rounds. The target (INT8 at least 1.5x faster than FP32 on
onnxruntime) is reported, never raised.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import fewbit
from benchmarks.common import environment, time_it, write_json
from fewbit.workloads.models import cnn
from fewbit.workloads.models.transformer import Seq2SeqTransformer, TransformerConfig

MODELS = ("resnet", "mobilenet_v2", "encoder")
TARGET = 1.5  # ort int8 at least this many times faster than ort fp32
INTEGER_OPS = ("QLinearConv", "QLinearAdd", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "MatMulInteger", "ConvInteger")
FLOAT_OPS = ("Conv", "FusedConv", "NchwcConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Add")
ENCODER = TransformerConfig(vocab_size=1000, d_model=128, heads=4, encoder_layers=2, decoder_layers=0, d_ff=512,
                            dropout=0.0, max_len=97)
ENCODER_TOKENS = 32


class Encoder(nn.Module):
    """The translation Transformer's encoder alone: ids (B, S) -> memory (B, S, C)."""

    def __init__(self, model: Seq2SeqTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: torch.Tensor) -> torch.Tensor:
        return self.model.encode(src)[0]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "encoder":
        return Encoder(Seq2SeqTransformer(ENCODER)).eval()
    model = cnn.build(name)
    g = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:  # no zero-initialised branch; statistics of the data, as after training
        nn.init.uniform_(m.weight, 0.5, 1.0)
        nn.init.uniform_(m.bias, -0.1, 0.1)
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        for _ in range(4):
            model.train()(torch.randn(64, 1, 28, 28, generator=g))
    return model.eval()


def example(name: str, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "encoder":
        return torch.randint(4, ENCODER.vocab_size, (batch, ENCODER_TOKENS), generator=g)  # ids past the specials
    return torch.randn(batch, 1, 28, 28, generator=g)


def int8_model(name: str, model: nn.Module) -> nn.Module:
    """BatchNorm folded, INT8 (attention's products in float), max-calibrated on 4 batches of 64 (on random data
    entropy calibration clips hard; speed does not depend on the calibrator)."""
    model = copy.deepcopy(model)
    fewbit.fold_batchnorm_(model)
    fewbit.quantize_(model, "int8", layer_recipes={"*.scores": None, "*.mix": None})
    fewbit.calibrate(model, [example(name, 64, seed) for seed in range(1, 5)], "max")
    return model


def float_onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


def session(model_bytes: bytes, threads: int, optimized: Path | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def summarize_ops(counts: dict[str, int]) -> str:
    integer = [f"{op} {counts[op]}" for op in INTEGER_OPS if counts.get(op)]
    floating = [f"{op} {counts[op]}" for op in FLOAT_OPS if counts.get(op)]
    return ", ".join(integer) + (f"; float: {', '.join(floating)}" if floating else "")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--batches", default="64,1", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    for name in models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    batches = [int(b) for b in args.batches.split(",") if b]
    torch.set_num_threads(args.threads)

    rows, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model = build(name)
            quantized = int8_model(name, model)
            fp32 = session(float_onnx(model, example(name, 2)), args.threads)
            optimized = Path(tmp) / f"{name}-int8.onnx"
            int8 = session(fewbit.export_onnx(model=quantized, example_input=example(name, 2)).SerializeToString(),
                           args.threads, optimized)
            ops = op_counts(optimized)
            for batch in batches:
                x = example(name, batch, seed=9)
                feed = {"input": x.numpy()}
                with torch.inference_mode():
                    fake, reference = quantized(x).numpy(), model(x).numpy()
                got = int8.run(None, feed)[0]
                calls: dict[str, Callable[[], object]] = {
                    "torch fp32": lambda m=model, x=x: _torch_call(m, x),
                    "ort fp32": lambda s=fp32, f=feed: s.run(None, f),
                    "ort int8": lambda s=int8, f=feed: s.run(None, f),
                }
                row = {"model": name, "batch": batch, "int8_vs_fake_quant": relative_error(got, fake),
                       "fake_quant_vs_fp32": relative_error(fake, reference), "int8_ops": ops}
                rows.append(row)
                runs.append((row, calls))
        times: dict[int, dict[str, list[float]]] = {id(row): {} for row, _ in runs}
        for _ in range(args.rounds):  # rounds interleave the configurations, so drift hits all alike
            for row, calls in runs:
                for config, fn in calls.items():
                    ms = 1e3 * time_it(fn, repeats=args.repeats, warmup=args.warmup)
                    times[id(row)].setdefault(config, []).append(ms)
    for row, _ in runs:
        for config, samples in times[id(row)].items():
            key = config.replace(" ", "_")
            row[f"{key}_ms"] = statistics.median(samples)
            row[f"{key}_spread_pct"] = 50 * (max(samples) - min(samples)) / statistics.median(samples)
        row["int8_speedup_vs_ort_fp32"] = row["ort_fp32_ms"] / row["ort_int8_ms"]
        row["int8_speedup_vs_torch_fp32"] = row["torch_fp32_ms"] / row["ort_int8_ms"]
        row["target_pass"] = row["int8_speedup_vs_ort_fp32"] >= TARGET

    console = Console(width=160)
    console.print(environment())
    import onnxruntime

    table = Table(title=f"Inference ms, onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads; median "
                        f"over {args.rounds} rounds of the median of {args.repeats}")
    for col in ["model", "batch", "torch fp32", "ort fp32", "ort int8", "int8 x ort fp32", "int8 x torch fp32",
                "int8 vs fake quant", "fake quant vs fp32", "target"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), f"{r['torch_fp32_ms']:.2f}", f"{r['ort_fp32_ms']:.2f}",
                      f"{r['ort_int8_ms']:.2f}", f"{r['int8_speedup_vs_ort_fp32']:.2f}",
                      f"{r['int8_speedup_vs_torch_fp32']:.2f}", f"{r['int8_vs_fake_quant']:.1e}",
                      f"{r['fake_quant_vs_fp32']:.1e}",
                      "[green]PASS[/green]" if r["target_pass"] else "[red]MISS[/red]")
    console.print(table)
    console.print(f"target: ort int8 >= {TARGET}x faster than ort fp32 (speedup = fp32 ms / int8 ms)")
    for name in models:
        ops = next(r["int8_ops"] for r in rows if r["model"] == name)
        console.print(f"{name} int8, onnxruntime's optimized graph: {summarize_ops(ops)}")
    payload = {"environment": environment(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
               "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup, "target": TARGET, "rows": rows}
    write_json(args.json, payload)
    return payload


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """Mean |got - expected| over mean |expected|."""
    return float(np.abs(got - expected).mean() / np.abs(expected).mean())


def _torch_call(model: nn.Module, x: torch.Tensor):
    with torch.inference_mode():
        return model(x)


if __name__ == "__main__":
    main()
