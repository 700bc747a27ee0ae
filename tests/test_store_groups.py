"""Feature store v2: several stream groups per store, reads that touch only what is asked, int8 storage,
and stores written before groups existed (format 1)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import numpy as np
import pytest

from dualfocus.store import (FeatureStore, GroupWriter, MissingStreamError, StoreBusyError, StoreMismatchError,
                             TapInfo, migrate_v1, summarize)
from dualfocus.store.dtypes import dequantize_int8, quantize_int8, round_trip

P, M, D = 5, 2, 8      # eva: semantic [P, D], spatiotemporal [M, D]
G, W = 6, 4            # dino: grid [G, W]
SAMPLING = {"fps": 1.0, "max_frames": 32}


def eva_writer(root, fmt="zarr", dtype="float16", **kwargs) -> GroupWriter:
    kwargs.setdefault("sampling", SAMPLING)
    return GroupWriter(root, "eva", taps={"semantic": (P, D), "spatiotemporal": (M, D)}, fingerprint={"m": "eva"},
                       format=fmt, dtype=dtype, frames_per_zarr_shard=4, **kwargs)


def dino_writer(root, fmt="zarr", fingerprint=None, **kwargs) -> GroupWriter:
    kwargs.setdefault("sampling", SAMPLING)
    return GroupWriter(root, "dino", taps={"grid": (G, W)}, fingerprint=fingerprint or {"m": "dino"}, format=fmt,
                       frames_per_zarr_shard=4, **kwargs)


def features(video_id: str, t: int, shapes: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(sum(map(ord, video_id)))
    return {name: rng.standard_normal((t, *shape)).astype(np.float32) for name, shape in shapes.items()}


def put(writer: GroupWriter, video_id: str, t: int) -> dict[str, np.ndarray]:
    arrays = features(video_id + writer.name, t, {k: v.shape for k, v in writer.taps.items()})
    writer.begin_video(video_id, f"{video_id}.mp4", {"n_frames": t})
    writer.add_frames(arrays, np.arange(t, dtype=np.float32))
    writer.end_video()
    return arrays


@pytest.fixture
def two_groups(tmp_path):
    """eva holds a, b, c; dino holds a and c (b failed there)."""
    with eva_writer(tmp_path) as w:
        eva = {v: put(w, v, t) for v, t in (("a", 3), ("b", 5), ("c", 9))}
    with dino_writer(tmp_path) as w:
        dino = {v: put(w, v, t) for v, t in (("a", 3), ("c", 9))}
        w.add_failed("b", "b.mp4", "dino ran out of memory")
    return tmp_path, eva, dino


def test_groups_share_sampling_and_read_independently(two_groups):
    root, eva, dino = two_groups
    store = FeatureStore.open(root)
    assert store.streams() == ["dino.grid", "eva.semantic", "eva.spatiotemporal"]
    assert store.video_ids() == ["a", "c"] and len(store) == 2 and "b" not in store
    assert store.video_ids(["semantic"]) == ["a", "b", "c"]
    assert store.video_ids(["eva.semantic", "dino.grid"]) == ["a", "c"]
    got = store.read("c", np.array([8, 0, 4]), streams=["grid", "eva.semantic"])
    assert set(got.streams) == {"grid", "eva.semantic"}
    np.testing.assert_array_equal(got["grid"], dino["c"]["grid"][[8, 0, 4]].astype(np.float16))
    np.testing.assert_array_equal(got["eva.semantic"], eva["c"]["semantic"][[8, 0, 4]].astype(np.float16))
    np.testing.assert_array_equal(got.timestamps, [8.0, 0.0, 4.0])
    assert set(store["a"].streams) == {"semantic", "spatiotemporal", "grid"}
    assert store.read("b", streams=["spatiotemporal"])["spatiotemporal"].shape == (5, M, D)
    with pytest.raises(KeyError, match="dino ran out of memory"):
        store.read("b", streams=["grid"])
    streamed = [v.video_id for v in store.iter_videos(streams=["grid"])]
    assert sorted(streamed) == ["a", "c"]


def test_unknown_and_ambiguous_streams_are_named(two_groups, tmp_path_factory):
    root, _, _ = two_groups
    store = FeatureStore.open(root)
    with pytest.raises(MissingStreamError) as err:
        store.read("a", streams=["siglip.grid"])
    assert "'siglip.grid' is not in the store" in str(err.value) and "dino.grid, eva.semantic" in str(err.value)
    other = tmp_path_factory.mktemp("other")
    for name in ("x", "y"):
        with GroupWriter(other, name, taps={"grid": (2, 2)}, fingerprint={}, sampling=SAMPLING):
            pass
    with pytest.raises(MissingStreamError, match=r"'grid' is a tap of several groups \(x, y\)"):
        FeatureStore.open(other).resolve("grid")
    assert FeatureStore.open(other).resolve("y.grid") == ("y", "grid")


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_reads_touch_only_the_streams_and_frames_asked_for(tmp_path, fmt, monkeypatch):
    """Count the bytes each backend reads per file: other taps and other groups' shards are never read."""
    import zarr.storage._local as zarr_local

    from dualfocus.store.tar_shard import TarShardReader

    read: Counter = Counter()
    zarr_get = zarr_local._get

    def counting_get(path, prototype, byte_range):
        buf = zarr_get(path, prototype, byte_range)
        read[str(path.relative_to(tmp_path))] += len(buf)
        return buf

    tar_read = TarShardReader._read_npy

    def counting_read(self, member, frame_indices):
        out = tar_read(self, member, frame_indices)
        read[f"{self.path.relative_to(tmp_path)}:{member}"] += out.nbytes
        return out

    monkeypatch.setattr(zarr_local, "_get", counting_get)
    monkeypatch.setattr(TarShardReader, "_read_npy", counting_read)
    with eva_writer(tmp_path, fmt) as w:
        put(w, "v", 12)
    with dino_writer(tmp_path, fmt) as w:
        put(w, "v", 12)
    store = FeatureStore.open(tmp_path)

    read.clear()
    store.read("v", streams=["spatiotemporal"])
    assert read and all("groups/eva/" in key for key in read)
    assert not [key for key in read if "semantic" in key or "dino" in key]
    whole = sum(v for k, v in read.items() if "spatiotemporal" in k)

    read.clear()
    store.read("v", np.array([1]), streams=["spatiotemporal"])
    part = sum(v for k, v in read.items() if "spatiotemporal" in k)
    assert 0 < part < whole    # one frame: zarr reads its chunk only, the tar member is memory-mapped

    read.clear()
    store.read("v", streams=["grid"])
    assert read and all("groups/dino/" in key for key in read)


