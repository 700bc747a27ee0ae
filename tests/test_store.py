"""Feature store, one group: round trips, backend parity, frame access, sharding, keys and on-disk layout.
(Several groups, int8 and format-1 stores: `test_store_groups.py`.)"""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import zarr

from dualfocus.store import FeatureStore, GroupWriter, NotAStoreError, StoreError, safe_key, summarize
from dualfocus.store.summary import print_summary
from dualfocus.store.manifest import read_all

P, M, D = 5, 2, 8          # semantic tokens, spatiotemporal tokens, width
ZARR_SHARD = 4             # frames per zarr shard: small so that tests cross shard boundaries
FORMATS = ("zarr", "webdataset")
DTYPES = ("float16", "bfloat16", "float32")
GROUP = "eva"
SAMPLING = {"fps": 2.0, "max_frames": None}


def make_videos(seed: int, lengths: list[int], prefix: str = "vid") -> dict[str, tuple]:
    """{video_id: (semantic [t, P, D], spatiotemporal [t, M, D], timestamps [t])} in float32."""
    rng = np.random.default_rng(seed)
    return {f"{prefix}{i}": (rng.standard_normal((t, P, D), dtype=np.float32) * 3,
                             rng.standard_normal((t, M, D), dtype=np.float32),
                             np.arange(t, dtype=np.float32) * 0.5)
            for i, t in enumerate(lengths)}


def write_video(writer: GroupWriter, video_id: str, arrays: tuple, rng) -> dict:
    """Feed one video in random-sized chunks."""
    semantic, spatiotemporal, timestamps = arrays
    writer.begin_video(video_id, f"/videos/{video_id}.mp4",
                       {"n_frames": len(timestamps), "duration_s": len(timestamps) / 2, "native_fps": 30.0})
    at = 0
    while at < len(timestamps):
        k = int(rng.integers(1, 7))
        writer.add_frames({"semantic": semantic[at:at + k], "spatiotemporal": spatiotemporal[at:at + k]},
                          timestamps[at:at + k])
        at += k
    return writer.end_video()


def open_writer(root, fmt="zarr", dtype="float16", group=GROUP, **kwargs) -> GroupWriter:
    kwargs.setdefault("fingerprint", {"model": "toy", "layers": [3, 7]})
    kwargs.setdefault("sampling", SAMPLING)
    return GroupWriter(root, group, format=fmt, dtype=dtype, taps={"semantic": (P, D), "spatiotemporal": (M, D)},
                       frames_per_zarr_shard=ZARR_SHARD, **kwargs)


def group_dir(root, group=GROUP):
    return root / "groups" / group


