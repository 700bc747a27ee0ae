"""The per-item pieces of extract without Ray: a video's chunk rows (decode_chunks) and how a writer turns
chunk rows, in any order, into manifest rows (VideoAssembler over SlotWriters)."""

from __future__ import annotations

import numpy as np
import pytest

from dualfocus.extract.config import ExtractConfig
from dualfocus.extract.decode import DecodeError, VideoInfo
from dualfocus.extract.stages import decode_chunks
from dualfocus.extract.writing import Outcome, VideoAssembler
from dualfocus.store import FeatureStore, GroupWriter, StoreBusyError
from dualfocus.store.manifest import latest, read_all
from dualfocus.store.slot_writer import SlotWriter

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


def chunk(vid: str, k: int, *, index: int = 0, first: int = 0, last: bool = False, error: str = "", need: str = "",
          errors: dict | None = None) -> dict:
    """An encoded chunk row of video ``vid`` with frames ``first .. first+k-1`` (values = frame number), with
    arrays for groups eva (semantic, spatiotemporal) and dino (grid); ``errors`` = per-group encoder errors."""
    values = np.arange(first, first + k, dtype=np.float32)
    errors = errors or {}
    return {"video_id": vid, "path": f"{vid}.mp4", "chunk": index, "last": last, "error": error, "n_frames": 4, "need": need,
            "duration_s": 4.0, "native_fps": 10.0, "timestamps": values,
            "eva/semantic": np.broadcast_to(values[:, None, None], (k, P, D)),
            "eva/spatiotemporal": np.broadcast_to(values[:, None, None], (k, M, D)),
            "dino/grid": np.broadcast_to(-values[:, None, None], (k, M, D)),
            "eva/error": errors.get("eva", ""), "dino/error": errors.get("dino", "")}


def writers(root, *groups: str, slots: int = 1) -> tuple[dict, list[dict]]:
    """GroupWriters holding ``groups`` of the store at ``root``, and per slot its ``SlotWriter`` of each group."""
    opened = {}
    for group in groups:
        taps = {"semantic": (P, D), "spatiotemporal": (M, D)} if group == "eva" else {"grid": (M, D)}
        opened[group] = GroupWriter(root, group, taps=taps, fingerprint={"t": 1},
                                    sampling={"fps": 1.0, "max_frames": None}, videos_per_shard=2)
    specs = {group: w.slot_specs(slots) for group, w in opened.items()}
    return opened, [{group: SlotWriter(specs[group][s]) for group in groups} for s in range(slots)]


def assemble(root, rows, *groups: str) -> Outcome:
    held, (slot,) = writers(root, *groups)
    assembler = VideoAssembler(slot)
    for row in rows:
        assembler.add(row)
    outcome = assembler.close()
    for group in held.values():
        group.close()
    return outcome


def test_one_manifest_row_per_video_whatever_the_order_of_its_chunks(tmp_path):
    rows = [
        chunk("late", 2, index=1, first=2, last=True),                               # its second chunk first
        chunk("ok1", 2), chunk("cut", 2),                                            # interleaved videos
        chunk("ok1", 2, index=1, first=2, last=True),
        chunk("cut", 0, index=-1, error="video data ends early"),                    # aborted mid-video
        chunk("never", 0, index=-1, error="file not found"),                         # failed before any frame
        chunk("oom", 2, errors={"eva": "encoder failed: OOM"}), chunk("oom", 2, index=1, first=2, last=True),
        chunk("late", 2),
        chunk("ok1", 2), chunk("late", 2),                                           # repeats (a retried task)
        chunk("ok2", 4, last=True),
        chunk("lost", 2),                                                            # its last chunk never came
    ]
    outcome = assemble(tmp_path, rows, "eva")
    assert (outcome.ok, outcome.failed, outcome.frames) == (3, 4, 12)
    assert outcome.failures == [("cut", "video data ends early"), ("never", "file not found"),
                                ("oom", "encoder failed: OOM"),
                                ("lost", "its chunks did not all reach the writer (chunk 1 never came)")]

    manifest = read_all(tmp_path / "groups" / "eva")
    assert sorted(manifest["video_id"]) == ["cut", "late", "lost", "never", "ok1", "ok2", "oom"]   # once each
    status = dict(zip(manifest["video_id"], manifest["status"]))
    assert [vid for vid, s in sorted(status.items()) if s == "ok"] == ["late", "ok1", "ok2"]
    assert max(manifest.groupby("shard").size()) <= 2                                  # videos_per_shard
    store = FeatureStore.open(tmp_path)
    for vid in ("ok1", "ok2", "late"):
        np.testing.assert_array_equal(store[vid].timestamps, [0, 1, 2, 3])
        np.testing.assert_array_equal(store[vid]["semantic"][:, 0, 0], [0, 1, 2, 3])


