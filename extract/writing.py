"""Feed the pipeline's chunk rows into the run's group writers: one manifest row per video per group.

Rows arrive in corpus order, a video's chunks consecutively (see ``extract/stages.py`` for their keys). A
row's ``need`` names the groups that still lack the video; each of them gets the row's ``<group>/<tap>``
arrays. A video fails in a group at its first error row for that group (a decode error fails it in every
group; an encoder error in its own group only); later rows of it are dropped there, so a video never gets a
second row or a partial ok row in any group.
"""

from __future__ import annotations

from dualfocus.extract.run import ExtractSummary


def _meta(row: dict, n_frames: int | None = None) -> dict:
    return dict(n_frames=int(row["n_frames"]) if n_frames is None else n_frames,
                duration_s=float(row["duration_s"]), native_fps=float(row["native_fps"]))


def write_rows(rows, writers: dict, summary: ExtractSummary, on_video=None) -> None:
    """Write chunk rows (in order) into ``writers`` (group name -> ``GroupWriter``) and count the outcome.

    ``summary`` counts a video ok when every group that needed it stored it, failed (with its first reason)
    otherwise; ``summary.groups`` counts per group. ``on_video(result_row)`` is called once per video.
    """
    for name in writers:
        summary.groups.setdefault(name, {"ok": 0, "failed": 0, "frames": 0, "bytes": 0})
    video, need, results, finished = None, [], {}, None
    for row in rows:
        vid = row["video_id"]
        if vid == finished:
            continue                      # leftovers of a video every group has already ended
        if vid != video:
            video, results = vid, {}
            need = [g for g in (row.get("need") or "").split(",") if g] or list(writers)
        for group in need:
            if group in results:
                continue
            writer, counts = writers[group], summary.groups[group]
            error = row["error"] or row.get(f"{group}/error", "")
            if error:
                if writer.video_open():
                    results[group] = writer.abort_video(error)
                else:
                    results[group] = writer.add_failed(vid, row["path"], error, meta=_meta(row, 0))
                counts["failed"] += 1
                continue
            if not writer.video_open():
                writer.begin_video(vid, row["path"], _meta(row))
            writer.add_frames(_arrays(row, group, writer), row["timestamps"])
            if row["last"]:
                result = results[group] = writer.end_video()
                counts["ok"] += 1
                counts["frames"] += int(result["length"])
                counts["bytes"] += int(result["bytes"])
        if len(results) == len(need):
            _count_video(vid, [results[g] for g in need], summary)
            if on_video:
                on_video(next((r for r in results.values() if r["status"] != "ok"), results[need[0]]))
            video, finished = None, vid


def _arrays(row: dict, group: str, writer) -> dict:
    """The arrays of ``row`` that ``group`` stores: its encoder's taps, or the decoded pixels and boxes."""
    if writer.kind == "pixels":
        return {"frames": row["pixels"], "box": row["box"]}
    return {tap: row[f"{group}/{tap}"] for tap in writer.taps}


def _count_video(vid: str, results: list[dict], summary: ExtractSummary) -> None:
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        summary.failed += 1
        summary.failures.append((vid, failed[0]["error"]))
    else:
        summary.ok += 1
        summary.frames += int(results[0]["length"])
        summary.bytes += sum(int(r["bytes"]) for r in results)
