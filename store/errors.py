"""Errors a user can fix (another path, `overwrite=True`, waiting for the other writer).

All derive from `StoreError`, which the CLI reports as one line instead of a traceback.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the feature store's user-facing errors."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path holds no `store.json`."""


class StoreMismatchError(StoreError, ValueError):
    """An existing store was written with different settings than the ones requested."""


class StoreBusyError(StoreError, RuntimeError):
    """Another `StoreWriter` holds the store."""
