"""The per-item pieces of extract without Ray: a video's chunk rows (decode_chunks) and how the driver
turns the ordered row stream into manifest rows (write_rows)."""

from __future__ import annotations

import numpy as np
import pytest

from dualfocus.extract.config import ExtractConfig
from dualfocus.extract.decode import DecodeError, VideoInfo
from dualfocus.extract.run import ExtractSummary
from dualfocus.extract.writing import write_rows
from dualfocus.extract.stages import decode_chunks
from dualfocus.store import FeatureStore, GroupWriter
from dualfocus.store.manifest import read_all

P, M, D = 5, 2, 3
ITEM = {"video_id": "v", "path": "v.mp4"}


def fake_decoder(n: int, chunk: int, fail_after: int | None = None, short_by: int = 0):
    """A ``decode_fn`` giving ``n`` frames (frame i filled with i) in chunks of ``chunk``."""

    def decode(path, fps, max_frames, size, chunk_frames):
        timestamps = np.arange(n) / fps

        def chunks():
            for i, lo in enumerate(range(0, n - short_by, chunk)):
                if fail_after is not None and i == fail_after:
                    raise DecodeError("video data ends early (truncated file?)")
                hi = min(lo + chunk, n - short_by)
                yield np.arange(lo, hi, dtype=np.uint8)[:, None, None, None] * np.ones((1, size, size, 3), np.uint8)

        return VideoInfo(n / fps, 10.0, n * 10, 8, 8, "fake"), timestamps, chunks()

    return decode


def test_decode_chunks_flags_only_the_last_chunk():
    rows = list(decode_chunks(ITEM, fake_decoder(5, 2), fps=2.0, max_frames=None, size=4, chunk_frames=2))
    assert [(r["chunk"], r["last"], len(r["frames"])) for r in rows] == [(0, False, 2), (1, False, 2), (2, True, 1)]
    assert all(r["error"] == "" and r["n_frames"] == 5 and r["duration_s"] == 2.5 for r in rows)
    np.testing.assert_array_equal(np.concatenate([r["timestamps"] for r in rows]), [0, 0.5, 1, 1.5, 2])
    assert rows[2]["frames"].shape == (1, 4, 4, 3) and rows[2]["frames"][0, 0, 0, 0] == 4


def test_decode_chunks_carry_the_groups_that_need_the_video():
    item = {**ITEM, "need": "dino,siglip"}
    rows = list(decode_chunks(item, fake_decoder(5, 2), fps=2.0, max_frames=None, size=4, chunk_frames=2))
    (failed,) = decode_chunks(item, fake_decoder(5, 2, fail_after=0), fps=2.0, max_frames=None, size=4,
                              chunk_frames=2)
    assert [r["need"] for r in rows] == ["dino,siglip"] * 3 and failed["need"] == "dino,siglip" and failed["error"]


@pytest.mark.parametrize("decoder, chunks_before_error, reason", [
    (fake_decoder(5, 2, fail_after=2), 1, "video data ends early (truncated file?)"),
    (fake_decoder(5, 2, short_by=1), 1, "RuntimeError: decoder returned 4 of 5 sampled frames"),
])
def test_decode_chunks_ends_a_failing_video_with_one_error_row(decoder, chunks_before_error, reason):
    rows = list(decode_chunks(ITEM, decoder, fps=1.0, max_frames=None, size=4, chunk_frames=2))
    assert [r["error"] for r in rows] == [""] * chunks_before_error + [reason]
    assert not any(r["last"] for r in rows[:-1]) and rows[-1]["chunk"] == -1 and len(rows[-1]["frames"]) == 0


def test_decode_chunks_never_raises_for_a_bad_file():
    def broken(*args):
        raise DecodeError("file not found")

    (row,) = decode_chunks(ITEM, broken, fps=1.0, max_frames=None, size=4, chunk_frames=2)
    assert row["error"] == "file not found" and row["frames"].shape == (0, 4, 4, 3)


def chunk(vid: str, k: int, *, first: int = 0, last: bool = False, error: str = "", need: str = "",
          errors: dict | None = None) -> dict:
    """An encoded chunk row of video ``vid`` with frames ``first .. first+k-1`` (values = frame number), with
    arrays for groups eva (semantic, spatiotemporal) and dino (grid); ``errors`` = per-group encoder errors."""
    values = np.arange(first, first + k, dtype=np.float32)
    errors = errors or {}
    return {"video_id": vid, "path": f"{vid}.mp4", "last": last, "error": error, "n_frames": 4, "need": need,
            "duration_s": 4.0, "native_fps": 10.0, "timestamps": values,
            "eva/semantic": np.broadcast_to(values[:, None, None], (k, P, D)),
            "eva/spatiotemporal": np.broadcast_to(values[:, None, None], (k, M, D)),
            "dino/grid": np.broadcast_to(-values[:, None, None], (k, M, D)),
            "eva/error": errors.get("eva", ""), "dino/error": errors.get("dino", "")}


