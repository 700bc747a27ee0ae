"""`FeatureStore`: read videos back from a store, whatever its backend.

Legend: t frames, P = p+1 semantic tokens, M = p/4 spatiotemporal tokens, D width.
Returned dtypes: float16 stores give float16, bfloat16 and float32 stores give float32; timestamps
are float32 seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import layout, manifest
from .dtypes import decode
from .protocols import Extent, ShardReader
from .tar_shard import TarShardReader
from .zarr_shard import ZarrShardReader

_BACKENDS: dict[str, type[ShardReader]] = {"zarr": ZarrShardReader, "webdataset": TarShardReader}


def _extent(row: dict) -> Extent:
    return Extent(row["key"], int(row["start"]), int(row["length"]))


@dataclass
class VideoFeatures:
    """One video's cached encoder outputs.

    semantic: [t, P, D]; spatiotemporal: [t, M, D]; timestamps: [t] float32 seconds.
    """

    video_id: str
    semantic: np.ndarray
    spatiotemporal: np.ndarray
    timestamps: np.ndarray


class FeatureStore:
    """Read-only view of a store: `store[video_id]`, `read(video_id, frame_indices)`, `iter_videos()`.

    `manifest` holds the latest row per video (ok and failed) as of `open`; later commits by a running
    writer are not seen. Safe to pickle into DataLoader workers (open shard readers are not carried).
    """

    def __init__(self, root: Path, info: dict, manifest_rows: pd.DataFrame):
        self.root = Path(root)
        self.info = info
        self.manifest = manifest_rows
        self._backend = _BACKENDS[info["format"]]
        ok = manifest_rows[manifest_rows["status"] == "ok"]
        self._ok_ids = list(ok["video_id"])
        self._rows = {row["video_id"]: row for row in manifest_rows.to_dict("records")}
        self._readers: dict[str, ShardReader] = {}

    @staticmethod
    def open(path) -> "FeatureStore":
        """Open the store at `path`; dispatches on `store.json` "format"."""
        root = Path(path)
        info = layout.read_info(root)
        if info.get("format") not in _BACKENDS:
            raise ValueError(f"{root}/store.json has unknown format {info.get('format')!r}; "
                             f"expected one of {sorted(_BACKENDS)}")
        return FeatureStore(root, info, manifest.latest(manifest.read_all(root)))

    # ---- container protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ok_ids)

    def __contains__(self, video_id: object) -> bool:
        row = self._rows.get(video_id)
        return row is not None and row["status"] == "ok"

    def __getitem__(self, video_id: str) -> VideoFeatures:
        return self.read(video_id)

    def video_ids(self) -> list[str]:
        """Ids of the ok videos, in manifest order."""
        return list(self._ok_ids)

    # ---- reading ----------------------------------------------------------------------------------
    def read(self, video_id: str, frame_indices: np.ndarray | None = None) -> VideoFeatures:
        """One video, or only the frames `frame_indices` ([n] ints in [0, t)); Zarr reads only the
        chunks of those frames, WebDataset memory-maps the members and indexes them."""
        row = self._ok_row(video_id)
        if frame_indices is not None:
            frame_indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
            bad = frame_indices[(frame_indices < 0) | (frame_indices >= row["length"])]
            if len(bad):
                raise IndexError(f"frame indices {bad[:5].tolist()} out of range for {video_id!r} "
                                 f"with {row['length']} frames")
        return self._read_row(row, frame_indices)

    def iter_videos(self, ids: Iterable[str] | None = None) -> Iterator[VideoFeatures]:
        """Stream videos shard by shard, each shard read sequentially (ids default to all ok ones;
        the output order follows the storage, not `ids`)."""
        rows = [self._ok_row(v) for v in (self._ok_ids if ids is None else ids)]
        by_shard: dict[str, list] = {}
        for row in rows:
            by_shard.setdefault(row["shard"], []).append(row)
        for shard in sorted(by_shard):
            reader = self._reader(shard)
            rows_by_key = {row["key"]: row for row in by_shard[shard]}
            for extent in reader.order([_extent(r) for r in by_shard[shard]]):
                yield self._read_row(rows_by_key[extent.key], None)

    # ---- internals --------------------------------------------------------------------------------
    def _ok_row(self, video_id: str) -> dict:
        row = self._rows.get(video_id)
        if row is None:
            raise KeyError(f"video {video_id!r} is not in the store at {self.root}")
        if row["status"] != "ok":
            raise KeyError(f"video {video_id!r} failed during extraction: {row['error']}")
        return row

    def _read_row(self, row: dict, frame_indices: np.ndarray | None) -> VideoFeatures:
        reader = self._reader(row["shard"])
        semantic, spatiotemporal, timestamps = reader.read(_extent(row), frame_indices)
        dtype = self.info["dtype"]
        return VideoFeatures(row["video_id"], decode(semantic, dtype), decode(spatiotemporal, dtype),
                             timestamps)

    def _reader(self, shard: str) -> ShardReader:
        if shard not in self._readers:
            self._readers[shard] = self._backend(self.root / shard)
        return self._readers[shard]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}}

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.root)!r}, format={self.info['format']!r}, "
                f"dtype={self.info['dtype']!r}, videos={len(self)})")
