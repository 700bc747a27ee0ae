"""The write path of ``dualfocus extract`` at ViT-g size, with 1, 2 and 4 writers, on one node and on two (a script,
not a test).

The encoder is synthetic: ``SyntheticEncode`` (the real ``EncodeStage`` class with its towers replaced) returns
ViT-g/14-sized DualFocus outputs (semantic [n, 257, 1408], spatiotemporal [n, 64, 1408], float16: 0.92 MB per
frame) drawn once, so the encoder costs a memory copy and the writers (compression + Zarr) are what is measured.
The model directory is a config-only-sized ViT-g layout (2 blocks, random weights) so that the store's taps
have the real shapes. Videos are small renders (decoding is cheap).

For each setting it runs the real ``run_extract`` (decode actors -> synthetic encoder -> writer actors) and prints:
frames/s and MB/s written (uncompressed feature bytes / wall time of the pipeline, Ray start excluded), bytes the
driver received per video and per frame (progress rows + the writers' outcomes, pickled), and peak RSS of the
driver and of the writer actors.

Two nodes: a local ``ray.cluster_utils.Cluster`` (head + one worker node, both on this machine, CPUs split).

    python benchmarks/extract_scale.py --dir /tmp/xscale [--videos 24 --seconds 60] [--writers 1,2,4] [--nodes 1,2]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from extract import RssMonitor  # noqa: E402 - the sibling benchmark's sampler

from dualfocus.extract.stages import EncodeStage, EncoderGroup, router_for  # noqa: E402

SHAPES = {"semantic": (257, 1408), "spatiotemporal": (64, 1408)}


class SyntheticEncode(EncodeStage):
    """``EncodeStage`` whose towers return fixed ViT-g-sized float16 arrays (no model is loaded)."""

    def __init__(self, groups, device, compute_dtype, batch_frames, threads, writers=None):
        rng = np.random.default_rng(0)
        cache = {tap: rng.standard_normal((batch_frames, *shape)).astype(np.float16) for tap, shape in SHAPES.items()}
        self.groups = [EncoderGroup(spec["name"], lambda frames: {t: a[:len(frames)] for t, a in cache.items()},
                                    dict(SHAPES), np.dtype(np.float16)) for spec in groups]
        self.batch_frames = batch_frames
        self.router = router_for(writers)


class DriverBytes:
    """Counts what the driver receives: progress rows (patched into the progress bar) and writer outcomes."""

    def __init__(self):
        self.bytes = 0

    def __enter__(self):
        import dualfocus.pipeline.progress as progress
        from dualfocus.extract import writing

        self._progress, self._merge = progress.video_progress, writing.Outcome.merge
        counter = self

        import contextlib

        @contextlib.contextmanager
        def counting(total, enabled=True, label="extract"):
            def advance(row):
                counter.bytes += len(pickle.dumps(dict(row)))
            yield advance

        def merge(outcome, other):
            counter.bytes += len(pickle.dumps(other))
            return counter._merge(outcome, other)

        progress.video_progress, writing.Outcome.merge = counting, merge
        return self

    def __exit__(self, *exc):
        import dualfocus.pipeline.progress as progress
        from dualfocus.extract import writing

        progress.video_progress, writing.Outcome.merge = self._progress, self._merge


def make_videos(folder: Path, n: int, seconds: int) -> Path:
    from dualfocus.pipeline.toy import write_mp4

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        path = folder / f"clip_{i:04d}.mp4"
        if not path.exists():
            frames = (rng.integers(0, 255, (seconds * 2, 32, 32, 3))).astype(np.uint8)
            write_mp4(path, frames, fps=2)
    return folder


def make_model(folder: Path) -> Path:
    from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

    if not (folder / "config.json").exists():
        write_tiny_model(folder, TinyModelConfig(vision_width=1408, vision_layers=2, image_size=224, patch_size=14))
    return folder


def run_once(videos: Path, model: Path, store: Path, writers: int, address: str | None) -> dict:
    import ray

    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config

    values = {"corpus": str(videos), "model": str(model), "out": str(store), "ray.writers": writers,
              "ray.writer_cpus": 0.5, "ray.decode_cpus": 0.25, "ray.encoder_cpus": 0.25, "ray.decode_workers": 2,
              "decode.chunk_frames": 32, "encoder.batch_frames": 32}
    if address:
        values["ray.address"] = address
    cfg = load_config(ExtractConfig, values=values)
    if not address:
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    with RssMonitor() as rss, DriverBytes() as driver:
        before = rss.me.cpu_times()
        start = time.perf_counter()
        summary = run_extract(cfg, progress=False, encode_stage=SyntheticEncode)
        seconds = time.perf_counter() - start
    if not address:
        ray.shutdown()
    assert summary.failed == 0, summary.failures[:3]
    cpu = rss.cpu_by_role()
    cpu["driver"] = sum(rss.me.cpu_times()[:2]) - sum(before[:2])   # this run's share of the driver
    return {"frames": summary.frames, "bytes": summary.bytes, "seconds": seconds, "videos": summary.ok,
            "driver_bytes": driver.bytes, "rss": dict(rss.peaks), "cpu": cpu}


def writers_only(model: Path, store: Path, writers: int, videos: int, frames: int) -> dict:
    """The writer actors alone: each is sent ``videos / writers`` videos of ``frames`` frames as chunk rows whose
    arrays were put in the object store once (no decode, no encoder), through the same ``add`` the pipeline uses."""
    import ray

    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.groups import plan_groups
    from dualfocus.extract.run import open_writers
    from dualfocus.extract.writer_actor import start_writers
    from dualfocus.pipeline.config import load_config

    cfg = load_config(ExtractConfig, values={"corpus": str(store), "model": str(model), "out": str(store)})
    groups = open_writers(cfg, plan_groups(cfg, "float32"))
    rng = np.random.default_rng(0)
    chunk = {f"eva/{tap}": rng.standard_normal((32, *shape)).astype(np.float16) for tap, shape in SHAPES.items()}
    arrays = ray.put(chunk)
    actors = start_writers({"eva": groups["eva"].slot_specs(writers)}, cpus=0.5, spread=False)
    with RssMonitor() as rss:
        start = time.perf_counter()
        pending = []
        for v in range(videos):
            writer = actors[v % writers]
            n_chunks = frames // 32
            for c in range(n_chunks):
                row = {"video_id": f"v{v:05d}", "path": "p", "need": "", "chunk": c, "last": c == n_chunks - 1,
                       "error": "", "n_frames": frames, "duration_s": float(frames), "native_fps": 1.0,
                       "timestamps": np.arange(32 * c, 32 * c + 32, dtype=np.float32), "eva/error": "",
                       **ray.get(arrays)}
                pending.append(writer.add.remote([row]))
                if len(pending) > 4 * writers:
                    ray.get(pending.pop(0))
        ray.get(pending)
        outcomes = ray.get([a.close.remote() for a in actors])
        seconds = time.perf_counter() - start
    groups["eva"].close()
    written = sum(o.bytes for o in outcomes)
    return {"frames": sum(o.frames for o in outcomes), "bytes": written, "seconds": seconds, "cpu": rss.cpu_by_role()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--writers", default="1,2,4")
    parser.add_argument("--nodes", default="1,2")
    parser.add_argument("--writers-only", action="store_true",
                        help="only the writer actors, fed chunks already in the object store (one node)")
    args = parser.parse_args()
    RssMonitor.ROLES = (*RssMonitor.ROLES, ("ray::WriterActor", "writer actor"),
                        ("SyntheticEncode", "synthetic encoder actor"))
    RssMonitor.OTHER = "other Ray processes"

    model = make_model(args.dir / "vitg-layout")
    if args.writers_only:
        import ray

        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
        print(f"writer actors alone: {args.videos} videos x {args.seconds} frames, chunks of 32 frames")
        for writers in [int(w) for w in args.writers.split(",")]:
            store = args.dir / f"store-only-{writers}w"
            shutil.rmtree(store, ignore_errors=True)
            r = writers_only(model, store, writers, args.videos, args.seconds)
            print(f"  {writers} writer(s): {r['frames']} frames in {r['seconds']:.1f} s = "
                  f"{r['frames'] / r['seconds']:.1f} frames/s, {r['bytes'] / 1e6 / r['seconds']:.1f} MB/s; CPU seconds: "
                  + ", ".join(f"{role} {s:.1f}" for role, s in sorted(r["cpu"].items())), flush=True)
            shutil.rmtree(store, ignore_errors=True)
        return
    videos = make_videos(args.dir / "videos", args.videos, args.seconds)
    print(f"{args.videos} videos x {args.seconds} s at 1 fps; synthetic ViT-g encoder "
          f"({sum(np.prod(s) for s in SHAPES.values()) * 2 / 1e6:.2f} MB/frame float16)")
    print(f"{'nodes':>5} {'writers':>7} {'frames':>7} {'s':>6} {'frames/s':>9} {'MB/s':>7} {'driver B/video':>14} "
          f"{'driver B/frame':>14} {'driver RSS MB':>13} {'writer RSS MB':>13}")
    for nodes in [int(n) for n in args.nodes.split(",")]:
        cluster = None
        if nodes > 1:
            from ray.cluster_utils import Cluster

            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=2)
            cluster.wait_for_nodes()
        try:
            for writers in [int(w) for w in args.writers.split(",")]:
                store = args.dir / f"store-{nodes}n-{writers}w"
                shutil.rmtree(store, ignore_errors=True)
                r = run_once(videos, model, store, writers, cluster.address if cluster else None)
                mb = r["bytes"] / 1e6
                print(f"{nodes:>5} {writers:>7} {r['frames']:>7} {r['seconds']:>6.1f} "
                      f"{r['frames'] / r['seconds']:>9.1f} {mb / r['seconds']:>7.1f} "
                      f"{r['driver_bytes'] / r['videos']:>14.0f} {r['driver_bytes'] / r['frames']:>14.1f} "
                      f"{r['rss'].get('driver', 0) / 2**20:>13.0f} {r['rss'].get('writer actor', 0) / 2**20:>13.0f}",
                      flush=True)
                print("        CPU seconds: " + ", ".join(f"{role} {s:.1f}" for role, s in sorted(r["cpu"].items())),
                      flush=True)
                shutil.rmtree(store, ignore_errors=True)
        finally:
            if cluster is not None:
                import ray

                ray.shutdown()
                cluster.shutdown()


if __name__ == "__main__":
    main()
