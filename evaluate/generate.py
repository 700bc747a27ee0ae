"""``run_generate``: answers for zero-shot QA questions from cached features, resumable.

One JSON line per question: ``{"question_id", "video_id", "question", "pred", "visual_tokens"}`` (the last: how
many visual tokens the LLM read for that question's video). Question ids already in
the output file are skipped, so an interrupted run continues where it stopped; a file another export or other
answer-changing settings began is refused (``PREDS.source.json`` records them). Questions whose video is
not in the store (or failed there) are listed in the summary and in ``PREDS.missing.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dualfocus.evaluate.predictor import SamplingConfig

from dualfocus.pipeline.devices import device_problem


@dataclass
class GenerateConfig:
    """Everything ``dualfocus generate`` needs; saved beside the predictions as PREDS.config.yaml."""

    store: str = ""
    """Feature store holding the questions' videos."""
    questions: str = ""
    """test_q.json (video_name, question, question_id) or JSONL with the same keys."""
    checkpoint: str = ""
    """RUN_DIR/final export written by `dualfocus train`."""
    out: str = ""
    """Predictions JSONL (appended to when it exists)."""
    model: str | None = None
    """Base model directory; null = the one recorded in the checkpoint."""
    batch_size: int = 8
    """Questions per generation batch."""
    max_frames: int | None = None
    """Frames per video; null = the value the connector was trained with."""
    llm_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype the connector and the LLM both run in; null = the one the checkpoint was trained with."""
    device: str = "auto"
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" or "cuda:N"."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> list[str]:
        problems = [f"{name} is required" for name in ("store", "questions", "checkpoint", "out") if not getattr(self, name)]
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_frames is not None and self.max_frames < 1:
            problems.append(f"max_frames must be >= 1 or null, got {self.max_frames}")
        if problem := device_problem(self.device):
            problems.append(f"device {problem}")
        return problems


@dataclass
class GenerateSummary:
    """What a generate run did."""

    out: str
    total: int
    written: int
    skipped: int
    missing: list[str]
    seconds: float


def done_question_ids(path: Path) -> set[str]:
    """Question ids already answered in an existing predictions file (a torn last line is ignored)."""
    done: set[str] = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                done.add(str(json.loads(line)["question_id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def answers_source(cfg: GenerateConfig) -> dict:
    """What decides the answers in a predictions file: the export's bytes (a digest of its two files) and the
    settings that change answers, paths resolved. Saved beside the predictions as ``PREDS.source.json``."""
    import hashlib

    from dualfocus.connectors.export import EXPORT_META, EXPORT_WEIGHTS
    from dualfocus.pipeline.config import config_to_dict

    digest = hashlib.sha256()
    for name in (EXPORT_META, EXPORT_WEIGHTS):
        with open(Path(cfg.checkpoint) / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return {"checkpoint": digest.hexdigest(), "store": str(Path(cfg.store).resolve()),
            "model": str(Path(cfg.model).resolve()) if cfg.model else None, "max_frames": cfg.max_frames,
            "llm_dtype": cfg.llm_dtype, "sampling": config_to_dict(cfg.sampling)}


def check_same_source(out: Path, source: dict) -> None:
    """Refuse to add answers to predictions another export or other settings made: the file would then score two
    models as one. (A file written before sources were recorded is taken as it is.)"""
    from dualfocus.pipeline.config import describe_differences
    from dualfocus.pipeline.errors import UserError

    saved_path = out.with_suffix(".source.json")
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    settings = {k: v for k, v in source.items() if k != "checkpoint"}
    differing = [] if saved.pop("checkpoint", None) == source["checkpoint"] else [
        "another checkpoint (its weights or record differ)"]
    differing += describe_differences(saved, settings)
    if differing:
        raise UserError(f"{out} holds answers made with {', '.join(differing)}; answer into another --out, "
                        f"or delete {out} to answer every question again")


def run_generate(cfg: GenerateConfig, progress: bool = True) -> GenerateSummary:
    """Answer every question of ``cfg.questions`` not yet in ``cfg.out``; see module docstring."""
    from dualfocus.connectors.export import read_export
    from dualfocus.connectors.limits import ModelLimits, check_context_length
    from dualfocus.connectors.export import connector_system
    from dualfocus.connectors.registry import frame_planner
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset, check_store_streams
    from dualfocus.evaluate.predictor import Predictor, check_export_matches, inference_dtype
    from dualfocus.pipeline.config import save_config
    from dualfocus.pipeline.devices import resolve_device
    from dualfocus.pipeline.progress import count_progress
    from dualfocus.store import FeatureStore

    start = time.perf_counter()
    meta, _ = read_export(cfg.checkpoint)
    store = FeatureStore.open(cfg.store)
    check_store_streams(store, meta.streams, cfg.store, cfg.model or meta.base_model)
    model_dir = check_export_matches(meta, cfg.model, store.fingerprint(meta.streams), cfg.checkpoint)
    resolve_device(cfg.device)                      # a device or dtype that cannot be had fails before any output
    inference_dtype(meta, cfg.llm_dtype, cfg.checkpoint)
    system, connector_cfg = connector_system(meta, cfg.checkpoint)
    expected = system.expected_streams(connector_cfg, model_dir)
    prepared = prepare_samples(cfg.store, cfg.questions, model_dir, with_answers=False, expected=expected,
                               max_question_tokens=meta.max_question_tokens,  # the fingerprint check covers taps
                               plan_frames=frame_planner(system, connector_cfg, model_dir))
    max_frames = cfg.max_frames if cfg.max_frames is not None else meta.max_frames
    check_context_length(prepared.samples, max_frames, ModelLimits.of(model_dir), frames_key="max_frames",
                         tokens_per_frame=system.tokens_per_frame(connector_cfg, model_dir))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_question_ids(out)
    source = answers_source(cfg)
    if done:
        check_same_source(out, source)
    save_config(cfg, out.with_suffix(".config.yaml"))
    out.with_suffix(".source.json").write_text(json.dumps(source, indent=2) + "\n")
    if prepared.report.missing:
        out.with_suffix(".missing.json").write_text(json.dumps(prepared.report.missing, indent=2))

    todo = [s for s in prepared.samples if s.question_id not in done]
    summary = GenerateSummary(out=str(out), total=prepared.report.total, written=0,
                              skipped=len(prepared.samples) - len(todo), missing=prepared.report.missing, seconds=0.0)
    if todo:
        predictor = Predictor(cfg.checkpoint, model_dir, dtype=cfg.llm_dtype, device=cfg.device)
        dataset = FeatureQADataset(cfg.store, todo, max_frames, tuple(expected))
        with open(out, "a") as f, count_progress(len(todo), "generate", enabled=progress) as advance:
            for s in range(0, len(todo), cfg.batch_size):
                batch = collate([dataset[i] for i in range(s, min(s + cfg.batch_size, len(todo)))],
                                prepared.qformer_pad_id, prepared.pad_token_id or 0)
                for sample, (pred, n_visual) in zip(batch.samples, predictor.answers(batch, cfg.sampling)):
                    f.write(json.dumps({"question_id": sample.question_id, "video_id": sample.video_id,
                                        "question": sample.question, "pred": pred,
                                        "visual_tokens": n_visual}) + "\n")
                f.flush()
                summary.written += len(batch.samples)
                advance(len(batch.samples))
    summary.seconds = time.perf_counter() - start
    return summary
