"""Store v2 through the real CLI: `train` refuses a store without its connector's streams before loading any
model; `migrate` and `inspect` on a store written before stream groups; an extract into such a store."""

from __future__ import annotations

import json
import shutil

from conftest import run_cli
from test_store_groups import make_v1_store

from dualfocus.store import FeatureStore, GroupWriter


def test_train_names_missing_streams_and_the_extract_command_before_loading_a_model(tmp_path, tiny_model):
    store = tmp_path / "store"
    with GroupWriter(store, "dino", taps={"grid": (4, 8)}, fingerprint={}, sampling={"fps": 1.0, "max_frames": None}):
        pass
    (tmp_path / "qa.json").write_text(json.dumps([{"video_id": "v", "q": "what?", "a": "red"}]))
    model = shutil.copytree(tiny_model, tmp_path / "model")
    for weights in model.glob("*.safetensors*"):   # any model load would now fail with another message
        weights.unlink()
    proc = run_cli("train", store, tmp_path / "qa.json", "--model", model, "--out", tmp_path / "run", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"the feature store at {store} lacks the stream(s) semantic, spatiotemporal" in lines[0]
    assert "it has dino.grid" in lines[0]
    assert f"dualfocus extract CORPUS --out {store} --model {model}" in lines[0]


def test_migrate_and_inspect_a_format_1_store(tmp_path, tiny_model):
    make_v1_store(tmp_path / "old")
    out = run_cli("inspect", tmp_path / "old").stdout
    assert "(format 1; sampling fps=1.0, max_frames=32; 1 group(s))" in out
    assert f"dualfocus migrate {tmp_path / 'old'}" in out

    corpus = tmp_path / "corpus.csv"
    corpus.write_text("video_id,path\nc,c.mp4\n")
    proc = run_cli("extract", corpus, "--model", tiny_model, "--out", tmp_path / "old", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run `dualfocus migrate {tmp_path / 'old'}` once" in proc.stderr
    assert not (tmp_path / "old" / "groups").exists()

    out = run_cli("migrate", tmp_path / "old").stdout
    assert "moved manifest, shard-000000.zarr into groups/eva/" in out
    assert "already format 2" in run_cli("migrate", tmp_path / "old").stdout
    out = run_cli("inspect", tmp_path / "old").stdout
    assert "(format 2; sampling fps=1.0, max_frames=32; 1 group(s))" in out and "dualfocus migrate" not in out
    assert FeatureStore.open(tmp_path / "old").video_ids() == ["a", "b"]