def writer(root, group: str) -> GroupWriter:
    taps = {"semantic": (P, D), "spatiotemporal": (M, D)} if group == "eva" else {"grid": (M, D)}
    return GroupWriter(root, group, taps=taps, fingerprint={"t": 1}, sampling={"fps": 1.0, "max_frames": None})


def test_write_rows_gives_one_manifest_row_per_video(tmp_path):
    rows = [
        chunk("ok1", 2), chunk("ok1", 2, first=2, last=True),
        chunk("cut", 2), chunk("cut", 0, error="video data ends early"),           # aborted mid-video
        chunk("never", 0, error="file not found"),                                   # failed before any frame
        chunk("batch", 0, error="encoder failed: OOM"), chunk("batch", 0, error="encoder failed: OOM"),
        chunk("batch", 2, first=2, last=True),                                       # leftovers of a failed batch
        chunk("ok2", 4, last=True),
    ]
    summary = ExtractSummary(store=str(tmp_path))
    seen = []
    with writer(tmp_path, "eva") as eva:
        write_rows(iter(rows), {"eva": eva}, summary, on_video=seen.append)
    assert (summary.ok, summary.failed, summary.frames) == (2, 3, 8)
    assert [v for v, _ in summary.failures] == ["cut", "never", "batch"]
    assert [r["video_id"] for r in seen] == ["ok1", "cut", "never", "batch", "ok2"]

    manifest = read_all(tmp_path / "groups" / "eva")
    assert list(manifest["video_id"]) == ["ok1", "cut", "never", "batch", "ok2"]
    assert list(manifest["status"]) == ["ok", "failed", "failed", "failed", "ok"]
    store = FeatureStore.open(tmp_path)
    for vid in ("ok1", "ok2"):
        np.testing.assert_array_equal(store[vid].timestamps, [0, 1, 2, 3])
        np.testing.assert_array_equal(store[vid]["semantic"][:, 0, 0], [0, 1, 2, 3])


def test_write_rows_feeds_each_group_what_it_needs(tmp_path):
    """One decode, two groups: a video already in eva goes to dino only; an encoder error fails its group only;
    a decode error fails the video in every group that needed it."""
    rows = [
        chunk("both", 2), chunk("both", 2, first=2, last=True),
        chunk("dino_only", 4, last=True, need="dino"),
        chunk("dino_oom", 2, errors={"dino": "encoder failed: OOM"}), chunk("dino_oom", 2, first=2, last=True),
        chunk("broken", 2), chunk("broken", 0, error="video data ends early"),
    ]
    summary = ExtractSummary(store=str(tmp_path))
    seen = []
    with writer(tmp_path, "eva") as eva, writer(tmp_path, "dino") as dino:
        write_rows(iter(rows), {"eva": eva, "dino": dino}, summary, on_video=seen.append)
    assert [r["video_id"] for r in seen] == ["both", "dino_only", "dino_oom", "broken"]
    assert (summary.ok, summary.failed, summary.frames) == (2, 2, 8)
    assert summary.failures == [("dino_oom", "encoder failed: OOM"), ("broken", "video data ends early")]
    assert summary.groups["eva"] == {"ok": 2, "failed": 1, "frames": 8, "bytes": summary.groups["eva"]["bytes"]}
    assert (summary.groups["dino"]["ok"], summary.groups["dino"]["failed"]) == (2, 2)
    status = {g: dict(zip(m["video_id"], m["status"])) for g in ("eva", "dino")
              for m in [read_all(tmp_path / "groups" / g)]}
    assert status["eva"] == {"both": "ok", "dino_oom": "ok", "broken": "failed"}
    assert status["dino"] == {"both": "ok", "dino_only": "ok", "dino_oom": "failed", "broken": "failed"}
    store = FeatureStore.open(tmp_path)
    np.testing.assert_array_equal(store.read("dino_only", streams=["grid"])["grid"][:, 0, 0], [0, -1, -2, -3])
    np.testing.assert_array_equal(store.read("dino_oom", streams=["semantic"])["semantic"][:, 0, 0], [0, 1, 2, 3])


def test_max_failures_as_count_or_fraction():
    assert not ExtractConfig(max_failures=2).failures_exceeded(2, 10)
    assert ExtractConfig(max_failures=2).failures_exceeded(3, 10)
    assert not ExtractConfig(max_failures=0.3).failures_exceeded(3, 10)
    assert ExtractConfig(max_failures=0.3).failures_exceeded(4, 10)
    assert ExtractConfig(max_failures=0).failures_exceeded(1, 100)
    assert not ExtractConfig(max_failures=None).failures_exceeded(100, 100)
