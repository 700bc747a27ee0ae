"""The one reader of JSON-list and JSONL files (QA files, corpus tables, predictions, answers).

A file whose first non-blank character is ``[`` is one JSON list; anything else is JSONL, one object per
line, blank lines skipped. Every record must be a JSON object. Each comes back with where it was found
(``record 3`` in a list, ``line 7`` in JSONL, both 1-based), so the caller's own checks can name the place
too. Every problem is a one-line ``UserError`` naming the file and the place.
"""

from __future__ import annotations

import json
from pathlib import Path

from dualfocus.pipeline.errors import UserError


def read_json_records(path: str | Path) -> list[tuple[str, dict]]:
    """``[(where, record), ...]`` in file order; raises UserError for a missing, empty or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # tolerate the BOM some editors write
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); JSON files are UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    if not text.strip():
        raise UserError(f"{path} is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        records = [(f"record {i}", obj) for i, obj in enumerate(data, start=1)]
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: malformed JSON at line {lineno}, column {e.colno}: {e.msg}") from None
    for where, obj in records:
        if not isinstance(obj, dict):
            raise UserError(f"{path}: {where} is not a JSON object (got {type(obj).__name__})")
    return records
