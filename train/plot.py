"""Loss curve PNG from metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_loss(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Plot loss against step for every line of ``metrics_path``; returns ``out_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {}
    for line in Path(metrics_path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            points[rec["step"]] = rec["loss"]  # a resumed run may rewrite a step; keep the last
    steps = sorted(points)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [points[s] for s in steps], lw=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title("dualfocus train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
