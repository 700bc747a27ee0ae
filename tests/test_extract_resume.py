"""A hard-killed ``dualfocus extract`` resumes: rerunning the same command stores every video exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dualfocus_command, proc_stat, run_cli

from dualfocus.extract.decode_worker import HANG_ENV
from dualfocus.store import FeatureStore
from dualfocus.store.manifest import latest, read_all

N_VIDEOS = 30
PER_SHARD = 4


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (the killed command and what it started, Ray workers included)."""
    pids = []
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[3]) == sid:  # state, ppid, pgrp, session, ...
            pids.append(int(entry.name))
    return pids


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group, then whatever else it started in its session (Ray gives its
    workers their own process groups)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def store_state(store: Path) -> tuple[list[str], list[str]]:
    """(committed manifest parts, uncommitted entries as the writer names them when it removes them:
    temp shards, shards without a part, temp parts under manifest/)."""
    manifest = store / "manifest"
    parts = sorted(p.name for p in manifest.glob("part-*.parquet")) if manifest.is_dir() else []
    indices = {p[len("part-"):-len(".parquet")] for p in parts}
    shards = [p.name for p in store.glob("shard-*")] if store.is_dir() else []
    garbage = [s for s in shards if ".tmp-" in s or s[len("shard-"):len("shard-") + 6] not in indices]
    if manifest.is_dir():
        garbage += [f"manifest/{p.name}" for p in manifest.glob("part-*.tmp-*")]
    return parts, sorted(garbage)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from dualfocus.pipeline.toy import make_toy_corpus

    root = tmp_path_factory.mktemp("resume") / "toy"
    make_toy_corpus(root, n_videos=N_VIDEOS, seed=11)
    return root / "videos"


def test_hard_kill_then_rerun_stores_every_video_exactly_once(corpus, tiny_model, tmp_path):
    store = tmp_path / "store"
    group = store / "groups" / "eva"     # the default group's shards and manifest
    args = ["extract", str(corpus), "--model", str(tiny_model), "--out", str(store), "--no-progress",
            f"store.videos_per_shard={PER_SHARD}", "--writers", "2"]
    # The test hook makes the last video hang in the first run, so that run cannot finish before the kill
    # however fast the machine is; the rerun has no hook.
    env = {**os.environ, HANG_ENV: f"toy_{N_VIDEOS - 1:05d}"}
    first = subprocess.Popen([*dualfocus_command(), *args], env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Aim the kill at a moment with one batch committed and the next one half-written. The writer
        # keeps going while we look, so the state the kill actually leaves is read again afterwards and
        # every assertion below holds for whatever that state is (garbage or none).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            parts, garbage = store_state(group)
            if parts and garbage:
                break
            time.sleep(0.02)
        assert first.poll() is None, f"first run ended before the kill:\n{first.stdout.read()}"
        assert parts, "no committed manifest part within the deadline"
    finally:
        kill_session(first)

    parts, garbage = store_state(group)  # frozen now: every process of the first run is dead
    committed = latest(read_all(group))
    assert len(committed) == PER_SHARD * len(parts) < N_VIDEOS  # only whole shards were committed
    assert (committed["status"] == "ok").all()

    second = run_cli(*args, timeout=600)
    out = second.stdout
    if garbage:
        assert (f"removed {len(garbage)} uncommitted shard(s) from an interrupted run: "
                f"{', '.join(garbage)}") in out, out
    else:
        assert "uncommitted shard" not in out, out
    assert (f"videos: {N_VIDEOS} in corpus | ok {N_VIDEOS - len(committed)} | failed 0 | "
            f"skipped {len(committed)}") in out, out

    rows = read_all(group)
    assert sorted(rows["video_id"]) == [f"toy_{i:05d}" for i in range(N_VIDEOS)]  # each exactly once
    assert (rows["status"] == "ok").all()
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
    assert store_state(group)[1] == []
    assert {p.name for p in group.glob("shard-*")} == set(rows["shard"])   # every shard committed, none orphaned

    features = FeatureStore.open(store)
    assert len(features) == N_VIDEOS
    frames = 0
    for video in features.iter_videos():
        n = len(video.timestamps)
        np.testing.assert_array_equal(video.timestamps, np.arange(n, dtype=np.float32))
        assert video["semantic"].shape == (n, 257, 64) and video["spatiotemporal"].shape == (n, 64, 64)
        frames += n
    assert frames == int(rows["length"].sum())
    assert int(re.search(r"frames: (\d+) in", out).group(1)) == frames - int(committed["length"].sum())
