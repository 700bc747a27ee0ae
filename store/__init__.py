"""Feature store: per-video encoder outputs in Zarr v3 (default) or WebDataset shards, a Parquet
manifest, and a commit protocol that makes interrupted extraction runs resumable.

    StoreWriter(root, fingerprint=..., semantic_shape=(P, D), spatiotemporal_shape=(M, D))  # write
    FeatureStore.open(root)[video_id] -> VideoFeatures                                       # read
    summarize(root) -> dict                                                                  # inspect
"""

from .errors import NotAStoreError, StoreBusyError, StoreError, StoreMismatchError
from .keys import safe_key
from .protocols import Extent, ShardReader, ShardWriter
from .reader import FeatureStore, VideoFeatures
from .summary import summarize
from .writer import StoreWriter

__all__ = [
    "Extent",
    "FeatureStore",
    "NotAStoreError",
    "ShardReader",
    "ShardWriter",
    "StoreBusyError",
    "StoreError",
    "StoreMismatchError",
    "StoreWriter",
    "VideoFeatures",
    "safe_key",
    "summarize",
]