def test_quantize_int8_properties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7, 64)).astype(np.float32) * rng.uniform(0.01, 100, (3, 7, 1)).astype(np.float32)
    x[0, 0] = 0.0
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (3, 7)
    assert np.abs(q).max() <= 127 and scale[0, 0] == 0 and not q[0, 0].any()
    assert (np.abs(q).max(axis=-1)[1:] >= 126).all()   # each token uses the full range
    back = dequantize_int8(q, scale)
    assert (np.abs(back - x) <= scale.astype(np.float32)[..., None] / 2 * 1.001).all()
    np.testing.assert_array_equal(round_trip(x, "int8"), back)


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_int8_group_round_trip_size_and_error(tmp_path, fmt):
    width = 256
    with GroupWriter(tmp_path / "q", "eva", taps={"semantic": (P, width)}, fingerprint={}, sampling=SAMPLING,
                     dtype="int8", format=fmt) as w:
        arrays = put(w, "v", 10)
    with GroupWriter(tmp_path / "h", "eva", taps={"semantic": (P, width)}, fingerprint={}, sampling=SAMPLING,
                     format=fmt) as w:
        put(w, "v", 10)
    got = FeatureStore.open(tmp_path / "q")["v"]["semantic"]
    x = arrays["semantic"]
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.linalg.norm(got - x) / np.linalg.norm(x) < 0.01
    int8, fp16 = (summarize(tmp_path / s)["groups"]["eva"] for s in ("q", "h"))
    assert int8["taps"]["semantic"]["bytes_per_frame"] == P * width + P * 2
    assert int8["bytes"] / fp16["bytes"] < 0.55


def test_a_group_with_other_sampling_is_refused_naming_the_key(two_groups):
    root, _, _ = two_groups
    with pytest.raises(StoreMismatchError, match=r"fps: store has 1.0, requested 2.0") as err:
        GroupWriter(root, "siglip", taps={"grid": (2, 2)}, fingerprint={}, sampling={**SAMPLING, "fps": 2.0})
    assert "max_frames" not in str(err.value)
    assert not (root / "groups" / "siglip").exists()


