"""fewbit.report.layers: the summary record rendered as a rich table and as plain text."""

from __future__ import annotations

import io

from rich.console import Console
from torch import nn

import fewbit
from fewbit.nn import LayerRow, ModelSummary
from fewbit.report.layers import COLUMNS, model_summary_renderable, model_summary_table, model_summary_text

RECORD = ModelSummary(
    model="Net",
    rows=(LayerRow(name="fc", type="QLinear", recipe="mxfp8", weight="mxfp8_e4m3", input="mxfp8_e4m3",
                   grad_output="mxfp8_e5m2", float_bytes=8192, quantized_bytes=2112, weights=2048),
          LayerRow(name="", type="QMatmul", recipe="fp8", weight="-", input="fp8_e4m3", grad_output="fp8_e5m2",
                   float_bytes=0, quantized_bytes=0, weights=0)),
    skipped={"embed": "Embedding has no quantized version (kept in float)"})


def test_table_has_one_row_per_layer_and_the_columns():
    table = model_summary_table(RECORD)
    assert table.title == "fewbit summary: Net"
    assert [c.header for c in table.columns] == list(COLUMNS)
    assert table.row_count == 2
    cells = [list(c.cells) for c in table.columns]
    assert cells[0] == ["fc", "(model)"] and cells[-2] == ["8,192", "0"] and cells[-1] == ["2,112", "0"]


def test_text_lists_rows_skipped_layers_and_totals():
    text = model_summary_text(RECORD)
    lines = text.splitlines()
    assert "fewbit summary: Net" in lines[0]
    row = next(line for line in lines if " fc " in line)
    for cell in ["QLinear", "mxfp8", "mxfp8_e4m3", "mxfp8_e5m2", "8,192", "2,112"]:
        assert cell in row
    assert "Not converted (1):" in lines
    assert "  embed: Embedding has no quantized version (kept in float)" in lines
    assert lines[-1] == "weights: 8,192 bytes in float, 2,112 quantized (3.88x smaller)"
    assert "\x1b" not in text and max(len(line) for line in lines) <= 160


def test_a_float_model_renders_an_empty_table_without_totals():
    text = model_summary_text(fewbit.summary(nn.Linear(2, 2)), width=80)
    assert "fewbit summary: Linear" in text and "Not converted" not in text and "weights:" not in text


def test_renderable_prints_on_a_console():
    console = Console(file=io.StringIO(), width=120)
    console.print(model_summary_renderable(RECORD))
    assert "Not converted (1):" in console.file.getvalue()
