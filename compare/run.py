"""``run_compare``: train, generate and score each connector on one store, then one table and one picture.

Per connector, in ``OUT/NAME/``: ``run/`` (the training run: checkpoints, metrics.jsonl, final/), ``train.json``
(the run's figures), ``preds.jsonl``, ``score.json`` and ``result.json`` (its row of the table). Every stage
resumes: a connector with a ``result.json`` made under the same settings is not touched again, an interrupted
training run continues from its last checkpoint, ``generate`` skips the questions already answered. A
connector whose streams the store lacks gets a row saying so, with the extract command that adds them, and
the others still run; so does one whose training fails.

Training runs in a child process (spawned, one at a time) so each connector's peak memory is its own. On Linux
the child asks the kernel for SIGTERM when the compare process dies, so killing ``dualfocus compare`` (SIGTERM
from a scheduler, SIGKILL) never leaves a training run going on its own.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dualfocus.compare.config import CompareConfig
from dualfocus.pipeline.config import describe_differences

DONE, MISSING, FAILED, CHANCE = "done", "missing streams", "failed", "reference"


@dataclass
class Row:
    """One connector's line of the table (what ``result.json`` holds)."""

    connector: str
    status: str
    message: str = ""
    """Why a row has no figures (the missing streams and the extract command, or the error)."""
    accuracy: float | None = None
    """Exact match over every scored question."""
    per_type: dict[str, float | None] = field(default_factory=dict)
    judge_accuracy: float | None = None
    judge_score: float | None = None
    trainable_params: int | None = None
    visual_tokens: float | None = None
    """Visual tokens in the LLM's sequence per test video (mean over videos)."""
    samples_per_s: float | None = None
    peak_memory_mib: float | None = None
    memory_kind: str = ""
    """What ``peak_memory_mib`` measures: "cuda" (peak allocated on the GPU) or "rss" (the training process)."""
    bytes_per_sample: float | None = None
    """Store bytes a training sample reads."""
    steps: int | None = None
    recipe: str = ""
    settings: dict = field(default_factory=dict)
    """The resolved train config and generation settings the row was made with (the resume check)."""


def train_config_for(cfg: CompareConfig, name: str):
    """The connector's recipe with compare's inputs and shared settings filled in."""
    from dualfocus.pipeline.config import load_config
    from dualfocus.pipeline.errors import UserError
    from dualfocus.train.config import TrainConfig
    from dualfocus.train.loop import resolve_packaged

    recipe = resolve_packaged(cfg.recipes[name])
    if not recipe.is_file():
        raise UserError(f"recipes.{name}: no such file {cfg.recipes[name]}")
    absolute = lambda path: str(Path(path).resolve())  # noqa: E731 - a rerun from another directory is the same run
    values = {"store": absolute(cfg.store), "annotations": absolute(cfg.train), "model": absolute(cfg.model),
              "out": absolute(Path(cfg.out) / name / "run"), "max_steps": cfg.max_steps, "seed": cfg.seed,
              "data.batch_size": cfg.batch_size}
    tcfg = load_config(TrainConfig, recipe, cfg.train_overrides, values)
    if tcfg.connector.name != name:
        raise UserError(f"recipes.{name} ({recipe}) trains connector {tcfg.connector.name!r}, not {name!r}")
    return tcfg


def stream_problem(tcfg, store) -> str:
    """Why the store cannot give the connector's streams ("" when it can), with the extract command if needed."""
    import functools

    from dualfocus.connectors.registry import connector_class
    from dualfocus.data.samples import store_stream_problem

    system = connector_class(tcfg.connector.name)
    return store_stream_problem(store, list(system.expected_streams(tcfg.connector, tcfg.model)), tcfg.store,
                                tcfg.model, functools.partial(system.extract_args, tcfg.connector, tcfg.model))


def settings_of(tcfg, cfg: CompareConfig) -> dict:
    """What a finished row depends on: the resolved train config (its output dir aside) and generation."""
    from dualfocus.pipeline.config import config_to_dict

    train = config_to_dict(tcfg)
    train.pop("out", None)
    return {"train": train, "test_q": str(Path(cfg.test_q).resolve()), "test_a": str(Path(cfg.test_a).resolve()),
            "max_new_tokens": cfg.max_new_tokens,
            "judge": {"url": cfg.judge.url, "model": cfg.judge.model}}


