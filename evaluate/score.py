"""``dualfocus score``: join predictions with reference answers and write a metrics report.

Predictions are JSONL (or a JSON list) of ``{"question_id", "video_id", "question", "pred"}``; answers
are the zero-shot QA ``test_a.json`` list ``[{"answer", "type", "question_id"}]`` or JSONL with the same
keys (``type`` optional). Question ids are compared as strings, so ``7`` and ``"7"`` match.

The offline metrics (normalised exact match and contains, see ``metrics.py``) are always computed; the
LLM-judge metrics are added when ``judge.url`` is set. Report layout::

    {
      "predictions": str, "answers": str,                    # input paths
      "counts": {"predictions", "answers", "matched", "only_in_predictions", "only_in_answers"},
      "unmatched": {"only_in_predictions": [id], "only_in_answers": [id]},
      "overall":  {"n", "exact_match", "contains", "judge": null | JudgeMetrics},
      "per_type": {type: {...same as overall...}},          # {} when per_type is off or no types
      "judge": null | {"url", "model", "cache", "n_requests", "n_cached",
                       "unjudged": [{"question_id", "reason"}]},
      "config": {...the resolved ScoreConfig...}
    }
    JudgeMetrics = {"n_judged", "n_unjudged", "n_yes", "n_no", "accuracy", "score"}

Accuracies are fractions in [0, 1]; the judge score is a mean on the 0-5 scale; None where no item
counts.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dualfocus.evaluate.judge import JudgeConfig, JudgeItem, run_judge
from dualfocus.evaluate.metrics import offline_metrics
from dualfocus.pipeline.config import ConfigError
from dualfocus.pipeline.errors import UserError
from dualfocus.pipeline.json_records import read_json_records

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge; used only when judge.url is set."""
    per_type: bool = True
    """Also break every metric down by question type (the answers' "type" field)."""


# ----------------------------------------------------------------------------------------------
# reading inputs


def _index(path: Path, records: list[tuple[str, dict]], required: tuple[str, ...]) -> dict[str, dict]:
    """question_id (as a string) -> record; missing keys and duplicate ids are errors."""
    out: dict[str, dict] = {}
    seen_at: dict[str, str] = {}
    for where, obj in records:
        missing = [k for k in required if k not in obj]
        if missing:
            raise UserError(f"{path}: {where} lacks {', '.join(repr(k) for k in missing)}")
        qid = str(obj["question_id"]).strip()
        if qid in out:
            raise UserError(f"{path}: question_id {qid!r} appears twice ({seen_at[qid]} and {where})")
        out[qid], seen_at[qid] = obj, where
    return out


def load_predictions(path: str | Path) -> dict[str, dict]:
    """question_id -> prediction record (needs ``question_id`` and ``pred``)."""
    path = Path(path)
    return _index(path, read_json_records(path), ("question_id", "pred"))


def load_answers(path: str | Path) -> dict[str, dict]:
    """question_id -> answer record (needs ``question_id`` and ``answer``; ``type`` optional)."""
    path = Path(path)
    return _index(path, read_json_records(path), ("question_id", "answer"))


# ----------------------------------------------------------------------------------------------
# stage


