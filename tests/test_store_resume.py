"""Feature store commit protocol: crashes, garbage removal, resume bookkeeping, fingerprints."""

from __future__ import annotations

import gc

import numpy as np
import pandas as pd
import pytest

from dualfocus.store import FeatureStore, GroupWriter, StoreBusyError, StoreMismatchError
from dualfocus.store.manifest import read_all

P, M, D = 5, 2, 8
FINGERPRINT = {"model": "toy-vit", "layers": [3, 7]}
SAMPLING = {"fps": 1.0, "max_frames": 64}


def open_writer(root, fmt="zarr", fingerprint=FINGERPRINT, dtype="float16", **kwargs) -> GroupWriter:
    return GroupWriter(root, "eva", format=fmt, fingerprint=fingerprint, sampling=SAMPLING,
                       taps={"semantic": (P, D), "spatiotemporal": (M, D)}, dtype=dtype,
                       frames_per_zarr_shard=4, **kwargs)


def add_video(writer: GroupWriter, video_id: str, t: int = 6) -> np.ndarray:
    """Write a video whose frames are all `hash(video_id)`-seeded noise; returns its semantic [t, P, D]."""
    rng = np.random.default_rng(abs(hash(video_id)) % 2**32)
    semantic = rng.standard_normal((t, P, D), dtype=np.float32)
    writer.begin_video(video_id, f"{video_id}.mp4", {"n_frames": t})
    writer.add_frames({"semantic": semantic[:2], "spatiotemporal": np.zeros((2, M, D))}, np.arange(2, dtype=np.float32))
    writer.add_frames({"semantic": semantic[2:], "spatiotemporal": np.zeros((t - 2, M, D))},
                      np.arange(2, t, dtype=np.float32))
    writer.end_video()
    return semantic


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_exception_leaves_garbage_that_reopen_removes(tmp_path, fmt):
    group = tmp_path / "groups" / "eva"
    with pytest.raises(RuntimeError, match="boom"):
        with open_writer(tmp_path, fmt, videos_per_shard=2) as writer:
            for video_id in ("a", "b", "c"):
                add_video(writer, video_id)         # a, b are committed as shard 0; c sits in shard 1
            writer.begin_video("d", "d.mp4")        # half-written when the crash comes
            raise RuntimeError("boom")
    leftovers = sorted(p.name for p in group.iterdir() if ".tmp-" in p.name)
    assert leftovers and all(name.startswith("shard-000001.") for name in leftovers)
    assert FeatureStore.open(tmp_path).video_ids() == ["a", "b"]   # readers ignore the garbage

    writer = open_writer(tmp_path, fmt, videos_per_shard=2)
    assert writer.removed_garbage() == leftovers
    assert writer.done_ids() == {"a", "b"}
    semantic_c = add_video(writer, "c")
    writer.close()
    assert not [p for p in group.iterdir() if ".tmp-" in p.name]
    store = FeatureStore.open(tmp_path)
    assert store.video_ids() == ["a", "b", "c"]
    np.testing.assert_array_equal(store["c"]["semantic"], semantic_c.astype(np.float16))


def test_writer_never_closed_is_uncommitted(tmp_path):
    writer = open_writer(tmp_path)
    add_video(writer, "a")
    del writer                 # the process "dies": no close, no commit
    gc.collect()
    writer = open_writer(tmp_path)
    assert len(writer.removed_garbage()) == 1 and writer.done_ids() == set()
    writer.close()


def test_committed_shard_without_manifest_part_is_removed(tmp_path):
    with open_writer(tmp_path, videos_per_shard=1) as writer:
        add_video(writer, "a")
        add_video(writer, "b")
    (tmp_path / "groups" / "eva" / "manifest" / "part-000001.parquet").unlink()   # crash between rename and part write
    writer = open_writer(tmp_path, videos_per_shard=1)
    assert writer.removed_garbage() == ["shard-000001.zarr"]
    assert writer.done_ids() == {"a"}
    add_video(writer, "b")
    writer.close()
    assert FeatureStore.open(tmp_path).video_ids() == ["a", "b"]


def test_failed_then_ok_resolves_to_ok(tmp_path):
    with open_writer(tmp_path) as writer:
        add_video(writer, "a")
        writer.add_failed("b", "b.mp4", "decode error: moov atom not found", {"duration_s": 3.0})
        writer.begin_video("c", "c.mp4")
        writer.abort_video("timeout after 60 s")
    writer = open_writer(tmp_path)
    assert writer.done_ids() == {"a"}                           # failed videos are retried
    add_video(writer, "b")
    rows = writer.close()
    assert [(r["video_id"], r["status"]) for r in rows] == [("b", "ok")]

    history = read_all(tmp_path / "groups" / "eva")
    assert history["video_id"].tolist() == ["a", "b", "c", "b"]
    failed = history.iloc[1]
    assert (failed["status"], failed["error"], failed["start"], failed["length"]) == \
        ("failed", "decode error: moov atom not found", 0, 0)
    assert pd.isna(failed["shard"]) and failed["duration_s"] == 3.0 and failed["n_frames"] == 0
    store = FeatureStore.open(tmp_path)
    assert store.groups["eva"].manifest.set_index("video_id")["status"].to_dict() == {"a": "ok", "b": "ok", "c": "failed"}
    assert store.video_ids() == ["a", "b"] and len(store) == 2
    with pytest.raises(KeyError, match="timeout after 60 s"):
        store["c"]


def test_closing_with_an_open_video_records_it_as_failed(tmp_path):
    writer = open_writer(tmp_path)
    add_video(writer, "a")
    writer.begin_video("b", "b.mp4")
    writer.add_frames({"semantic": np.ones((3, P, D)), "spatiotemporal": np.ones((3, M, D))}, np.arange(3.0))
    rows = writer.close()
    assert [(r["video_id"], r["status"]) for r in rows] == [("a", "ok"), ("b", "failed")]
    assert "before end_video" in rows[1]["error"]


def test_fingerprint_mismatch_and_overwrite(tmp_path):
    with open_writer(tmp_path) as writer:
        add_video(writer, "a")
    other = {**FINGERPRINT, "layers": [3, 8]}
    with pytest.raises(StoreMismatchError) as err:
        open_writer(tmp_path, fingerprint=other)
    message = str(err.value)
    assert "fingerprint.layers" in message and "[3, 7]" in message and "[3, 8]" in message
    assert "fingerprint.model" not in message
    with pytest.raises(StoreMismatchError, match="format: store has 'zarr', requested 'webdataset'"):
        open_writer(tmp_path, "webdataset")
    with pytest.raises(StoreMismatchError, match="taps.semantic: store has .*float16.*requested .*float32"):
        open_writer(tmp_path, dtype="float32")

    writer = open_writer(tmp_path, "webdataset", fingerprint=other, overwrite=True)
    assert writer.done_ids() == set()
    group = tmp_path / "groups" / "eva"
    assert not (group / "shard-000000.zarr").exists() and not (group / "manifest").exists()
    add_video(writer, "b")
    writer.close()
    store = FeatureStore.open(tmp_path)
    assert store.group_info("eva").fingerprint == other and store.group_info("eva").format == "webdataset"
    assert store.video_ids() == ["b"]


def test_one_writer_per_store(tmp_path):
    with open_writer(tmp_path):
        with pytest.raises(StoreBusyError):
            open_writer(tmp_path)
    open_writer(tmp_path).close()   # the lock goes with the first writer
