"""``fewbit ttq`` records rendered: the table (rich) and the markdown report.

A ttq record (what ``ttq.json`` holds): ``workload``, ``target`` (``metric``, ``target``, ``higher_is_better``,
``eval_every``, ``describe``), ``config``, ``overrides``, ``runs`` per recipe and ``results``: one row per recipe
with ``recipe``, ``score`` (``runs``, ``converged``, ``valid``, ``reason``, ``seconds``, ``samples``, ``steps``,
``rcp``: the RCP verdict) and ``runs`` (each run's ``seed``, ``status``, ``reason``, ``seconds``,
``samples_to_target``, ``final_metric``, ``log_path``, ``compliance``).
"""

from __future__ import annotations

from rich.table import Table

from fewbit.report import markdown as md

COLUMNS = ["recipe", "runs converged", "olympic time s", "olympic samples", "RCP", "final metric", "compliance"]


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _final(runs: list[dict]) -> str:
    values = [r["final_metric"] for r in runs if r.get("final_metric") is not None]
    if not values:
        return "-"
    return f"{sum(values) / len(values):.4g}" if len(values) > 1 else f"{values[0]:.4g}"


def _compliance(runs: list[dict]) -> str:
    checked = [r["compliance"]["passed"] for r in runs if r.get("compliance") is not None]
    return f"{sum(checked)}/{len(checked)} pass" if checked else "-"


def cells(record: dict) -> list[list[str]]:
    rows = []
    for row in record["results"]:
        s = row["score"]
        time = _number(s["seconds"], ".1f") if s["valid"] else "invalid"
        samples = _number(s["samples"], ",.0f") if s["samples"] is not None else "invalid"
        rcp = s["rcp"]["status"] if s.get("rcp") else "-"
        rows.append([row["recipe"], f"{s['converged']}/{s['runs']}", time, samples, rcp, _final(row["runs"]),
                     _compliance(row["runs"])])
    return rows


def notes(record: dict) -> list[str]:
    """One line per recipe whose score is invalid or whose runs did not all converge, and the RCP messages."""
    lines = []
    for row in record["results"]:
        s = row["score"]
        if not s["valid"]:
            lines.append(f"{row['recipe']}: score invalid: {s['reason']}")
        elif s["reason"]:
            lines.append(f"{row['recipe']}: {s['reason']}")
        for run in row["runs"]:
            if run["status"] != "success":
                lines.append(f"{row['recipe']} seed {run['seed']}: aborted: {run['reason']}")
        if s.get("rcp") and s["rcp"]["status"] != "pass":
            lines.append(f"{row['recipe']}: RCP {s['rcp']['status']}: {s['rcp']['message']}")
    return lines


def table(record: dict) -> Table:
    t = Table(title=f"fewbit ttq: {record['workload']} to {record['target']['describe']} "
                    f"(evaluated every {record['target']['eval_every']} steps)", title_style="bold")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col == "recipe" else "right")
    for row in cells(record):
        t.add_row(*row)
    return t


def markdown(record: dict) -> str:
    lines = [
        f"# fewbit ttq: {record['workload']}",
        "",
        f"Time to quality, MLPerf Training style: each run trains from scratch until {record['target']['describe']} "
        f"on the {record['target']['split']} split (evaluated every {record['target']['eval_every']} steps, on the "
        "clock), timed from run_start to run_stop; initialization (model build, layer conversion, compilation, a "
        "warm-up on synthetic input) is untimed. Olympic score: the fastest and the slowest run dropped, the rest "
        "averaged; one non-converged run counts as the slowest, more than one makes the score invalid. RCP: the "
        "olympic samples to target against fewbit's FP32 reference (one-sided t-test at 0.05).",
        "",
        *md.table(COLUMNS, cells(record)),
        "",
        *[f"- {line}" for line in notes(record)],
        "",
        "## Runs",
        "",
        *md.table(["recipe", "seed", "status", "seconds", "init s", "samples to target", "final metric", "log"],
                  [[row["recipe"], str(r["seed"]), r["status"], f"{r['seconds']:.1f}", f"{r['init_seconds']:.1f}",
                    _number(r["samples_to_target"], ",d"), _number(r["final_metric"], ".4g"),
                    f"`{r['log_path']}`" if r.get("log_path") else "-"]
                   for row in record["results"] for r in row["runs"]]),
        "",
        *md.config_section(record["config"]),
    ]
    return "\n".join(lines)
