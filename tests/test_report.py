"""fewbit.report renders plain records: the study and ptq tables, markdown and plot, the catalog tables."""

from __future__ import annotations

import io

from rich.console import Console

from fewbit import formats, recipes
from fewbit.report import catalog, markdown, ptq, study

STUDY = {"workload": "lm", "metric": "perplexity", "higher_is_better": False, "secondary": "bits_per_byte",
         "split": "test", "config": {"steps": 4},
         "baseline": {"path": "/cache/b", "train": {"steps": 4, "seconds": 1.0}},
         "results": [{"recipe": "fp32", "metric": 5.5, "delta": 0.0, "bits_per_weight": 32.0, "weight_bytes": 4000,
                      "seconds": 0.1, "metrics": {"bits_per_byte": 2.46}},
                     {"recipe": "mxfp4", "metric": 6.25, "delta": 0.75, "bits_per_weight": 4.25, "weight_bytes": 900,
                      "seconds": 0.2, "metrics": {"bits_per_byte": 2.64}}]}


def text(renderable) -> str:
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_study_table_markdown_and_plot():
    shown = text(study.table(STUDY))
    assert "perplexity: lower is better" in shown and "+0.75" in shown and "2.6400" in shown and "900" in shown
    md = study.markdown(STUDY)
    assert "| mxfp4 | 6.25 | +0.75 | 2.6400 | 4.25 | 900 |" in md and "(lower is better)" in md
    assert "![perplexity vs bits per weight](perplexity_vs_bits.png)" in md and "steps: 4" in md
    assert study.plot(STUDY)[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_table_aligns_numbers_right():
    assert markdown.table(["a", "b"], [["x", "1"]]) == ["| a | b |", "|---|---:|", "| x | 1 |"]


def test_ptq_calibration_tables_name_the_choice_and_the_layers_left_in_float():
    report = {"recipe": "int8", "float_metric": 90.0, "higher_is_better": True, "tolerance": 0.01,
              "calibrator_metrics": {"max": 88.0, "entropy": 89.5}, "chosen_calibrator": "entropy",
              "sensitivity": {"head": 85.0, "body": 89.9}, "float_layers": ["head"], "final_metric": 89.4,
              "within_tolerance": True, "seconds": 2.0}
    shown = "\n".join(text(part) for part in ptq.calibration_tables(report))
    assert "entropy (chosen)" in shown and "89.5" in shown and "tolerance 1.00%" in shown
    assert "final metric 89.4 (within tolerance), 1 layer(s) left in float, 2.0 s" in shown
    head_row = next(line for line in shown.splitlines() if "head" in line)
    assert "yes" in head_row and "yes" not in next(line for line in shown.splitlines() if "body" in line)


def test_catalog_tables_list_every_format_and_recipe():
    shown = text(catalog.formats_table([formats.get(n) for n in formats.names()]))
    assert all(name in shown for name in formats.names()) and "448" in shown
    rows = [recipes.get(n) for n in recipes.names(include_training=True)]
    shown = text(catalog.recipes_table(rows))
    assert "fp16_pure" in shown and "float16 / float32" in shown
