"""Turn encoded chunk rows into stored videos: one manifest row per video per group, whatever order rows come in.

A writer (``extract/writer_actor.py``) receives the chunk rows of its videos (see ``extract/stages.py`` for their
keys) interleaved with other videos', a video's own chunks possibly out of order (several encoder actors), and
possibly twice (Ray retries a task whose actor died). ``VideoAssembler`` puts each video's chunks back in order,
drops repeats, and feeds them to each group's ``SlotWriter``, so a video is stored once, whole, in one shard per
group.

A row's ``need`` names the groups that still lack the video; each gets the row's ``<group>/<tap>`` arrays. A
video fails in a group at its first error for that group (a decode error, ``chunk`` -1, fails it in every group;
an encoder error in its own group only); later rows of it are dropped there, so a video never gets a second row
or a partial ok row in any group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INCOMPLETE = "its chunks did not all reach the writer (chunk {chunk} never came)"


@dataclass
class Outcome:
    """What one writer stored: counts over videos (ok = stored by every group that needed it) and per group."""

    ok: int = 0
    failed: int = 0
    frames: int = 0
    bytes: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    groups: dict[str, dict] = field(default_factory=dict)
    """Per group: ``{"ok", "failed", "frames", "bytes"}``."""

    def merge(self, other: "Outcome") -> None:
        self.ok, self.failed = self.ok + other.ok, self.failed + other.failed
        self.frames, self.bytes = self.frames + other.frames, self.bytes + other.bytes
        self.failures += other.failures
        for name, counts in other.groups.items():
            mine = self.groups.setdefault(name, dict.fromkeys(counts, 0))
            for key, value in counts.items():
                mine[key] += value


@dataclass
class _Video:
    path: str
    need: list[str]
    meta: dict
    next_chunk: int = 0
    pending: dict[int, dict] = field(default_factory=dict)   # chunks that came before their turn
    results: dict[str, dict] = field(default_factory=dict)   # group -> committed-to-be manifest row


class VideoAssembler:
    """Feed chunk rows to ``writers`` (group name -> ``SlotWriter``); ``close`` commits and returns the ``Outcome``."""

    def __init__(self, writers: dict):
        self.writers = writers
        self.outcome = Outcome(groups={name: {"ok": 0, "failed": 0, "frames": 0, "bytes": 0} for name in writers})
        self._videos: dict[str, _Video] = {}
        self._finished: set[str] = set()

    def add(self, row: dict) -> None:
        """One chunk row (``chunk`` -1 with ``error`` set: the video failed to decode)."""
        vid = row["video_id"]
        if vid in self._finished:
            return                        # a repeat, or leftovers of a video every group has already ended
        video = self._videos.get(vid)
        if video is None:
            need = [g for g in str(row.get("need") or "").split(",") if g] or list(self.writers)
            video = self._videos[vid] = _Video(str(row["path"]), need, _meta(row))
        chunk = int(row["chunk"])
        if row["error"] or chunk < 0:
            self._fail_everywhere(vid, video, str(row["error"]) or "decode failed")
            return
        if chunk < video.next_chunk or chunk in video.pending:
            return                        # a repeat of a chunk already taken
        video.pending[chunk] = row
        while video.next_chunk in video.pending and vid not in self._finished:
            self._write_chunk(vid, video, video.pending.pop(video.next_chunk))
            video.next_chunk += 1

    def close(self, drop_incomplete: bool = False) -> Outcome:
        """Commit every shard and return the ``Outcome``. Videos whose chunks never all arrived are recorded as
        failed, or with ``drop_incomplete`` (a run that stopped) left without a row, for the rerun to do."""
        for vid, video in list(self._videos.items()):
            if drop_incomplete:
                for group in video.need:
                    if group not in video.results and self.writers[group].video_open(vid):
                        self.writers[group].discard_video(vid)
                    # a group that already has its row keeps it: that part of the video is done
                del self._videos[vid]
            else:
                self._fail_everywhere(vid, video, INCOMPLETE.format(chunk=video.next_chunk))
        for writer in self.writers.values():
            writer.close()
        return self.outcome

    def abandon(self) -> None:
        for writer in self.writers.values():
            writer.abandon()

    def _write_chunk(self, vid: str, video: _Video, row: dict) -> None:
        for group in video.need:
            if group in video.results:
                continue
            writer = self.writers[group]
            error = row.get(f"{group}/error", "")
            if error:
                self._fail(vid, video, group, str(error))
                continue
            if not writer.video_open(vid):
                writer.begin_video(vid, video.path, video.meta)
            writer.add_frames(vid, _arrays(row, group, writer), row["timestamps"])
            if row["last"]:
                result = video.results[group] = writer.end_video(vid)
                counts = self.outcome.groups[group]
                counts["ok"] += 1
                counts["frames"] += int(result["length"])
                counts["bytes"] += int(result["bytes"])
        self._finish_if_done(vid, video)

    def _fail_everywhere(self, vid: str, video: _Video, error: str) -> None:
        for group in video.need:
            if group not in video.results:
                self._fail(vid, video, group, error)
        self._finish_if_done(vid, video)

    def _fail(self, vid: str, video: _Video, group: str, error: str) -> None:
        writer = self.writers[group]
        if writer.video_open(vid):
            video.results[group] = writer.abort_video(vid, error)
        else:
            video.results[group] = writer.add_failed(vid, video.path, error, meta={**video.meta, "n_frames": 0})
        self.outcome.groups[group]["failed"] += 1

    def _finish_if_done(self, vid: str, video: _Video) -> None:
        if len(video.results) < len(video.need):
            return
        results = [video.results[g] for g in video.need]
        failed = [r for r in results if r["status"] != "ok"]
        if failed:
            self.outcome.failed += 1
            self.outcome.failures.append((vid, failed[0]["error"]))
        else:
            self.outcome.ok += 1
            self.outcome.frames += int(results[0]["length"])
            self.outcome.bytes += sum(int(r["bytes"]) for r in results)
        del self._videos[vid]
        self._finished.add(vid)


def _meta(row: dict) -> dict:
    return dict(n_frames=int(row["n_frames"]), duration_s=float(row["duration_s"]),
                native_fps=float(row["native_fps"]))


def _arrays(row: dict, group: str, writer) -> dict:
    """The arrays of ``row`` that ``group`` stores: its encoder's taps, or the decoded pixels and boxes."""
    if writer.kind == "pixels":
        return {"frames": row["pixels"], "box": row["box"]}
    return {tap: row[f"{group}/{tap}"] for tap in writer.taps}