def write_store(root, videos: dict, fmt="zarr", dtype="float16", seed=0, **kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    with open_writer(root, fmt, dtype, **kwargs) as writer:
        for video_id, arrays in videos.items():
            write_video(writer, video_id, arrays, rng)
    return writer.close()


def expected(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(np.float16) if dtype == "float16" else x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip(tmp_path, fmt, dtype):
    videos = make_videos(1, [1, 3, 4, 9, 13, 0])
    rows = write_store(tmp_path, videos, fmt, dtype)
    assert [r["status"] for r in rows] == ["ok"] * len(videos)
    store = FeatureStore.open(tmp_path)
    assert store.video_ids() == list(videos) and len(store) == len(videos)
    for video_id, (semantic, spatiotemporal, timestamps) in videos.items():
        got = store[video_id]
        assert got.video_id == video_id
        assert got["semantic"].shape == semantic.shape and got["spatiotemporal"].shape == spatiotemporal.shape
        assert got["semantic"].dtype == (np.float16 if dtype == "float16" else np.float32)
        np.testing.assert_array_equal(got.timestamps, timestamps)
        for out, ref in ((got["semantic"], semantic), (got["spatiotemporal"], spatiotemporal)):
            if dtype == "bfloat16":  # 8 significant bits: relative error <= 2**-9 after rounding
                np.testing.assert_allclose(out, ref, rtol=2.0**-8, atol=0)
                assert not np.array_equal(out, ref) or ref.size == 0   # it really was rounded
            else:
                np.testing.assert_array_equal(out, expected(ref, dtype))


def test_bfloat16_rounding_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((6, P, D), dtype=np.float32)
    x[0, 0, :4] = [np.inf, -np.inf, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]   # ties round to even
    with open_writer(tmp_path, dtype="bfloat16") as writer:
        writer.begin_video("v", "v.mp4")
        writer.add_frames({"semantic": torch.from_numpy(x).bfloat16(), "spatiotemporal": torch.zeros(6, M, D)},
                          torch.arange(6.0))
        writer.end_video()
    reference = torch.from_numpy(x).bfloat16().float().numpy()
    np.testing.assert_array_equal(FeatureStore.open(tmp_path)["v"]["semantic"], reference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zarr_and_webdataset_read_back_the_same(tmp_path, dtype):
    videos = make_videos(3, [2, 7, 5, 11])
    write_store(tmp_path / "z", videos, "zarr", dtype, videos_per_shard=3)
    write_store(tmp_path / "w", videos, "webdataset", dtype, videos_per_shard=3, seed=9)
    zs, ws = FeatureStore.open(tmp_path / "z"), FeatureStore.open(tmp_path / "w")
    assert zs.video_ids() == ws.video_ids()
    streamed = {v.video_id: v for v in ws.iter_videos()}
    assert sorted(streamed) == sorted(videos)
    for video_id in videos:
        a, b, c = zs[video_id], ws[video_id], streamed[video_id]
        for x in (b, c):
            np.testing.assert_array_equal(a.timestamps, x.timestamps)
            for name in ("semantic", "spatiotemporal"):
                np.testing.assert_array_equal(a[name], x[name])


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_frame_indices_equals_slicing(tmp_path, fmt):
    videos = make_videos(4, [3, 14])
    write_store(tmp_path, videos, fmt)
    store = FeatureStore.open(tmp_path)
    full = store["vid1"]
    for idx in (np.array([13, 0, 5, 5, 9]), np.arange(4, 9), np.array([], dtype=np.int64)):
        part = store.read("vid1", idx)
        np.testing.assert_array_equal(part["semantic"], full["semantic"][idx])
        np.testing.assert_array_equal(part["spatiotemporal"], full["spatiotemporal"][idx])
        np.testing.assert_array_equal(part.timestamps, full.timestamps[idx])
    with pytest.raises(IndexError, match="vid1"):
        store.read("vid1", np.array([14]))


@pytest.mark.parametrize("fmt", FORMATS)
def test_rollover_by_video_count_keeps_videos_whole(tmp_path, fmt):
    videos = make_videos(5, [6, 3, 9, 1, 5])
    write_store(tmp_path, videos, fmt, videos_per_shard=2)
    rows = read_all(group_dir(tmp_path))
    assert rows.groupby("part").size().tolist() == [2, 2, 1]
    assert sorted(p.name for p in group_dir(tmp_path).glob("shard-*")) == [
        f"shard-00000{i}.{'zarr' if fmt == 'zarr' else 'tar'}" for i in range(3)]
    store = FeatureStore.open(tmp_path)
    for row in rows.itertuples():
        assert row.shard.startswith(f"shard-{row.part:06d}.")
        if fmt == "zarr":   # the frame range lies inside its own shard
            frames = zarr.open_group(str(group_dir(tmp_path) / row.shard), mode="r")["semantic"].shape[0]
            assert 0 <= row.start and row.start + row.length <= frames
        np.testing.assert_array_equal(store[row.video_id].timestamps, videos[row.video_id][2])


@pytest.mark.parametrize("fmt", FORMATS)
def test_rollover_by_bytes(tmp_path, fmt):
    videos = make_videos(6, [4, 4, 4, 4, 4])
    per_video = 4 * ((P * D + M * D) * 2 + 4)
    write_store(tmp_path, videos, fmt, max_shard_bytes=int(per_video * 1.5))
    rows = read_all(group_dir(tmp_path))
    assert (rows["bytes"] == per_video).all()
    assert rows.groupby("part").size().tolist() == [2, 2, 1]   # shard closes after the video that crosses


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_ids_get_safe_distinct_keys(tmp_path, fmt):
    ids = ["a/b.c", "a_b_c", "a b c", "clips/2024 01/x.mp4", "é" * 200]
    keys = [safe_key(i) for i in ids]
    assert keys[1] == "a_b_c" and len(set(keys)) == len(ids)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)
    assert safe_key("a/b.c") == keys[0] and len(keys[4]) < 120
    arrays = make_videos(7, [2, 3, 4, 5, 6])
    videos = dict(zip(ids, arrays.values()))
    write_store(tmp_path, videos, fmt)
    store = FeatureStore.open(tmp_path)
    assert store.video_ids() == ids
    assert store.groups[GROUP].manifest["key"].tolist() == keys
    for video_id, (_, _, timestamps) in videos.items():
        np.testing.assert_array_equal(store[video_id].timestamps, timestamps)


def test_zarr_uses_one_frame_chunks_sharding_and_zstd(tmp_path):
    write_store(tmp_path, make_videos(8, [5, 6]), "zarr", "bfloat16")
    group = zarr.open_group(str(group_dir(tmp_path) / "shard-000000.zarr"), mode="r")
    assert group.attrs["dtypes"] == {"semantic": "bfloat16", "spatiotemporal": "bfloat16"}
    tails = {"semantic": (P, D), "spatiotemporal": (M, D), "timestamps": ()}
    for name, tail in tails.items():
        arr = group[name]
        assert arr.metadata.zarr_format == 3 and arr.shape == (11, *tail)
        assert arr.chunks == (1, *tail) and arr.shards == (ZARR_SHARD, *tail)
        codecs = arr.metadata.to_dict()["codecs"]
        assert [c["name"] for c in codecs] == ["sharding_indexed"]
        inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
        assert "zstd" in inner
    assert group["semantic"].dtype == np.uint16 and group["timestamps"].dtype == np.float32


def test_webdataset_shard_is_plain_webdataset(tmp_path):
    import webdataset as wds

    videos = make_videos(9, [3, 4])
    write_store(tmp_path, videos, "webdataset")
    samples = list(wds.WebDataset(str(group_dir(tmp_path) / "shard-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == list(videos)
    for sample in samples:
        assert set(sample) >= {"semantic.npy", "spatiotemporal.npy", "timestamps.npy", "json"}
        semantic = np.load(io.BytesIO(sample["semantic.npy"]), allow_pickle=False)
        np.testing.assert_array_equal(semantic, videos[sample["__key__"]][0].astype(np.float16))


def test_abort_and_failed_videos(tmp_path):
    videos = make_videos(10, [9, 3])
    rng = np.random.default_rng(0)
    with open_writer(tmp_path) as writer:
        writer.begin_video("broken", "b.mp4")
        semantic, spatiotemporal, timestamps = (a[:7] for a in videos["vid0"])
        writer.add_frames({"semantic": semantic, "spatiotemporal": spatiotemporal}, timestamps)  # crosses a zarr shard, dies
        row = writer.abort_video("decoder hung")
        assert row["status"] == "failed" and row["shard"] is None and row["length"] == 0
        writer.add_failed("missing", "m.mp4", "file not found")
        write_video(writer, "vid1", videos["vid1"], rng)
    store = FeatureStore.open(tmp_path)
    assert store.video_ids() == ["vid1"] and "broken" not in store and "vid1" in store
    np.testing.assert_array_equal(store["vid1"]["semantic"], videos["vid1"][0].astype(np.float16))
    with pytest.raises(KeyError, match="decoder hung"):
        store["broken"]
    with pytest.raises(KeyError, match="nope"):
        store["nope"]
    summary = summarize(tmp_path)["groups"][GROUP]
    assert (summary["n_ok"], summary["n_failed"], summary["n_frames"], summary["shards"]) == (1, 2, 3, 1)
    assert summary["failures"] == [("broken", "decoder hung"), ("missing", "file not found")]
    assert summary["raw_fp16_bytes_per_frame"] == (P * D + M * D) * 2 + 4
    assert summary["bytes"] == 3 * summary["raw_fp16_bytes_per_frame"] and summary["bytes_per_frame"] > 0
    lines = []
    print_summary(summarize(tmp_path), SimpleNamespace(print=lambda text, **_: lines.append(text)))
    assert "  videos: ok 1 | failed 2 | shards 1" in lines and "    broken: decoder hung" in lines
    assert f"  tap {GROUP}.semantic: [t, {P}, {D}] float16, {P * D * 2} B/frame" in lines


def test_bad_input_is_reported(tmp_path):
    with pytest.raises(ValueError) as err:
        GroupWriter(tmp_path, "a.b", format="hdf5", dtype="int4", fingerprint={}, sampling={"fps": 1},
                    taps={"semantic": (P, D), "timestamps": (1,)}, videos_per_shard=0)
    assert all(s in str(err.value) for s in ("group name", "format", "dtype", "timestamps", "sampling",
                                             "videos_per_shard"))
    with open_writer(tmp_path) as writer:
        writer.begin_video("v", "v.mp4")
        with pytest.raises(ValueError, match=r"semantic must be \[2, 5, 8\]"):
            writer.add_frames({"semantic": np.zeros((2, P + 1, D)), "spatiotemporal": np.zeros((2, M, D))}, np.zeros(2))
        with pytest.raises(ValueError, match=r"taps missing \['spatiotemporal'\], unknown \['other'\]"):
            writer.add_frames({"semantic": np.zeros((2, P, D)), "other": np.zeros((2, M, D))}, np.zeros(2))
        writer.abort_video("test")
        with pytest.raises(ValueError, match="unknown keys"):
            writer.add_failed("w", "w.mp4", "x", {"fps": 3})
    with pytest.raises(NotAStoreError, match="not a feature store") as err:
        FeatureStore.open(tmp_path / "elsewhere")
    assert isinstance(err.value, StoreError) and str(tmp_path / "elsewhere") in str(err.value)


@pytest.mark.parametrize("flushed_frames", [0, 70, 200])
def test_an_aborted_video_leaves_no_frames_in_the_shard(tmp_path, flushed_frames):
    """Whether none, some or many of an aborted video's frames reached disk, the shard ends where the last kept
    video ends, and the video after it reads back whole."""
    from dualfocus.store import FeatureStore, GroupWriter

    def frames(n: int, value: float):
        return {"x": np.full((n, 2, 3), value, np.float32)}, np.arange(n, dtype=np.float32)

    with GroupWriter(tmp_path, "g", taps={"x": (2, 3)}, fingerprint={}, sampling={"fps": 1.0, "max_frames": None},
                     frames_per_zarr_shard=64) as w:
        w.begin_video("a", "a.mp4")
        w.add_frames(*frames(40, 1.0))
        w.end_video()
        w.begin_video("bad", "bad.mp4")
        for _ in range(0, flushed_frames, 10):
            w.add_frames(*frames(10, 9.0))
        w.abort_video("decode failed")
        w.begin_video("b", "b.mp4")
        w.add_frames(*frames(30, 2.0))
        w.end_video()
    store = FeatureStore.open(tmp_path)
    np.testing.assert_array_equal(store["a"]["x"][:, 0, 0], np.ones(40))
    np.testing.assert_array_equal(store["b"]["x"][:, 0, 0], np.full(30, 2.0))
    (shard,) = (tmp_path / "groups" / "g").glob("shard-*.zarr")
    assert zarr.open_group(str(shard), mode="r")["x"].shape[0] == 70        # a + b, nothing of "bad"


def test_inspect_reads_a_zarr_shards_size_from_its_attributes_and_it_equals_its_files(tmp_path):
    from dualfocus.store.zarr_shard import ZARR_JSON, disk_bytes

    with GroupWriter(tmp_path, "g", taps={"x": (4, 8)}, fingerprint={}, sampling={"fps": 1.0, "max_frames": None}) as w:
        w.begin_video("a", "a.mp4")
        w.add_frames({"x": np.random.default_rng(0).standard_normal((100, 4, 8))}, np.arange(100, dtype=np.float32))
        w.end_video()
    (shard,) = (tmp_path / "groups" / "g").glob("shard-*.zarr")
    walked = sum(p.stat().st_size for p in shard.rglob("*") if p.is_file())
    assert disk_bytes(shard) == walked == summarize(tmp_path)["groups"]["g"]["disk_bytes"]
    meta = json.loads((shard / ZARR_JSON).read_text())
    meta["attributes"]["disk_bytes"] = 7                        # proof that the attribute, not a walk, is read
    (shard / ZARR_JSON).write_text(json.dumps(meta))
    assert disk_bytes(shard) == 7 + (shard / ZARR_JSON).stat().st_size
