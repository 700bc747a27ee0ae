"""Sanitised sample keys: any video id becomes a name that is safe in a path, a tar member and a
WebDataset key (no dots, no slashes)."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_STEM = 96


def safe_key(video_id: str) -> str:
    """Map `video_id` to `[A-Za-z0-9_-]+`.

    An id that is already safe (and not overlong) is returned unchanged. Otherwise every odd character
    becomes `_`, the result is cut to 96 characters and an 8-hex-digit hash of the ORIGINAL id is
    appended, so "a/b.c" -> "a_b_c-<hash>" never collides with the id "a_b_c" (kept as is), nor with
    "a b c" (same stem, different hash).
    """
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"video_id must be a non-empty string, got {video_id!r}")
    if len(video_id) <= _MAX_STEM and not _UNSAFE.search(video_id):
        return video_id
    stem = _UNSAFE.sub("_", video_id)[:_MAX_STEM]
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:8]
    return f"{stem}-{digest}"
