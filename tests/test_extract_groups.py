"""Several encoders from one decode, through the real CLI: groups written side by side, a group added to an
existing store later, the bad inputs of store v2, and a kill while a second group is being extracted."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dualfocus_command, run_cli
from test_extract_resume import kill_session, store_state

from dualfocus.extract.decode_worker import HANG_ENV
from dualfocus.store import FeatureStore
from dualfocus.store.manifest import latest, read_all

pytestmark = pytest.mark.long(minutes=3)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, Path]:
    from dualfocus.encoders import write_tiny_encoder

    root = tmp_path_factory.mktemp("encoders")
    return {family: write_tiny_encoder(root / family, family) for family in ("dinov2", "siglip")}


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def refused(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory, toy_corpus, tiny_model, encoders) -> tuple[Path, str]:
    """eva (--model), dino (--encoder) and the pixels (--pixels 64) written by one extract run."""
    store = tmp_path_factory.mktemp("groups") / "store"
    out = run_cli("extract", toy_corpus / "videos", "--model", tiny_model, "--encoder", f"dino={encoders['dinov2']}",
                  "--pixels", 64, "--out", store, "--no-progress").stdout
    return store, out


def test_one_decode_fills_every_group(two_groups, toy_store, toy_corpus, encoders):
    store, out = two_groups
    assert "videos: 12 in corpus | ok 12 | failed 0 | skipped 0" in out
    assert "  group eva: ok 12 | failed 0" in out and "  group dino: ok 12 | failed 0" in out
    assert "  group pixels: ok 12 | failed 0" in out
    features = FeatureStore.open(store)
    assert features.streams() == ["dino.grid", "eva.semantic", "eva.spatiotemporal", "pixels.box", "pixels.frames"]
    assert features.group_info("dino").fingerprint["family"] == "dinov2"
    assert features.group_info("dino").taps["grid"].shape == (256, 64)
    # the default group holds the same numbers as a store extracted with --model alone
    alone = FeatureStore.open(toy_store)
    for video_id in alone.video_ids():
        np.testing.assert_allclose(features[video_id]["semantic"].astype(np.float32),
                                   alone[video_id]["semantic"].astype(np.float32), rtol=2e-3, atol=2e-3)
    # the pixels: uint8 frames, long side 64 (the toy clips are 96 x 96), the box saying what is real
    info = features.group_info("pixels")
    assert info.kind == "pixels" and info.fingerprint["long_side"] == 64
    assert {k: (v.shape, v.dtype) for k, v in info.taps.items()} == {"frames": ((64, 64, 3), "uint8"),
                                                                      "box": ((2,), "int32")}
    for video_id in alone.video_ids():
        got = features.read(video_id, streams=["frames", "box"])
        assert got["frames"].dtype == np.uint8 and got["frames"].shape[1:] == (64, 64, 3)
        assert (got["box"] == [64, 64]).all() and got["frames"].std() > 5
        np.testing.assert_array_equal(got.timestamps, alone[video_id].timestamps)
    inspect = run_cli("inspect", store).stdout
    assert "group pixels: pixels, zarr" in inspect and "tap pixels.frames (pixels): [t, 64, 64, 3] uint8" in inspect
    # dino's grid is what its own tower gives on the same decoded frames
    from dualfocus.encoders import load_encoder
    from dualfocus.extract.decode import decode_video

    video_id = alone.video_ids()[0]
    _, _, chunks = decode_video(str(toy_corpus / "videos" / f"{video_id}.mp4"), 1.0, None, 224, 16)
    frames = np.concatenate(list(chunks))
    want = load_encoder(encoders["dinov2"])(frames, {"grid": "grid"})["grid"]
    got = features.read(video_id, streams=["grid"])["grid"]
    assert got.dtype == np.float16 and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_a_group_added_later_leaves_the_others_untouched(two_groups, toy_corpus, encoders, tmp_path):
    import shutil

    store = shutil.copytree(two_groups[0], tmp_path / "store")
    before = {g: files(store / "groups" / g) for g in ("eva", "dino", "pixels")}
    out = run_cli("extract", toy_corpus / "videos", "--encoder", f"siglip={encoders['siglip']}", "--out", store,
                  "--no-progress", "store.dtype=int8").stdout
    assert "videos: 12 in corpus | ok 12 | failed 0 | skipped 0" in out
    assert {g: files(store / "groups" / g) for g in ("eva", "dino", "pixels")} == before
    features = FeatureStore.open(store)
    assert features.group_info("siglip").taps["grid"].dtype == "int8"
    assert features.video_ids() == features.video_ids(["dino.grid", "siglip.grid", "frames"]) and len(features) == 12
    assert features.read(features.video_ids()[0], streams=["siglip.grid"])["siglip.grid"].dtype == np.float32
    # every group done: nothing to decode
    line = refused(run_cli("extract", toy_corpus / "videos", "--model", encoders["siglip"], "--out", store,
                           check=False))
    assert "is a siglip encoder; --model takes an InstructBLIP/BLIP-2 checkpoint" in line
    out = run_cli("extract", toy_corpus / "videos", "--encoder", f"siglip={encoders['siglip']}", "--out", store,
                  "--no-progress", "store.dtype=int8").stdout
    assert "ok 0 | failed 0 | skipped 12" in out


def test_bad_groups_are_refused_before_any_work(two_groups, toy_corpus, tiny_model, encoders, tmp_path):
    import shutil

    store = shutil.copytree(two_groups[0], tmp_path / "store")
    before = files(store)
    corpus = toy_corpus / "videos"

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = refused(run_cli("extract", corpus, "--encoder", f"text={bert}", "--out", store, check=False))
    assert str(bert) in line and "'bert'" in line and all(f in line for f in ("eva", "siglip", "dinov2", "clip",
                                                                                "convnext"))
    line = refused(run_cli("extract", corpus, "--encoder", f"dino2={encoders['dinov2']}", "--out", store,
                           "encoders.dino2.taps.mid=hidden[9]", check=False))
    assert "encoders.dino2.taps.mid" in line and "hidden[9]" in line and "3" in line
    line = refused(run_cli("extract", corpus, "--encoder", f"sig={encoders['siglip']}", "--out", store, "--fps", "2",
                           check=False))
    assert "fps: store has 1.0, requested 2.0" in line
    line = refused(run_cli("extract", corpus, "--encoder", f"dino={encoders['siglip']}", "--out", store,
                           check=False))
    assert "group 'dino'" in line and "fingerprint.family: store has 'dinov2', requested 'siglip'" in line
    assert "--overwrite" in line
    assert files(store) == before and not (store / "groups" / "sig").exists()

    eva = files(store / "groups" / "eva")
    out = run_cli("extract", corpus, "--encoder", f"dino={encoders['siglip']}", "--out", store, "--overwrite",
                  "--no-progress").stdout
    assert "ok 12 | failed 0 | skipped 0" in out
    assert files(store / "groups" / "eva") == eva
    assert FeatureStore.open(store).group_info("dino").fingerprint["family"] == "siglip"


def test_kill_during_a_second_group_then_rerun(toy_corpus, toy_store, tiny_model, encoders, tmp_path):
    """eva is complete; the run adding dino is hard-killed mid-way; the same command again completes dino with
    every video exactly once and never touches eva."""
    import shutil

    store = shutil.copytree(toy_store, tmp_path / "store")
    eva = files(store / "groups" / "eva")
    group = store / "groups" / "dino"
    args = ["extract", str(toy_corpus / "videos"), "--model", str(tiny_model), "--encoder",
            f"dino={encoders['dinov2']}", "--out", str(store), "--no-progress", "store.videos_per_shard=2"]
    videos = sorted(p.stem for p in (toy_corpus / "videos").glob("*.mp4"))
    env = {**os.environ, HANG_ENV: videos[-1]}   # the first run cannot finish before the kill
    first = subprocess.Popen([*dualfocus_command(), *args], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None and not store_state(group)[0]:
            time.sleep(0.05)
        assert first.poll() is None, f"first run ended before the kill:\n{first.stdout.read()}"
        assert store_state(group)[0], "no committed dino part within the deadline"
    finally:
        kill_session(first)
    committed = latest(read_all(group))
    assert 0 < len(committed) < len(videos)

    out = run_cli(*args, timeout=600).stdout
    assert f"skipped {len(committed)}" in out and f"ok {len(videos) - len(committed)} | failed 0" in out
    rows = read_all(group)
    assert sorted(rows["video_id"]) == videos and (rows["status"] == "ok").all()   # each exactly once
    assert store_state(group)[1] == [] and not [p for p in store.rglob("*") if ".tmp-" in p.name]
    assert files(store / "groups" / "eva") == eva
    assert sorted(FeatureStore.open(store).video_ids()) == sorted(FeatureStore.open(toy_store).video_ids())
