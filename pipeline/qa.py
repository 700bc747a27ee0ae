"""Question-answer files and the lenient match between their video names and store ids.

Formats read (DESIGN.md §5):
- training: VideoInstruct-100K JSON list ``[{"video_id", "q", "a"}]`` or JSONL ``{"video_id", "question", "answer"}``;
- zero-shot evaluation: ``test_q.json`` ``[{"video_name", "question", "question_id"}]`` (or JSONL with
  ``video_id``/``video_name``, ``question``, ``question_id``).

Video names differ across public QA sets and their files (``v_`` prefixes, extensions), so ids are
matched leniently by ``IdMatcher``; whatever stays unmatched is counted and reported, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable

from dualfocus.pipeline.corpus import VIDEO_EXTENSIONS
from dualfocus.pipeline.errors import UserError
from dualfocus.pipeline.json_records import read_json_records


@dataclass(frozen=True)
class QAItem:
    """One question about one video; ``answer`` is empty for evaluation questions."""

    video_id: str
    question: str
    answer: str = ""
    question_id: str = ""


def _field(rec: dict, names: Iterable[str], path: Path, where: str) -> str:
    for name in names:
        if rec.get(name) not in (None, ""):
            return str(rec[name])
    raise UserError(f"{path}: {where} has no {' / '.join(names)}")


def read_training_qa(path: str | Path) -> list[QAItem]:
    """VideoInstruct JSON (``video_id, q, a``) or JSONL (``video_id, question, answer``)."""
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise UserError(f"{path} holds no question-answer pairs")
    return [QAItem(video_id=_field(r, ("video_id", "video_name", "video"), path, where),
                   question=_field(r, ("q", "question"), path, where),
                   answer=_field(r, ("a", "answer"), path, where)) for where, r in records]


def read_eval_questions(path: str | Path) -> list[QAItem]:
    """Zero-shot ``test_q.json`` (``video_name, question, question_id``) or JSONL of the same keys."""
    path = Path(path)
    records = read_json_records(path)
    if not records:
        raise UserError(f"{path} holds no questions")
    items = [QAItem(video_id=_field(r, ("video_name", "video_id", "video"), path, where),
                    question=_field(r, ("question", "q"), path, where),
                    question_id=_field(r, ("question_id", "id"), path, where)) for where, r in records]
    seen: set[str] = set()
    dupes = sorted({q.question_id for q in items if q.question_id in seen or seen.add(q.question_id)})
    if dupes:
        raise UserError(f"{path}: duplicate question_id values: {', '.join(dupes[:10])}")
    return items


def _variants(name: str) -> list[str]:
    """Spellings under which a QA file may refer to a video: as is, without extension, +/- ``v_``."""
    base = name.strip()
    suffix = PurePosixPath(base).suffix
    if suffix.lower() in VIDEO_EXTENSIONS:  # the extensions a directory corpus reads
        base = base[: -len(suffix)]
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
