"""A bounded in-memory cache of feature reads, for training sets small enough to revisit from RAM.

Reading a sample from a Zarr store costs about 1 ms of CPU per stored frame and stream (zarr's per-chunk
overhead, not I/O: the page cache already holds the bytes), ~25 ms for a DualFocus sample of 8 frames. A
training run over a few thousand clips reads each one every epoch; on a small CPU machine those reads
compete with the step itself. Questions about one video read the same frames, so the key is the video and
its frame list, not the sample.

The cache keeps what it is given until ``max_bytes`` is reached and then stops adding (no eviction): under
random access any fixed subset hits as often as an LRU would, without the churn. Each DataLoader worker holds
its own cache, so the bound is per reading process.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np


class ReadCache:
    """``get(key) -> dict[str, np.ndarray] | None``; ``put(key, arrays)`` stores while the total stays within
    ``max_bytes`` (0 keeps nothing). ``hits``/``misses`` count lookups."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[Hashable, dict[str, np.ndarray]] = {}

    def get(self, key: Hashable) -> dict[str, np.ndarray] | None:
        found = self._entries.get(key)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: Hashable, arrays: dict[str, np.ndarray]) -> None:
        size = sum(a.nbytes for a in arrays.values())
        if key in self._entries or self.bytes + size > self.max_bytes:
            return
        for a in arrays.values():  # the cached arrays are shared by every later hit: nobody may write to them
            a.flags.writeable = False
        self._entries[key] = arrays
        self.bytes += size
