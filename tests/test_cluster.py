"""The README's cluster path: `dualfocus extract` submitted through the Ray Jobs API to a real two-node
Ray cluster (head with its job server + one worker node, both on this machine), with ``ray.address=auto``.

The cluster is ours alone: its own ports and temp dir, and torn down by killing exactly the processes it
started (never `ray stop`, which would stop every Ray instance of this user, other tests' included).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import dualfocus_command

from dualfocus.store import FeatureStore
from dualfocus.store.manifest import read_all

N_VIDEOS = 6
JOB_TIMEOUT_S = 600  # generous: this machine's cores are shared with other test runs
CLUSTER_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_USAGE_STATS_ENABLED": "0",
               # Ray >= 2.5x turns token auth on when ~/.ray/auth_token exists; this cluster listens on
               # 127.0.0.1 only and its client (this test) holds no token
               "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """A head node (GCS, dashboard, job server) and worker nodes, each a `ray start --block` process."""

    temp_dir: str
    """Short on purpose: Ray's Unix sockets live under it (paths are limited to ~107 characters)."""
    gcs_port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_node(self, *args: str) -> None:
        ray = Path(sys.executable).parent / "ray"
        # Every port a second Ray instance on this machine could also want is chosen free, not defaulted.
        cmd = [str(ray), "start", "--block", "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
               f"--object-store-memory={200 * 2**20}", f"--temp-dir={self.temp_dir}",
               f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", *args]
        env = {**os.environ, **CLUSTER_ENV, "PATH": f"{ray.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        with open(Path(self.temp_dir) / f"node{len(self.nodes)}.log", "w") as log:
            # its own process group: teardown signals that group, and only that group
            self.nodes.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self) -> None:
        self._start_and_wait(1, "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                             f"--ray-client-server-port={_free_port()}")
        self._start_and_wait(2, f"--address=127.0.0.1:{self.gcs_port}")

    def _start_and_wait(self, n: int, *args: str) -> None:
        """Start a node; again, up to 4 times in all, if `ray start` gave up: it allows a raylet a fixed 30 s to
        register, which a machine at 10x its core count overruns twice in a row (seen at load 21 on 2 cores)."""
        for attempt in range(1, 5):
            self.start_node(*args)
            try:
                return self._wait_for_nodes(n)
            except RuntimeError:
                if attempt == 4:
                    raise
                failed = self.nodes.pop()
                _signal_group(failed.pid, signal.SIGKILL)
                failed.wait(timeout=30)

    def _wait_for_nodes(self, n: int, timeout_s: float = 240) -> None:
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        alive, error = 0, None
        while time.monotonic() < deadline:
            for i, node in enumerate(self.nodes):
                if node.poll() is not None:
                    log = (Path(self.temp_dir) / f"node{i}.log").read_text()[-3000:]
                    raise RuntimeError(f"ray start (node {i}) exited with {node.returncode}:\n{log}")
            try:
                alive = sum(s.state == "ALIVE" for s in list_nodes(address=self.dashboard_url, timeout=10))
            except Exception as e:  # noqa: BLE001 - the dashboard is not up yet
                alive, error = 0, e
            if alive >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{alive} of {n} Ray nodes alive after {timeout_s} s; last error: {error!r}")

    def stop(self) -> None:
        """SIGTERM each node's process group, then SIGKILL what is left of it or still names our temp dir."""
        for node in reversed(self.nodes):
            _signal_group(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in reversed(self.nodes):
            try:
                node.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(node.pid, signal.SIGKILL)
            node.wait(timeout=30)
        for pid in _pids_mentioning(self.temp_dir):  # e.g. a worker process that left the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _pids_mentioning(text: str) -> list[int]:
    """Our own processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if entry.stat().st_uid == os.getuid() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def ray_cluster():
    cluster = LocalCluster(temp_dir=tempfile.mkdtemp(prefix="dfray", dir="/tmp"))
    try:
        start = time.monotonic()
        cluster.start()
        print(f"\ntwo-node Ray cluster with job server up in {time.monotonic() - start:.1f} s")
        yield cluster
    finally:
        cluster.stop()


def test_extract_submitted_as_a_ray_job_to_a_two_node_cluster(ray_cluster, tiny_model, toy_corpus, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import list_actors

    videos = sorted(p.stem for p in (toy_corpus / "videos").glob("*.mp4"))[:N_VIDEOS]
    corpus = tmp_path / "corpus.jsonl"  # a table corpus, absolute paths: what a shared-storage cluster reads
    corpus.write_text("".join(json.dumps({"video_id": v, "path": str(toy_corpus / "videos" / f"{v}.mp4")}) + "\n"
                              for v in videos))
    store = tmp_path / "store"
    # 1 CPU per node and 1 CPU per actor: the decoding actor and the encoder actor land on different nodes;
    # the two writers ask for no CPU (none is left) and are spread over both nodes
    entrypoint = shlex.join([*dualfocus_command(), "extract", str(corpus), "--model", str(tiny_model),
                             "--out", str(store), "--no-progress", "ray.address=auto", "ray.decode_workers=1",
                             "ray.decode_cpus=1", "ray.encoder_actors=1", "ray.encoder_cpus=1", "ray.writers=2",
                             "ray.writer_cpus=0", "store.videos_per_shard=2"])
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    start = time.monotonic()
    job = client.submit_job(entrypoint=entrypoint)
    status = client.get_job_status(job)
    while not status.is_terminal() and time.monotonic() - start < JOB_TIMEOUT_S:
        time.sleep(1)
        status = client.get_job_status(job)
    seconds = time.monotonic() - start
    logs = client.get_job_logs(job)
    if not status.is_terminal():
        client.stop_job(job)
    assert status == JobStatus.SUCCEEDED, f"job {status} after {seconds:.0f} s:\n{logs[-4000:]}"
    print(f"\nextract as a Ray job on 2 nodes: {len(videos)} videos in {seconds:.1f} s (submit to SUCCEEDED)\n"
          f"--- job logs\n{logs}---")

    # every video stored exactly once, and readable
    rows = read_all(store / "groups" / "eva")
    assert sorted(rows["video_id"]) == videos and set(rows["status"]) == {"ok"}
    assert sorted(FeatureStore.open(store).video_ids()) == videos
    assert f"videos: {len(videos)} in corpus | ok {len(videos)} | failed 0 | skipped 0" in logs

    # the work ran on both nodes
    workers = [a for a in list_actors(address=ray_cluster.dashboard_url, detail=True, limit=1000)
               if a.class_name.startswith("MapWorker")]
    assert {a.node_id for a in workers if "DecodeStage" in a.class_name} != \
        {a.node_id for a in workers if "EncodeStage" in a.class_name}
    assert len({a.node_id for a in workers}) == 2
    writers = [a for a in list_actors(address=ray_cluster.dashboard_url, detail=True, limit=1000)
               if a.class_name == "WriterActor"]
    assert len(writers) == 2 and len({a.node_id for a in writers}) == 2      # one writer per node
    assert {p % 2 for p in set(rows["part"])} == {0, 1}                      # each wrote shards of its own

    # what the user reads is ours: no notices about Ray's own progress bars. (On a cluster the stages keep
    # Ray's actor restarts, so Ray's false-alarm "core_worker.cc" line may show; the local path has none,
    # see test_extract_cli.)
    for noise in ("Progress bars", "Traceback", "Deprecat"):
        assert noise not in logs, logs[-4000:]


def test_inside_a_job_extract_joins_the_jobs_cluster(monkeypatch):
    """With no ray.address, RAY_ADDRESS (set by `ray job submit` for its entrypoint) is the cluster to join."""
    import ray

    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import _init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    _init_ray(ExtractConfig())
    assert calls[-1]["address"] == "10.0.0.1:6379" and "num_cpus" not in calls[-1]
    cfg = ExtractConfig()
    cfg.ray.address = "auto"
    _init_ray(cfg)
    assert calls[-1]["address"] == "auto"
    monkeypatch.delenv("RAY_ADDRESS")
    _init_ray(ExtractConfig())
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= 1  # a local Ray of its own, as before


def test_a_cluster_recorded_by_ray_start_does_not_capture_a_local_extract(tiny_model, toy_corpus, tmp_path):
    """`ray start` (and ray.cluster_utils.Cluster) record their address in RAY_TMPDIR/ray/ray_current_cluster,
    and a bare ray.init() joins whatever is recorded there, even a cluster long gone. A local extract (no
    ray.address, no RAY_ADDRESS) must start its own Ray regardless: CI once failed when another test's cluster
    was recorded there while this suite extracted ("When connecting to an existing cluster, num_cpus ...")."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="dfrt", dir="/tmp"))  # short: Ray's socket paths live under it
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
        videos = sorted(p.stem for p in (toy_corpus / "videos").glob("*.mp4"))[:2]
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"video_id": v, "path": str(toy_corpus / "videos" / f"{v}.mp4")})
                                  + "\n" for v in videos))
        env = {**os.environ, **CLUSTER_ENV, "RAY_TMPDIR": str(ray_tmp), "COLUMNS": "200"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run([*dualfocus_command(), "extract", str(corpus), "--model", str(tiny_model), "--out",
                               str(tmp_path / "store"), "--no-progress"], capture_output=True, text=True, env=env,
                              timeout=JOB_TIMEOUT_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "ok 2 | failed 0 | skipped 0" in proc.stdout, proc.stdout
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_unreachable_cluster_is_a_one_line_error_naming_the_key(monkeypatch):
    import ray

    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import _init_ray
    from dualfocus.pipeline.errors import UserError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init must not be reached"))
    cfg = ExtractConfig()
    cfg.ray.address = f"127.0.0.1:{_free_port()}"
    with pytest.raises(UserError, match=rf"^ray\.address={cfg.ray.address}: no Ray cluster answers there"):
        _init_ray(cfg)
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match=r"^RAY_ADDRESS=ray://127\.0\.0\.1:\d+: no Ray cluster answers there"):
        _init_ray(ExtractConfig())
    monkeypatch.delenv("RAY_ADDRESS")

    def no_cluster(**kw):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.")

    monkeypatch.setattr(ray, "init", no_cluster)
    cfg.ray.address = "auto"
    with pytest.raises(UserError, match=r"^ray\.address=auto: Could not find any running Ray instance"):
        _init_ray(cfg)
