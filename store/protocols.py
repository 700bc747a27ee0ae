"""The interface every storage backend (Zarr, WebDataset) implements.

Legend: t frames of one video, F frames of one shard, P = p+1 semantic tokens, M = p/4 spatiotemporal
tokens, D width. Backends see arrays already in their on-disk dtype (see `dtypes.py`); the facade
classes (`StoreWriter`, `FeatureStore`) do the casting, naming, manifest and commit protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

ARRAY_NAMES = ("semantic", "spatiotemporal", "timestamps")


@dataclass(frozen=True)
class Extent:
    """Where one video lives inside a shard: its safe key and frame range [start, start+length)."""

    key: str
    start: int
    length: int


class ShardWriter(Protocol):
    """Writes one shard at `path` (a temporary name; the caller renames it once `close` returned)."""

    def begin(self, key: str) -> None:
        """Start a video; frames follow through `add`."""

    def add(self, semantic: np.ndarray, spatiotemporal: np.ndarray, timestamps: np.ndarray) -> None:
        """Append a chunk: semantic [k, P, D], spatiotemporal [k, M, D], timestamps [k] float32."""

    def end(self, meta: dict) -> Extent:
        """Finish the video; `meta` (JSON-able) may be stored beside it. Returns where it lives."""

    def abort(self) -> None:
        """Drop the open video; its frames are never referenced."""

    def close(self) -> None:
        """Flush everything to disk; the shard is complete afterwards."""

    def release(self) -> None:
        """Free handles without completing the shard (crash path); the temp files stay as garbage."""


class ShardReader(Protocol):
    """Reads videos of one committed shard."""

    def __init__(self, path: Path) -> None: ...

    def read(self, extent: Extent, frame_indices: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """On-disk arrays of one video: semantic [t, P, D], spatiotemporal [t, M, D], timestamps [t],
        or only the frames `frame_indices` (indices into the video, 0 <= i < length)."""

    def order(self, extents: list[Extent]) -> list[Extent]:
        """`extents` sorted for sequential reading of the shard."""
