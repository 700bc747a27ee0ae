"""Loss curve PNG from metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def read_losses(metrics_path: str | Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a run's metrics.jsonl; a step written twice (a resumed run) keeps its last value."""
    points = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            points[rec["step"]] = rec["loss"]
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot loss against step for every line of ``metrics_path``; returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = read_losses(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("dualfocus train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
