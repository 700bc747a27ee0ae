"""``dualfocus`` command line: a thin table of commands, each calling one stage function.

Every stage takes ``--config FILE`` (YAML) and trailing ``key=value`` overrides (dotted keys of the
stage's dataclass config); common options are also plain flags. Heavy libraries are imported inside the
commands so ``dualfocus --help`` stays instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Extract frozen video features once, then train and evaluate the DualFocus connector.")

OverridesArg = typer.Argument(None, help="Config overrides as dotted key=value, e.g. decode.fps=2 store.format=webdataset")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (applied before key=value overrides).")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def friendly_errors(fn):
    """Turn the errors users can fix (bad config, path, store, model) into one line and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dualfocus.pipeline.errors import USER_ERRORS

        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)

    return wrapper


def _keys_epilog(module: str, name: str) -> str:
    """Help text listing every dotted config key of a stage with its default and doc line."""
    import importlib

    from dualfocus.pipeline.config import describe_keys

    rows = describe_keys(getattr(importlib.import_module(module), name))
    lines = [f"{key} = {default}  {doc}" for key, default, doc in rows]
    return "Config keys (YAML or key=value):\n\n" + "\n\n".join(lines)


def _keys_help(module: str, name: str) -> type:
    """A command class whose --help ends with the stage's config keys (``_keys_epilog``), built only when help is
    shown: the config modules import torch, which every other use of the CLI should not pay for."""
    from typer.core import TyperCommand

    class KeysHelpCommand(TyperCommand):
        def format_help(self, ctx, formatter):
            if self.epilog is None:
                self.epilog = _keys_epilog(module, name)
            return super().format_help(ctx, formatter)

    return KeysHelpCommand


def _given(**flags: Any) -> dict[str, Any]:
    """Flags the user actually passed (None means 'not given')."""
    return {k: v for k, v in flags.items() if v is not None}


@app.command("init-tiny")
@friendly_errors
def init_tiny(out_dir: Path = typer.Argument(..., help="Directory to write the tiny model to."),
              seed: int = typer.Option(0, help="Seed for the random weights."),
              family: str = typer.Option("eva", help="Encoder family: eva (the InstructBLIP-layout model), "
                                                     "siglip, dinov2, clip or convnext (a vision tower only)."),
              reading_steps: int = typer.Option(0, "--reading-steps", help="Steps of text-only reading practice for "
                                                "the tiny LLM (eva only; 0: random LLM). `make compare` uses 1000.")):
    """Write a tiny random InstructBLIP-layout model (for tests, CI and the demo), or another family's encoder."""
    from dualfocus.encoders.tiny import write_tiny_encoder

    if reading_steps < 0:
        raise typer.BadParameter(f"expected >= 0, got {reading_steps}", param_hint="--reading-steps")
    path = write_tiny_encoder(out_dir, family, seed=seed, reading_steps=reading_steps)
    reading = path / "reading.json"
    if reading_steps and reading.exists():
        accuracy = json.loads(reading.read_text())["accuracy_on_256_fresh_prompts"]
        typer.echo(f"LLM reading practice: {reading_steps} steps, answers {accuracy:.2f} of 256 fresh prompts")
    typer.echo(f"tiny model written to {path}")


@app.command("toy-corpus")
@friendly_errors
def toy_corpus(out_dir: Path = typer.Argument(..., help="Directory for videos/, train.json, test_q.json, test_a.json."),
               videos: int = typer.Option(200, "--videos", "-n", help="Number of clips to render."),
               seed: int = typer.Option(0, help="Seed; the same seed gives the same corpus."),
               kind: str = typer.Option("v1", "--kind", help="v1: colour, shape, direction. v2: also questions that "
                                        "need time (colour change, order, bounce count) and long, mostly still clips.")):
    """Render the synthetic toy corpus (coloured shapes moving in one direction) and its QA files."""
    if kind not in ("v1", "v2"):
        raise typer.BadParameter(f"expected v1 or v2, got {kind!r}", param_hint="--kind")
    if kind == "v2":
        from dualfocus.pipeline.toy_v2 import make_toy_corpus_v2

        info = make_toy_corpus_v2(out_dir, n_videos=videos, seed=seed)
        info = {k: v for k, v in info.items() if k != "clips"}  # every clip's description is in the files
    else:
        from dualfocus.pipeline.toy import make_toy_corpus

        info = make_toy_corpus(out_dir, n_videos=videos, seed=seed)
    typer.echo(f"toy corpus written to {out_dir}: " + ", ".join(f"{k}={v}" for k, v in info.items()))


