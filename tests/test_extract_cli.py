"""End to end through the console script: init-tiny, toy-corpus, extract (twice), inspect and inspect --json."""

from __future__ import annotations

import json
import re

import yaml
from conftest import run_cli

from dualfocus.store import FeatureStore
from dualfocus.store.manifest import read_all

N_VIDEOS = 4


def test_init_tiny_toy_corpus_extract_inspect(tmp_path):
    model, toy, store = tmp_path / "model", tmp_path / "toy", tmp_path / "store"

    out = run_cli("init-tiny", model).stdout
    assert f"tiny model written to {model}" in out
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "qformer_tokenizer"} <= \
        {p.name for p in model.iterdir()}

    out = run_cli("toy-corpus", toy, "--videos", N_VIDEOS, "--seed", 1).stdout
    assert f"n_videos={N_VIDEOS}" in out
    assert len(list((toy / "videos").glob("*.mp4"))) == N_VIDEOS

    proc = run_cli("extract", toy / "videos", "--model", model, "--out", store, "--no-progress")
    out = proc.stdout
    for noise in ("core_worker.cc", "Progress bars", "Traceback", "Deprecat"):  # nothing a user would read as
        assert noise not in proc.stderr, proc.stderr[-3000:]                     # an error or a stray notice
    group = store / "groups" / "eva"
    rows = read_all(group)
    frames, written = int(rows["length"].sum()), int(rows["bytes"].sum())
    assert f"videos: {N_VIDEOS} in corpus | ok {N_VIDEOS} | failed 0 | skipped 0" in out
    assert re.search(rf"frames: {frames} in [\d.]+ s = [\d.]+ frames/s \| written: .* \({written} bytes\)", out), out
    assert f"store: {store}" in out
    assert frames == int(rows["n_frames"].sum()) >= 3 * N_VIDEOS  # toy clips last 3-5 s, sampled at 1 fps
    assert written == frames * ((257 * 64 + 64 * 64) * 2 + 4)     # fp16 streams + fp32 timestamp

    # the store's layout
    assert sorted(p.name for p in store.iterdir()) == ["groups", "store.json"]
    names = sorted(p.name for p in group.iterdir() if not p.name.startswith("."))
    assert names == ["extract_config.yaml", "group.json", "manifest", "shard-000000.zarr"]
    assert [p.name for p in (group / "manifest").iterdir()] == ["part-000000.parquet"]
    assert {"semantic", "spatiotemporal", "timestamps"} <= {p.name for p in (group / "shard-000000.zarr").iterdir()}
    info = json.loads((store / "store.json").read_text())
    assert info["format_version"] == 2 and info["sampling"] == {"fps": 1.0, "max_frames": None}
    ginfo = json.loads((group / "group.json").read_text())
    assert ginfo["format"] == "zarr" and ginfo["kind"] == "encoder" and ginfo["fingerprint"]["dtype"] == "float16"
    assert ginfo["taps"] == {"semantic": {"shape": [257, 64], "dtype": "float16", "spec": "post_ln"},
                             "spatiotemporal": {"shape": [64, 64], "dtype": "float16", "spec": "pool4"}}
    saved = yaml.safe_load((group / "extract_config.yaml").read_text())
    assert saved["model"] == str(model) and saved["decode"]["fps"] == 1.0 and saved["store"]["format"] == "zarr"
    assert sorted(FeatureStore.open(store).video_ids()) == sorted(p.stem for p in (toy / "videos").glob("*.mp4"))

    # the same command again: everything is already there (no Ray needed)
    out = run_cli("extract", toy / "videos", "--model", model, "--out", store, "--no-progress").stdout
    assert f"videos: {N_VIDEOS} in corpus | ok 0 | failed 0 | skipped {N_VIDEOS}" in out
    assert len(read_all(group)) == N_VIDEOS

    out = run_cli("inspect", store).stdout
    assert f"store: {store} (format 2; sampling fps=1.0, max_frames=None; 1 group(s))" in out
    assert "group eva: encoder, zarr, created" in out and "pool_factor=4" in out
    assert "  tap eva.semantic (post_ln): [t, 257, 64] float16, 32.1 KiB/frame" in out
    assert "  tap eva.spatiotemporal (pool4): [t, 64, 64] float16, 8.0 KiB/frame" in out
    assert f"  videos: ok {N_VIDEOS} | failed 0 | shards 1" in out
    assert f"  frames: {frames} | on disk" in out
    assert "/frame raw fp16" in out

    summary = json.loads(run_cli("inspect", store, "--json").stdout)
    assert summary["sampling"] == {"fps": 1.0, "max_frames": None} and list(summary["groups"]) == ["eva"]
    summary = summary["groups"]["eva"]
    disk = sum(p.stat().st_size for p in (group / "shard-000000.zarr").rglob("*") if p.is_file())
    assert (summary["n_ok"], summary["n_failed"], summary["n_frames"], summary["shards"]) == (N_VIDEOS, 0, frames, 1)
    assert summary["format"] == "zarr" and summary["bytes"] == written and summary["disk_bytes"] == disk
    assert summary["raw_fp16_bytes_per_frame"] == (257 * 64 + 64 * 64) * 2 + 4
    assert summary["bytes_per_frame"] == disk / frames
    assert summary["failures"] == []