def test_each_group_gets_what_it_needs(tmp_path):
    """One decode, two groups: a video already in eva goes to dino only; an encoder error fails its group only;
    a decode error fails the video in every group that needed it."""
    rows = [
        chunk("both", 2), chunk("both", 2, index=1, first=2, last=True),
        chunk("dino_only", 4, last=True, need="dino"),
        chunk("dino_oom", 2, errors={"dino": "encoder failed: OOM"}), chunk("dino_oom", 2, index=1, first=2, last=True),
        chunk("broken", 2), chunk("broken", 0, index=-1, error="video data ends early"),
    ]
    outcome = assemble(tmp_path, rows, "eva", "dino")
    assert (outcome.ok, outcome.failed, outcome.frames) == (2, 2, 8)
    assert outcome.failures == [("dino_oom", "encoder failed: OOM"), ("broken", "video data ends early")]
    assert outcome.groups["eva"] == {"ok": 2, "failed": 1, "frames": 8, "bytes": outcome.groups["eva"]["bytes"]}
    assert (outcome.groups["dino"]["ok"], outcome.groups["dino"]["failed"]) == (2, 2)
    status = {g: dict(zip(m["video_id"], m["status"])) for g in ("eva", "dino")
              for m in [read_all(tmp_path / "groups" / g)]}
    assert status["eva"] == {"both": "ok", "dino_oom": "ok", "broken": "failed"}
    assert status["dino"] == {"both": "ok", "dino_only": "ok", "dino_oom": "failed", "broken": "failed"}
    store = FeatureStore.open(tmp_path)
    np.testing.assert_array_equal(store.read("dino_only", streams=["grid"])["grid"][:, 0, 0], [0, -1, -2, -3])
    np.testing.assert_array_equal(store.read("dino_oom", streams=["semantic"])["semantic"][:, 0, 0], [0, 1, 2, 3])


def test_a_stopped_run_commits_finished_videos_and_leaves_the_rest_without_a_row(tmp_path):
    held, (slot,) = writers(tmp_path, "eva", "dino")
    assembler = VideoAssembler(slot)
    for row in [chunk("done", 4, last=True), chunk("half", 2), chunk("later", 2, index=1, first=2, last=True),
                chunk("eva_only", 2, need="eva,dino", errors={"dino": "encoder failed: OOM"})]:
        assembler.add(row)
    outcome = assembler.close(drop_incomplete=True)
    for group in held.values():
        group.close()
    assert (outcome.ok, outcome.failed) == (1, 0)
    eva, dino = (latest(read_all(tmp_path / "groups" / g)) for g in ("eva", "dino"))
    assert list(eva["video_id"]) == ["done"]                                  # no row for what was not finished
    assert dict(zip(dino["video_id"], dino["status"])) == {"done": "ok", "eva_only": "failed"}
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]          # and no temp shard left behind
    assert set(eva["shard"]) == {p.name for p in (tmp_path / "groups" / "eva").glob("shard-*")}


def test_parallel_slots_write_disjoint_shards_and_a_later_run_writes_above_them(tmp_path):
    held, slots = writers(tmp_path, "eva", slots=3)
    assemblers = [VideoAssembler(slot) for slot in slots]
    vids = [f"v{i}" for i in range(12)]
    for i, vid in enumerate(vids):
        assemblers[i % 3].add(chunk(vid, 4, last=True))
    outcomes = [a.close() for a in assemblers]
    held["eva"].close()
    assert [o.ok for o in outcomes] == [4, 4, 4]
    first = read_all(tmp_path / "groups" / "eva")
    assert sorted(first["video_id"]) == sorted(vids)
    assert sorted(set(first["part"])) == list(range(6))       # slot s of 3: parts s, s + 3
    assert {p % 3 for p in first.loc[first["video_id"].isin(["v0", "v3", "v6", "v9"]), "part"]} == {0}

    held, (slot,) = writers(tmp_path, "eva")                   # the next run: names above every committed one
    assert held["eva"].first_index == 6 and held["eva"].done_ids() == set(vids)
    assembler = VideoAssembler(slot)
    assembler.add(chunk("v0", 0, index=-1, error="retried and failed"))
    assembler.close()
    held["eva"].close()
    assert latest(read_all(tmp_path / "groups" / "eva")).set_index("video_id").loc["v0", "status"] == "failed"


def test_a_new_run_waits_for_slot_writers_of_a_killed_one(tmp_path):
    held, (slot,) = writers(tmp_path, "eva")
    held["eva"].abandon()                                      # the driver is gone, its writer is not
    with pytest.raises(StoreBusyError, match=r"writers of an earlier run still hold group 'eva'.*after 0 s"):
        GroupWriter(tmp_path, "eva", taps={"semantic": (P, D), "spatiotemporal": (M, D)}, fingerprint={"t": 1},
                    sampling={"fps": 1.0, "max_frames": None}, stale_writers_wait_s=0.0)
    slot["eva"].abandon()
    GroupWriter(tmp_path, "eva", taps={"semantic": (P, D), "spatiotemporal": (M, D)}, fingerprint={"t": 1},
                sampling={"fps": 1.0, "max_frames": None}, stale_writers_wait_s=0.0).close()


def test_max_failures_as_count_or_fraction():
    assert not ExtractConfig(max_failures=2).failures_exceeded(2, 10)
    assert ExtractConfig(max_failures=2).failures_exceeded(3, 10)
    assert not ExtractConfig(max_failures=0.3).failures_exceeded(3, 10)
    assert ExtractConfig(max_failures=0.3).failures_exceeded(4, 10)
    assert ExtractConfig(max_failures=0).failures_exceeded(1, 100)
    assert not ExtractConfig(max_failures=None).failures_exceeded(100, 100)
