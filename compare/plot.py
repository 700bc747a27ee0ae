"""The comparison picture: exact match per question type as grouped bars, and every loss curve on one plot."""

from __future__ import annotations

from pathlib import Path


def plot_comparison(rows, metrics: dict[str, Path], out_path: Path) -> Path:
    """Left: bars per (type, connector) for the finished rows, overall first, and the chance row as dashed ticks.
    Right: loss against step for each run in ``metrics`` (connector -> metrics.jsonl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dualfocus.compare.run import CHANCE, DONE
    from dualfocus.compare.table import question_types
    from dualfocus.train.plot import read_losses

    done = [r for r in rows if r.status == DONE]
    groups = ["overall", *question_types(done)]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(done), 1)
    for i, r in enumerate(done):
        values = [r.accuracy or 0.0, *((r.per_type.get(t) or 0.0) for t in groups[1:])]
        bars.bar([g + (i - (len(done) - 1) / 2) * width for g in range(len(groups))], values, width, label=r.connector)
    for r in rows:
        if r.status == CHANCE:  # chance: a black tick across each group
            values = [r.accuracy, *(r.per_type.get(t) for t in groups[1:])]
            for g, v in enumerate(values):
                if v is not None:
                    bars.hlines(v, g - 0.45, g + 0.45, colors="black", linestyles="dashed", lw=1,
                                label=r.connector if g == 0 else None)
    bars.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    bars.set_ylim(0, 1)
    bars.set_ylabel("exact match (held-out)")
    bars.set_title("accuracy per question type")
    bars.grid(axis="y", alpha=0.3)
    if bars.get_legend_handles_labels()[0]:
        bars.legend(fontsize=8)
    for name, path in metrics.items():
        if Path(path).is_file():
            steps, losses = read_losses(path)
            curves.plot(steps, losses, lw=1.2, label=name)
    curves.set_xlabel("optimiser step")
    curves.set_ylabel("loss (answer tokens)")
    curves.set_title("training loss")
    curves.grid(alpha=0.3)
    if metrics:
        curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
