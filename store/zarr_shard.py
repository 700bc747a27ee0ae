"""Zarr v3 backend: one group per shard, arrays concatenated along the frame axis.

    shard-000003.zarr/
      semantic        [F, P, D]  chunk (1, P, D), sharding codec over `frames_per_zarr_shard` frames, zstd
      semantic.scale  [F, P]     (int8 taps only) same chunking along frames
      spatiotemporal  [F, M, D]  same
      timestamps      [F]        float32, same chunking along frames

Frames are buffered until a whole zarr shard (e.g. 64 frames) is full and then written in one go to an
aligned region, so each zarr shard file is written exactly once; the buffer holds at most one zarr
shard. An aborted video is cut off the end of the arrays (it is always the shard's last video), so a committed
shard holds no frame that no manifest row points to.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .protocols import ArraySpec, Extent

ZARR_JSON = "zarr.json"


class ZarrShardWriter:
    """Implements `ShardWriter` for Zarr v3."""

    def __init__(self, path: Path, *, arrays: dict[str, ArraySpec], attributes: dict,
                 frames_per_zarr_shard: int = 64, zstd_level: int = 3):
        self.group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attributes)
        s = frames_per_zarr_shard
        self.arrays = {
            name: self.group.create_array(
                name, shape=(0, *spec.tail), dtype=spec.dtype, chunks=(1, *spec.tail),
                shards=(s, *spec.tail), compressors=ZstdCodec(level=zstd_level), fill_value=0)
            for name, spec in arrays.items()
        }
        self.buffers = {name: np.empty((s, *spec.tail), spec.dtype) for name, spec in arrays.items()}
        self.frames_per_zarr_shard = s
        self.flushed = 0      # frames on disk; always a multiple of s until `close`
        self.buffered = 0     # frames in the buffers, to go at [flushed, flushed + buffered)
        self.video_start: int | None = None
        self.key = ""

    def begin(self, key: str) -> None:
        self.key, self.video_start = key, self.flushed + self.buffered

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        k, done = len(next(iter(chunk.values()))), 0
        while done < k:
            take = min(k - done, self.frames_per_zarr_shard - self.buffered)
            for name in self.buffers:
                self.buffers[name][self.buffered:self.buffered + take] = chunk[name][done:done + take]
            self.buffered += take
            done += take
            if self.buffered == self.frames_per_zarr_shard:
                self._flush()

    def end(self, meta: dict) -> Extent:
        start, self.video_start = self.video_start, None
        return Extent(key=self.key, start=start, length=self.flushed + self.buffered - start)

    def abort(self) -> None:
        start, self.video_start = self.video_start, None
        if start >= self.flushed:             # all of it still in the buffers: forget it
            self.buffered = start - self.flushed
            return
        # Part of it is on disk: shrink the arrays back to the last aligned frame before it and reload the
        # earlier videos' frames of that zarr shard into the buffers, to be written again with what follows.
        aligned = start - start % self.frames_per_zarr_shard
        for name, arr in self.arrays.items():
            self.buffers[name][:start - aligned] = arr[aligned:start]
            arr.resize((aligned, *arr.shape[1:]))
        self.flushed, self.buffered = aligned, start - aligned

    def close(self) -> None:
        if self.buffered:
            self._flush()
        # What the shard's files take on disk, kept in its group attributes so that `inspect` reads one small
        # file per shard instead of walking its thousands (the root zarr.json itself is not counted here)
        root = Path(self.group.store.root)
        self.group.attrs["disk_bytes"] = _files_bytes(root, skip=root / ZARR_JSON)

    def release(self) -> None:
        self.buffers = {}

    def _flush(self) -> None:
        """Write the buffered frames to [flushed, flushed + buffered), growing the arrays."""
        stop = self.flushed + self.buffered
        for name, arr in self.arrays.items():
            arr.resize((stop, *arr.shape[1:]))
            arr[self.flushed:stop] = self.buffers[name][:self.buffered]
        self.flushed, self.buffered = stop, 0


def disk_bytes(path: Path) -> int:
    """Bytes a committed Zarr shard takes on disk: from its ``disk_bytes`` attribute when it has one (shards
    written since it exists), else by walking its files."""
    import json

    meta = Path(path) / ZARR_JSON
    try:
        recorded = json.loads(meta.read_text()).get("attributes", {}).get("disk_bytes")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        return int(recorded) + meta.stat().st_size
    return _files_bytes(Path(path))


def _files_bytes(root: Path, skip: Path | None = None) -> int:
    """Sizes of the files under ``root`` (but ``skip``), summed."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p != skip)


class ZarrShardReader:
    """Implements `ShardReader` for Zarr v3: an array is opened when first asked for, and frame subsets
    read only the chunks they need."""

    def __init__(self, path: Path):
        self.group = zarr.open_group(str(path), mode="r", zarr_format=3)
        self.arrays: dict[str, zarr.Array] = {}

    def _array(self, name: str) -> zarr.Array:
        if name not in self.arrays:
            self.arrays[name] = self.group[name]
        return self.arrays[name]

    def read(self, extent: Extent, names, frame_indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if frame_indices is None:
            window = slice(extent.start, extent.start + extent.length)
            return {name: self._array(name)[window] for name in names}
        rows = extent.start + frame_indices
        if len(rows) == 0:
            return {name: self._array(name)[0:0] for name in names}
        return {name: self._array(name).oindex[rows] for name in names}

    def order(self, extents: list[Extent]) -> list[Extent]:
        return sorted(extents, key=lambda e: e.start)