def exit_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel send this process SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
    if the parent ``parent_pid`` is already gone, terminate now. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:  # died between the spawn and the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def train_in_child(tcfg, resume: bool, progress: bool, figures_path: str, parent_pid: int) -> None:
    """Runs in a spawned process: ``run_train``, then its figures and this process's peak memory to
    ``figures_path`` (JSON). Ends with the process ``parent_pid`` (``exit_with_parent``)."""
    exit_with_parent(parent_pid)
    import torch

    from dualfocus.train.loop import run_train

    summary = run_train(tcfg, resume=resume, progress=progress)
    if torch.cuda.is_available():
        peak, kind = torch.cuda.max_memory_allocated() / 2 ** 20, "cuda"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss"  # Linux: KiB
    figures = {"steps": summary.steps, "start_step": summary.start_step, "samples_per_s": summary.samples_per_s,
               "first_loss": summary.first_loss, "last_loss": summary.last_loss,
               "trainable_params": summary.trainable_params, "bytes_per_sample": summary.bytes_per_sample,
               "peak_memory_mib": peak, "memory_kind": kind, "export": summary.export}
    tmp = Path(figures_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(figures, indent=1))
    tmp.replace(figures_path)


def train_connector(tcfg, figures_path: Path, progress: bool) -> dict:
    """Train (or resume) in a child process unless the run is already exported; returns the run's figures."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from dualfocus.train.checkpoint import latest_complete_tag
    from dualfocus.train.loop import check_resume

    run = Path(tcfg.out)
    resume = latest_complete_tag(run) is not None
    if resume:  # a run begun under other settings is refused, naming what differs
        check_resume(tcfg, run, resume=True)
    if figures_path.is_file() and (run / "final" / "dualfocus.json").is_file():
        return json.loads(figures_path.read_text())
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(train_in_child, tcfg, resume, progress, str(figures_path), os.getpid()).result()
    return json.loads(figures_path.read_text())


def mean_visual_tokens(preds_path: Path) -> float | None:
    """Visual tokens per video, averaged first over a video's questions, then over videos."""
    per_video: dict[str, list[int]] = {}
    for line in preds_path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if "visual_tokens" in rec:
                per_video.setdefault(str(rec["video_id"]), []).append(int(rec["visual_tokens"]))
    if not per_video:
        return None
    return statistics.fmean(statistics.fmean(v) for v in per_video.values())


def evaluate_connector(cfg: CompareConfig, tcfg, folder: Path, progress: bool) -> dict:
    """Generate (greedy, resumable) and score; returns the score report."""
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.evaluate.score import ScoreConfig, run_score

    preds = folder / "preds.jsonl"
    gcfg = GenerateConfig(store=cfg.store, questions=cfg.test_q, checkpoint=str(Path(tcfg.out) / "final"),
                          out=str(preds), batch_size=cfg.generate_batch_size)
    gcfg.sampling.greedy = True
    gcfg.sampling.max_new_tokens = cfg.max_new_tokens
    run_generate(gcfg, progress=progress)
    return run_score(preds, cfg.test_a, folder / "score.json", ScoreConfig(judge=cfg.judge), progress=progress)


