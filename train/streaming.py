"""Training samples streamed shard by shard from a WebDataset store, in a seeded order that resumes exactly.

The order of epoch ``e`` comes from the manifest alone (no feature is read to compute it):

1. the shards of the first group the streams come from are visited in a permutation seeded by ``(seed, e)``;
2. a shard's samples are listed in file order (its videos as its manifest part lists them, which is the
   order the writer put them in the tar; one video's samples by index) and mixed by a shuffle buffer of
   ``buffer_size`` samples seeded by ``(seed, e, shard)``, as WebDataset's ``shuffle`` does;
3. the concatenation is cut into batches of ``batch_size``. With ``world`` ranks the batches are cut to a
   multiple of ``world`` and rank ``r`` takes the ``r``-th contiguous run of them: every rank streams its own
   stretch of shards, and all ranks make the same number of batches.

A position is ``(epoch, batches this rank consumed in it)``, as for ``ResumableBatches``; starting there
recomputes the order and reads only the samples still to come.

DataLoader workers: worker ``w`` of ``W`` builds the batches whose count from the start position is ``w``
modulo ``W``. The DataLoader takes one batch from each worker in turn, so the batches come out in the order
above whatever ``W`` is (0 included), and never depend on timing. A worker reads the videos its batches need
front to back within each shard, holding a video read ahead of its turn until its samples are used (the
buffer's look-ahead: about ``buffer_size`` samples, raw store dtype).

Legend: t frames after the ``max_frames`` cap, P vision tokens, M motion tokens, d_v vision width.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from dualfocus.connectors.dualfocus import DUALFOCUS_STREAMS
from dualfocus.data.samples import Tokenised, frames_to_read

SHUFFLE_BUFFER = 16
"""Samples the in-shard shuffle buffer holds. Small, because a worker keeps the features of the samples it
read ahead of their turn: at the paper's 32 frames, about 30 MB per video in float16."""


def wants_streaming(setting: bool | str, store_path: str, streams: Sequence[str] = DUALFOCUS_STREAMS) -> bool:
    """Resolve ``data.streaming``: ``"auto"`` streams when every group the streams come from is WebDataset;
    ``True`` on a store with a Zarr group is a ``ConfigError`` naming the key."""
    from dualfocus.pipeline.config import ConfigError
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(store_path)
    groups = {store.group_info(s).name: store.group_info(s).format for s in streams}
    other = sorted(g for g, fmt in groups.items() if fmt != "webdataset")
    if setting == "auto":
        return not other
    if setting is True and other:
        named = ", ".join(f"{g!r} ({groups[g]})" for g in other)
        raise ConfigError([f"data.streaming=true reads WebDataset shards front to back, but group(s) {named} of "
                           f"{store_path} are not WebDataset; set data.streaming to auto or false"])
    return bool(setting)


def buffer_shuffle(items: Sequence[int], size: int, rng: np.random.Generator) -> list[int]:
    """``items`` mixed by a buffer of ``size``: once it is full, each new item sends out a random held one; the
    rest leave in random order at the end. An item leaves at most ``size - 1`` places before its file order."""
    if size <= 1:
        return list(items)
    held: list[int] = []
    out: list[int] = []
    for item, u in zip(items, rng.random(len(items))):
        held.append(item)
        if len(held) == size:
            j = int(u * size)
            held[j], held[-1] = held[-1], held[j]
            out.append(held.pop())
    out.extend(held[k] for k in rng.permutation(len(held)))
    return out


