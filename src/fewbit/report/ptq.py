"""``fewbit ptq`` records rendered: the calibrator and sensitivity tables, the summary table, the markdown report.

The record is what ``ptq.json`` holds: the :class:`fewbit.PTQReport` fields (``recipe``, ``float_metric``,
``calibrator_metrics``, ``chosen_calibrator``, ``sensitivity``, ``float_layers``, ``final_metric``,
``within_tolerance``, ...) plus ``workload``, ``metric``, ``split``, ``limit``, ``tolerance_rule``, ``test``
(float and quantized metrics on the test split), ``calibration``, ``folded_batchnorms``, ``checkpoint``,
``config``, ``qat`` and, with ``--onnx``, ``onnx``.
"""

from __future__ import annotations

import json

from rich.table import Table

from fewbit.report import markdown as md


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float | int) else str(value)


def calibration_tables(report: dict) -> list:
    """What PTQ did, as rich renderables: the float metric, every calibrator's metric, the sensitivity ranking
    (when it was needed) and the final verdict."""
    direction = "higher" if report["higher_is_better"] else "lower"
    out: list = [f"PTQ ({report['recipe']}): float metric {report['float_metric']:.6g} ({direction} is better), "
                 f"tolerance {report['tolerance']:.2%}"]
    table = Table(title="calibrators")
    table.add_column("calibrator")
    table.add_column("metric", justify="right")
    for method, metric in report["calibrator_metrics"].items():
        chosen = " (chosen)" if method == report["chosen_calibrator"] else ""
        table.add_row(method + chosen, f"{metric:.6g}" if isinstance(metric, float) else str(metric))
    out.append(table)
    if report["sensitivity"]:
        table = Table(title="sensitivity (metric with only this layer quantized)")
        table.add_column("layer")
        table.add_column("metric", justify="right")
        table.add_column("left in float")
        for name, metric in report["sensitivity"].items():
            table.add_row(name, _cell(metric), "yes" if name in report["float_layers"] else "")
        out.append(table)
    verdict = "within" if report["within_tolerance"] else "NOT within"
    out.append(f"final metric {report['final_metric']:.6g} ({verdict} tolerance), {len(report['float_layers'])} "
               f"layer(s) left in float, {report['seconds']:.1f} s")
    return out


def _rows(record: dict) -> list[list[str]]:
    metric = record["metric"]
    rows = [[f"{record['split']} (decides)", _cell(record["float_metric"]), _cell(record["final_metric"])],
            ["test", _cell(record["test"]["float"][metric]), _cell(record["test"]["quantized"][metric])]]
    if "onnx" in record:
        rows.append(["test, onnxruntime INT8", "", _cell(record["onnx"]["test"][metric])])
    return rows


def summary_table(record: dict) -> Table:
    table = Table(title=f"fewbit ptq: {record['workload']} ({record['recipe']}), {record['metric']}")
    for column in ("split", "fp32", record["recipe"]):
        table.add_column(column, justify="left" if column == "split" else "right")
    for row in _rows(record):
        table.add_row(*row)
    return table


def markdown(record: dict) -> str:
    metric, recipe = record["metric"], record["recipe"]
    calibration = record["calibration"]
    verdict = "within" if record["within_tolerance"] else "**not** within"
    qat = record.get("qat")
    lines = [
        f"# fewbit ptq: {record['workload']}, {recipe}",
        "",
        f"Metric: **{metric}**. The calibrator and the layers left in float are chosen on the {record['split']} "
        f"split ({record['limit'] or 'all'} examples); the test split is reported beside it.",
        "",
        *md.table(["split", "fp32", recipe], _rows(record)),
        "",
        f"Final {metric} is {verdict} the tolerance: {record['tolerance_rule']}, tolerance {record['tolerance']:g}. "
        + (f"Quantization-aware fine-tuning ({qat['steps']} steps at lr {qat['lr']:g}) moved it "
           f"from {qat['metric_before']:.4g} to {qat['metric_after']:.4g}. " if qat else "")
        + f"{len(record['float_layers'])} layer(s) left in float"
        + (f": {', '.join(f'`{n}`' for n in record['float_layers'])}." if record["float_layers"] else "."),
        "",
        "## Calibrators",
        "",
        f"One pass over {calibration['batches']} training batches ({calibration['examples']} examples, the "
        f"training batches of steps {calibration['first_step']} to "
        f"{calibration['first_step'] + calibration['batches'] - 1}, after the FP32 run's last), then each "
        f"calibrator on the same histograms. Chosen: **{record['chosen_calibrator']}**.",
        "",
        *md.table(["calibrator", metric], [[m, _cell(v)] for m, v in record["calibrator_metrics"].items()]),
        "",
    ]
    if record["sensitivity"]:
        lines += ["## Sensitivity", "", f"{metric} with only this layer quantized, most sensitive first.", "",
                  *md.table(["layer", metric, "left in float"],
                            [[f"`{n}`", _cell(v), "yes" if n in record["float_layers"] else ""]
                             for n, v in record["sensitivity"].items()]),
                  ""]
    lines += [
        "## Run",
        "",
        f"- FP32 model: `{record['checkpoint']}`",
        f"- BatchNorm layers folded: {len(record['folded_batchnorms'])}",
        f"- not calibrated: {json.dumps(record['skipped'])}",
        f"- {record['seconds']:.1f} s in ptq, {record['total_seconds']:.1f} s in all",
        "",
        *md.config_section(record["config"]),
    ]
    return "\n".join(lines)
