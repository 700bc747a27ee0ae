"""Uniform frame subsampling, shared by extract (the ``decode.max_frames`` cap) and train/generate/ask
(the ``data.max_frames`` cap), so both caps pick frames the same way."""

from __future__ import annotations

import numpy as np


def uniform_indices(n: int, max_frames: int | None) -> np.ndarray:
    """``arange(n)``, or ``max_frames`` indices spread evenly over it (first and last kept; halves round up)."""
    if max_frames is None or n <= max_frames:
        return np.arange(n)
    return np.unique(np.floor(np.linspace(0, n - 1, max_frames) + 0.5).astype(np.int64))
