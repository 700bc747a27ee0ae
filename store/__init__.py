"""Feature store: stream groups (one frozen encoder's named taps, or the pixels) of per-video arrays in Zarr v3
(default) or WebDataset shards, a Parquet manifest per group, and a commit protocol that makes interrupted
extraction runs resumable.

    GroupWriter(root, "eva", taps={"semantic": (P, D), ...}, fingerprint=..., sampling=...)  # write a group
    SlotWriter(spec) for spec in group_writer.slot_specs(n)                                  # ... n in parallel
    FeatureStore.open(root).read(video_id, frames, streams=["semantic"]) -> VideoFeatures    # read
    summarize(root) -> dict                                                                  # inspect
"""

from .errors import NotAStoreError, StoreBusyError, StoreError, StoreMismatchError
from .info import GroupInfo, TapInfo
from .keys import safe_key
from .migrate import migrate_v1
from .protocols import ArraySpec, Extent, ShardReader, ShardWriter
from .reader import FeatureStore, MissingStreamError, VideoFeatures
from .slot_writer import SlotSpec, SlotWriter
from .summary import summarize
from .writer import GroupWriter

__all__ = [
    "ArraySpec",
    "Extent",
    "FeatureStore",
    "GroupInfo",
    "GroupWriter",
    "MissingStreamError",
    "NotAStoreError",
    "ShardReader",
    "ShardWriter",
    "SlotSpec",
    "SlotWriter",
    "StoreBusyError",
    "StoreError",
    "StoreMismatchError",
    "TapInfo",
    "VideoFeatures",
    "migrate_v1",
    "safe_key",
    "summarize",
]
