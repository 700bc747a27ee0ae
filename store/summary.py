"""`summarize(path)` and `print_summary(summary, console)`: what `dualfocus inspect` shows about a store."""

from __future__ import annotations

from pathlib import Path

from . import layout, manifest


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def summarize(path) -> dict:
    """Counts and sizes of the store at `path`.

    bytes: uncompressed stored bytes of ok videos (manifest); disk_bytes: size of all shard files;
    bytes_per_frame: disk_bytes per ok frame; raw_fp16_bytes_per_frame: one frame's semantic and
    spatiotemporal tokens in float16 plus its float32 timestamp, for comparison with the former.
    """
    root = Path(path)
    info = layout.read_info(root)
    rows = manifest.latest(manifest.read_all(root))
    ok, failed = rows[rows["status"] == "ok"], rows[rows["status"] != "ok"]
    shards = layout.shard_paths(root)
    disk = sum(_disk_bytes(p) for p in shards)
    frames = int(ok["length"].sum())
    (p, d), (m, d_st) = info["semantic_shape"], info["spatiotemporal_shape"]
    return {
        "path": str(root),
        "format": info["format"],
        "dtype": info["dtype"],
        "fingerprint": info["fingerprint"],
        "created": info.get("created"),
        "n_ok": len(ok),
        "n_failed": len(failed),
        "n_frames": frames,
        "bytes": int(ok["bytes"].sum()),
        "disk_bytes": disk,
        "bytes_per_frame": disk / frames if frames else 0.0,
        "raw_fp16_bytes_per_frame": (p * d + m * d_st) * 2 + 4,
        "shards": len(shards),
        "failures": [(v, e) for v, e in zip(failed["video_id"], failed["error"])],
    }


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def print_summary(summary: dict, console) -> None:
    """Print a `summarize` result on a rich `Console` (anything with `.print(text, markup=, highlight=)`)."""
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    say(f"store: {summary['path']} ({summary['format']}, {summary['dtype']}, created {summary['created']})")
    say("fingerprint: " + ", ".join(f"{k}={v}" for k, v in sorted(summary["fingerprint"].items())))
    say(f"videos: ok {summary['n_ok']} | failed {summary['n_failed']} | shards {summary['shards']}")
    ratio = summary["bytes_per_frame"] / summary["raw_fp16_bytes_per_frame"]
    say(f"frames: {summary['n_frames']} | on disk {_human(summary['disk_bytes'])} | "
        f"{_human(summary['bytes_per_frame'])}/frame stored vs {_human(summary['raw_fp16_bytes_per_frame'])}"
        f"/frame raw fp16 ({ratio:.2f}x)")
    if summary["failures"]:
        say(f"failures ({len(summary['failures'])}):")
        for video_id, error in summary["failures"]:
            say(f"  {video_id}: {error}")
