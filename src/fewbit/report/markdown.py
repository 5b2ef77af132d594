"""Markdown building blocks shared by every report: tables and the config section."""

from __future__ import annotations

from collections.abc import Sequence


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """The lines of a markdown table; the first ``left`` columns align left, the others right (numbers)."""
    align = ["---"] * left + ["---:"] * (len(columns) - left)
    return ["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def config_section(config: dict) -> list[str]:
    """The lines of a report's "Config" section: the config, one ``key: value`` a line."""
    return ["## Config", "", "```yaml", *(f"{k}: {v}" for k, v in config.items()), "```", ""]
