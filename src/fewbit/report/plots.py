"""Plots as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io


def figure(width: float = 7, height: float = 4.5):
    """A new (figure, axes) pair on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=120)


def png(fig) -> bytes:
    """``fig`` as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
