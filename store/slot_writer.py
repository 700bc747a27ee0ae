"""`SlotWriter`: one of several writers that fill a stream group's shards in parallel, each owning disjoint names.

A run that writes a group with W writers gives writer `s` (its *slot*, 0 <= s < W) the shard indices
`first + s`, `first + s + W`, `first + s + 2W`, ... where `first` is above every index the group held when the
run began (`SlotSpec`). No two writers ever touch one shard or one manifest part, and a later run's rows always
sit in higher parts than an earlier run's, so "the row in the highest part wins" (`manifest.latest`) still
holds. The commit protocol is the group's (see `writer.py`): shard under a temp name, rename, then its part.

Several videos may be open at once (a video's chunks arrive interleaved with other videos'): each open video
has a shard of its own, so a video never spans shards and a slow video holds back only its own shard. A shard
commits once it holds `videos_per_shard` rows or `max_shard_bytes` bytes and no video is open in it; `close`
commits the rest. While a `SlotWriter` is open it holds a shared lock on the group's `.slots.lock`, which the
run's `GroupWriter` takes exclusively before it removes garbage: a writer left over from a killed run can
never commit into a group a new run has started to clean.
"""

from __future__ import annotations

import fcntl
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import info as store_info
from . import layout, manifest
from .dtypes import as_numpy, encode_tap
from .keys import safe_key
from .protocols import TIMESTAMPS, ShardWriter
from .tar_shard import TarShardWriter
from .zarr_shard import ZarrShardWriter

BACKENDS = {"zarr": ZarrShardWriter, "webdataset": TarShardWriter}
META_KEYS = ("n_frames", "duration_s", "native_fps")
SLOTS_LOCK = ".slots.lock"


@dataclass(frozen=True)
class SlotSpec:
    """What a writer needs to write its slot of a group (plain values: it travels to Ray actors)."""

    root: str
    group: str
    slot: int
    slots: int
    first_index: int
    videos_per_shard: int = 256
    max_shard_bytes: int = 2**30
    frames_per_zarr_shard: int = 64

    def index(self, k: int) -> int:
        """The index of this slot's `k`-th shard (k = 0, 1, ...)."""
        return self.first_index + self.slot + k * self.slots


class _Shard:
    """One open shard of a slot: its rows so far and, once a video reached it, its backend."""

    def __init__(self, index: int):
        self.index = index
        self.rows: list[dict] = []
        self.bytes = 0
        self.backend: ShardWriter | None = None
        self.tmp: Path | None = None
        self.video: str | None = None   # the video open in it


