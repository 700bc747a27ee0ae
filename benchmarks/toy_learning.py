"""End-to-end learning proof: the real CLI stages on the toy corpus with the tiny model.

    python benchmarks/toy_learning.py [--dir DIR] [--videos 300] [--steps N] [--seed 0]
    python benchmarks/toy_learning.py --seeds                 # the 3 (corpus seed, train seed) pairs 0:0,1:1,2:2
    python benchmarks/toy_learning.py --seeds 3:5,4:6         # any pairs
    python benchmarks/toy_learning.py --reading-steps 1000    # the tiny LLM given reading practice first

Per pair: toy-corpus (corpus seed) -> init-tiny -> extract (every stream the recipe's connector reads) -> train
(--config, default configs/train_tiny.yaml; configs/train_qavit_tiny.yaml for QA-ViT mode; train seed)
-> generate (greedy) -> score, each as a `dualfocus` subprocess, timing every stage, then a line
`accuracy 0.87: colour 1.00, shape 0.60, direction 1.00` (normalised exact match on the held-out toy
questions; chance is 1/4 for colour and direction, 1/3 for shape). With several pairs it ends with the mean
and spread per type. Everything is also written to DIR/summary.json; the last line is `accuracy: X`, the
lowest overall accuracy over the pairs run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PAIRS = "0:0,1:1,2:2"
TYPES = ("color", "shape", "direction")
TINY_ENCODERS = {"SIGLIP_DIR": "siglip", "DINO_DIR": "dinov2"}  # extract_args placeholder -> init-tiny --family


def dualfocus(*args, cwd: Path) -> float:
    """Run one stage; returns its wall time in seconds (output shown only on failure)."""
    script = Path(sys.executable).parent / "dualfocus"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "dualfocus.cli"]
    start = time.perf_counter()
    quiet = [] if args[0] in ("init-tiny", "toy-corpus", "score") else ["--no-progress"]
    proc = subprocess.run([*cmd, *map(str, args), *quiet], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"dualfocus {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if args[0] == "train":
        detail = "".join(f" | {ln}" for ln in lines if ln.startswith("samples:"))
    else:
        detail = f" | {lines[-3]}" if args[0] == "extract" and len(lines) >= 3 else ""
    print(f"  [{args[0]}] {seconds:.1f} s{detail}", flush=True)
    return seconds


def parse_pairs(text: str) -> list[tuple[int, int]]:
    """"0:0,1:1" -> [(0, 0), (1, 1)] (corpus seed, train seed)."""
    pairs = []
    for part in text.split(","):
        corpus, _, train = part.strip().partition(":")
        try:
            pairs.append((int(corpus), int(train or corpus)))
        except ValueError:
            sys.exit(f"--seeds: expected CORPUS:TRAIN pairs like {DEFAULT_PAIRS}, got {part!r}")
    return pairs


def extract_args(config: str, model: Path) -> list[str]:
    """What ``extract`` needs for the recipe's connector: every stream it reads, from the one decode."""
    import shlex

    from dualfocus.connectors.registry import connector_class
    from dualfocus.pipeline.config import load_config
    from dualfocus.train.config import TrainConfig

    cfg = load_config(TrainConfig, config, values={"store": "-", "annotations": "-", "model": str(model), "out": "-"})
    system = connector_class(cfg.connector.name)
    streams = list(system.expected_streams(cfg.connector, str(model)))
    args = shlex.split(system.extract_args(cfg.connector, str(model), streams))
    # Encoders other than the base model are the user's (LongVU: SIGLIP_DIR, DINO_DIR): tiny random ones here.
    for placeholder, family in TINY_ENCODERS.items():
        if any(placeholder in a for a in args):
            encoder = model.parent / f"tiny-{family}"
            if not (encoder / "config.json").is_file():
                dualfocus("init-tiny", encoder, "--family", family, cwd=model.parent)
            args = [a.replace(placeholder, str(encoder)) for a in args]
    return args


