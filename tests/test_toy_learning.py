"""The end-to-end learning proof (opt in: ``pytest -m slow``): the real CLI stages on a few hundred toy
clips must reach >= 0.85 held-out accuracy with the tiny model on a 2-core CPU within 15 minutes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_toy_corpus_is_learned(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_learning.py"), "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1800)
    minutes = (time.perf_counter() - start) / 60
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("accuracy: ")
    accuracy = float(last.split()[1])
    assert accuracy >= 0.85, proc.stdout
    assert minutes <= 15, f"took {minutes:.1f} min\n{proc.stdout}"
