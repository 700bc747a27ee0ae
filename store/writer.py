"""`GroupWriter`: turns a stream of videos (each a stream of frame chunks) into committed shards of one
stream group of a store.

Legend: k frames in a chunk; each tap has its own per-frame shape (e.g. semantic [P, D]).

Commit protocol (per group). Batch i is written to `shard-<i>.<ext>.tmp-<random>`, renamed to
`shard-<i>.<ext>` once complete, and only then committed by writing `manifest/part-<i>.parquet` (itself temp +
rename). Opening a group removes its temp shards and shards without a part. One `GroupWriter` per group at a
time (an advisory lock on `groups/<name>/.writer.lock`); it writes the group itself, or hands disjoint shard
names to several parallel `SlotWriter`s (`slot_specs`, see `slot_writer.py`), so one writer per shard, always.
Writers of other groups of the same store never touch this group's files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from pathlib import Path

from . import info as store_info
from . import layout, manifest
from .dtypes import STORAGE_DTYPES
from .errors import StoreBusyError, StoreMismatchError
from .info import GROUP_JSON, GROUP_KINDS, SAMPLING_KEYS, GroupInfo, TapInfo
from .slot_writer import BACKENDS as _BACKENDS
from .slot_writer import SLOTS_LOCK, SlotSpec, SlotWriter


def _check_args(group, kind, format, taps, fingerprint, sampling, videos_per_shard, max_shard_bytes) -> list[str]:
    problems = []
    try:
        store_info.check_name(group)
    except ValueError as e:
        problems.append(str(e))
    if kind not in GROUP_KINDS:
        problems.append(f"kind must be one of {list(GROUP_KINDS)}, got {kind!r}")
    if format not in _BACKENDS:
        problems.append(f"format must be one of {sorted(_BACKENDS)}, got {format!r}")
    if not taps:
        problems.append("taps must name at least one array")
    for name, tap in taps.items():
        try:
            store_info.check_name(name, "tap name")
        except ValueError as e:
            problems.append(str(e))
        if tap.dtype not in STORAGE_DTYPES:
            problems.append(f"tap {name!r}: dtype must be one of {list(STORAGE_DTYPES)}, got {tap.dtype!r}")
        if not tap.shape or any(int(n) < 1 for n in tap.shape):
            problems.append(f"tap {name!r}: shape must be positive ints, got {list(tap.shape)}")
    if not isinstance(fingerprint, dict):
        problems.append(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
    else:
        try:
            json.dumps(fingerprint)
        except (TypeError, ValueError) as err:
            problems.append(f"fingerprint must be JSON-serialisable: {err}")
    if set(sampling) != set(SAMPLING_KEYS):
        problems.append(f"sampling must give exactly {list(SAMPLING_KEYS)}, got {sorted(sampling)}")
    if videos_per_shard < 1:
        problems.append(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    if max_shard_bytes < 1:
        problems.append(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    return problems


def _taps(taps: dict, dtype: str) -> dict[str, TapInfo]:
    """Accept {name: TapInfo} or {name: shape} (stored in `dtype`)."""
    return {name: tap if isinstance(tap, TapInfo) else TapInfo(tuple(int(n) for n in tap), dtype)
            for name, tap in taps.items()}


class GroupWriter:
    """Write videos into stream group `group` of the store at `root`, resuming a compatible existing one.

    Usage:
        with GroupWriter(root, "eva", taps={"semantic": (257, 1024), "spatiotemporal": (64, 1024)},
                         fingerprint=fp, sampling={"fps": 1.0, "max_frames": 64}) as w:
            for vid in videos:
                if vid.id in w.done_ids(): continue
                w.begin_video(vid.id, vid.path, {"n_frames": ..., "duration_s": ..., "native_fps": ...})
                for arrays, ts in chunks:   # {"semantic": [k, P, D], ...}, [k]
                    w.add_frames(arrays, ts)
                w.end_video()                 # or w.abort_video(str(err)); w.add_failed(...) for no frames

    Or, for parallel writers: `specs = w.slot_specs(n)`, one `SlotWriter(spec)` per spec (each in its own
    process if need be); `w` itself then writes nothing and only holds the group until `close`.

    `taps` maps each tap to its per-frame shape (stored in `dtype`) or to a `TapInfo` (its own storage dtype,
    e.g. uint8 pixels). The store's `store.json` is created by the first group; every later group must ask
    for the same `sampling` (fps, max_frames), and an existing group the same kind, format, taps and
    fingerprint, else `StoreMismatchError` names each differing key. `overwrite=True` replaces this group
    only; other groups are never touched.

    Leaving the `with` block normally commits the open shard; leaving it by an exception does not (the
    temp shard is removed on the next open, and its videos are redone).
    A shard is committed after `videos_per_shard` rows (ok or failed) or once its videos hold
    `max_shard_bytes` uncompressed bytes; a video never spans shards.
    """

    def __init__(self, root, group: str, *, taps: dict, fingerprint: dict, sampling: dict, kind: str = "encoder",
                 format: str = "zarr", dtype: str = "float16", videos_per_shard: int = 256,
                 max_shard_bytes: int = 2**30, overwrite: bool = False, frames_per_zarr_shard: int = 64,
                 stale_writers_wait_s: float = 60.0):
        taps = _taps(taps, dtype)
        problems = _check_args(group, kind, format, taps, fingerprint, sampling, videos_per_shard, max_shard_bytes)
        if problems:
            raise ValueError("invalid GroupWriter arguments:\n  " + "\n  ".join(problems))
        self.root, self.name = Path(root), group
        self.dir = store_info.group_dir(self.root, group)
        self.format, self.kind, self.taps = format, kind, taps
        self.videos_per_shard, self.max_shard_bytes = videos_per_shard, max_shard_bytes
        self.frames_per_zarr_shard = frames_per_zarr_shard

        fingerprint = json.loads(json.dumps(fingerprint))   # as it will read back from group.json
        self.root.mkdir(parents=True, exist_ok=True)
        if store_info.is_v1_store(self.root):   # before anything is created inside it
            raise StoreMismatchError(store_info.migrate_hint(self.root))
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = self._acquire_lock()
        try:
            self._check_store(dict(sampling), overwrite)
            with self._no_slot_writers(stale_writers_wait_s):
                if overwrite:
                    layout.clear_shards(self.dir, GROUP_JSON)
                self.info = self._open_group(fingerprint)
                self._removed = layout.remove_garbage(self.dir)
            rows = manifest.latest(manifest.read_all(self.dir))
        except BaseException:
            self._lock.close()
            if created and {p.name for p in self.dir.iterdir()} <= {layout.LOCK_FILE, SLOTS_LOCK}:
                for name in (layout.LOCK_FILE, SLOTS_LOCK):   # leave no empty group behind
                    (self.dir / name).unlink(missing_ok=True)
                self.dir.rmdir()
            raise
        self._done = set(rows.loc[rows["status"] == "ok", "video_id"])
        parts = layout.part_indices(self.dir)
        self.first_index = parts[-1] + 1 if parts else 0
        """Shards of this run get indices from here on (above every committed one)."""
        self._own: SlotWriter | None = None      # this object's own writing (slot 0 of 1)
        self._video: str | None = None           # the video open in it
        self._handed_out = False
        self._closed = False

    # ---- setup -------------------------------------------------------------------------------------
    def _check_store(self, sampling: dict, overwrite: bool) -> None:
        """Create `store.json` or check that the store samples frames the way this group asks.

        Other sampling is refused, naming each key, unless `overwrite` and this group is the store's only
        one: then the store's sampling is replaced with the group.
        """
        path = self.root / layout.STORE_JSON
        wanted = {"format_version": store_info.FORMAT_VERSION, "sampling": sampling, "created": layout.now_iso()}
        if not path.is_file() and layout.create_json_once(path, wanted):
            return
        have = layout.read_info(self.root).get("sampling") or {}
        differences = [f"{key}: store has {have.get(key)!r}, requested {sampling.get(key)!r}"
                       for key in SAMPLING_KEYS if have.get(key) != sampling.get(key)]
        if not differences:
            return
        others = [g for g in store_info.group_names(self.root) if g != self.name]
        if overwrite and not others:
            layout.write_json_atomic(path, wanted)
            return
        why = (f"its group(s) {', '.join(others)} were sampled that way" if others
               else "every group of a store shares its frame sampling")
        raise StoreMismatchError(
            f"{self.root} samples frames otherwise (" + "; ".join(differences) + f"): {why}; use the store's values, "
            "another store directory" + ("" if others else ", or --overwrite"))

    def _acquire_lock(self):
        handle = open(self.dir / layout.LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreBusyError(f"another writer is writing group {self.name!r} of {self.root}") from None
        return handle

    @contextlib.contextmanager
    def _no_slot_writers(self, wait_s: float):
        """Hold `.slots.lock` exclusively: no `SlotWriter` of an earlier, killed run (e.g. a Ray actor that outlived
        its driver for a moment) can commit while this run cleans the group. Waits up to `wait_s` for them."""
        handle = open(self.dir / SLOTS_LOCK, "a")
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreBusyError(
                            f"writers of an earlier run still hold group {self.name!r} of {self.root} "
                            f"({self.dir / SLOTS_LOCK}) after {wait_s:.0f} s; stop that run first") from None
                    time.sleep(0.2)
            yield
        finally:
            handle.close()

    def _open_group(self, fingerprint: dict) -> GroupInfo:
        wanted = GroupInfo(self.name, self.dir, self.kind, self.format, fingerprint, self.taps, layout.now_iso())
        if (self.dir / GROUP_JSON).is_file():
            existing = store_info.read_group(self.root, self.name)
            def flat(g: GroupInfo) -> dict:
                return {"kind": g.kind, "format": g.format, "fingerprint": g.fingerprint,
                        **{f"taps.{name}": tap.to_json() for name, tap in g.taps.items()}}

            have, want = flat(existing), flat(wanted)
            keys = ("kind", "format", *sorted(k for k in set(have) | set(want) if k.startswith("taps.")))
            differences = layout.describe_mismatch(have, want, keys)
            if differences:
                raise StoreMismatchError(
                    f"group {self.name!r} of {self.root} was written with other settings: " + "; ".join(differences)
                    + " (rerun with --overwrite, or overwrite=True, to replace this group; other groups stay)")
            return existing
        layout.write_json_atomic(self.dir / GROUP_JSON, wanted.to_json())
        return wanted

    # ---- state -------------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        """video_ids whose latest committed row is ok (resume skips these; failed ones are retried); counts this
        writer's own commits, not those of slot writers it handed names to."""
        done = set(self._done)
        for row in self._own.committed() if self._own else []:
            (done.add if row["status"] == "ok" else done.discard)(row["video_id"])
        return done

    def removed_garbage(self) -> list[str]:
        """Entries (relative to the store root) deleted as uncommitted leftovers when opening."""
        return list(self._removed)

    def video_open(self) -> bool:
        """True between `begin_video` and `end_video`/`abort_video`."""
        return self._video is not None

    def slot_specs(self, slots: int) -> list[SlotSpec]:
        """Disjoint shard names for `slots` parallel `SlotWriter`s of this run; this writer then writes nothing."""
        self._check_writable()
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if self._own is not None:
            raise RuntimeError(f"group {self.name!r}: slot_specs after this writer wrote videos itself")
        self._handed_out = True
        return [self._slot_spec(slot, slots) for slot in range(slots)]

    def _slot_spec(self, slot: int, slots: int) -> SlotSpec:
        return SlotSpec(str(self.root), self.name, slot, slots, self.first_index, self.videos_per_shard,
                        self.max_shard_bytes, self.frames_per_zarr_shard)

    # ---- per video (this writer's own writing: one video open at a time) ----------------------------
    def begin_video(self, video_id: str, path: str, meta: dict | None = None) -> None:
        """Open a video; `meta` may hold n_frames, duration_s, native_fps."""
        if self._video is not None:
            raise RuntimeError(f"begin_video({video_id!r}) while {self._video!r} is open; "
                               "call end_video or abort_video first")
        self._writer().begin_video(video_id, path, meta)
        self._video = video_id

    def add_frames(self, arrays: dict, timestamps) -> None:
        """Append a chunk of the open video: one array per tap, each [k, *shape], and timestamps [k] (seconds).
        Any float dtype, numpy or torch, for feature taps; cast to each tap's storage dtype."""
        if self._video is None:
            raise RuntimeError("add_frames called with no open video; call begin_video first")
        self._own.add_frames(self._video, arrays, timestamps)

    def end_video(self) -> dict:
        """Finish the open video; returns its (ok) manifest row. May commit the shard afterwards."""
        if self._video is None:
            raise RuntimeError("end_video called with no open video")
        video, self._video = self._video, None
        return self._own.end_video(video)

    def abort_video(self, error: str) -> dict:
        """Drop the open video's frames and record it as failed with `error`."""
        if self._video is None:
            raise RuntimeError("abort_video called with no open video")
        video, self._video = self._video, None
        return self._own.abort_video(video, error)

    def add_failed(self, video_id: str, path: str, error: str, meta: dict | None = None) -> dict:
        """Record a video that produced no frames (e.g. decode error) as failed."""
        if self._video is not None:
            raise RuntimeError(f"add_failed({video_id!r}) while {self._video!r} is open")
        return self._writer().add_failed(video_id, path, error, meta)

    # ---- batches -----------------------------------------------------------------------------------
    def close(self) -> list[dict]:
        """Commit the open batch (if it has any row) and release the store. A video still open is
        recorded as failed. Returns every row this writer committed."""
        if self._closed:
            return self._own.committed() if self._own else []
        if self._video is not None:
            self.abort_video("writer closed before end_video")
        rows = self._own.close() if self._own else []
        self._release()
        return rows

    def __enter__(self) -> "GroupWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()

    def abandon(self) -> None:
        """Crash path: release the group without committing the open shard (the next open removes it)."""
        if self._closed:
            return
        if self._own is not None:
            self._own.abandon()
        self._release()

    def _writer(self) -> SlotWriter:
        self._check_writable()
        if self._handed_out:
            raise RuntimeError(f"group {self.name!r}: this writer handed its shard names to slot writers")
        if self._own is None:
            self._own = SlotWriter(self._slot_spec(0, 1))
        return self._own

    def _check_writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"GroupWriter for group {self.name!r} of {self.root} is closed")

    def _release(self) -> None:
        self._closed = True
        self._lock.close()
