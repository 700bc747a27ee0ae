"""End-to-end learning proof: the real CLI stages on the toy corpus with the tiny model.

    python benchmarks/toy_learning.py [--dir DIR] [--videos 300] [--steps N] [--seed 0]

toy-corpus -> init-tiny -> extract -> train (configs/train_tiny.yaml) -> generate (greedy) -> score,
each as a `dualfocus` subprocess, timing every stage. The last line printed is `accuracy: X` (the
offline contains-match accuracy on the held-out toy test questions; chance is at most 1/3 per type).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dualfocus(*args, cwd: Path) -> float:
    """Run one stage; returns its wall time in seconds (output shown only on failure)."""
    script = Path(sys.executable).parent / "dualfocus"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dualfocus.cli"]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *map(str, args), *([] if args[0] in ("init-tiny", "toy-corpus", "score") else ["--no-progress"])],
                          cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"dualfocus {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    print(f"[{args[0]}] {seconds:.1f} s" + (f" | {lines[-3] if len(lines) >= 3 else ''}" if args[0] in ("extract", "train") else ""))
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--videos", type=int, default=300, help="toy clips (80%% train, 20%% test)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "configs" / "train_tiny.yaml"))
    args = ap.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="dualfocus-toy-"))
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("toy", "model", "store", "run"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "preds.jsonl").unlink(missing_ok=True)

    total = 0.0
    total += dualfocus("toy-corpus", "toy", "--videos", args.videos, "--seed", args.seed, cwd=work)
    total += dualfocus("init-tiny", "model", cwd=work)
    total += dualfocus("extract", "toy/videos", "--model", "model", "--out", "store", cwd=work)
    train_args = ["train", "store", "toy/train.json", "--model", "model", "--out", "run", "--config", args.config,
                  f"seed={args.seed}"]
    if args.steps:
        train_args.append(f"max_steps={args.steps}")
    total += dualfocus(*train_args, cwd=work)
    total += dualfocus("generate", "store", "toy/test_q.json", "--checkpoint", "run/final", "--out", "preds.jsonl",
                       "--greedy", "sampling.max_new_tokens=8", cwd=work)
    total += dualfocus("score", "preds.jsonl", "toy/test_a.json", "--out", "score.json", cwd=work)
    report = json.loads((work / "score.json").read_text())
    for kind, m in sorted(report["per_type"].items()):
        print(f"  {kind:<10} n={m['n']:<4} contains={m['contains']:.3f} exact={m['exact_match']:.3f}")
    print(f"total wall time: {total:.1f} s ({total / 60:.1f} min) in {work}")
    print(f"accuracy: {report['overall']['contains']:.4f}")


if __name__ == "__main__":
    main()
