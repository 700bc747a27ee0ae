"""`FeatureStore`: read videos back from a store, whatever its groups and backends.

A stream is one tap of one group, named `group.tap` (e.g. `eva.semantic`), or just `tap` when no other group
has a tap of that name. Reading touches only the groups, taps and frames asked for.

Legend: t frames. Returned dtypes: float16 taps give float16; bfloat16, float32 and int8 taps give float32;
exact taps (uint8 pixels) come back as stored; timestamps are float32 seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import info as store_info
from . import manifest
from .dtypes import decode_tap, on_disk_arrays
from .errors import StoreError
from .info import GroupInfo
from .protocols import TIMESTAMPS, Extent, ShardReader
from .tar_shard import TarShardReader
from .zarr_shard import ZarrShardReader

_BACKENDS: dict[str, type[ShardReader]] = {"zarr": ZarrShardReader, "webdataset": TarShardReader}


class MissingStreamError(StoreError, KeyError):
    """A stream asked for is not in the store (or names a tap of several groups)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _extent(row: dict) -> Extent:
    return Extent(row["key"], int(row["start"]), int(row["length"]))


@dataclass
class VideoFeatures:
    """One video's cached arrays: `streams[name]` is `[t, ...]` for each stream asked for, by the name
    used to ask; `timestamps` `[t]` float32 seconds. `features["semantic"]` reads like a dict."""

    video_id: str
    streams: dict[str, np.ndarray]
    timestamps: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.streams[name]


class _Group:
    """One group's manifest and open shard readers."""

    def __init__(self, info: GroupInfo):
        self.info = info
        self.manifest = manifest.latest(manifest.read_all(info.path))
        self.rows = {row["video_id"]: row for row in self.manifest.to_dict("records")}
        self.ok_ids = list(self.manifest.loc[self.manifest["status"] == "ok", "video_id"])
        self.readers: dict[str, ShardReader] = {}
        self.backend = _BACKENDS[info.format]

    def ok(self, video_id: str) -> bool:
        row = self.rows.get(video_id)
        return row is not None and row["status"] == "ok"

    def reader(self, shard: str) -> ShardReader:
        if shard not in self.readers:
            self.readers[shard] = self.backend(self.info.path / shard)
        return self.readers[shard]

    def __getstate__(self) -> dict:  # open shard readers stay behind (DataLoader workers open their own)
        return {**self.__dict__, "readers": {}}


