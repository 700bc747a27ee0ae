"""The comparison table: one row per connector, written for a terminal, as Markdown and as JSON.

Columns: overall exact match, exact match per question type (the types in order of first appearance), the
judge's accuracy and score when any row has them, trainable parameters, visual tokens per video, train
samples/s, peak memory and store bytes read per sample. A row without figures says why in its last column; the
``chance`` row (status "reference") has accuracies only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from dualfocus.compare.run import CHANCE, DONE
from dualfocus.evaluate.words import TYPE_WORDS

FIGURES = ("trainable params", "visual tokens/video", "train samples/s", "peak memory MiB", "store KiB/sample")
"""The columns after the accuracies (and the judge's)."""

def question_types(rows) -> list[str]:
    """Every question type of the rows' per-type figures, in order of first appearance."""
    return list(dict.fromkeys(t for r in rows for t in r.per_type))


def _has_judge(rows) -> bool:
    return any(r.judge_accuracy is not None for r in rows)


def header(rows) -> list[str]:
    judge = ["judge acc", "judge score"] if _has_judge(rows) else []
    return (["connector", "overall", *(TYPE_WORDS.get(t, t) for t in question_types(rows)), *judge,
             *FIGURES, "note"])


def _num(x, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def cells(row, types: list[str], judge: bool) -> list[str]:
    """One row's cells, in ``header`` order."""
    if row.status == CHANCE:  # accuracies only
        return [row.connector, _num(row.accuracy, ".3f"), *(_num(row.per_type.get(t), ".3f") for t in types),
                *[""] * (2 * judge + len(FIGURES)), row.message]
    if row.status != DONE:
        return [row.connector, *[""] * (1 + len(types) + 2 * judge + len(FIGURES)), f"{row.status}: {row.message}"]
    judge_cells = [_num(row.judge_accuracy, ".3f"), _num(row.judge_score, ".2f")] if judge else []
    memory = _num(row.peak_memory_mib, ",.0f") + (" (GPU)" if row.memory_kind == "cuda" else "")
    return [row.connector, _num(row.accuracy, ".3f"), *(_num(row.per_type.get(t), ".3f") for t in types),
            *judge_cells, _num(row.trainable_params, ","), _num(row.visual_tokens, ".1f"),
            _num(row.samples_per_s, ".1f"), memory,
            _num(None if row.bytes_per_sample is None else row.bytes_per_sample / 1024, ",.1f"), ""]


def render_markdown(rows) -> str:
    types, judge = question_types(rows), _has_judge(rows)
    head = header(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r, types, judge)) + " |" for r in rows]
    return "\n".join(lines)


def render_terminal(rows, console) -> None:
    from rich.table import Table

    types, judge = question_types(rows), _has_judge(rows)
    table = Table(show_lines=False)
    for i, name in enumerate(header(rows)[:-1]):  # the notes go below the table, whole
        table.add_column(name, justify="left" if i == 0 else "right", overflow="fold")
    for r in rows:
        table.add_row(*cells(r, types, judge)[:-1])
    console.print(table)
    for r in rows:
        if r.status != DONE:
            note = r.message if r.status == CHANCE else f"{r.status}: {r.message}"
            console.print(f"{r.connector}: {note}", markup=False, soft_wrap=True)


def write_json(rows, cfg, path: Path) -> Path:
    """``{"types": [...], "rows": [Row as a dict, ...], "config": {...}}``."""
    from dualfocus.pipeline.config import config_to_dict

    data = {"types": question_types(rows), "rows": [asdict(r) for r in rows], "config": config_to_dict(cfg)}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
