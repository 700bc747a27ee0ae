"""`StoreWriter`: turns a stream of videos (each a stream of frame chunks) into committed shards.

Legend: k frames in a chunk, P = p+1 semantic tokens, M = p/4 spatiotemporal tokens, D width.

Commit protocol. Batch i is written to `shard-<i>.<ext>.tmp-<random>`, renamed to `shard-<i>.<ext>`
once complete, and only then committed by writing `manifest/part-<i>.parquet` (itself temp + rename).
Opening a store removes temp shards and shards without a part. One `StoreWriter` per store at a time
(an advisory lock on `STORE/.writer.lock`), so one writer per shard, always.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from pathlib import Path

import numpy as np

from . import layout, manifest
from .dtypes import STORAGE_DTYPES, as_numpy, encode, on_disk_dtype
from .errors import StoreBusyError, StoreMismatchError
from .keys import safe_key
from .protocols import ShardWriter
from .tar_shard import TarShardWriter
from .zarr_shard import ZarrShardWriter

_BACKENDS = {"zarr": ZarrShardWriter, "webdataset": TarShardWriter}
_META_KEYS = ("n_frames", "duration_s", "native_fps")


def _check_args(format, dtype, fingerprint, semantic_shape, spatiotemporal_shape, videos_per_shard,
                max_shard_bytes) -> None:
    problems = []
    if format not in _BACKENDS:
        problems.append(f"format must be one of {sorted(_BACKENDS)}, got {format!r}")
    if dtype not in STORAGE_DTYPES:
        problems.append(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
    if not isinstance(fingerprint, dict):
        problems.append(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    else:
        try:
            json.dumps(fingerprint)
        except (TypeError, ValueError) as err:
            problems.append(f"fingerprint must be JSON-serialisable: {err}")
    for name, shape in (("semantic_shape", semantic_shape), ("spatiotemporal_shape", spatiotemporal_shape)):
        if len(tuple(shape)) != 2 or any(int(n) < 1 for n in shape):
            problems.append(f"{name} must be two positive ints (tokens, width), got {shape!r}")
    if videos_per_shard < 1:
        problems.append(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    if max_shard_bytes < 1:
        problems.append(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if problems:
        raise ValueError("invalid StoreWriter arguments:\n  " + "\n  ".join(problems))


def _float_or_nan(value) -> float:
    return float("nan") if value is None else float(value)


class StoreWriter:
    """Write videos into a feature store at `root`, resuming a compatible existing one.

    Usage:
        with StoreWriter(root, fingerprint=fp, semantic_shape=(257, 1024),
                         spatiotemporal_shape=(64, 1024)) as w:
            for vid in videos:
                if vid.id in w.done_ids(): continue
                w.begin_video(vid.id, vid.path, {"n_frames": ..., "duration_s": ..., "native_fps": ...})
                for sem, spt, ts in chunks:   # [k, P, D], [k, M, D], [k]
                    w.add_frames(sem, spt, ts)
                w.end_video()                 # or w.abort_video(str(err)); w.add_failed(...) for no frames

    Leaving the `with` block normally commits the open shard; leaving it by an exception does not (the
    temp shard is removed on the next open, and its videos are redone).
    A shard is committed after `videos_per_shard` rows (ok or failed) or once its videos hold
    `max_shard_bytes` uncompressed bytes; a video never spans shards.
    """

    def __init__(self, root, *, format: str = "zarr", dtype: str = "float16", fingerprint: dict,
                 semantic_shape: tuple[int, int], spatiotemporal_shape: tuple[int, int],
                 videos_per_shard: int = 256, max_shard_bytes: int = 2**30, overwrite: bool = False,
                 frames_per_zarr_shard: int = 64):
        _check_args(format, dtype, fingerprint, semantic_shape, spatiotemporal_shape, videos_per_shard,
                    max_shard_bytes)
        self.root = Path(root)
        self.format, self.dtype = format, dtype
        self.semantic_shape = tuple(int(n) for n in semantic_shape)
        self.spatiotemporal_shape = tuple(int(n) for n in spatiotemporal_shape)
        self.videos_per_shard, self.max_shard_bytes = videos_per_shard, max_shard_bytes
        self.frames_per_zarr_shard = frames_per_zarr_shard

        fingerprint = json.loads(json.dumps(fingerprint))   # as it will read back from store.json

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        try:
            if overwrite:
                layout.clear_store(self.root)
            self.info = self._open_info(fingerprint)
            self._removed = layout.remove_garbage(self.root)
            rows = manifest.latest(manifest.read_all(self.root))
        except BaseException:
            self._lock.close()
            raise
        self._done = set(rows.loc[rows["status"] == "ok", "video_id"])
        parts = layout.part_indices(self.root)
        self._index = parts[-1] + 1 if parts else 0

        self._rows: list[dict] = []        # rows of the open batch
        self._committed: list[dict] = []   # rows committed by this writer
        self._shard: ShardWriter | None = None
        self._shard_tmp: Path | None = None
        self._shard_bytes = 0
        self._video: dict | None = None    # the open video's row
        self._closed = False

    # ---- setup -------------------------------------------------------------------------------------
    def _acquire_lock(self):
        handle = open(self.root / layout.LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreBusyError(f"another StoreWriter is writing {self.root}") from None
        return handle

    def _open_info(self, fingerprint: dict) -> dict:
        wanted = {"format_version": layout.FORMAT_VERSION, "format": self.format, "dtype": self.dtype,
                  "fingerprint": fingerprint, "semantic_shape": list(self.semantic_shape),
                  "spatiotemporal_shape": list(self.spatiotemporal_shape)}
        if (self.root / layout.STORE_JSON).is_file():
            existing = layout.read_info(self.root)
            differences = layout.describe_mismatch(existing, wanted)
            if differences:
                raise StoreMismatchError(
                    f"{self.root} holds a store written with other settings: " + "; ".join(differences)
                    + " (rerun with --overwrite, or overwrite=True, to replace it)")
            return existing
        info = {**wanted, "created": layout.now_iso()}
        layout.write_json_atomic(self.root / layout.STORE_JSON, info)
        return info

    # ---- state -------------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """video_ids whose latest committed row is ok (resume skips these; failed ones are retried)."""
        return set(self._done)

    def removed_garbage(self) -> list[str]:
        """Entries (relative to the store root) deleted as uncommitted leftovers when opening."""
        return list(self._removed)

    # ---- per video ---------------------------------------------------------------------------------
    def begin_video(self, video_id: str, path: str, meta: dict | None = None) -> None:
        """Open a video; `meta` may hold n_frames, duration_s, native_fps."""
        self._check_writable()
        if self._video is not None:
            raise RuntimeError(f"begin_video({video_id!r}) while {self._video['video_id']!r} is open; "
                               "call end_video or abort_video first")
        self._video = self._new_row(video_id, path, meta)
        if self._shard is None:
            self._open_shard()
        self._shard.begin(self._video["key"])

    def add_frames(self, semantic, spatiotemporal, timestamps) -> None:
        """Append a chunk of the open video: semantic [k, P, D], spatiotemporal [k, M, D], timestamps [k]
        (seconds). Any float dtype, numpy or torch; cast to the storage dtype."""
        if self._video is None:
            raise RuntimeError("add_frames called with no open video; call begin_video first")
        sem, spt, ts = as_numpy(semantic), as_numpy(spatiotemporal), as_numpy(timestamps)
        k = len(ts) if ts.ndim == 1 else len(sem)
        problems = []
        if ts.shape != (k,):
            problems.append(f"timestamps must be [{k}], got {list(ts.shape)}")
        if sem.shape != (k, *self.semantic_shape):
            problems.append(f"semantic must be [{k}, {self.semantic_shape[0]}, {self.semantic_shape[1]}], "
                            f"got {list(sem.shape)}")
        if spt.shape != (k, *self.spatiotemporal_shape):
            problems.append(f"spatiotemporal must be [{k}, {self.spatiotemporal_shape[0]}, "
                            f"{self.spatiotemporal_shape[1]}], got {list(spt.shape)}")
        if problems:
            raise ValueError(f"add_frames for {self._video['video_id']!r}: " + "; ".join(problems))
        self._shard.add(encode(sem, self.dtype), encode(spt, self.dtype),
                        np.ascontiguousarray(ts, dtype=np.float32))

    def end_video(self) -> dict:
        """Finish the open video; returns its (ok) manifest row. May commit the shard afterwards."""
        if self._video is None:
            raise RuntimeError("end_video called with no open video")
        row, self._video = self._video, None
        sidecar = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                   for k, v in row.items() if k in ("video_id", "path", *_META_KEYS)}
        extent = self._shard.end(sidecar)
        row.update(status="ok", shard=layout.shard_name(self._index, self.format),
                   start=extent.start, length=extent.length, bytes=self._video_bytes(extent.length))
        if row["n_frames"] is None:
            row["n_frames"] = extent.length
        return self._record(row)

    def abort_video(self, error: str) -> dict:
        """Drop the open video's frames and record it as failed with `error`."""
        if self._video is None:
            raise RuntimeError("abort_video called with no open video")
        row, self._video = self._video, None
        self._shard.abort()
        row.update(status="failed", error=str(error) or "aborted", n_frames=row["n_frames"] or 0)
        return self._record(row)

    def add_failed(self, video_id: str, path: str, error: str, meta: dict | None = None) -> dict:
        """Record a video that produced no frames (e.g. decode error) as failed."""
        self._check_writable()
        if self._video is not None:
            raise RuntimeError(f"add_failed({video_id!r}) while {self._video['video_id']!r} is open")
        row = self._new_row(video_id, path, meta)
        row.update(status="failed", error=str(error) or "failed", n_frames=row["n_frames"] or 0)
        return self._record(row)

    # ---- batches -----------------------------------------------------------------------------------
    def close(self) -> list[dict]:
        """Commit the open batch (if it has any row) and release the store. A video still open is
        recorded as failed. Returns every row this writer committed."""
        if self._closed:
            return list(self._committed)
        if self._video is not None:
            self.abort_video("writer closed before end_video")
        if self._rows:
            self._commit()
        self._release()
        return list(self._committed)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # crash path: leave the temp shard uncommitted; the next open removes it
            if self._shard is not None:
                self._shard.release()
            self._release()

    def _open_shard(self) -> None:
        final = layout.shard_name(self._index, self.format)
        self._shard_tmp = self.root / layout.temp_name(final)
        kwargs = dict(dtype=on_disk_dtype(self.dtype), semantic_shape=self.semantic_shape,
                      spatiotemporal_shape=self.spatiotemporal_shape,
                      attributes={"dtype": self.dtype, "on_disk_dtype": str(on_disk_dtype(self.dtype))})
        if self.format == "zarr":
            kwargs["frames_per_zarr_shard"] = self.frames_per_zarr_shard
        self._shard = _BACKENDS[self.format](self._shard_tmp, **kwargs)

    def _commit(self) -> None:
        """Complete and rename the shard (if any video reached it), then write the manifest part."""
        if self._shard is not None:
            self._shard.close()
            os.replace(self._shard_tmp, self.root / layout.shard_name(self._index, self.format))
        manifest.write_part(self.root, self._index, self._rows)
        for row in self._rows:
            (self._done.add if row["status"] == "ok" else self._done.discard)(row["video_id"])
        self._committed.extend(self._rows)
        self._rows, self._shard, self._shard_tmp, self._shard_bytes = [], None, None, 0
        self._index += 1

    def _record(self, row: dict) -> dict:
        self._rows.append(row)
        self._shard_bytes += row["bytes"]
        if len(self._rows) >= self.videos_per_shard or self._shard_bytes >= self.max_shard_bytes:
            self._commit()
        return dict(row)

    # ---- helpers -----------------------------------------------------------------------------------
    def _new_row(self, video_id: str, path: str, meta: dict | None) -> dict:
        meta = dict(meta or {})
        unknown = sorted(set(meta) - set(_META_KEYS))
        if unknown:
            raise ValueError(f"meta for {video_id!r} has unknown keys {unknown}; allowed: {list(_META_KEYS)}")
        return {"video_id": video_id, "key": safe_key(video_id), "path": str(path), "status": "",
                "error": "",
                "n_frames": None if meta.get("n_frames") is None else int(meta["n_frames"]),
                "duration_s": _float_or_nan(meta.get("duration_s")),
                "native_fps": _float_or_nan(meta.get("native_fps")),
                "shard": None, "start": 0, "length": 0, "bytes": 0}

    def _video_bytes(self, length: int) -> int:
        """Uncompressed stored bytes of one video's three arrays."""
        (p, d), (m, d_st) = self.semantic_shape, self.spatiotemporal_shape
        return length * ((p * d + m * d_st) * on_disk_dtype(self.dtype).itemsize + 4)

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"StoreWriter for {self.root} is closed")

    def _release(self) -> None:
        self._closed = True
        self._lock.close()
