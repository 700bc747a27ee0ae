"""Question-answer files and the lenient match between their video names and store ids.

Formats read (DESIGN.md §5):
- training: VideoInstruct-100K JSON list ``[{"video_id", "q", "a"}]`` or JSONL ``{"video_id", "question", "answer"}``;
- zero-shot evaluation: ``test_q.json`` ``[{"video_name", "question", "question_id"}]`` (or JSONL with
  ``video_id``/``video_name``, ``question``, ``question_id``).

Video names differ across public QA sets and their files (``v_`` prefixes, extensions), so ids are
matched leniently by ``IdMatcher``; whatever stays unmatched is counted and reported, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dualfocus.pipeline.errors import UserError


@dataclass(frozen=True)
class QAItem:
    """One question about one video; ``answer`` is empty for evaluation questions."""

    video_id: str
    question: str
    answer: str = ""
    question_id: str = ""


def read_json_records(path: str | Path) -> list[dict]:
    """A JSON list or JSONL file as a list of dicts; malformed input names the file and position."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    text = path.read_text()
    if not text.strip():
        raise UserError(f"{path} is empty")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}") from e
    bad = [i for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise UserError(f"{path}: record {bad[0] + 1} is not a JSON object")
    return records


def _field(rec: dict, names: Iterable[str], path: Path, i: int) -> str:
    for name in names:
        if rec.get(name) not in (None, ""):
            return str(rec[name])
    raise UserError(f"{path}: record {i + 1} has no {' / '.join(names)}")


def read_training_qa(path: str | Path) -> list[QAItem]:
    """VideoInstruct JSON (``video_id, q, a``) or JSONL (``video_id, question, answer``)."""
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise UserError(f"{path} holds no question-answer pairs")
    return [QAItem(video_id=_field(r, ("video_id", "video_name", "video"), path, i),
                   question=_field(r, ("q", "question"), path, i),
                   answer=_field(r, ("a", "answer"), path, i)) for i, r in enumerate(records)]


def read_eval_questions(path: str | Path) -> list[QAItem]:
    """Zero-shot ``test_q.json`` (``video_name, question, question_id``) or JSONL of the same keys."""
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise UserError(f"{path} holds no questions")
    items = [QAItem(video_id=_field(r, ("video_name", "video_id", "video"), path, i),
                    question=_field(r, ("question", "q"), path, i),
                    question_id=_field(r, ("question_id", "id"), path, i)) for i, r in enumerate(records)]
    seen: set[str] = set()
    dupes = sorted({q.question_id for q in items if q.question_id in seen or seen.add(q.question_id)})
    if dupes:
        raise UserError(f"{path}: duplicate question_id values: {', '.join(dupes[:10])}")
    return items


_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".gif", ".m4v")


def _variants(name: str) -> list[str]:
    """Spellings under which a QA file may refer to a video: as is, without extension, +/- ``v_``."""
    base = name.strip()
    for ext in _EXTENSIONS:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    stem = base.rsplit("/", 1)[-1]
    out = [name, base, stem]
    for b in (base, stem):
        out.append(b[2:] if b.startswith("v_") else "v_" + b)
    return list(dict.fromkeys(out))


class IdMatcher:
    """Resolve a QA file's video name to a store id: exact first, then the lenient variants."""

    def __init__(self, store_ids: Iterable[str]):
        self.exact = set(store_ids)
        self.lookup: dict[str, str] = {}
        for vid in self.exact:
            for v in _variants(vid):
                self.lookup.setdefault(v, vid)

    def __call__(self, name: str) -> str | None:
        if name in self.exact:
            return name
        for v in _variants(name):
            if v in self.exact:
                return v
            if v in self.lookup:
                return self.lookup[v]
        return None
