"""Resizing decoded frames: the square frames encoders read, and the aspect-kept, padded views of the pixels
group (``FrameViews``). Every view is made from the decoded frame itself, never from another view.

Legend: ``k`` frames in a chunk, ``S`` the square size, ``L`` the pixels group's long side.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FrameViews:
    """Decode into several views of each frame, each made from the decoded frame itself (never from another view).

    ``square``: ``[size, size, 3]``, aspect ignored (what encoders read; None = no such view). ``long_side``:
    aspect kept, the long side resized to this (never upscaled: a smaller frame keeps its size), zero-padded at
    the bottom and right to ``[long_side, long_side, 3]`` (the pixels group), with each frame's valid ``box``
    ``(height, width)``. Passing a ``FrameViews`` as ``size`` makes every chunk a dict:
    ``{"frames": [k, S, S, 3] (or [k, 0, 0, 3]), "pixels": [k, L, L, 3], "box": int32 [k, 2]}``.
    """

    square: int | None
    long_side: int

    def problems(self) -> list[str]:
        bad = [] if self.square is None or self.square >= 1 else [f"square size must be >= 1, got {self.square}"]
        return bad + ([] if self.long_side >= 1 else [f"long_side must be >= 1, got {self.long_side}"])


def fit_long_side(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) with the long side at most ``long_side``, aspect kept (rounded, >= 1), never upscaled."""
    scale = long_side / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_views(frames: Iterable[np.ndarray], views: FrameViews) -> dict[str, np.ndarray]:
    from PIL import Image

    frames = list(frames)
    size, n = views.long_side, len(frames)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    box = np.zeros((n, 2), np.int32)
    for i, frame in enumerate(frames):
        h, w = fit_long_side(frame.shape[0], frame.shape[1], size)
        if (h, w) != frame.shape[:2]:
            frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.BICUBIC))
        pixels[i, :h, :w], box[i] = frame, (h, w)
    square = (resize_stack(frames, views.square) if views.square is not None and n
              else np.zeros((n, 0, 0, 3), np.uint8))
    return {"frames": square, "pixels": pixels, "box": box}


def resize_stack(frames: Iterable[np.ndarray], size: "int | FrameViews"):
    """Resize RGB frames ``[h, w, 3]`` to ``[size, size, 3]`` (bicubic, aspect ignored), stacked; or, for a
    ``FrameViews``, to each of its views (a dict, see there)."""
    from PIL import Image

    if isinstance(size, FrameViews):
        return resize_views(frames, size)
    out = []
    for frame in frames:
        if frame.shape[:2] != (size, size):
            frame = np.asarray(Image.fromarray(frame).resize((size, size), Image.BICUBIC))
        out.append(frame)
    return np.stack(out).astype(np.uint8, copy=False)