class StreamingQADataset(torch.utils.data.IterableDataset):
    """Infinite iterable of this rank's batches, each a list of what ``FeatureQADataset[i]`` gives (pass it to
    a DataLoader with ``batch_size=None`` and ``collate_fn=collate``). Set ``position`` before iterating to
    resume; see the module docstring for the order."""

    def __init__(self, store_path: str, samples: list[Tokenised], max_frames: int | None, batch_size: int,
                 seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                 streams: Sequence[str] = DUALFOCUS_STREAMS, buffer_size: int = SHUFFLE_BUFFER,
                 position: tuple[int, int] = (0, 0)):
        from dualfocus.pipeline.errors import UserError
        from dualfocus.store import FeatureStore

        if not samples:
            raise ValueError("no samples to batch")
        self.store_path, self.samples, self.max_frames = store_path, samples, max_frames
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world, self.buffer_size = rank, world, buffer_size
        self.streams = tuple(streams)
        self.position = tuple(position)
        n_batches = -(-len(samples) // batch_size)
        if n_batches < world:
            raise UserError(f"{len(samples)} samples make {n_batches} batch(es) of {batch_size}, fewer than the "
                            f"{world} processes training; lower data.batch_size or use fewer processes")
        self.batches_per_epoch = n_batches // world if world > 1 else n_batches

        store = FeatureStore.open(store_path)
        group = store.groups[store.group_info(self.streams[0]).name]
        ok = group.manifest[group.manifest["status"] == "ok"]
        self.shards = sorted(set(ok["shard"]))
        shard_index = {name: k for k, name in enumerate(self.shards)}
        # video -> (shard number, manifest row): within a shard, rows are in the order the writer filled the tar
        self._place = {v: (shard_index[s], k) for k, (v, s) in enumerate(zip(ok["video_id"], ok["shard"]))}
        missing = sorted({s.video_id for s in samples} - set(self._place))
        if missing:
            raise ValueError(f"videos {missing[:5]} are not stored ok in group {group.info.name!r} of {store_path}")
        by_video: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            by_video.setdefault(s.video_id, []).append(i)
        self._file_order: list[list[int]] = [[] for _ in self.shards]
        for video in sorted(by_video, key=self._place.__getitem__):
            self._file_order[self._place[video][0]].extend(by_video[video])
        self._store = None  # opened lazily, once per worker process

    # ---- the order (manifest only) -----------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        """Shard numbers (indices into ``shards``) in the order epoch ``epoch`` visits them."""
        n = len(self.shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist() if self.shuffle else list(range(n))

    def epoch_order(self, epoch: int) -> list[int]:
        """Every sample index once, in the order of epoch ``epoch`` (all ranks)."""
        out: list[int] = []
        for shard in self.shard_order(epoch):
            items = self._file_order[shard]
            if self.shuffle:
                items = buffer_shuffle(items, self.buffer_size, np.random.default_rng([self.seed, epoch, shard]))
            out.extend(items)
        return out

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch ``epoch`` (sample indices), ``batches_per_epoch`` of them."""
        order = self.epoch_order(epoch)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        per = self.batches_per_epoch
        return batches[self.rank * per:(self.rank + 1) * per]

    # ---- reading -----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, skip = self.position
        counted = 0  # batches of this rank from the start position up to this epoch
        while True:
            batches = self.epoch_batches(epoch)[skip:]
            mine = [b for k, b in enumerate(batches, counted) if k % workers == worker]
            counted += len(batches)
            yield from self._read_batches(mine)
            epoch, skip = epoch + 1, 0

    def _read_batches(self, batches: list[list[int]]) -> Iterator[list[dict]]:
        """The samples of ``batches``, reading the videos they need front to back within each shard."""
        from dualfocus.store import FeatureStore

        if self._store is None:
            self._store = FeatureStore.open(self.store_path)
        unit = self._unit
        uses = Counter(unit(i) for b in batches for i in b)
        ahead: dict[int, deque] = {}  # shard number -> videos still to read, in file order
        for u in sorted(uses, key=lambda u: self._place[u[0]]):
            ahead.setdefault(self._place[u[0]][0], deque()).append(u)
        held: dict[tuple[str, int], object] = {}  # read, some samples still to come
        for batch in batches:
            items = []
            for i in batch:
                u = unit(i)
                queue = ahead[self._place[u[0]][0]]
                while u not in held:
                    video, frames = queue.popleft()
                    held[(video, frames)] = self._store.read(video, np.asarray(frames, dtype=np.int64),
                                                             streams=self.streams)
                feats = held[u]
                uses[u] -= 1
                if uses[u] == 0:
                    del held[u]
                # semantic [t, P, d_v], spatiotemporal [t, M, d_v]: as FeatureQADataset gives them
                out = {name: torch.from_numpy(np.asarray(feats[name], dtype=np.float32)) for name in self.streams}
                items.append({**out, "sample": self.samples[i], "index": i})
            yield items

    def _unit(self, i: int) -> tuple[str, tuple[int, ...]]:
        """What one read fetches: a video's frames to read (the samples of a video usually share them)."""
        s = self.samples[i]
        return s.video_id, tuple(int(f) for f in frames_to_read(s, self.max_frames))

    def __getstate__(self) -> dict:  # workers open their own store
        return {**self.__dict__, "_store": None}
