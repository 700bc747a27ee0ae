"""Parallel shard writers for ``dualfocus extract``: Ray actors that receive encoded chunks straight from the stage
that produced them, so feature bytes never pass through the driver.

    encoder actor ──Router.push──► WriterActor[crc32(video_id) % W] ──► SlotWriter per group ──► shards, parts
         │                                                                                        (commit)
         └── one small progress row per finished video ──► driver (progress bar)

Writer ``w`` of ``W`` owns slot ``w`` of every group the run writes (``store/slot_writer.py``: disjoint shard
names), and every chunk of a video goes to the same writer, so a video stays in one shard. ``add`` hands a
batch of rows to a thread that writes them (``extract/writing.py`` puts each video's chunks back in order), and
returns once the rows are queued: the pusher waits only for the transfer, unless the writer is ``queue_batches``
behind, which holds the encoders back instead of filling memory. ``close`` waits for the queue, commits, and
returns the writer's ``Outcome``.
"""

from __future__ import annotations

import queue
import threading
import traceback
import zlib
from collections import defaultdict

import numpy as np


def writer_of(video_id: str, writers: int) -> int:
    """The writer every chunk of ``video_id`` goes to (stable across processes, unlike ``hash``)."""
    return zlib.crc32(video_id.encode()) % writers


class WriterActor:
    """Owns one slot of each group; run as a Ray actor (``start_writers``) or in-process (tests).

    Args:
        specs: group name -> ``SlotSpec`` (the same slot number in every group).
        queue_batches: batches accepted but not yet written before ``add`` blocks.
    """

    def __init__(self, specs: dict, queue_batches: int = 4):
        from dualfocus.extract.writing import VideoAssembler
        from dualfocus.store.slot_writer import SlotWriter

        opened = {}
        try:
            for name, spec in specs.items():
                opened[name] = SlotWriter(spec)
        except BaseException:
            for writer in opened.values():
                writer.abandon()
            raise
        self.assembler = VideoAssembler(opened)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_batches)
        self._error: str | None = None
        self._thread = threading.Thread(target=self._drain, name="shard-writer", daemon=True)
        self._thread.start()

    def add(self, rows: list[dict]) -> None:
        """Queue chunk rows of this writer's videos for writing; raises if an earlier batch failed to write."""
        self._check()
        self._queue.put(rows)

    def close(self, stopped: bool = False):
        """Write what is queued, commit every shard, return the ``writing.Outcome``. ``stopped``: the run ended
        early, so a video still incomplete gets no row (the rerun does it) instead of a failed one."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            self.assembler.abandon()
        self._check()
        return self.assembler.close(drop_incomplete=stopped)

    def abandon(self) -> None:
        """Crash path: stop without committing open shards (the next run removes them)."""
        self._error = self._error or "abandoned"
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.assembler.abandon()

    def _drain(self) -> None:
        while (rows := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                for row in rows:
                    self.assembler.add(row)
            except BaseException:  # noqa: BLE001 - reported to the pusher and to close
                self._error = traceback.format_exc()

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"shard writer failed:\n{self._error}")


def writer_nodes(on_gpu_nodes: bool) -> list[str]:
    """Alive nodes to spread writers over, in a fixed order: those with GPUs when the encoders use GPUs (the
    features are made there), else every node with CPUs."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpu = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) > 0]
    chosen = gpu if on_gpu_nodes and gpu else [n for n in nodes if n.get("Resources", {}).get("CPU", 0) > 0] or nodes
    return sorted(n["NodeID"] for n in chosen)


def start_writers(specs: dict[str, list], cpus: float, spread: bool, on_gpu_nodes: bool = False,
                  placement_timeout_s: float = 300.0) -> list:
    """One ``WriterActor`` Ray actor per slot; ``specs``: group name -> its ``SlotSpec`` list (one per slot).

    Never restarted: a restarted writer would have lost its open shards; the run stops instead and its rerun
    redoes what was not committed. ``spread``: writer ``w`` is asked for the ``w``-th node of ``writer_nodes``
    in turn. Writers the cluster cannot place within
    ``placement_timeout_s`` (too few free CPUs) are a one-line ``UserError``.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dualfocus.pipeline.errors import UserError

    slots = len(next(iter(specs.values())))
    nodes = writer_nodes(on_gpu_nodes) if spread else []
    actor_class = ray.remote(WriterActor)
    actors = []
    for slot in range(slots):
        # soft: a node without room passes the writer on. Ray 2.60 ignores a soft request for an actor that
        # asks for no CPU (it lands anywhere), so such a writer is pinned (it always fits)
        strategy = (NodeAffinitySchedulingStrategy(nodes[slot % len(nodes)], soft=cpus > 0) if nodes
                    else "DEFAULT")
        remote = actor_class.options(num_cpus=cpus, max_restarts=0, scheduling_strategy=strategy)
        actors.append(remote.remote({name: group_specs[slot] for name, group_specs in specs.items()}))
    refs = [actor.__ray_ready__.remote() for actor in actors]
    ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=placement_timeout_s)
    if waiting:
        for actor in actors:
            ray.kill(actor)
        free = ray.available_resources().get("CPU", 0)
        raise UserError(f"ray.writers={slots} with ray.writer_cpus={cpus}: only {len(ready)} writer(s) could be "
                        f"placed within {placement_timeout_s:.0f} s ({free:g} CPUs free in the cluster); lower "
                        "ray.writers or ray.writer_cpus, or free CPUs")
    try:
        ray.get(refs)   # a refusal (e.g. the group's lock) surfaces here
    except ray.exceptions.RayError as e:
        for actor in actors:
            ray.kill(actor)
        cause = str(e).strip().splitlines()
        raise UserError(f"a shard writer could not start ({cause[-1] if cause else type(e).__name__}); if a node was "
                        "just lost, run the same command again once the cluster has marked it dead") from None
    return actors


class Router:
    """Splits a batch of chunk rows by writer, pushes each part, and waits until every writer has taken its part.

    Returns the batch's progress rows: one per video whose last chunk (or decode error) was in the batch.
    """

    def __init__(self, writers: list):
        self.writers = writers

    def push(self, batch: dict) -> dict:
        import ray

        n = len(batch["video_id"])
        parts: dict[int, list[dict]] = defaultdict(list)
        for i in range(n):
            row = {key: column[i] for key, column in batch.items()}
            parts[writer_of(str(row["video_id"]), len(self.writers))].append(row)
        ray.get([self.writers[w].add.remote(rows) for w, rows in parts.items()])
        return progress_rows(batch)


def progress_rows(batch: dict) -> dict:
    """``{video_id, status, length}`` for each row of ``batch`` that ends a video (last chunk or decode error):
    what the driver's progress bar counts (the writers' outcomes give the exact figures at the end)."""
    groups = [key for key in batch if key.endswith("/error")]
    ended = [i for i in range(len(batch["video_id"])) if batch["last"][i] or batch["error"][i]]
    failed = [bool(batch["error"][i]) or any(batch[key][i] for key in groups) for i in ended]
    return {"video_id": np.array([str(batch["video_id"][i]) for i in ended], dtype=object),
            "status": np.array(["failed" if f else "ok" for f in failed], dtype=object),
            "length": np.array([0 if f else int(batch["n_frames"][i]) for i, f in zip(ended, failed)], np.int64)}


def route(batch: dict, writers: list) -> dict:
    """Ray Data ``map_batches`` function for a run with no encoder (the pixels group alone)."""
    return Router(writers).push(batch)