def test_overwrite_replaces_one_group_and_leaves_the_others(two_groups):
    root, eva, _ = two_groups
    eva_files = {p: p.stat().st_mtime_ns for p in (root / "groups" / "eva").rglob("*")}
    with pytest.raises(StoreMismatchError, match=r"group 'dino'.*fingerprint.m: store has 'dino', requested 'dino2'"):
        dino_writer(root, fingerprint={"m": "dino2"})
    with dino_writer(root, fingerprint={"m": "dino2"}, overwrite=True) as w:
        assert w.done_ids() == set()
        put(w, "b", 5)
    store = FeatureStore.open(root)
    assert store.group_info("dino").fingerprint == {"m": "dino2"}
    assert store.video_ids() == ["b"] and store.video_ids(["semantic"]) == ["a", "b", "c"]
    assert {p: p.stat().st_mtime_ns for p in (root / "groups" / "eva").rglob("*")} == eva_files
    np.testing.assert_array_equal(store.read("a", streams=["semantic"])["semantic"],
                                  eva["a"]["semantic"].astype(np.float16))


def test_writers_lock_their_own_group_only(tmp_path):
    with eva_writer(tmp_path) as a:
        with pytest.raises(StoreBusyError, match="group 'eva'"):
            eva_writer(tmp_path)
        with dino_writer(tmp_path) as b:   # another group of the same store: fine
            put(b, "x", 2)
        put(a, "x", 2)
    assert FeatureStore.open(tmp_path).video_ids() == ["x"]


def test_exact_taps_keep_their_values(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    box = np.tile(np.array([[6, 5]], np.int32), (4, 1))
    taps = {"frames": TapInfo((6, 6, 3), "uint8"), "box": TapInfo((2,), "int32")}
    with GroupWriter(tmp_path, "pixels", kind="pixels", taps=taps, fingerprint={}, sampling=SAMPLING) as w:
        w.begin_video("v", "v.mp4")
        with pytest.raises(ValueError, match="stored as uint8 but got float32"):
            w.add_frames({"frames": frames.astype(np.float32), "box": box}, np.arange(4.0))
        w.add_frames({"frames": frames, "box": box}, np.arange(4.0))
        w.end_video()
    got = FeatureStore.open(tmp_path)["v"]
    assert got["frames"].dtype == np.uint8
    np.testing.assert_array_equal(got["frames"], frames)
    np.testing.assert_array_equal(got["box"], box)


def make_v1_store(root) -> dict[str, np.ndarray]:
    """A store laid out as format 1 wrote it: shards and manifest at the top, the old store.json."""
    with eva_writer(root / "tmp") as w:
        arrays = {v: put(w, v, t) for v, t in (("a", 3), ("b", 6))}
    group = root / "tmp" / "groups" / "eva"
    for entry in group.iterdir():
        if entry.name != "group.json":
            os.replace(entry, root / entry.name)
    shutil.rmtree(root / "tmp")
    v1 = {"format_version": 1, "format": "zarr", "dtype": "float16", "created": "2026-10-01T00:00:00+00:00",
          "fingerprint": {"model": "/models/instructblip", "fps": 1.0, "max_frames": 32, "dtype": "float16"},
          "semantic_shape": [P, D], "spatiotemporal_shape": [M, D]}
    (root / "store.json").write_text(json.dumps(v1))
    return arrays


def test_a_format_1_store_reads_as_one_group_then_migrates(tmp_path):
    arrays = make_v1_store(tmp_path)
    store = FeatureStore.open(tmp_path)
    assert store.streams() == ["eva.semantic", "eva.spatiotemporal"] and store.sampling == SAMPLING
    assert store.group_info("eva").legacy
    np.testing.assert_array_equal(store["b"]["semantic"], arrays["b"]["semantic"].astype(np.float16))
    summary = summarize(tmp_path)
    assert summary["format_version"] == 1 and summary["groups"]["eva"]["n_ok"] == 2

    with pytest.raises(StoreMismatchError, match=f"dualfocus migrate {tmp_path}") as err:
        eva_writer(tmp_path)
    assert "\n" not in str(err.value)

    moved = migrate_v1(tmp_path)
    assert sorted(moved) == ["manifest", "shard-000000.zarr"]
    assert migrate_v1(tmp_path) == []                        # already format 2: nothing to do
    store = FeatureStore.open(tmp_path)
    assert not store.group_info("eva").legacy and store.sampling == SAMPLING
    assert store.group_info("eva").fingerprint == {"model": "/models/instructblip", "dtype": "float16"}
    np.testing.assert_array_equal(store["b"]["semantic"], arrays["b"]["semantic"].astype(np.float16))
    taps = {"semantic": TapInfo((P, D), "float16", "post_ln"), "spatiotemporal": TapInfo((M, D), "float16", "pool4")}
    with GroupWriter(tmp_path, "eva", taps=taps, fingerprint={"model": "/models/instructblip", "dtype": "float16"},
                     sampling=SAMPLING) as w:
        assert w.done_ids() == {"a", "b"}                    # resume sees what format 1 stored