@app.command("extract", cls=_keys_help("dualfocus.extract.config", "ExtractConfig"))
@friendly_errors
def extract(corpus: str = typer.Argument(..., help="Directory of videos, or CSV/JSON/JSONL/Parquet with video_id, path."),
            overrides: Optional[list[str]] = OverridesArg,
            model: Optional[str] = typer.Option(None, "--model", "-m", help="Local model directory."),
            out: Optional[str] = typer.Option(None, "--out", "-o", help="Feature store directory."),
            config: Optional[Path] = ConfigOpt,
            fps: Optional[float] = typer.Option(None, help="Frames sampled per second [decode.fps]."),
            max_frames: Optional[int] = typer.Option(None, help="Cap on frames per video [decode.max_frames]."),
            format: Optional[str] = typer.Option(None, "--format", help="zarr or webdataset [store.format]."),
            dtype: Optional[str] = typer.Option(None, help="float16, bfloat16, float32 or int8 [store.dtype]."),
            batch_size: Optional[int] = typer.Option(None, help="Frames per encoder forward [encoder.batch_frames]."),
            decode_workers: Optional[int] = typer.Option(None, help="Decoding actors [ray.decode_workers]."),
            encoder_actors: Optional[int] = typer.Option(None, help="Encoder actors [ray.encoder_actors]."),
            writers: Optional[int] = typer.Option(None, help="Shard writer actors [ray.writers]."),
            gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs per encoder actor [ray.gpus_per_actor]."),
            ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of starting one."),
            encoder: Optional[list[str]] = typer.Option(
                None, "--encoder", "-e", help="Another stream group from the same decode: NAME=DIR (repeatable; "
                "taps default per family, set them in a recipe's encoders) [encoders.NAME.model]."),
            pixels: Optional[int] = typer.Option(
                None, "--pixels", help="Also store the frames as a group, long side resized to this [pixels.long_side]."),
            overwrite: bool = typer.Option(False, "--overwrite", help="Replace the stream groups this run writes."),
            limit: Optional[int] = typer.Option(None, help="Process at most N new videos."),
            max_failures: Optional[str] = typer.Option(
                None, help="Failures tolerated: a count (3) or a fraction (0.05); exceeded => exit 1."),
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")):
    """Decode videos, run the frozen vision encoder once per frame, write a sharded feature store."""
    import yaml

    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.report import print_extract_summary
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config

    values = _given(corpus=corpus, model=model, out=out, **{
        "decode.fps": fps, "decode.max_frames": max_frames, "store.format": format, "store.dtype": dtype,
        "encoder.batch_frames": batch_size, "ray.decode_workers": decode_workers,
        "ray.encoder_actors": encoder_actors, "ray.writers": writers, "ray.gpus_per_actor": gpus_per_actor, "ray.address": ray_address,
        "pixels.long_side": pixels,
        "limit": limit, "max_failures": yaml.safe_load(max_failures) if max_failures is not None else None})
    if overwrite:
        values["overwrite"] = True
    for entry in encoder or ():
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"expected NAME=DIR, got {entry!r}", param_hint="--encoder")
        values[f"encoders.{name}.model"] = path
    cfg = load_config(ExtractConfig, config, overrides or (), values)
    summary = run_extract(cfg, progress=not no_progress and sys.stdout.isatty())
    print_extract_summary(summary, _console())
    if summary.failures_exceeded:
        raise typer.Exit(1)


