"""``init-tiny`` is a pure function of its seed: two runs write the same model, byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_write_the_same_model(tmp_path: Path):
    """The Q-Former's WordPiece vocabulary once came from a trainer that broke ties in hash order (415 or 416
    tokens), so every run drew differently shaped, different weights."""
    from dualfocus.pipeline.tiny import write_tiny_model

    a, b = write_tiny_model(tmp_path / "a"), write_tiny_model(tmp_path / "b")
    assert _digest(a) == _digest(b)
