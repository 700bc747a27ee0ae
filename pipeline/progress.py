"""Progress bars shared by the stages (rich), silent when disabled or when output is not a terminal."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable, Iterator


def quiet_ray_data(ctx) -> None:
    """Make Ray Data draw no bars and print only its warnings and errors; the stage draws its own bar.

    ``ctx`` is the run's ``ray.data.DataContext``. Ray Data's notice that its bars are off is dropped (our
    choice, not a problem); its INFO lines per dataset (plan, "execution finished in N s") go only to the
    session's ``logs/ray-data*.log``; its warnings and errors still reach the console.
    """
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # only speaks about bars
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handlers keep everything
            handler.setLevel(max(handler.level, logging.WARNING))


@contextlib.contextmanager
def video_progress(total: int, enabled: bool = True, label: str = "extract") -> Iterator[Callable[[dict], None]]:
    """Yield ``advance(result_row)``; shows videos done, ok/failed counts and frames per second."""
    if not enabled:
        yield lambda result: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    counts = {"ok": 0, "failed": 0, "frames": 0}
    start = time.perf_counter()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(label, total=total, info="")

        def advance(result: dict) -> None:
            ok = result.get("status") == "ok"
            counts["ok" if ok else "failed"] += 1
            counts["frames"] += int(result.get("length", 0)) if ok else 0
            fps = counts["frames"] / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=1, info=f"ok {counts['ok']} failed {counts['failed']} | {fps:.1f} frames/s")

        yield advance


@contextlib.contextmanager
def step_progress(total: int, start: int = 0, enabled: bool = True, label: str = "train") -> Iterator[Callable[[float, float], None]]:
    """Yield ``advance(loss, samples_per_s)`` for a training loop of ``total`` optimiser steps."""
    if not enabled:
        yield lambda loss, sps: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task(label, total=total, completed=start, info="")
        yield lambda loss, sps: bar.update(task, advance=1, info=f"loss {loss:.4f} | {sps:.1f} samples/s")


@contextlib.contextmanager
def count_progress(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)`` for a plain count of items (questions answered, items judged)."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.update(task, advance=n)
