"""How fast a 100,000-video store's manifest reads, plans a resume, and inspects (issue: extract at cluster scale).

Writes a synthetic group: `--videos` rows in parts of `--per-part` (one part per shard, as parallel writers
leave them), each part beside a shard directory holding only its `zarr.json` (with the `disk_bytes` attribute
a real shard records when it closes), then times:

    read      manifest.read_all + latest          (what every reader and `inspect` does first)
    resume    GroupWriter open (lock, checks, garbage scan, manifest, done ids) + the todo list of run_extract
    inspect   store.summarize (the whole of `dualfocus inspect` but printing)

Usage:
    python benchmarks/manifest_scale.py --dir /tmp/mscale [--videos 100000] [--per-part 64] [--repeat 3]
Targets (issue 9): read <= 1 s, resume <= 2 s on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def build(root: Path, videos: int, per_part: int) -> None:
    from dualfocus.store import GroupWriter
    from dualfocus.store.layout import shard_name
    from dualfocus.store.manifest import write_part

    taps = {"semantic": (257, 1408), "spatiotemporal": (64, 1408)}
    GroupWriter(root, "eva", taps=taps, fingerprint={"model": "synthetic"},
                sampling={"fps": 1.0, "max_frames": None}).close()
    group = root / "groups" / "eva"
    rng = np.random.default_rng(0)
    for part, lo in enumerate(range(0, videos, per_part)):
        rows = []
        start = 0
        for i in range(lo, min(lo + per_part, videos)):
            n = int(rng.integers(30, 240))
            rows.append({"video_id": f"v_{i:07d}", "key": f"v_{i:07d}", "path": f"/data/videos/v_{i:07d}.mp4",
                         "status": "ok", "error": "", "n_frames": n, "duration_s": float(n), "native_fps": 30.0,
                         "shard": shard_name(part, "zarr"), "start": start, "length": n, "bytes": n * 925_000})
            start += n
        shard = group / shard_name(part, "zarr")
        shard.mkdir()
        (shard / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                     "attributes": {"disk_bytes": start * 850_000}}))
        write_part(group, part, rows)


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--per-part", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from dualfocus.store import GroupWriter, summarize
    from dualfocus.store.manifest import latest, read_all

    root = args.dir / "store"
    if root.exists():
        shutil.rmtree(root)
    t = time.perf_counter()
    build(root, args.videos, args.per_part)
    parts = -(-args.videos // args.per_part)
    print(f"built {args.videos} rows in {parts} parts in {time.perf_counter() - t:.1f} s")
    group = root / "groups" / "eva"
    corpus = [f"v_{i:07d}" for i in range(args.videos + 1000)]   # 1,000 videos still to do

    read_s, rows = timed(lambda: latest(read_all(group)), args.repeat)

    def resume():
        writer = GroupWriter(root, "eva", taps={"semantic": (257, 1408), "spatiotemporal": (64, 1408)},
                             fingerprint={"model": "synthetic"}, sampling={"fps": 1.0, "max_frames": None})
        done = writer.done_ids()
        todo = [vid for vid in corpus if vid not in done]
        writer.close()
        return todo

    resume_s, todo = timed(resume, args.repeat)
    inspect_s, summary = timed(lambda: summarize(root), args.repeat)
    assert len(rows) == args.videos and len(todo) == 1000
    assert summary["groups"]["eva"]["n_ok"] == args.videos
    print(f"read    {read_s:6.3f} s   manifest of {len(rows)} videos, {parts} parts   (target <= 1 s)")
    print(f"resume  {resume_s:6.3f} s   open + done ids + todo of {len(corpus)}   (target <= 2 s)")
    print(f"inspect {inspect_s:6.3f} s   summarize, disk sizes from each shard's zarr.json")


if __name__ == "__main__":
    main()
