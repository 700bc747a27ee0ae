"""``run_extract`` in-process (local Ray): parity with the Hugging Face vision model, fps sampling and
the frame cap, Zarr vs WebDataset, fingerprint refusal, and the corpus problems refused before any work.

The Zarr store is the session's ``toy_store`` (the 12-clip toy corpus at 1 fps, tiny model)."""

from __future__ import annotations

import math
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dualfocus.extract.config import ExtractConfig
from dualfocus.extract.decode import decode_video
from dualfocus.extract.run import run_extract
from dualfocus.pipeline.config import load_config
from dualfocus.pipeline.corpus import CorpusError
from dualfocus.pipeline.models import load_image_spec, normalize_frames
from dualfocus.store import FeatureStore, StoreMismatchError, safe_key
from dualfocus.store.manifest import latest, read_all

N_VIDEOS = 4
ODD_IDS = ["clips/first take.v1", "second.mp4", "third id", "4"]  # slash, dots, spaces


def extract(corpus, model, out, **values):
    cfg = load_config(ExtractConfig, values={"corpus": str(corpus), "model": str(model), "out": str(out), **values})
    return run_extract(cfg, progress=False)


def write_csv(path: Path, rows: list[tuple[str, Path]]) -> Path:
    path.write_text("video_id,path\n" + "".join(f"{vid},{p}\n" for vid, p in rows))
    return path


@pytest.fixture(scope="module")
def videos(toy_corpus) -> list[Path]:
    return sorted((toy_corpus / "videos").glob("*.mp4"))[:N_VIDEOS]


@pytest.fixture(scope="module")
def zarr_store(toy_store) -> Path:
    return toy_store


@pytest.fixture(scope="module")
def wds_store(tiny_model, videos, tmp_path_factory) -> Path:
    """Four of the toy videos under odd ids, as WebDataset tars (two videos per shard)."""
    root = tmp_path_factory.mktemp("wds")
    corpus = write_csv(root / "corpus.csv", list(zip(ODD_IDS, videos)))
    summary = extract(corpus, tiny_model, root / "store", **{"store.format": "webdataset",
                                                               "store.videos_per_shard": 2})
    assert (summary.ok, summary.failed) == (N_VIDEOS, 0)
    return root / "store"


def pool_by_hand(patches: torch.Tensor) -> torch.Tensor:
    """``[t, p, d]`` -> ``[t, p/4, d]``: the mean of tokens 0-3, 4-7, ..., one group at a time."""
    return torch.stack([patches[:, i:i + 4].mean(dim=1) for i in range(0, patches.shape[1], 4)], dim=1)


def test_stored_streams_equal_the_hugging_face_vision_model(zarr_store, tiny_model, videos):
    from transformers import InstructBlipForConditionalGeneration

    vision = InstructBlipForConditionalGeneration.from_pretrained(tiny_model, local_files_only=True).vision_model
    vision = vision.float().eval()
    spec = load_image_spec(tiny_model)
    store = FeatureStore.open(zarr_store)
    assert {v.stem for v in videos} <= set(store.video_ids())
    for video in videos:
        _, timestamps, chunks = decode_video(video, fps=1.0, max_frames=None, size=spec.size)
        frames = np.concatenate(list(chunks))                                  # [t, 224, 224, 3] uint8
        with torch.no_grad():
            out = vision(pixel_values=normalize_frames(frames, spec), output_hidden_states=True)
        semantic = out.last_hidden_state.numpy()                               # [t, 257, 64]
        motion = pool_by_hand(out.hidden_states[-2][:, 1:]).numpy()            # [t, 64, 64]
        last_block = pool_by_hand(out.hidden_states[-1][:, 1:]).numpy()

        got = store[video.stem]
        assert got["semantic"].dtype == got["spatiotemporal"].dtype == np.float16
        assert got["semantic"].shape == semantic.shape == (len(frames), 257, 64)
        assert got["spatiotemporal"].shape == motion.shape == (len(frames), 64, 64)
        np.testing.assert_array_equal(got.timestamps, timestamps.astype(np.float32))
        np.testing.assert_allclose(got["semantic"].astype(np.float32), semantic, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got["spatiotemporal"].astype(np.float32), motion, rtol=2e-3, atol=2e-3)
        # sharp enough to tell frames and blocks apart (a tower initialised near 0 would store zeros)
        assert np.abs(np.diff(semantic, axis=0)).max() > 0.05 and got["spatiotemporal"].astype(np.float32).std() > 0.05
        assert np.abs(motion - last_block).max() > 0.05


def test_timestamps_follow_the_fps_grid(zarr_store):
    store = FeatureStore.open(zarr_store)
    fps = store.sampling["fps"]
    for row in store.groups["eva"].manifest.to_dict("records"):
        expected = math.ceil(row["duration_s"] * fps - 1e-9)     # max_frames is null here
        assert 3 <= row["duration_s"] <= 5.1                     # toy clips last 3-5 s
        assert row["n_frames"] == row["length"] == expected
        np.testing.assert_array_equal(store[row["video_id"]].timestamps, np.arange(expected, dtype=np.float32) / fps)


