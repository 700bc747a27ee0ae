"""The interface every storage backend (Zarr, WebDataset) implements.

A shard holds named arrays that share a leading frame axis: one per on-disk array of each tap (see
`dtypes.on_disk_arrays`) plus `timestamps` [F] float32. Legend: t frames of one video, F frames of one shard.
Backends see arrays already in their on-disk dtype; the facade classes (`GroupWriter`, `FeatureStore`) do the
casting, naming, manifest and commit protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

TIMESTAMPS = "timestamps"


@dataclass(frozen=True)
class ArraySpec:
    """One array of a shard: its per-frame shape (the frame axis excluded) and on-disk dtype."""

    tail: tuple[int, ...]
    dtype: np.dtype

    def frame_bytes(self) -> int:
        return int(np.prod(self.tail, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class Extent:
    """Where one video lives inside a shard: its safe key and frame range [start, start+length)."""

    key: str
    start: int
    length: int


class ShardWriter(Protocol):
    """Writes one shard at `path` (a temporary name; the caller renames it once `close` returned).

    Constructed as `Backend(path, arrays={name: ArraySpec}, attributes={...})`.
    """

    def begin(self, key: str) -> None:
        """Start a video; frames follow through `add`."""

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        """Append k frames: every array of the shard, each `[k, *tail]` in its on-disk dtype."""

    def end(self, meta: dict) -> Extent:
        """Finish the video; `meta` (JSON-able) may be stored beside it. Returns where it lives."""

    def abort(self) -> None:
        """Drop the open video; its frames are never referenced."""

    def close(self) -> None:
        """Flush everything to disk; the shard is complete afterwards."""

    def release(self) -> None:
        """Free handles without completing the shard (crash path); the temp files stay as garbage."""


class ShardReader(Protocol):
    """Reads videos of one committed shard, touching only the arrays asked for."""

    def __init__(self, path: Path) -> None: ...

    def read(self, extent: Extent, names: Sequence[str], frame_indices: np.ndarray | None = None
             ) -> dict[str, np.ndarray]:
        """On-disk arrays `names` of one video, each `[t, *tail]`, or only the frames `frame_indices`
        (indices into the video, 0 <= i < length)."""

    def order(self, extents: list[Extent]) -> list[Extent]:
        """`extents` sorted for sequential reading of the shard."""
