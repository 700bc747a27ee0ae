"""Zarr v3 backend: one group per shard, arrays concatenated along the frame axis.

    shard-000003.zarr/
      semantic        [F, P, D]  chunk (1, P, D), sharding codec over `frames_per_zarr_shard` frames, zstd
      spatiotemporal  [F, M, D]  same
      timestamps      [F]        float32, same chunking along frames

Frames are buffered until a whole zarr shard (e.g. 64 frames) is full and then written in one go to an
aligned region, so each zarr shard file is written exactly once; the buffer holds at most one zarr
shard. An aborted video that already reached disk leaves an unreferenced frame range behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .protocols import ARRAY_NAMES, Extent


class ZarrShardWriter:
    """Implements `ShardWriter` for Zarr v3."""

    def __init__(self, path: Path, *, dtype: np.dtype, semantic_shape: tuple[int, int],
                 spatiotemporal_shape: tuple[int, int], attributes: dict,
                 frames_per_zarr_shard: int = 64, zstd_level: int = 3):
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attributes)
        tails = {"semantic": tuple(semantic_shape), "spatiotemporal": tuple(spatiotemporal_shape),
                 "timestamps": ()}
        dtypes = {"semantic": dtype, "spatiotemporal": dtype, "timestamps": np.dtype("<f4")}
        s = frames_per_zarr_shard
        self.arrays = {
            name: self.group.create_array(
                name, shape=(0, *tails[name]), dtype=dtypes[name], chunks=(1, *tails[name]),
                shards=(s, *tails[name]), compressors=ZstdCodec(level=zstd_level), fill_value=0)
            for name in ARRAY_NAMES
        }
        self.buffers = {name: np.empty((s, *tails[name]), dtypes[name]) for name in ARRAY_NAMES}
        self.frames_per_zarr_shard = s
        self.flushed = 0      # frames on disk; always a multiple of s until `close`
        self.buffered = 0     # frames in the buffers, to go at [flushed, flushed + buffered)
        self.video_start: int | None = None
        self.key = ""

    def begin(self, key: str) -> None:
        self.key, self.video_start = key, self.flushed + self.buffered

    def add(self, semantic: np.ndarray, spatiotemporal: np.ndarray, timestamps: np.ndarray) -> None:
        chunk = dict(zip(ARRAY_NAMES, (semantic, spatiotemporal, timestamps)))
        k, done = len(timestamps), 0
        while done < k:
            take = min(k - done, self.frames_per_zarr_shard - self.buffered)
            for name in ARRAY_NAMES:
                self.buffers[name][self.buffered:self.buffered + take] = chunk[name][done:done + take]
            self.buffered += take
            done += take
            if self.buffered == self.frames_per_zarr_shard:
                self._flush()

    def end(self, meta: dict) -> Extent:
        start, self.video_start = self.video_start, None
        return Extent(key=self.key, start=start, length=self.flushed + self.buffered - start)

    def abort(self) -> None:
        # drop the video's buffered frames; frames already flushed stay as an unused range
        self.buffered = max(0, self.video_start - self.flushed)
        self.video_start = None

    def close(self) -> None:
        if self.buffered:
            self._flush()

    def release(self) -> None:
        self.buffers = {}

    def _flush(self) -> None:
        """Write the buffered frames to [flushed, flushed + buffered), growing the arrays."""
        stop = self.flushed + self.buffered
        for name, arr in self.arrays.items():
            arr.resize((stop, *arr.shape[1:]))
            arr[self.flushed:stop] = self.buffers[name][:self.buffered]
        self.flushed, self.buffered = stop, 0


class ZarrShardReader:
    """Implements `ShardReader` for Zarr v3; frame subsets read only the chunks they need."""

    def __init__(self, path: Path):
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.arrays = {name: group[name] for name in ARRAY_NAMES}

    def read(self, extent: Extent, frame_indices: np.ndarray | None = None):
        if frame_indices is None:
            window = slice(extent.start, extent.start + extent.length)
            return tuple(self.arrays[name][window] for name in ARRAY_NAMES)
        rows = extent.start + frame_indices
        if len(rows) == 0:
            return tuple(self.arrays[name][0:0] for name in ARRAY_NAMES)
        return tuple(self.arrays[name].oindex[rows] for name in ARRAY_NAMES)

    def order(self, extents: list[Extent]) -> list[Extent]:
        return sorted(extents, key=lambda e: e.start)