def default_cache_path(out_path: str | Path) -> Path:
    """Where judge verdicts are cached when judge.cache is unset: beside the report."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".judge_cache.jsonl")


def run_score(preds_path: str | Path, answers_path: str | Path, out_path: str | Path, cfg: ScoreConfig,
              progress: bool = True) -> dict[str, Any]:
    """Score predictions against answers, write the JSON report to ``out_path`` and return it.

    Raises ConfigError for an invalid ``cfg``, UserError for malformed or unreadable inputs, when no
    question id is shared by both files or when the report cannot be written, and judge.JudgeError (also
    a UserError) when the judge stops the run (the verdicts obtained are kept in the cache; no report is
    written). Every message is one line naming the file or key.
    """
    problems = [f"judge.{p}" for p in cfg.judge.check()]
    if problems:
        raise ConfigError(problems)
    preds_path, answers_path, out_path = Path(preds_path), Path(answers_path), Path(out_path)
    preds = load_predictions(preds_path)
    answers = load_answers(answers_path)

    matched = [qid for qid in preds if qid in answers]
    only_preds = [qid for qid in preds if qid not in answers]
    only_answers = [qid for qid in answers if qid not in preds]
    if not matched:
        raise UserError(f"no question_id is shared by {preds_path} ({len(preds)} predictions) and "
                        f"{answers_path} ({len(answers)} answers); e.g. {only_preds[:3]} vs {only_answers[:3]}")
    if only_preds or only_answers:
        log.warning("%d prediction(s) have no answer and %d answer(s) have no prediction",
                    len(only_preds), len(only_answers))

    items = []
    for qid in matched:
        qtype = answers[qid].get("type")
        items.append({"question_id": qid, "question": preds[qid].get("question"),
                      "pred": "" if preds[qid]["pred"] is None else str(preds[qid]["pred"]),
                      "answer": str(answers[qid]["answer"]),
                      "type": None if qtype is None else str(qtype)})
    metrics = offline_metrics(items, per_type=cfg.per_type)
    report: dict[str, Any] = {
        "predictions": str(preds_path),
        "answers": str(answers_path),
        "counts": {"predictions": len(preds), "answers": len(answers), "matched": len(matched),
                   "only_in_predictions": len(only_preds), "only_in_answers": len(only_answers)},
        "unmatched": {"only_in_predictions": only_preds, "only_in_answers": only_answers},
        "overall": {**metrics["overall"], "judge": None},
        "per_type": {t: {**m, "judge": None} for t, m in metrics["per_type"].items()},
        "judge": None,
        "config": asdict(cfg),
    }

    if cfg.judge.url is not None:
        no_question = [qid for qid in matched if not isinstance(preds[qid].get("question"), str)]
        if no_question:
            raise UserError(f"{preds_path}: {len(no_question)} prediction(s) have no 'question' text, which "
                            f"the judge needs (e.g. question_id {no_question[0]!r})")
        cache = Path(cfg.judge.cache) if cfg.judge.cache else default_cache_path(out_path)
        result = run_judge([JudgeItem(it["question_id"], it["question"], it["answer"], it["pred"]) for it in items],
                           cfg.judge, cache_path=cache, progress=progress)
        report["overall"]["judge"] = result.summary(matched)
        for qtype, entry in report["per_type"].items():
            ids = [it["question_id"] for it in items if (it["type"] or "untyped") == qtype]
            entry["judge"] = result.summary(ids)
        report["judge"] = {
            "url": cfg.judge.url, "model": cfg.judge.model, "cache": str(cache),
            "n_requests": result.n_requests, "n_cached": result.n_cached,
            "unjudged": [{"question_id": qid, "reason": result.unjudged[qid]}
                         for qid in matched if qid in result.unjudged],
        }

    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out_path)
    except OSError as e:
        if tmp.is_file():  # leave nothing half-written behind
            tmp.unlink()
        raise UserError(f"cannot write the report {out_path}: {e.strerror or e}") from None
    return report


# ----------------------------------------------------------------------------------------------
# display


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_report(report: dict[str, Any]):
    """A rich Table: one row per question type, then "overall"; judge columns when judged."""
    from rich.table import Table

    judged = report.get("judge") is not None
    table = Table(title=f"scores for {Path(report['predictions']).name}")
    table.add_column("type")
    table.add_column("n", justify="right")
    table.add_column("exact %", justify="right")
    table.add_column("contains %", justify="right")
    if judged:
        table.add_column("judge acc %", justify="right")
        table.add_column("judge score", justify="right")
        table.add_column("unjudged", justify="right")

    def row(name: str, m: dict, **style) -> None:
        cells = [name, str(m["n"]), _pct(m["exact_match"]), _pct(m["contains"])]
        if judged:
            j = m["judge"]
            cells += [_pct(j["accuracy"]), "-" if j["score"] is None else f"{j['score']:.2f}",
                      str(j["n_unjudged"])]
        table.add_row(*cells, **style)

    for name, m in report["per_type"].items():
        row(name, m)
    if report["per_type"]:
        table.add_section()
    row("overall", report["overall"], style="bold")
    counts = report["counts"]
    if counts["only_in_predictions"] or counts["only_in_answers"]:
        table.caption = (f"{counts['matched']} matched; {counts['only_in_predictions']} prediction(s) without "
                         f"an answer, {counts['only_in_answers']} answer(s) without a prediction")
    return table