class FeatureStore:
    """Read-only view of a store: `store.read(video_id, frames, streams=[...])`, `store[video_id]`,
    `iter_videos()`, `video_ids()`.

    Each group's manifest is read at `open`: later commits by a running writer are not seen. Safe to pickle
    into DataLoader workers (open shard readers are not carried).
    """

    def __init__(self, root: Path, sampling: dict, groups: dict[str, GroupInfo]):
        self.root = Path(root)
        self.sampling = sampling
        self.groups = {name: _Group(g) for name, g in groups.items()}

    @staticmethod
    def open(path) -> "FeatureStore":
        """Open the store at `path` (store format 2, or 1 read as one group)."""
        root = Path(path)
        sampling, groups = store_info.read_groups(root)
        return FeatureStore(root, sampling, groups)

    # ---- streams -----------------------------------------------------------------------------------
    def streams(self) -> list[str]:
        """Every stream as `group.tap`, sorted."""
        return sorted(f"{g}.{tap}" for g, group in self.groups.items() for tap in group.info.taps)

    def resolve(self, stream: str) -> tuple[str, str]:
        """`group.tap` or an unambiguous `tap` -> (group, tap); `MissingStreamError` naming what exists."""
        group, _, tap = stream.rpartition(".")
        if group:
            if group in self.groups and tap in self.groups[group].info.taps:
                return group, tap
            found = []
        else:
            found = self.groups_with(tap)
            if len(found) == 1:
                return found[0], tap
        have = ", ".join(self.streams()) or "none"
        why = f"is a tap of several groups ({', '.join(found)}): name one as group.tap" if found \
            else "is not in the store"
        raise MissingStreamError(f"stream {stream!r} {why}; {self.root} has: {have}")

    def groups_with(self, tap: str) -> list[str]:
        """The groups holding a tap of this name."""
        return [g for g, grp in self.groups.items() if tap in grp.info.taps]

    def group_info(self, stream_or_group: str) -> GroupInfo:
        """The `GroupInfo` of a group name, or of the group holding a stream."""
        if stream_or_group in self.groups:
            return self.groups[stream_or_group].info
        return self.groups[self.resolve(stream_or_group)[0]].info

    def tap_shape(self, stream: str) -> tuple[int, ...]:
        group, tap = self.resolve(stream)
        return self.groups[group].info.taps[tap].shape

    def frame_bytes(self, stream: str) -> int:
        """Bytes one stored frame of ``stream`` occupies on disk (an int8 tap's scales included)."""
        from .dtypes import on_disk_arrays
        from .protocols import ArraySpec

        group, tap = self.resolve(stream)
        info = self.groups[group].info.taps[tap]
        arrays = on_disk_arrays(tap, info.shape, info.dtype).values()
        return sum(ArraySpec(tail, dtype).frame_bytes() for tail, dtype in arrays)

    def _groups_of(self, streams: Sequence[str] | None) -> list[str]:
        if streams is None:
            return list(self.groups)
        return list(dict.fromkeys(self.resolve(s)[0] for s in streams))

    # ---- which videos ------------------------------------------------------------------------------
    def video_ids(self, streams: Sequence[str] | None = None) -> list[str]:
        """Ids of the videos stored ok in every group the streams come from (default: every group), in the
        first group's manifest order."""
        groups = [self.groups[g] for g in self._groups_of(streams)]
        if not groups:
            return []
        return [v for v in groups[0].ok_ids if all(g.ok(v) for g in groups[1:])]

    def __len__(self) -> int:
        return len(self.video_ids())

    def __contains__(self, video_id: object) -> bool:
        return bool(self.groups) and all(g.ok(video_id) for g in self.groups.values())

    def __getitem__(self, video_id: str) -> VideoFeatures:
        return self.read(video_id)

    def failures(self) -> dict[str, list[tuple[str, str]]]:
        """Per group, the (video_id, error) of videos whose latest row failed."""
        out = {}
        for name, group in self.groups.items():
            bad = group.manifest[group.manifest["status"] != "ok"]
            out[name] = list(zip(bad["video_id"], bad["error"]))
        return out

    def status(self, streams: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per video known to any group the streams come from: ``video_id, status, error, length``.

        A video is ``ok`` when every such group stored it, ``failed`` when one of them failed it (its error),
        ``missing`` when one of them has no row for it yet. ``length`` is its stored frame count (ok rows).
        """
        groups = [self.groups[g] for g in self._groups_of(streams)]
        ids = list(dict.fromkeys(v for g in groups for v in g.manifest["video_id"]))
        out = []
        for video_id in ids:
            rows = [(g.info.name, g.rows.get(video_id)) for g in groups]
            bad = [(name, row) for name, row in rows if row is not None and row["status"] != "ok"]
            absent = [name for name, row in rows if row is None]
            if bad:
                name, row = bad[0]
                status, error, length = "failed", f"{row['error']} (group {name})" if len(groups) > 1 else row["error"], 0
            elif absent:
                status, error, length = "missing", f"not in group {absent[0]}", 0
            else:
                status, error, length = "ok", "", min(int(row["length"]) for _, row in rows)
            out.append({"video_id": video_id, "status": status, "error": error, "length": length})
        return pd.DataFrame(out, columns=["video_id", "status", "error", "length"])

    def fingerprint(self, streams: Sequence[str] | None = None) -> dict:
        """What produced the numbers of ``streams``: the group's encoder fingerprint plus the store's sampling
        (keys prefixed ``group.`` when the streams come from several groups)."""
        groups = self._groups_of(streams)
        if len(groups) == 1:
            return {**self.groups[groups[0]].info.fingerprint, **self.sampling}
        return {**self.sampling, **{f"{g}.{k}": v for g in groups for k, v in self.groups[g].info.fingerprint.items()}}

    # ---- reading -----------------------------------------------------------------------------------
    def read(self, video_id: str, frame_indices: np.ndarray | None = None,
             streams: Sequence[str] | None = None) -> VideoFeatures:
        """One video's `streams` (default: every tap of every group, named `tap`, or `group.tap` where two
        groups share a tap name), or only the frames `frame_indices` ([n] ints in [0, t))."""
        wanted = self._wanted(streams)
        rows = {g: self._ok_row(g, video_id) for g in dict.fromkeys(g for g, _ in wanted.values())}
        if frame_indices is not None:
            length = min(int(row["length"]) for row in rows.values())
            frame_indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
            bad = frame_indices[(frame_indices < 0) | (frame_indices >= length)]
            if len(bad):
                raise IndexError(f"frame indices {bad[:5].tolist()} out of range for {video_id!r} "
                                 f"with {length} frames")
        out, timestamps = {}, None
        for group, row in rows.items():
            taps = {name: tap for name, (g, tap) in wanted.items() if g == group}
            arrays, ts = self._read_group(group, row, list(taps.values()), frame_indices)
            out.update({name: arrays[tap] for name, tap in taps.items()})
            timestamps = ts if timestamps is None else timestamps
        return VideoFeatures(video_id, out, timestamps)

    def iter_videos(self, ids: Iterable[str] | None = None, streams: Sequence[str] | None = None
                    ) -> Iterator[VideoFeatures]:
        """Stream videos shard by shard of the first group asked for, each shard read sequentially (ids
        default to `video_ids(streams)`; the output order follows the storage, not `ids`)."""
        first = self._groups_of(streams)[0]
        ids = self.video_ids(streams) if ids is None else list(ids)
        by_shard: dict[str, list] = {}
        for video_id in ids:
            row = self._ok_row(first, video_id)
            by_shard.setdefault(row["shard"], []).append(row)
        for shard in sorted(by_shard):
            rows_by_key = {row["key"]: row for row in by_shard[shard]}
            for extent in self.groups[first].reader(shard).order([_extent(r) for r in by_shard[shard]]):
                yield self.read(rows_by_key[extent.key]["video_id"], streams=streams)

    # ---- internals ---------------------------------------------------------------------------------
    def _wanted(self, streams: Sequence[str] | None) -> dict[str, tuple[str, str]]:
        """Output name -> (group, tap)."""
        if streams is not None:
            return {s: self.resolve(s) for s in streams}
        counts: dict[str, int] = {}
        for group in self.groups.values():
            for tap in group.info.taps:
                counts[tap] = counts.get(tap, 0) + 1
        return {(tap if counts[tap] == 1 else f"{g}.{tap}"): (g, tap)
                for g, group in self.groups.items() for tap in group.info.taps}

    def _ok_row(self, group: str, video_id: str) -> dict:
        row = self.groups[group].rows.get(video_id)
        if row is None:
            raise KeyError(f"video {video_id!r} is not in group {group!r} of the store at {self.root}")
        if row["status"] != "ok":
            raise KeyError(f"video {video_id!r} failed during extraction of group {group!r}: {row['error']}")
        return row

    def _read_group(self, group: str, row: dict, taps: list[str], frame_indices: np.ndarray | None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        info = self.groups[group].info
        names = [name for tap in taps for name in on_disk_arrays(tap, info.taps[tap].shape, info.taps[tap].dtype)]
        raw = self.groups[group].reader(row["shard"]).read(_extent(row), names + [TIMESTAMPS], frame_indices)
        return {tap: decode_tap(tap, raw, info.taps[tap].dtype) for tap in taps}, raw[TIMESTAMPS]

    def __repr__(self) -> str:
        groups = ", ".join(f"{n}: {g.info.kind} {g.info.format} {len(g.ok_ids)} ok" for n, g in self.groups.items())
        return f"FeatureStore({str(self.root)!r}, groups={{{groups}}})"