def test_existing_store_with_another_fingerprint_is_refused_then_overwritten(zarr_store, tiny_model, videos,
                                                                             tmp_path):
    store_dir = shutil.copytree(zarr_store, tmp_path / "store")
    corpus = write_csv(tmp_path / "corpus.csv", [(v.stem, v) for v in videos])
    before = sorted(p.name for p in (store_dir / "groups" / "eva" / "manifest").iterdir())
    with pytest.raises(StoreMismatchError) as err:
        extract(corpus, tiny_model, store_dir, **{"decode.fps": 2.0, "decode.max_frames": 2})
    assert "fps: store has 1.0, requested 2.0; max_frames: store has None, requested 2" in str(err.value)
    assert sorted(p.name for p in (store_dir / "groups" / "eva" / "manifest").iterdir()) == before

    summary = extract(corpus, tiny_model, store_dir, overwrite=True, **{"decode.fps": 2.0, "decode.max_frames": 2})
    assert (summary.ok, summary.skipped, summary.frames) == (N_VIDEOS, 0, 2 * N_VIDEOS)
    capped, full = FeatureStore.open(store_dir), FeatureStore.open(zarr_store)
    assert capped.sampling == {"fps": 2.0, "max_frames": 2}
    for row in capped.groups["eva"].manifest.to_dict("records"):
        grid = math.ceil(row["duration_s"] * 2.0 - 1e-9)          # samples before the cap: 6..10
        assert grid > 2
        assert row["n_frames"] == row["length"] == min(2, grid)
        got = capped[row["video_id"]]
        np.testing.assert_array_equal(got.timestamps, [0.0, (grid - 1) / 2.0])  # first and last of the grid
        np.testing.assert_array_equal(got["semantic"][0], full[row["video_id"]]["semantic"][0])  # frame at 0 s


def test_zarr_and_webdataset_stores_read_back_the_same_arrays(zarr_store, wds_store, videos):
    zarr, wds = FeatureStore.open(zarr_store), FeatureStore.open(wds_store)
    assert wds.group_info("eva").format == "webdataset" and wds.fingerprint() == zarr.fingerprint()
    assert sorted(p.name for p in (wds_store / "groups" / "eva").glob("shard-*")) == ["shard-000000.tar",
                                                                                       "shard-000001.tar"]
    assert sorted(wds.video_ids()) == sorted(ODD_IDS)      # commit order, not corpus order
    for odd_id, video in zip(ODD_IDS, videos):
        a, b = zarr[video.stem], wds[odd_id]
        assert b.video_id == odd_id
        np.testing.assert_array_equal(a.timestamps, b.timestamps, err_msg=odd_id)
        for name in ("semantic", "spatiotemporal"):
            assert a[name].dtype == b[name].dtype
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{odd_id} {name}")
    streamed = {f.video_id: f for f in wds.iter_videos()}
    assert sorted(streamed) == sorted(ODD_IDS)
    np.testing.assert_array_equal(streamed[ODD_IDS[0]]["semantic"], zarr[videos[0].stem]["semantic"])


def test_odd_ids_are_stored_under_safe_keys_and_kept_verbatim(wds_store):
    rows = latest(read_all(wds_store / "groups" / "eva")).set_index("video_id").loc[ODD_IDS].reset_index()
    assert list(rows["key"]) == [safe_key(i) for i in ODD_IDS]
    assert rows["key"].iloc[0] != ODD_IDS[0] and rows["key"].iloc[3] == "4"
    members = []
    for shard in sorted((wds_store / "groups" / "eva").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members += tar.getnames()
    for key in rows["key"]:
        assert {f"{key}.semantic.npy", f"{key}.spatiotemporal.npy", f"{key}.timestamps.npy", f"{key}.json"} \
            <= set(members)
    assert all(name.count(".") == (2 if name.endswith(".npy") else 1) and "/" not in name and " " not in name
               for name in members)


def test_duplicate_ids_are_refused_before_any_work(tmp_path, tiny_model, videos):
    corpus = write_csv(tmp_path / "corpus.csv", [("a", videos[0]), ("b", videos[1]), ("a", videos[2]),
                                                 ("b", videos[3]), ("c", videos[0])])
    with pytest.raises(CorpusError, match=r"duplicate video_id values: 'a', 'b'"):
        extract(corpus, tiny_model, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_corpus_without_videos_is_refused_before_any_work(tmp_path, tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no videos found"):
        extract(tmp_path / "empty", tiny_model, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_a_local_ray_start_that_times_out_is_retried_then_reported(monkeypatch):
    """Ray's own 30 s raylet wait can pass on a busy machine: retried after a clean shutdown, then one line."""
    import ray

    from dualfocus.extract.run import start_local_ray
    from dualfocus.pipeline.errors import UserError

    shutdowns = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(1))
    timeout = Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise timeout

    start_local_ray(flaky)
    assert (len(calls), len(shutdowns)) == (2, 1)

    def always():
        raise timeout

    with pytest.raises(UserError, match=r"^Ray could not start on this machine \(3 tries\): The current node timed out"):
        start_local_ray(always)

    def other():
        raise ValueError("not a start-up time-out")

    with pytest.raises(ValueError):  # anything else is not ours to retry
        start_local_ray(other)
