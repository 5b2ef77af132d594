"""``fewbit bench`` records rendered: the table of a bench or a sweep (performance beside accuracy, as the MLPerf
Inference paper reports them), its markdown, and the latency-distribution plot.

A record is what ``bench.json`` holds (:func:`fewbit.bench.run`): ``scenario``, ``recipe``, ``backend``,
``result`` (VALID / INVALID / None for an accuracy-only bench), ``reasons``, ``metric_name``, ``metric``,
``unit``, ``latency_ns`` (percentiles), ``accuracy``, ``eval``, ``fp32_accuracy``, ``accuracy_ok``; a sweep
row that did not run has ``skipped`` with the reason instead.
"""

from __future__ import annotations

from rich.table import Table

from fewbit.report import markdown as md
from fewbit.report import plots

PLOT_NAME = "latency.png"
COLUMNS = ["recipe", "backend", "scenario", "result", "metric", "p50 ms", "p99 ms", "accuracy", "FP32",
           "accuracy ok", "= eval"]
PERCENTILES = ["p50", "p90", "p95", "p97", "p99", "p99.9"]


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return f"{value:.{digits}g}" if isinstance(value, float | int) else str(value)


def row(record: dict) -> list[str]:
    """One record's cells, in :data:`COLUMNS` order."""
    if "skipped" in record:
        return [record["recipe"], record["backend"], record["scenario"], "skipped", record["skipped"], *["-"] * 6]
    latency = record.get("latency_ns") or {}
    metric = "-" if record.get("metric") is None else f"{_number(record['metric'])} {record['unit']}"
    result = record.get("result") or "-"
    if record.get("reasons"):
        result += " (" + "; ".join(record["reasons"]) + ")"
    return [record["recipe"], record["backend"], record["scenario"], result, metric,
            _number(latency.get("p50", 0) / 1e6 if "p50" in latency else None),
            _number(latency.get("p99", 0) / 1e6 if "p99" in latency else None),
            _number(record.get("accuracy")), _number(record.get("fp32_accuracy")),
            _number(record.get("accuracy_ok")), _number(record.get("accuracy_equals_eval"))]


def _records(result: dict) -> list[dict]:
    return result["records"] if "records" in result else [result]


def table(result: dict) -> Table:
    """A bench record or a sweep (``{"records": [...]}``) as a rich table."""
    records = _records(result)
    first = records[0] if records else {}
    table = Table(title=f"fewbit bench {first.get('workload', '')}: performance beside accuracy "
                        f"({first.get('accuracy_metric', 'metric')})")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("recipe", "backend", "scenario", "result") else "right")
    for record in records:
        table.add_row(*row(record))
    return table


def markdown(result: dict) -> str:
    """The table as markdown, with where the logs are."""
    records = _records(result)
    lines = [f"# fewbit bench {records[0]['workload'] if records else ''}", ""]
    lines += md.table(COLUMNS, [row(r) for r in records], left=4)
    lines += ["", "LoadGen's logs: " + ", ".join(f"`{r['out']}`" for r in records if "out" in r), ""]
    return "\n".join(lines)


def latency_plot(result: dict) -> bytes:
    """Latency percentiles (p50 ... p99.9, milliseconds, log scale) of every record that has them, one line each,
    as PNG bytes."""
    fig, ax = plots.figure()
    drawn = 0
    for record in _records(result):
        latency = record.get("latency_ns") or {}
        points = [(p, latency[p] / 1e6) for p in PERCENTILES if p in latency]
        if points:
            ax.plot([p for p, _ in points], [v for _, v in points], marker="o",
                    label=f"{record['recipe']} / {record['backend']} ({record['scenario']})")
            drawn += 1
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title("latency distribution (LoadGen)")
    if drawn:
        ax.legend(fontsize=7)
    return plots.png(fig)