@app.command("inspect")
@friendly_errors
def inspect_store(store: str = typer.Argument(..., help="Feature store directory."),
                  as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Sampling, then per stream group: fingerprint, taps (shape, dtype, bytes per frame), counts and failures."""
    from dualfocus.store.summary import print_summary, summarize

    info = summarize(store)
    if as_json:
        import json

        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        print_summary(info, _console())


@app.command("migrate")
@friendly_errors
def migrate(store: str = typer.Argument(..., help="A feature store written before stream groups (format 1).")):
    """Make a format-1 store a format-2 store in place (moves its shards into groups/eva/; nothing re-encoded)."""
    from dualfocus.store import migrate_v1

    moved = migrate_v1(store)
    typer.echo(f"{store}: moved {', '.join(moved)} into groups/eva/" if moved else f"{store} is already format 2")


@app.command("train", cls=_keys_help("dualfocus.train.config", "TrainConfig"))
@friendly_errors
def train(store: str = typer.Argument(..., help="Feature store written by `dualfocus extract`."),
          annotations: str = typer.Argument(..., help="Training QA: VideoInstruct JSON or JSONL."),
          overrides: Optional[list[str]] = OverridesArg,
          model: Optional[str] = typer.Option(None, "--model", "-m", help="Local model directory."),
          out: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory."),
          config: Optional[Path] = ConfigOpt,
          max_steps: Optional[int] = typer.Option(None, help="Optimiser steps [max_steps]."),
          connector: Optional[str] = typer.Option(None, "--connector",
                                                  help="Which connector trains: dualfocus (default), dualfocus-qavit "
                                                       "[connector.name]."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")):
    """Train a connector (default: DualFocus's Q-Former + FFP) on cached features with DeepSpeed (LLM frozen)."""
    from dualfocus.pipeline.config import load_config
    from dualfocus.train.config import TrainConfig
    from dualfocus.train.loop import run_train
    from dualfocus.train.report import print_train_summary

    values = _given(store=store, annotations=annotations, model=model, out=out, max_steps=max_steps)
    if connector is not None:
        values["connector.name"] = connector
    cfg = load_config(TrainConfig, config, overrides or (), values)
    summary = run_train(cfg, resume=resume, progress=not no_progress and sys.stdout.isatty())
    print_train_summary(summary, _console())


@app.command("generate")
@friendly_errors
def generate(store: str = typer.Argument(..., help="Feature store holding the questions' videos."),
             questions: str = typer.Argument(..., help="test_q.json (video_name, question, question_id) or JSONL."),
             overrides: Optional[list[str]] = OverridesArg,
             checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-k", help="RUN_DIR/final export."),
             out: Optional[str] = typer.Option(None, "--out", "-o", help="Predictions JSONL (resumed if present)."),
             model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model dir (default: recorded)."),
             config: Optional[Path] = ConfigOpt,
             greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding [sampling.greedy]."),
             batch_size: Optional[int] = typer.Option(None, help="Questions per batch [batch_size]."),
             device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N [device]."),
             no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")):
    """Answer zero-shot QA questions from cached features with a trained connector."""
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.pipeline.config import load_config

    values = _given(store=store, questions=questions, checkpoint=checkpoint, out=out, model=model,
                    batch_size=batch_size, device=device)
    if greedy:
        values["sampling.greedy"] = True
    cfg = load_config(GenerateConfig, config, overrides or (), values)
    s = run_generate(cfg, progress=not no_progress and sys.stdout.isatty())
    console = _console()
    console.print(f"questions: {s.total} | answered now {s.written} | already in {s.out} {s.skipped} | "
                  f"without a usable video {len(s.missing)} | {s.seconds:.1f} s")
    for m in s.missing[:20]:
        console.print(f"  no video for question {m['question_id']} ({m['video']}): {m['reason']}", markup=False)
    if len(s.missing) > 20:
        console.print(f"  ... {len(s.missing) - 20} more in {Path(s.out).with_suffix('.missing.json')}")
    console.print(f"predictions: {s.out}")


@app.command("score")
@friendly_errors
def score(preds: str = typer.Argument(..., help="Predictions JSONL from `dualfocus generate`."),
          answers: str = typer.Argument(..., help="test_a.json (answer, type, question_id) or JSONL."),
          overrides: Optional[list[str]] = OverridesArg,
          out: Optional[str] = typer.Option(None, "--out", "-o", help="JSON report (default: PREDS.score.json)."),
          judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
          judge_model: Optional[str] = typer.Option(None, help="Judge model name [judge.model]."),
          config: Optional[Path] = ConfigOpt,
          no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar.")):
    """Exact-match accuracy always; the GPT-judge protocol too when --judge-url is given."""
    from dualfocus.evaluate.score import ScoreConfig, format_report, run_score
    from dualfocus.pipeline.config import load_config

    cfg = load_config(ScoreConfig, config, overrides or (),
                      _given(**{"judge.url": judge_url, "judge.model": judge_model}))
    out_path = out or str(Path(preds).with_suffix(".score.json"))
    report = run_score(preds, answers, out_path, cfg, progress=not no_progress and sys.stdout.isatty())
    console = _console()
    console.print(format_report(report))
    console.print(f"report: {out_path}")


@app.command("ask")
@friendly_errors
def ask(video: str = typer.Argument(..., help="A video file."),
        question: str = typer.Argument(..., help="The question, quoted."),
        overrides: Optional[list[str]] = OverridesArg,
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-k", help="RUN_DIR/final export."),
        model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model dir (default: recorded)."),
        greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding [sampling.greedy]."),
        device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N [device]."),
        config: Optional[Path] = ConfigOpt):
    """Answer one question about one video (decode, encode, connector, LLM in one process)."""
    from dualfocus.evaluate.ask import AskConfig, run_ask
    from dualfocus.pipeline.config import load_config

    values = _given(checkpoint=checkpoint, model=model, device=device)
    if greedy:
        values["sampling.greedy"] = True
    cfg = load_config(AskConfig, config, overrides or (), values)
    typer.echo(run_ask(video, question, cfg))


@app.command("compare", cls=_keys_help("dualfocus.compare.config", "CompareConfig"))
@friendly_errors
def compare(store: str = typer.Argument(..., help="Feature store holding every stream the connectors read."),
            train_qa: str = typer.Argument(..., help="Training QA: VideoInstruct JSON or JSONL."),
            test_q: str = typer.Argument(..., help="Held-out questions: test_q.json or JSONL."),
            test_a: str = typer.Argument(..., help="Their answers: test_a.json or JSONL."),
            overrides: Optional[list[str]] = OverridesArg,
            model: Optional[str] = typer.Option(None, "--model", "-m", help="Local base model directory."),
            out: Optional[str] = typer.Option(None, "--out", "-o", help="Comparison directory (resumed if present)."),
            connectors: Optional[str] = typer.Option(None, help="Comma-separated connector names [connectors]."),
            max_steps: Optional[int] = typer.Option(None, help="Optimiser steps of every connector [max_steps]."),
            seed: Optional[int] = typer.Option(None, help="Training seed of every connector [seed]."),
            batch_size: Optional[int] = typer.Option(None, help="Micro-batch of every connector [batch_size]."),
            judge_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL for the judge columns."),
            judge_model: Optional[str] = typer.Option(None, help="Judge model name [judge.model]."),
            config: Optional[Path] = ConfigOpt,
            no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars.")):
    """Train several connectors on one store with the same data, steps, seed and batch; one table and picture."""
    from dualfocus.compare.config import CompareConfig
    from dualfocus.compare.run import FAILED, run_compare
    from dualfocus.pipeline.config import load_config

    values = _given(store=store, train=train_qa, test_q=test_q, test_a=test_a, model=model, out=out,
                    max_steps=max_steps, seed=seed, batch_size=batch_size,
                    **{"judge.url": judge_url, "judge.model": judge_model})
    if connectors is not None:
        values["connectors"] = [c.strip() for c in connectors.split(",") if c.strip()]
    cfg = load_config(CompareConfig, config, overrides or (), values)
    rows = run_compare(cfg, _console(), progress=not no_progress and sys.stdout.isatty())
    if any(r.status == FAILED for r in rows):
        raise typer.Exit(1)


@app.command("demo")
@friendly_errors
def demo(dir: str = typer.Argument("dualfocus-demo", help="Working directory for every stage's output."),
         overrides: Optional[list[str]] = OverridesArg,
         videos: Optional[int] = typer.Option(None, help="Toy clips to render [videos]."),
         max_steps: Optional[int] = typer.Option(None, help="Training steps [max_steps]."),
         config: Optional[Path] = ConfigOpt,
         no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars.")):
    """Toy corpus -> tiny model -> extract -> train -> generate -> score, in one command."""
    from dualfocus.pipeline.config import load_config
    from dualfocus.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, config, overrides or (), _given(dir=dir, videos=videos, max_steps=max_steps))
    run_demo(cfg, _console(), progress=not no_progress and sys.stdout.isatty())


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
