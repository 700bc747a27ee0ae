"""Read a video corpus: a directory of videos, or a CSV / JSONL / JSON / Parquet table with ``video_id, path``.

Every problem a corpus can have that would waste a long extract run is reported up front, naming the
file and the offending ids or rows: duplicate ids, missing columns, an unreadable table, an empty corpus.
A path that does not exist is *not* an error here: that video becomes a ``failed`` manifest row like any
other bad file.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                              ".3gp", ".ts", ".gif"})
"""File extensions (lowercase) a directory corpus reads, and that QA files may add to a video's id."""
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")


class CorpusError(ValueError):
    """The corpus cannot be used as given (message names the path and the ids)."""


@dataclass(frozen=True)
class CorpusRow:
    """One input video: its id (kept verbatim in the manifest) and its path."""

    video_id: str
    path: str


def read_corpus(source: str | Path) -> list[CorpusRow]:
    """All rows of the corpus in a stable order; raises CorpusError for an unusable corpus."""
    source = Path(source)
    if not source.exists():
        raise CorpusError(f"corpus not found: {source}")
    if source.is_dir():
        rows = _scan_directory(source)
    elif source.suffix.lower() in TABLE_EXTENSIONS:
        rows = _read_table(source)
    else:
        raise CorpusError(f"{source}: a corpus is a directory of videos or a {'/'.join(TABLE_EXTENSIONS)} table")
    if not rows:
        raise CorpusError(f"no videos found in {source}")
    duplicates = sorted(vid for vid, n in Counter(r.video_id for r in rows).items() if n > 1)
    if duplicates:
        shown = ", ".join(repr(d) for d in duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise CorpusError(f"{source}: duplicate video_id values: {shown}{more}; every video needs a unique id")
    return rows


def _scan_directory(root: Path) -> list[CorpusRow]:
    """Recursive scan; the id is the path relative to ``root`` without its extension."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    # absolute paths: the decoding workers may run in another directory (or on another node)
    return [CorpusRow(video_id=p.relative_to(root).with_suffix("").as_posix(), path=str(p.absolute()))
            for p in files]


def _read_table(path: Path) -> list[CorpusRow]:
    """Rows of a table file; relative video paths are taken relative to the table's directory."""
    records = _table_records(path)
    rows = []
    for where, rec in records:
        missing = [c for c in ("video_id", "path") if rec.get(c) in (None, "")]
        if missing:
            raise CorpusError(f"{path}: {where} has no {' or '.join(missing)} (columns needed: video_id, path)")
        video_path = Path(str(rec["path"]))
        if not video_path.is_absolute():
            video_path = path.absolute().parent / video_path  # relative to the table file
        rows.append(CorpusRow(video_id=str(rec["video_id"]), path=str(video_path)))
    return rows


def _table_records(path: Path) -> list[tuple[str, dict]]:
    """``(where, record)`` pairs of a CSV / JSON / JSONL / Parquet file; unreadable files are a CorpusError."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        from dualfocus.pipeline.errors import UserError
        from dualfocus.pipeline.json_records import read_json_records

        try:
            return read_json_records(path)
        except UserError as e:
            raise CorpusError(str(e)) from None
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        return [(f"row {i}", rec) for i, rec in enumerate(table.to_pylist(), start=1)]
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # tolerate the BOM spreadsheets write
            return [(f"row {i}", rec) for i, rec in enumerate(csv.DictReader(f), start=1)]
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text (byte {e.start}); save the table as UTF-8 CSV") from None
    except csv.Error as e:
        raise CorpusError(f"{path}: not a readable CSV file ({e})") from None
