"""Extract with parallel shard writers: every video exactly once whatever dies mid-run (a writer actor, an encoder
worker), and a video that hangs its decoder holds back only itself.

The kill tests run ``run_extract`` in a thread of this process (local Ray), so they can reach its actors; the
test hook ``DUALFOCUS_DECODE_TEST_HANG`` keeps one video hanging so that the run is still going at the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import dualfocus_command, run_cli

from dualfocus.extract.decode_worker import HANG_ENV
from dualfocus.store import FeatureStore
from dualfocus.store.manifest import latest, read_all

pytestmark = pytest.mark.long(minutes=5)

N_VIDEOS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from dualfocus.pipeline.toy import make_toy_corpus

    root = tmp_path_factory.mktemp("parallel") / "toy"
    make_toy_corpus(root, n_videos=N_VIDEOS, seed=5)
    return root / "videos"


def ids() -> list[str]:
    return [f"toy_{i:05d}" for i in range(N_VIDEOS)]


def committed(group: Path) -> list[str]:
    return list(latest(read_all(group))["video_id"]) if (group / "manifest").is_dir() else []


def assert_exactly_once(store: Path) -> None:
    group = store / "groups" / "eva"
    rows = read_all(group)
    assert sorted(rows["video_id"]) == ids() and (rows["status"] == "ok").all()   # one row each, all ok
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
    shards = {p.name for p in group.glob("shard-*")}
    assert shards == set(rows["shard"])                                           # no orphan shard
    features = FeatureStore.open(store)
    for video in features.iter_videos():
        n = len(video.timestamps)
        np.testing.assert_array_equal(video.timestamps, np.arange(n, dtype=np.float32))
        assert video["semantic"].shape == (n, 257, 64)


def test_two_writers_through_the_cli_store_what_one_writer_stores(corpus, tiny_model, toy_store, tmp_path):
    store = tmp_path / "store"
    out = run_cli("extract", str(corpus), "--model", str(tiny_model), "--out", str(store), "--no-progress",
                  "--writers", "2", "store.videos_per_shard=2").stdout
    assert f"videos: {N_VIDEOS} in corpus | ok {N_VIDEOS} | failed 0" in out, out
    assert_exactly_once(store)
    parts = set(read_all(store / "groups" / "eva")["part"])
    assert {p % 2 for p in parts} == {0, 1}                  # both writers committed shards of their own
    one = tmp_path / "one"
    run_cli("extract", str(corpus), "--model", str(tiny_model), "--out", str(one), "--no-progress")
    a, b = FeatureStore.open(store), FeatureStore.open(one)
    for vid in ids():
        np.testing.assert_array_equal(a[vid]["semantic"], b[vid]["semantic"])


class InProcessRun:
    """``run_extract`` in a thread, with a hanging video (``hang``), so a test can kill parts of it while it runs."""

    def __init__(self, corpus: Path, model: Path, store: Path, monkeypatch, hang: bool = True, **values):
        import ray

        from dualfocus.extract import writer_actor
        from dualfocus.extract.config import ExtractConfig
        from dualfocus.pipeline.config import load_config

        if ray.is_initialized():
            ray.shutdown()
        if hang:
            monkeypatch.setenv(HANG_ENV, f"toy_{N_VIDEOS - 1:05d}@1")     # hangs after its first chunk
        self.writers: list = []
        start = writer_actor.start_writers

        def recorded(*args, **kwargs):
            self.writers = start(*args, **kwargs)
            return self.writers

        monkeypatch.setattr(writer_actor, "start_writers", recorded)
        self.cfg = load_config(ExtractConfig, values={
            "corpus": str(corpus), "model": str(model), "out": str(store), "store.videos_per_shard": 1,
            "decode.timeout_s": 30.0, **values})
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from dualfocus.extract.run import run_extract

        try:
            run_extract(self.cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e

    def wait_for_commits(self, group: Path, n: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while len(committed(group)) < n and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.thread.is_alive(), f"the run ended before the kill: {self.error!r}"
        assert len(committed(group)) >= n, "nothing committed within the deadline"

    def finish(self, timeout_s: float = 300) -> BaseException | None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the run did not end after the kill"
        return self.error


def kill_then_rerun(kill, corpus: Path, model: Path, tmp_path: Path, monkeypatch) -> None:
    """Run extract with 2 writers, ``kill(run)`` once 2 videos are committed, check the run stops with one line
    and commits only finished videos, then run the same command again: every video exactly once."""
    import ray

    store = tmp_path / "store"
    group = store / "groups" / "eva"
    run = InProcessRun(corpus, model, store, monkeypatch, **{"ray.writers": 2})
    run.wait_for_commits(group, 2)
    kill(run)
    error = run.finish()
    assert error is not None and "extract stopped" in str(error) and "run the same command again" in str(error)
    before = latest(read_all(group))
    assert 0 < len(before) < N_VIDEOS and (before["status"] == "ok").all()   # no row for an interrupted video

    ray.shutdown()                        # the rerun starts its own Ray, without the hang hook
    monkeypatch.delenv(HANG_ENV)
    out = run_cli("extract", str(corpus), "--model", str(model), "--out", str(store), "--no-progress",
                  "--writers", "2", "store.videos_per_shard=1").stdout
    assert f"ok {N_VIDEOS - len(before)} | failed 0 | skipped {len(before)}" in out, out
    assert_exactly_once(store)


def test_a_writer_killed_mid_run_then_the_same_command_again_stores_every_video_once(
        corpus, tiny_model, tmp_path, monkeypatch):
    import ray

    kill_then_rerun(lambda run: ray.kill(run.writers[0], no_restart=True), corpus, tiny_model, tmp_path, monkeypatch)


def encoder_worker_pid() -> int:
    """The process of the pipeline's encoder actor (Ray Data names its map actors after their stage)."""
    from ray._private import state

    actors = state.actors().values()
    for actor in actors:
        if actor["ActorClassName"] == "MapWorker(MapBatches(EncodeStage))" and actor["State"] == "ALIVE":
            return int(actor["Pid"])
    raise AssertionError(f"no live encoder actor among {[a['ActorClassName'] for a in actors]}")


