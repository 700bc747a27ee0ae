"""Human-readable end-of-run summary of ``dualfocus extract``."""

from __future__ import annotations

from dualfocus.extract.run import ExtractSummary


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def print_extract_summary(summary: ExtractSummary, console) -> None:
    """Counts, throughput, bytes and every failure with its reason."""
    if summary.removed_garbage:
        console.print(f"removed {len(summary.removed_garbage)} uncommitted shard(s) from an interrupted run: "
                      + ", ".join(summary.removed_garbage))
    console.print(
        f"videos: {summary.total} in corpus | ok {summary.ok} | failed {summary.failed} | skipped {summary.skipped} "
        f"(already in store)")
    console.print(f"frames: {summary.frames} in {summary.seconds:.1f} s = {summary.frames_per_s:.2f} frames/s | "
                  f"written: {_human_bytes(summary.bytes)} ({summary.bytes} bytes)")
    if len(summary.groups) > 1:
        for name, g in summary.groups.items():
            console.print(f"  group {name}: ok {g['ok']} | failed {g['failed']} | frames {g['frames']} | "
                          f"written {_human_bytes(g['bytes'])}", markup=False, highlight=False)
    if summary.failures:
        console.print(f"failures ({len(summary.failures)}):")
        for vid, reason in summary.failures:
            console.print(f"  {vid}: {reason}", markup=False, highlight=False)
    if summary.failures_exceeded:
        console.print("[red]too many failures: more than max_failures videos failed[/red]")
    console.print(f"store: {summary.store}")