class SlotWriter:
    """Write videos into slot `spec.slot` of an existing group (its `group.json` must exist).

    Usage (chunks of different videos may interleave; a video's own chunks come in order):
        w = SlotWriter(spec)
        w.begin_video("a", path, meta); w.begin_video("b", path, meta)
        w.add_frames("b", {"semantic": [k, P, D], ...}, timestamps [k]); w.add_frames("a", ...)
        w.end_video("a"); w.abort_video("b", "decode failed"); w.add_failed("c", path, "no frames")
        rows = w.close()       # commits every shard with rows; w.abandon() on the crash path instead
    """

    def __init__(self, spec: SlotSpec):
        if not 0 <= spec.slot < spec.slots:
            raise ValueError(f"slot must be within 0..{spec.slots - 1}, got {spec.slot}")
        self.spec = spec
        self.info = store_info.read_group(Path(spec.root), spec.group)
        self.dir = self.info.path
        self.format, self.kind, self.taps = self.info.format, self.info.kind, self.info.taps
        self._arrays = self.info.arrays()
        self._lock = open(self.dir / SLOTS_LOCK, "a")
        fcntl.flock(self._lock, fcntl.LOCK_SH)   # the run's GroupWriter waits for it before cleaning
        self._opened = 0                         # shards opened so far (k of SlotSpec.index)
        self._free: list[_Shard] = []            # open shards with no open video
        self._open: dict[str, tuple[_Shard, dict]] = {}   # video_id -> (its shard, its row)
        self._committed: list[dict] = []
        self._closed = False

    # ---- per video ---------------------------------------------------------------------------------
    def begin_video(self, video_id: str, path: str, meta: dict | None = None) -> None:
        """Open a video; `meta` may hold n_frames, duration_s, native_fps."""
        self._check_writable()
        if video_id in self._open:
            raise RuntimeError(f"begin_video({video_id!r}): that video is already open")
        shard = self._shard_for_video()
        row = new_row(video_id, path, meta)
        if shard.backend is None:
            self._start_backend(shard)
        shard.video = video_id
        shard.backend.begin(row["key"])
        self._open[video_id] = (shard, row)

    def video_open(self, video_id: str) -> bool:
        return video_id in self._open

    def open_videos(self) -> list[str]:
        return list(self._open)

    def add_frames(self, video_id: str, arrays: dict, timestamps) -> None:
        """Append a chunk of an open video: one array per tap, each [k, *shape], and timestamps [k] (seconds).
        Any float dtype, numpy or torch, for feature taps; cast to each tap's storage dtype."""
        if video_id not in self._open:
            raise RuntimeError(f"add_frames({video_id!r}): that video is not open; call begin_video first")
        shard, _ = self._open[video_id]
        shard.backend.add(self._encode_chunk(video_id, arrays, timestamps))

    def end_video(self, video_id: str) -> dict:
        """Finish an open video; returns its (ok) manifest row. May commit its shard."""
        if video_id not in self._open:
            raise RuntimeError(f"end_video({video_id!r}): that video is not open")
        shard, row = self._open.pop(video_id)
        sidecar = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                   for k, v in row.items() if k in ("video_id", "path", *META_KEYS)}
        extent = shard.backend.end(sidecar)
        row.update(status="ok", shard=layout.shard_name(shard.index, self.format),
                   start=extent.start, length=extent.length, bytes=extent.length * self._frame_bytes())
        if row["n_frames"] is None:
            row["n_frames"] = extent.length
        return self._record(shard, row)

    def abort_video(self, video_id: str, error: str) -> dict:
        """Drop an open video's frames and record it as failed with `error`."""
        if video_id not in self._open:
            raise RuntimeError(f"abort_video({video_id!r}): that video is not open")
        shard, row = self._open.pop(video_id)
        shard.backend.abort()
        row.update(status="failed", error=str(error) or "aborted", n_frames=row["n_frames"] or 0)
        return self._record(shard, row)

    def discard_video(self, video_id: str) -> None:
        """Drop an open video's frames and record nothing: a later run does it again (a run that stops)."""
        if video_id not in self._open:
            raise RuntimeError(f"discard_video({video_id!r}): that video is not open")
        shard, _ = self._open.pop(video_id)
        shard.backend.abort()
        shard.video = None
        self._free.append(shard)

    def add_failed(self, video_id: str, path: str, error: str, meta: dict | None = None) -> dict:
        """Record a video that produced no frames (e.g. decode error) as failed."""
        self._check_writable()
        if video_id in self._open:
            raise RuntimeError(f"add_failed({video_id!r}): that video is open; call abort_video")
        shard = self._shard_for_video()
        row = new_row(video_id, path, meta)
        row.update(status="failed", error=str(error) or "failed", n_frames=row["n_frames"] or 0)
        return self._record(shard, row)

    # ---- shards ------------------------------------------------------------------------------------
    def close(self) -> list[dict]:
        """Record videos still open as failed, commit every shard with rows, release the lock. Returns every
        row this writer committed."""
        if self._closed:
            return list(self._committed)
        for video_id in list(self._open):
            self.abort_video(video_id, "writer closed before the video's last frames arrived")
        for shard in sorted(self._free, key=lambda s: s.index):
            if shard.rows:
                self._commit(shard)
            elif shard.backend is not None:   # only discarded videos reached it: leave no temp shard
                shard.backend.release()
                layout.remove_path(shard.tmp)
        self._free = []
        self._release()
        return list(self._committed)

    def abandon(self) -> None:
        """Crash path: release without committing open shards (the next run's open removes them)."""
        if self._closed:
            return
        for shard in [*self._free, *(s for s, _ in self._open.values())]:
            if shard.backend is not None:
                shard.backend.release()
        self._free, self._open = [], {}
        self._release()

    def committed(self) -> list[dict]:
        return list(self._committed)

    def _shard_for_video(self) -> _Shard:
        """An open shard with no open video (the fullest), or a new one."""
        if self._free:
            shard = max(self._free, key=lambda s: len(s.rows))
            self._free.remove(shard)
            return shard
        shard = _Shard(self.spec.index(self._opened))
        self._opened += 1
        return shard

    def _start_backend(self, shard: _Shard) -> None:
        final = layout.shard_name(shard.index, self.format)
        shard.tmp = self.dir / layout.temp_name(final)
        kwargs = dict(arrays=self._arrays,
                      attributes={"group": self.info.name, "dtypes": {k: v.dtype for k, v in self.taps.items()}})
        if self.format == "zarr":
            kwargs["frames_per_zarr_shard"] = self.spec.frames_per_zarr_shard
        shard.backend = BACKENDS[self.format](shard.tmp, **kwargs)

    def _record(self, shard: _Shard, row: dict) -> dict:
        shard.video = None
        shard.rows.append(row)
        shard.bytes += row["bytes"]
        if len(shard.rows) >= self.spec.videos_per_shard or shard.bytes >= self.spec.max_shard_bytes:
            self._commit(shard)
        else:
            self._free.append(shard)
        return dict(row)

    def _commit(self, shard: _Shard) -> None:
        """Complete and rename the shard (if any video reached it), then write its manifest part."""
        if shard.backend is not None:
            shard.backend.close()
            os.replace(shard.tmp, self.dir / layout.shard_name(shard.index, self.format))
        manifest.write_part(self.dir, shard.index, shard.rows)
        self._committed.extend(shard.rows)

    # ---- helpers -----------------------------------------------------------------------------------
    def _encode_chunk(self, video_id: str, arrays: dict, timestamps) -> dict:
        ts = as_numpy(timestamps)
        k = len(ts) if ts.ndim == 1 else -1
        problems = [] if ts.ndim == 1 else [f"timestamps must be [k], got {list(ts.shape)}"]
        missing, unknown = sorted(set(self.taps) - set(arrays)), sorted(set(arrays) - set(self.taps))
        if missing or unknown:
            problems.append(f"taps missing {missing}, unknown {unknown} (group {self.info.name!r} stores "
                            f"{sorted(self.taps)})")
        chunk = {}
        for name, tap in self.taps.items():
            if name not in arrays:
                continue
            x = as_numpy(arrays[name])
            if x.shape != (k, *tap.shape):
                problems.append(f"{name} must be {[k, *tap.shape]}, got {list(x.shape)}")
                continue
            try:
                chunk.update(encode_tap(name, x, tap.dtype))
            except ValueError as e:
                problems.append(str(e))
        if problems:
            raise ValueError(f"add_frames for {video_id!r}: " + "; ".join(problems))
        chunk[TIMESTAMPS] = np.ascontiguousarray(ts, dtype=np.float32)
        return chunk

    def _frame_bytes(self) -> int:
        """Uncompressed stored bytes of one frame's arrays (taps, scales, timestamps)."""
        return sum(spec.frame_bytes() for spec in self._arrays.values())

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"the writer of slot {self.spec.slot} of group {self.info.name!r} is closed")

    def _release(self) -> None:
        self._closed = True
        self._lock.close()


def new_row(video_id: str, path: str, meta: dict | None) -> dict:
    """A manifest row for `video_id` before its outcome is known."""
    meta = dict(meta or {})
    unknown = sorted(set(meta) - set(META_KEYS))
    if unknown:
        raise ValueError(f"meta for {video_id!r} has unknown keys {unknown}; allowed: {list(META_KEYS)}")
    return {"video_id": video_id, "key": safe_key(video_id), "path": str(path), "status": "",
            "error": "",
            "n_frames": None if meta.get("n_frames") is None else int(meta["n_frames"]),
            "duration_s": _float_or_nan(meta.get("duration_s")), "native_fps": _float_or_nan(meta.get("native_fps")),
            "shard": None, "start": 0, "length": 0, "bytes": 0}


def _float_or_nan(value) -> float:
    return float("nan") if value is None else float(value)
