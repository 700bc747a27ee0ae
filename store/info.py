"""`store.json` and `group.json`: what a store and each of its stream groups hold, and how old stores are read.

    STORE/
      store.json                 {"format_version": 2, "sampling": {"fps", "max_frames"}, "created"}
      groups/<name>/group.json   one frozen encoder (or `pixels`): kind, format, fingerprint, taps
      groups/<name>/manifest/... the group's own manifest parts, shards and writer lock (see `layout.py`)

Every group of a store shares the frame sampling in `store.json`, so frame i is the same instant in each.
A store written before stream groups existed (`format_version` 1: one encoder's `semantic` and
`spatiotemporal` at the top level) opens read-only as one group named `V1_GROUP`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import layout
from .dtypes import STORAGE_DTYPES, on_disk_arrays
from .errors import NotAStoreError, StoreError
from .protocols import TIMESTAMPS, ArraySpec

FORMAT_VERSION = 2
GROUPS_DIR = "groups"
GROUP_JSON = "group.json"
GROUP_KINDS = ("encoder", "pixels")
V1_GROUP = "eva"
SAMPLING_KEYS = ("fps", "max_frames")


@dataclass(frozen=True)
class TapInfo:
    """One stored tap: per-frame shape, storage dtype (see `dtypes.py`) and what it is (e.g. `post_ln`)."""

    shape: tuple[int, ...]
    dtype: str
    spec: str = ""

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "spec": self.spec}

    @staticmethod
    def from_json(raw: dict) -> "TapInfo":
        return TapInfo(tuple(int(n) for n in raw["shape"]), str(raw["dtype"]), str(raw.get("spec", "")))


@dataclass
class GroupInfo:
    """A stream group: one frozen encoder's taps (or the pixels), in its own directory `path`."""

    name: str
    path: Path
    kind: str
    format: str
    fingerprint: dict
    taps: dict[str, TapInfo]
    created: str | None = None
    legacy: bool = False
    """A pre-groups store read as a group: read-only."""
    extra: dict = field(default_factory=dict)

    def arrays(self) -> dict[str, ArraySpec]:
        """Every on-disk array of the group's shards (taps, int8 scales, timestamps)."""
        out = {}
        for tap, info in self.taps.items():
            for name, (tail, dtype) in on_disk_arrays(tap, info.shape, info.dtype).items():
                out[name] = ArraySpec(tail, dtype)
        out[TIMESTAMPS] = ArraySpec((), np.dtype("<f4"))
        return out

    def to_json(self) -> dict:
        return {"format_version": FORMAT_VERSION, "name": self.name, "kind": self.kind, "format": self.format,
                "fingerprint": self.fingerprint, "taps": {k: v.to_json() for k, v in self.taps.items()},
                "created": self.created, **self.extra}


def check_name(name: str, what: str = "group name") -> None:
    """Group and tap names: letters, digits, `_` and `-`; never `timestamps` or a `.scale` suffix."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name == TIMESTAMPS:
        raise ValueError(f"{what} must be letters, digits, '_' or '-' (and not {TIMESTAMPS!r}), got {name!r}")


def group_dir(root: Path, name: str) -> Path:
    return Path(root) / GROUPS_DIR / name


def read_store_json(root: Path) -> dict:
    """`store.json` of `root`; `NotAStoreError` naming the path when there is none."""
    return layout.read_info(root)


def is_v1(info: dict) -> bool:
    return int(info.get("format_version", 1)) == 1


def is_v1_store(root: Path) -> bool:
    """True when `root` holds a format-1 `store.json` (False when it holds none)."""
    return (Path(root) / layout.STORE_JSON).is_file() and is_v1(read_store_json(root))


def v1_group(root: Path, info: dict) -> GroupInfo:
    """A pre-groups store as one read-only group (its shards and manifest sit at the top level)."""
    fingerprint = dict(info.get("fingerprint") or {})
    taps = {"semantic": TapInfo(tuple(info["semantic_shape"]), info["dtype"], "post_ln"),
            "spatiotemporal": TapInfo(tuple(info["spatiotemporal_shape"]), info["dtype"], "pool4")}
    return GroupInfo(V1_GROUP, Path(root), "encoder", info["format"], fingerprint, taps, info.get("created"),
                     legacy=True)


def v1_sampling(info: dict) -> dict:
    fingerprint = info.get("fingerprint") or {}
    return {key: fingerprint.get(key) for key in SAMPLING_KEYS}


def read_group(root: Path, name: str) -> GroupInfo:
    """`groups/<name>/group.json`, checked; a `StoreError` naming the file when it is not readable."""
    import json

    path = group_dir(root, name) / GROUP_JSON
    try:
        raw = json.loads(path.read_text())
        taps = {k: TapInfo.from_json(v) for k, v in raw["taps"].items()}
        info = GroupInfo(raw["name"], path.parent, raw["kind"], raw["format"], raw["fingerprint"], taps,
                         raw.get("created"))
    except FileNotFoundError:
        raise NotAStoreError(f"{root} has no stream group {name!r} ({path} does not exist)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is not a valid group description ({type(e).__name__}: {e})") from None
    bad = [f"{k}: {v.dtype}" for k, v in taps.items() if v.dtype not in STORAGE_DTYPES]
    if bad or info.format not in layout.FORMATS or info.name != name:
        raise StoreError(f"{path} is not a valid group description (format {info.format!r}, "
                         f"name {info.name!r}, tap dtypes {bad or 'ok'})")
    return info


def group_names(root: Path) -> list[str]:
    """Names of the groups that have a `group.json`, sorted."""
    folder = Path(root) / GROUPS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / GROUP_JSON).is_file())


def read_groups(root: Path) -> tuple[dict, dict[str, GroupInfo]]:
    """(sampling, {name: GroupInfo}) of the store at `root`, v1 stores included (as one legacy group)."""
    info = read_store_json(root)
    if is_v1(info):
        return v1_sampling(info), {V1_GROUP: v1_group(root, info)}
    if int(info.get("format_version", 0)) != FORMAT_VERSION:
        raise StoreError(f"{root}/store.json has format_version {info.get('format_version')!r}; this dualfocus "
                         f"reads versions 1 and {FORMAT_VERSION} (a newer dualfocus wrote it?)")
    return dict(info.get("sampling") or {}), {name: read_group(root, name) for name in group_names(root)}


def migrate_hint(root: Path) -> str:
    return (f"{root} was written before stream groups (store format 1) and opens read-only; "
            f"to add streams to it, run `dualfocus migrate {root}` once (it moves files, rewrites nothing)")
