"""Where rendered output goes: a rich console sized for a terminal or for a pipe."""

from __future__ import annotations

import sys

from rich.console import Console


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr). Piped output gets a width that fits fewbit's tables rather than rich's
    80-column default."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr) if stream.isatty() else Console(stderr=stderr, width=140)
