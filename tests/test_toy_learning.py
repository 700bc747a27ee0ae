"""The end-to-end learning proof (opt in: ``pytest -m slow``): the real CLI stages on 300 toy clips must reach
>= 0.85 held-out exact-match accuracy with the tiny model and ``configs/train_tiny.yaml``, for each of three
(corpus seed, train seed) pairs. How long it takes is printed by the benchmark, never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["0:0", "1:1", "2:2"])
def test_toy_corpus_is_learned(tmp_path, pair):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_learning.py"), "--dir", str(tmp_path),
                           "--seeds", pair], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert run["accuracy"] >= 0.85, proc.stdout
    # Every type is learned, not just averaged over: chance is 1/4 (colour, direction) and 1/3 (shape).
    assert min(run["per_type"].values()) >= 0.6, proc.stdout
