"""Gradient statistics: per-layer histograms of log2|g| and the share of gradients a narrow format would lose.

Reproduces the mixed precision paper's gradient histogram: much of the mass lies below fp16's smallest subnormal
(2^-24), where it would flush to zero without loss scaling. Values are recorded unscaled (after the loss scale is
divided out). ``save`` writes ``grad_stats.json`` and, with matplotlib installed, ``grad_stats.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fewbit import formats

BINS = torch.arange(-60, 21)  # log2 |g| bin edges, one binade per bin
UNDERFLOW = {"fp16": formats.get("fp16").min_subnormal, "fp8_e5m2": formats.get("fp8_e5m2").min_subnormal}


class GradientStatistics:
    def __init__(self, model: torch.nn.Module) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.records: list[dict] = []

    def record(self, step: int, master: list[torch.Tensor] | None = None) -> None:
        grads = [m.grad for m in master] if master is not None else [p.grad for p in self.params]
        layers = {}
        for name, g in zip(self.names, grads, strict=False):
            if g is None:
                continue
            a = g.detach().abs().float().flatten()
            nonzero = a[a > 0]
            hist = torch.histc(torch.log2(nonzero), bins=len(BINS) - 1, min=float(BINS[0]), max=float(BINS[-1])) \
                if nonzero.numel() else torch.zeros(len(BINS) - 1)
            layers[name] = {
                "histogram": hist.tolist(), "zeros": int(a.numel() - nonzero.numel()), "count": int(a.numel()),
                **{f"below_{fmt}": float((nonzero < tiny).float().mean()) if nonzero.numel() else 0.0
                   for fmt, tiny in UNDERFLOW.items()},
            }
        self.records.append({"step": step, "layers": layers})

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "grad_stats.json"
        path.write_text(json.dumps({"bin_edges_log2": BINS.tolist(), "records": self.records}))
        try:
            self._plot(directory / "grad_stats.png")
        except ImportError:
            pass
        return path

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.records:
            return
        total = torch.zeros(len(BINS) - 1)
        for layer in self.records[-1]["layers"].values():
            total += torch.tensor(layer["histogram"])
        fig, ax = plt.subplots(figsize=(8, 4))
        centers = (BINS[:-1] + 0.5).tolist()
        ax.bar(centers, (total / max(total.sum().item(), 1)).tolist(), width=1.0)
        for fmt, tiny in UNDERFLOW.items():
            x = float(torch.log2(torch.tensor(tiny)))
            ax.axvline(x, linestyle="--", color="red" if fmt == "fp16" else "orange", label=f"{fmt} min subnormal")
        ax.set_xlabel("log2 |gradient|")
        ax.set_ylabel("fraction of gradient values")
        ax.set_title(f"gradient histogram, step {self.records[-1]['step']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
