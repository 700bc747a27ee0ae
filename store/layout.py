"""Names and files of a shard directory (a stream group's), and garbage collection of uncommitted shards.

    GROUP/                          STORE/groups/<name>/ (see `info.py`; a format-1 store is one at STORE/)
      group.json                    kind, format, taps, encoder fingerprint
      manifest/part-000003.parquet  rows of the videos handled in batch 3
      shard-000003.zarr | .tar      features of batch 3 (absent if every row of the batch failed)
      .writer.lock                  advisory lock held by the one active GroupWriter (the run's driver)
      .slots.lock                   held shared by each live SlotWriter (parallel writers of that run)

A batch `i` is committed once `manifest/part-i.parquet` exists. Anything named `*.tmp-*` is a write in
progress (or a crashed one), and a shard without its part is an uncommitted leftover.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from .errors import NotAStoreError

FORMATS = {"zarr": "zarr", "webdataset": "tar"}  # format name -> shard suffix
STORE_JSON = "store.json"
MANIFEST_DIR = "manifest"
LOCK_FILE = ".writer.lock"

_SHARD_RE = re.compile(r"^shard-(?P<index>\d{6,})\.(?P<suffix>zarr|tar)(?P<tmp>\.tmp-.+)?$")
_PART_RE = re.compile(r"^part-(?P<index>\d{6,})\.parquet(?P<tmp>\.tmp-.+)?$")


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}.{FORMATS[fmt]}"


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def temp_name(final: str) -> str:
    """A unique in-progress name for `final`; garbage if it is still there on the next open."""
    return f"{final}.tmp-{uuid.uuid4().hex[:12]}"


def part_indices(root: Path) -> list[int]:
    """Indices of committed manifest parts, ascending."""
    folder = Path(root) / MANIFEST_DIR
    if not folder.is_dir():
        return []
    found = (_PART_RE.match(p.name) for p in folder.iterdir())
    return sorted(int(m["index"]) for m in found if m and not m["tmp"])


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_info(root: Path) -> dict:
    """Load `store.json`; `NotAStoreError` naming the path when there is none."""
    path = Path(root) / STORE_JSON
    if not path.is_file():
        raise NotAStoreError(f"{root} is not a feature store: {path} does not exist")
    return json.loads(path.read_text())


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = Path(temp_name(str(path)))
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def create_json_once(path: Path, obj: dict) -> bool:
    """Write `path` only if it does not exist yet (atomic, race-free between processes); True if written."""
    tmp = Path(temp_name(str(path)))
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def describe_mismatch(existing: dict, wanted: dict, keys: tuple[str, ...]) -> list[str]:
    """One line per differing key (among `keys`, then every fingerprint key as `fingerprint.<key>`)."""
    lines = []
    for key in keys:
        if existing.get(key) != wanted.get(key):
            lines.append(f"{key}: store has {existing.get(key)!r}, requested {wanted.get(key)!r}")
    old, new = existing.get("fingerprint") or {}, wanted.get("fingerprint") or {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            lines.append(f"fingerprint.{key}: store has {old.get(key, '<missing>')!r}, "
                         f"requested {new.get(key, '<missing>')!r}")
    return lines


def remove_path(path: Path) -> None:
    """Delete a shard (a Zarr directory or a tar) or any file."""
    _remove(Path(path))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_garbage(root: Path) -> list[str]:
    """Delete temp shards, temp parts and shards without a manifest part; return what went (sorted,
    relative to `root`)."""
    root = Path(root)
    committed = set(part_indices(root))
    removed = []
    for entry in root.iterdir():
        m = _SHARD_RE.match(entry.name)
        if m and (m["tmp"] or int(m["index"]) not in committed):
            _remove(entry)
            removed.append(entry.name)
    manifest = root / MANIFEST_DIR
    if manifest.is_dir():
        for entry in manifest.iterdir():
            m = _PART_RE.match(entry.name)
            if m and m["tmp"]:
                _remove(entry)
                removed.append(f"{MANIFEST_DIR}/{entry.name}")
    return sorted(removed)


def clear_shards(root: Path, info_file: str) -> None:
    """Delete what a shard directory owns (`info_file`, manifest, shards); other files, the lock included, stay."""
    root = Path(root)
    for entry in root.iterdir():
        if entry.name in (info_file, MANIFEST_DIR) or _SHARD_RE.match(entry.name) \
                or entry.name.startswith(info_file + ".tmp-"):
            _remove(entry)


def shard_paths(root: Path) -> list[Path]:
    """Committed-looking shard entries (no temp names), sorted by name."""
    return sorted(p for p in Path(root).iterdir()
                  if (m := _SHARD_RE.match(p.name)) and not m["tmp"])