def run_pair(work: Path, model: Path, corpus_seed: int, train_seed: int, args) -> dict:
    """All stages for one (corpus seed, train seed) pair in ``work``; returns accuracies and times."""
    from dualfocus.evaluate.words import accuracy_in_words

    for sub in ("toy", "store", "run"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "preds.jsonl").unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    seconds = {"init-tiny": args.init_seconds}
    seconds["toy-corpus"] = dualfocus("toy-corpus", "toy", "--videos", args.videos, "--seed", corpus_seed, cwd=work)
    seconds["extract"] = dualfocus("extract", "toy/videos", "--out", "store", *extract_args(args.config, model),
                                   cwd=work)
    train_args = ["train", "store", "toy/train.json", "--model", model, "--out", "run", "--config", args.config,
                  f"seed={train_seed}"]
    if args.steps:
        train_args.append(f"max_steps={args.steps}")
    seconds["train"] = dualfocus(*train_args, cwd=work)
    seconds["generate"] = dualfocus("generate", "store", "toy/test_q.json", "--checkpoint", "run/final", "--out",
                                    "preds.jsonl", "--greedy", "sampling.max_new_tokens=8", cwd=work)
    seconds["score"] = dualfocus("score", "preds.jsonl", "toy/test_a.json", "--out", "score.json", cwd=work)
    report = json.loads((work / "score.json").read_text())
    total = sum(seconds.values())
    print(f"  {accuracy_in_words(report)} | {total / 60:.1f} min end to end", flush=True)
    return {"corpus_seed": corpus_seed, "train_seed": train_seed, "minutes": round(total / 60, 2),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "accuracy": report["overall"]["exact_match"],
            "per_type": {k: m["exact_match"] for k, m in report["per_type"].items()},
            "contains": report["overall"]["contains"], "words": accuracy_in_words(report)}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} +- {sd:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--videos", type=int, default=300, help="toy clips (80%% train, 20%% test)")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's max_steps")
    ap.add_argument("--seed", type=int, default=0, help="corpus and train seed of a single run")
    ap.add_argument("--seeds", nargs="?", const=DEFAULT_PAIRS, default=None, metavar="C:T,...",
                    help=f"run several (corpus seed, train seed) pairs; alone: {DEFAULT_PAIRS}")
    ap.add_argument("--config", default=str(ROOT / "configs" / "train_tiny.yaml"))
    ap.add_argument("--reading-steps", type=int, default=0,
                    help="init-tiny --reading-steps: text-only reading practice for the tiny LLM (0: random LLM)")
    args = ap.parse_args()
    args.config = str(Path(args.config).resolve())  # the stages run in the pair's directory

    pairs = parse_pairs(args.seeds) if args.seeds else [(args.seed, args.seed)]
    work = args.dir or Path(tempfile.mkdtemp(prefix="dualfocus-toy-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "model", ignore_errors=True)
    args.init_seconds = dualfocus("init-tiny", "model", "--reading-steps", str(args.reading_steps), cwd=work)
    model = (work / "model").resolve()
    results = []
    for corpus_seed, train_seed in pairs:
        print(f"corpus seed {corpus_seed}, train seed {train_seed}:", flush=True)
        pair_dir = work if len(pairs) == 1 else work / f"seed{corpus_seed}-{train_seed}"
        results.append(run_pair(pair_dir, model, corpus_seed, train_seed, args))

    print(f"\n{len(results)} run(s), {args.videos} clips, {Path(args.config).name}; exact match on held-out questions")
    print(f"{'corpus:train':<13}{'overall':>8}" + "".join(f"{t:>11}" for t in TYPES) + f"{'minutes':>9}")
    for r in results:
        print(f"{r['corpus_seed']}:{r['train_seed']:<11}{r['accuracy']:>8.3f}"
              + "".join(f"{r['per_type'].get(t, float('nan')):>11.3f}" for t in TYPES) + f"{r['minutes']:>9.1f}")
    if len(results) > 1:
        print(f"overall    {spread([r['accuracy'] for r in results])}")
        for t in TYPES:
            print(f"{t:<11}{spread([r['per_type'][t] for r in results if t in r['per_type']])}")
    (work / "summary.json").write_text(json.dumps({"videos": args.videos, "config": args.config,
                                                   "reading_steps": args.reading_steps, "runs": results}, indent=1) + "\n")
    print(f"summary: {work / 'summary.json'}")
    print(f"accuracy: {min(r['accuracy'] for r in results):.4f}")


if __name__ == "__main__":
    main()
