"""``run_demo``: the embedded default, every stage once on the toy corpus and the tiny model.

toy corpus -> tiny model -> extract -> train -> generate (greedy) -> score. Each stage is the same
library function the CLI calls; the demo only chooses the inputs and prints each stage's summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualfocus.evaluate.words import accuracy_in_words


@dataclass
class DemoConfig:
    """Sizes of the demo run."""

    dir: str = "dualfocus-demo"
    """Working directory (corpus, model, store, run, predictions, report)."""
    videos: int = 240
    """Toy clips to render (80% train, 20% held-out test)."""
    seed: int = 0
    """Seed of the toy corpus and the training run."""
    train_config: str = "configs/train_tiny.yaml"
    """Training recipe (a path, or a name under the package's configs/)."""
    max_steps: int | None = None
    """Override the recipe's step count (null = the recipe's)."""

    def check(self) -> list[str]:
        problems = []
        if self.videos < 10:
            problems.append(f"videos must be >= 10, got {self.videos}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or null, got {self.max_steps}")
        return problems


def run_demo(cfg: DemoConfig, console, progress: bool = True) -> dict:
    """Run every stage; returns the score report (with ``loss_plot`` added)."""
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.evaluate.score import ScoreConfig, format_report, run_score
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.report import print_extract_summary
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config
    from dualfocus.pipeline.tiny import write_tiny_model
    from dualfocus.pipeline.toy import make_toy_corpus
    from dualfocus.train.config import TrainConfig
    from dualfocus.train.loop import resolve_packaged, run_train
    from dualfocus.train.report import print_train_summary

    root = Path(cfg.dir)
    corpus, model, store, run = root / "toy", root / "tiny-model", root / "store", root / "run"
    preds, report_path = root / "preds.jsonl", root / "score.json"

    console.rule("1/6 toy corpus")
    if not (corpus / "test_a.json").is_file():
        make_toy_corpus(corpus, n_videos=cfg.videos, seed=cfg.seed)
    console.print(f"{cfg.videos} clips in {corpus}")

    console.rule("2/6 tiny model")
    if not (model / "config.json").is_file():
        write_tiny_model(model)
    console.print(f"random InstructBLIP-layout model in {model}")

    console.rule("3/6 extract")
    ecfg = load_config(ExtractConfig, values={"corpus": str(corpus / "videos"), "model": str(model), "out": str(store)})
    print_extract_summary(run_extract(ecfg, progress=progress), console)

    console.rule("4/6 train")
    overrides = {"store": str(store), "annotations": str(corpus / "train.json"), "model": str(model), "out": str(run),
                 "seed": cfg.seed}
    if cfg.max_steps is not None:
        overrides["max_steps"] = cfg.max_steps
    tcfg = load_config(TrainConfig, resolve_packaged(cfg.train_config), values=overrides)
    from dualfocus.train.checkpoint import latest_complete_tag

    if (run / "final" / "dualfocus.json").is_file():
        console.print(f"already trained: {run / 'final'}")
    else:
        print_train_summary(run_train(tcfg, resume=latest_complete_tag(run) is not None, progress=progress), console)

    console.rule("5/6 generate")
    gcfg = load_config(GenerateConfig, values={"store": str(store), "questions": str(corpus / "test_q.json"),
                                               "checkpoint": str(run / "final"), "out": str(preds),
                                               "sampling.greedy": True, "sampling.max_new_tokens": 8})
    g = run_generate(gcfg, progress=progress)
    console.print(f"predictions: {g.written} written, {g.skipped} already there, {len(g.missing)} without video -> {preds}")

    console.rule("6/6 score")
    report = run_score(preds, corpus / "test_a.json", report_path, ScoreConfig(), progress=progress)
    console.print(format_report(report))
    console.print(f"report: {report_path}")
    console.print(f"loss curve: {run / 'loss.png'}")
    console.print(accuracy_in_words(report))
    report["loss_plot"] = str(run / "loss.png")
    return report
