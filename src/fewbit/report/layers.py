"""The per-layer summary of a converted model (:func:`fewbit.summary`'s :class:`~fewbit.nn.ModelSummary`) as a rich
table, and as plain text for logs and error messages."""

from __future__ import annotations

import io

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from fewbit.nn import ModelSummary

__all__ = ["model_summary_renderable", "model_summary_table", "model_summary_text"]

COLUMNS = ("layer", "type", "recipe", "weight", "input", "grad_output", "weight bytes", "quantized bytes")


def model_summary_table(record: ModelSummary) -> Table:
    """One row per quantized layer: name (``(model)`` for the model itself), type, recipe, the spec of each role
    (``-``: not quantized), and the weight bytes in float and as stored quantized."""
    table = Table(title=f"fewbit summary: {record.model}")
    for col in COLUMNS:
        table.add_column(col, justify="right" if "bytes" in col else "left")
    for row in record.rows:
        table.add_row(row.name or "(model)", row.type, row.recipe, row.weight, row.input, row.grad_output,
                      f"{row.float_bytes:,}", f"{row.quantized_bytes:,}")
    return table


def _footer(record: ModelSummary) -> list[str]:
    lines = []
    if record.skipped:
        lines.append(f"Not converted ({len(record.skipped)}):")
        lines += [f"  {name or '(model)'}: {reason}" for name, reason in record.skipped.items()]
    if record.float_bytes:
        ratio = record.float_bytes / max(record.quantized_bytes, 1)
        lines.append(f"weights: {record.float_bytes:,} bytes in float, {record.quantized_bytes:,} quantized "
                     f"({ratio:.2f}x smaller)")
    return lines


def model_summary_renderable(record: ModelSummary) -> Group:
    """The table, then every layer left in float with its reason, then the weight totals: what to
    ``console.print``."""
    return Group(model_summary_table(record), *(Text(line) for line in _footer(record)))


def model_summary_text(record: ModelSummary, width: int = 160) -> str:
    """:func:`model_summary_renderable` as plain text (no colour codes), ``width`` characters wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(model_summary_renderable(record))
    return console.file.getvalue()