def compare_one(cfg: CompareConfig, name: str, store, console, progress: bool) -> Row:
    """Everything for one connector; a finished row under the same settings is read back, not redone."""
    from dualfocus.evaluate.words import accuracy_in_words
    from dualfocus.pipeline.errors import UserError

    folder = Path(cfg.out) / name
    tcfg = train_config_for(cfg, name)
    settings = settings_of(tcfg, cfg)
    result_path = folder / "result.json"
    if result_path.is_file():
        old = json.loads(result_path.read_text())
        if old.get("status") == DONE:
            changed = describe_differences(old.get("settings", {}), settings)
            if changed:
                raise UserError(f"{folder} was made with other settings: {', '.join(changed[:6])}; "
                                f"use another --out, or delete {folder} to redo {name}")
            console.print(f"{name}: already done ({result_path})")
            return Row(**old)
    why = stream_problem(tcfg, store)
    if why:
        return Row(name, MISSING, why,
                   recipe=str(cfg.recipes[name]), settings=settings)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        figures = train_connector(tcfg, folder / "train.json", progress)
        console.print(f"trained: {figures['steps']} steps | loss {figures['first_loss']:.4f} -> "
                      f"{figures['last_loss']:.4f} | {figures['samples_per_s']:.1f} samples/s | {tcfg.out}")
        report = evaluate_connector(cfg, tcfg, folder, progress)
        console.print(accuracy_in_words(report))
    except Exception as e:  # noqa: BLE001 - one connector's failure must not stop the others
        (folder / "error.txt").write_text(traceback.format_exc())
        kind = "" if isinstance(e, UserError) else f"{type(e).__name__}: "
        return Row(name, FAILED, f"{kind}{e} (traceback: {folder / 'error.txt'})", recipe=str(cfg.recipes[name]),
                   settings=settings)
    overall = report["overall"]
    judge = overall.get("judge") or {}
    row = Row(name, DONE, accuracy=overall["exact_match"],
              per_type={t: m["exact_match"] for t, m in report["per_type"].items() if t != "untyped"},
              judge_accuracy=judge.get("accuracy"), judge_score=judge.get("score"),
              trainable_params=figures["trainable_params"], visual_tokens=mean_visual_tokens(folder / "preds.jsonl"),
              samples_per_s=figures["samples_per_s"], peak_memory_mib=figures["peak_memory_mib"],
              memory_kind=figures["memory_kind"], bytes_per_sample=figures["bytes_per_sample"],
              steps=figures["steps"], recipe=str(cfg.recipes[name]), settings=settings)
    result_path.write_text(json.dumps(asdict(row), indent=1) + "\n")
    return row


def chance_row(test_a: str) -> Row:
    """A reference row: the exact match of a uniform guess among each type's distinct answers in ``test_a``
    (overall: weighted by each type's questions)."""
    from dualfocus.evaluate.score import load_answers
    from dualfocus.evaluate.metrics import normalize_answer

    answers: dict[str, list[str]] = {}
    for rec in load_answers(test_a).values():
        answers.setdefault(str(rec.get("type") or "untyped"), []).append(normalize_answer(str(rec["answer"])))
    per_type = {t: 1 / len(set(a)) for t, a in answers.items()}
    total = sum(len(a) for a in answers.values())
    overall = sum(per_type[t] * len(a) for t, a in answers.items()) / total if total else None
    return Row("chance", CHANCE, "uniform guess among each type's distinct answers", accuracy=overall,
               per_type={t: v for t, v in per_type.items() if t != "untyped"})


def run_compare(cfg: CompareConfig, console, progress: bool = True) -> list[Row]:
    """Every connector of ``cfg.connectors`` in turn, then the table (terminal, .md, .json) and the picture."""
    from dualfocus.compare.plot import plot_comparison
    from dualfocus.compare.table import render_markdown, render_terminal, write_json
    from dualfocus.connectors.registry import names
    from dualfocus.pipeline.config import save_config
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store import FeatureStore

    unknown = [n for n in cfg.connectors if n not in names()]
    if unknown:
        raise UserError(f"unknown connector(s) {', '.join(unknown)}; known: {', '.join(names())}")
    for key in ("train", "test_q", "test_a"):
        if not Path(getattr(cfg, key)).is_file():
            raise UserError(f"{key}: no such file {getattr(cfg, key)}")
    store = FeatureStore.open(cfg.store)
    for name in cfg.connectors:  # every recipe is read before anything trains: a typo fails in seconds
        train_config_for(cfg, name)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "compare_config.yaml")
    rows = []
    for i, name in enumerate(cfg.connectors, 1):
        console.rule(f"{i}/{len(cfg.connectors)} {name}")
        row = compare_one(cfg, name, store, console, progress)
        if row.status != DONE:
            console.print(f"{name}: {row.status}: {row.message}", markup=False, soft_wrap=True)
        rows.append(row)
    rows.append(chance_row(cfg.test_a))
    runs = {r.connector: out / r.connector / "run" / "metrics.jsonl" for r in rows if r.status == DONE}
    (out / "compare.md").write_text(render_markdown(rows) + "\n")
    write_json(rows, cfg, out / "compare.json")
    plot_comparison(rows, runs, out / "compare.png")
    console.rule("comparison")
    render_terminal(rows, console)
    console.print(f"table: {out / 'compare.md'} | {out / 'compare.json'} | picture: {out / 'compare.png'}")
    return rows
