"""`summarize(path)` and `print_summary(summary, console)`: what `dualfocus inspect` shows about a store."""

from __future__ import annotations

from pathlib import Path

from . import info as store_info
from . import layout, manifest
from .dtypes import FEATURE_DTYPES, on_disk_arrays


def _disk_bytes(path: Path) -> int:
    if path.is_dir():
        from .zarr_shard import disk_bytes

        return disk_bytes(path)
    return path.stat().st_size


def summarize_group(group: store_info.GroupInfo) -> dict:
    """Counts and sizes of one group.

    bytes: uncompressed stored bytes of ok videos (manifest); disk_bytes: size of the group's shard files;
    bytes_per_frame: disk_bytes per ok frame; raw_fp16_bytes_per_frame: one frame of every tap in float16
    (exact taps at their own size) plus its float32 timestamp, for comparison with the former.
    """
    rows = manifest.latest(manifest.read_all(group.path))
    ok, failed = rows[rows["status"] == "ok"], rows[rows["status"] != "ok"]
    shards = layout.shard_paths(group.path)
    disk = sum(_disk_bytes(p) for p in shards)
    frames = int(ok["length"].sum())
    arrays = group.arrays()
    taps = {}
    raw = 4
    for name, tap in group.taps.items():
        elements = 1
        for n in tap.shape:
            elements *= int(n)
        stored = sum(arrays[key].frame_bytes() for key in on_disk_arrays(name, tap.shape, tap.dtype))
        raw += elements * (2 if tap.dtype in FEATURE_DTYPES else arrays[name].dtype.itemsize)
        taps[name] = {"shape": list(tap.shape), "dtype": tap.dtype, "spec": tap.spec, "bytes_per_frame": stored}
    return {
        "name": group.name,
        "kind": group.kind,
        "format": group.format,
        "legacy": group.legacy,
        "fingerprint": group.fingerprint,
        "created": group.created,
        "taps": taps,
        "n_ok": len(ok),
        "n_failed": len(failed),
        "n_frames": frames,
        "bytes": int(ok["bytes"].sum()),
        "disk_bytes": disk,
        "bytes_per_frame": disk / frames if frames else 0.0,
        "raw_fp16_bytes_per_frame": raw,
        "shards": len(shards),
        "failures": [(v, e) for v, e in zip(failed["video_id"], failed["error"])],
    }


def summarize(path) -> dict:
    """The store at `path`: its sampling and one `summarize_group` entry per group."""
    root = Path(path)
    sampling, groups = store_info.read_groups(root)
    version = store_info.read_store_json(root).get("format_version", 1)
    return {"path": str(root), "format_version": version, "sampling": sampling,
            "groups": {name: summarize_group(g) for name, g in groups.items()}}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def print_summary(summary: dict, console) -> None:
    """Print a `summarize` result on a rich `Console` (anything with `.print(text, markup=, highlight=)`)."""
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)  # long paths stay on one line

    sampling = ", ".join(f"{k}={v}" for k, v in summary["sampling"].items())
    say(f"store: {summary['path']} (format {summary['format_version']}; sampling {sampling}; "
        f"{len(summary['groups'])} group(s))")
    if summary["format_version"] == 1:
        say(f"  read-only: {store_info.migrate_hint(Path(summary['path']))}")
    for name, g in summary["groups"].items():
        say(f"group {name}: {g['kind']}, {g['format']}, created {g['created']}")
        say("  fingerprint: " + ", ".join(f"{k}={v}" for k, v in sorted(g["fingerprint"].items())))
        for tap, t in g["taps"].items():
            spec = f" ({t['spec']})" if t["spec"] else ""
            say(f"  tap {name}.{tap}{spec}: [t, {', '.join(map(str, t['shape']))}] {t['dtype']}, "
                f"{_human(t['bytes_per_frame'])}/frame")
        say(f"  videos: ok {g['n_ok']} | failed {g['n_failed']} | shards {g['shards']}")
        ratio = g["bytes_per_frame"] / g["raw_fp16_bytes_per_frame"]
        say(f"  frames: {g['n_frames']} | on disk {_human(g['disk_bytes'])} | "
            f"{_human(g['bytes_per_frame'])}/frame stored vs {_human(g['raw_fp16_bytes_per_frame'])}"
            f"/frame raw fp16 ({ratio:.2f}x)")
        if g["failures"]:
            say(f"  failures ({len(g['failures'])}):")
            for video_id, error in g["failures"]:
                say(f"    {video_id}: {error}")