def test_an_encoder_worker_crash_then_the_same_command_again_stores_every_video_once(
        corpus, tiny_model, tmp_path, monkeypatch):
    kill_then_rerun(lambda run: os.kill(encoder_worker_pid(), signal.SIGKILL), corpus, tiny_model, tmp_path,
                    monkeypatch)


def test_a_hanging_video_holds_back_only_itself(corpus, tiny_model, tmp_path):
    """While one video hangs its decoder (until decode.timeout_s), every other video is committed."""
    store = tmp_path / "store"
    group = store / "groups" / "eva"
    hanging = "toy_00001"                     # early in the corpus: most videos come after it
    env = {**os.environ, HANG_ENV: f"{hanging}@1"}
    proc = subprocess.Popen([*dualfocus_command(), "extract", str(corpus), "--model", str(tiny_model), "--out",
                             str(store), "--no-progress", "--writers", "2", "store.videos_per_shard=1",
                             "decode.timeout_s=45", "ray.decode_workers=2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while len(committed(group)) < N_VIDEOS - 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        others = committed(group)
        still_running = proc.poll() is None
        out = proc.communicate(timeout=600)[0]
    finally:
        proc.kill()
    assert still_running, f"the run ended before the other videos were committed:\n{out}"
    assert sorted(others) == [v for v in ids() if v != hanging]     # all of them, the hanging one not yet
    assert f"ok {N_VIDEOS - 1} | failed 1" in out and hanging in out, out
    rows = latest(read_all(group)).set_index("video_id")
    assert rows.loc[hanging, "status"] == "failed" and "45" in rows.loc[hanging, "error"]


def test_writers_the_cluster_cannot_place_are_a_one_line_error(tmp_path):
    import ray

    from dualfocus.extract.writer_actor import start_writers
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store import GroupWriter

    group = GroupWriter(tmp_path, "eva", taps={"semantic": (2, 3)}, fingerprint={}, sampling={"fps": 1.0,
                                                                                             "max_frames": None})
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        with pytest.raises(UserError, match=r"ray.writers=2 with ray.writer_cpus=2: only 0 writer\(s\) could be "
                                            r"placed within 3 s \(1 CPUs free in the cluster\)"):
            start_writers({"eva": group.slot_specs(2)}, cpus=2, spread=False, placement_timeout_s=3)
    finally:
        ray.shutdown()
        group.close()


def test_decode_pool_bounds_are_checked():
    from dualfocus.extract.config import RayConfig

    assert RayConfig(decode_min_workers=3, decode_workers=2).check() == [
        "decode_min_workers (3) must be <= decode_workers (2)"]
    assert RayConfig(writers=0).check() == ["writers must be >= 1 or null, got 0"]
    assert RayConfig().n_writers() == 1 and RayConfig(encoder_actors=4).n_writers() == 4


def test_every_group_of_a_six_group_run_is_written_by_both_writers(streams_store):
    """conftest's streams_store: one extract run, six groups (five encoders and the pixels), two writers."""
    groups = sorted(p for p in (streams_store / "groups").iterdir() if p.is_dir())
    assert [g.name for g in groups] == ["dino", "eva", "pixels", "qavit", "siglip", "slowfast"]
    for group in groups:
        rows = read_all(group)
        assert len(rows) == 12 and rows["video_id"].is_unique and (rows["status"] == "ok").all(), group.name
        assert {part % 2 for part in set(rows["part"])} == {0, 1}, group.name        # both slots wrote shards
        assert {p.name for p in group.glob("shard-*")} == set(rows["shard"]), group.name
    store = FeatureStore.open(streams_store)
    assert len(store.video_ids()) == 12


@pytest.fixture(scope="module")
def bigger_corpus(tmp_path_factory) -> Path:
    from dualfocus.pipeline.toy import make_toy_corpus

    root = tmp_path_factory.mktemp("parallel60") / "toy"
    make_toy_corpus(root, n_videos=60, seed=6)
    return root / "videos"


def test_a_node_lost_mid_run_then_the_same_command_again_stores_every_video_once(bigger_corpus, tiny_model, tmp_path,
                                                                                 monkeypatch):
    """A two-node cluster (``ray.cluster_utils.Cluster``: head and one worker node on this machine), one writer
    pinned on each; the worker node is killed once two videos are committed (of 60, so the run is far from done),
    taking its writer and whatever else ran there. The same command again, on the head alone: every video once."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Cluster records its address in /tmp/ray/ray_current_cluster (and deletes that file at shutdown), where
    # a bare ray.init() or `ray status` of anyone on this machine would find it: leave the file alone
    monkeypatch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        store = tmp_path / "store"
        group = store / "groups" / "eva"
        run = InProcessRun(bigger_corpus, tiny_model, store, monkeypatch, hang=False, **{
            "ray.address": cluster.address, "ray.writers": 2, "ray.writer_cpus": 0})
        run.wait_for_commits(group, 2)
        cluster.remove_node(worker, allow_graceful=False)
        cluster.wait_for_nodes()                  # until the cluster itself counts the node as gone
        error = run.finish()
        assert "extract stopped" in str(error), error
        before = latest(read_all(group))
        assert 0 < len(before) < 60 and (before["status"] == "ok").all()
        ray.shutdown()

        out = run_cli("extract", str(bigger_corpus), "--model", str(tiny_model), "--out", str(store), "--no-progress",
                      f"ray.address={cluster.address}", "--writers", "2", "ray.writer_cpus=0",
                      "store.videos_per_shard=1").stdout
        assert f"ok {60 - len(before)} | failed 0 | skipped {len(before)}" in out, out
        rows = read_all(group)
        assert len(rows) == 60 and rows["video_id"].is_unique and (rows["status"] == "ok").all()
        assert not [p for p in store.rglob("*") if ".tmp-" in p.name]
        assert {p.name for p in group.glob("shard-*")} == set(rows["shard"])
    finally:
        ray.shutdown()
        cluster.shutdown()
