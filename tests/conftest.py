"""Shared fixtures: the tiny random model and a small toy corpus, built once per test run (under xdist, once
for all workers), and ``run_cli`` which runs the real ``dualfocus`` console script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Files marked ``long(minutes=M)`` (M: about how long the file takes here) go first, longest first; the rest
    keep their order. Under ``make test``'s two xdist workers a long file started last would leave one worker
    running it alone at the end."""
    def minutes(item) -> float:
        mark = item.get_closest_marker("long")
        return mark.kwargs.get("minutes", 1) if mark else 0

    items.sort(key=lambda item: -minutes(item))


def dualfocus_command() -> list[str]:
    """The installed console script next to this interpreter (falls back to ``python -m``)."""
    script = Path(sys.executable).parent / "dualfocus"
    return [str(script)] if script.exists() else [sys.executable, "-m", "dualfocus.cli"]


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``dualfocus ARGS`` and return the completed process (stdout/stderr as text)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([*dualfocus_command(), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"dualfocus {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, session, ...), or None when
    the process is gone (Linux)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder) -> Path`` run once per test run: under xdist the first worker to take the lock builds into the
    run's common temp folder and the others wait, then reuse it (the fixtures are read-only to the tests that use
    them; a test that changes one copies it first). Without xdist it builds into this session's temp folder."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / "shared"  # the folder every worker's basetemp sits in
    root.mkdir(exist_ok=True)
    done = root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way in another worker
            folder.mkdir()
            done.write_text(str(build(folder)))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random InstructBLIP-layout model directory (written by the library, as init-tiny does)."""
    from dualfocus.pipeline.tiny import write_tiny_model

    return built_once(tmp_path_factory, "tiny", lambda folder: write_tiny_model(folder / "model"))


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """A 12-clip toy corpus (videos/, train.json, test_q.json, test_a.json, corpus.csv)."""
    from dualfocus.pipeline.toy import make_toy_corpus

    def build(folder: Path) -> Path:
        make_toy_corpus(folder / "toy", n_videos=12, seed=3)
        return folder / "toy"

    return built_once(tmp_path_factory, "toy", build)


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory, tiny_model, toy_corpus) -> Path:
    """A zarr feature store of the toy corpus, made by the real extract stage (in-process, local Ray)."""
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config

    def build(folder: Path) -> Path:
        cfg = load_config(ExtractConfig, values={"corpus": str(toy_corpus / "videos"), "model": str(tiny_model),
                                                 "out": str(folder / "store")})
        summary = run_extract(cfg, progress=False)
        assert summary.ok == 12 and summary.failed == 0
        return folder / "store"

    return built_once(tmp_path_factory, "store", build)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model, toy_corpus, toy_store) -> Path:
    """RUN_DIR/final of a 6-step run with the shipped tiny recipe on the toy store (read-only to tests)."""

    def build(folder: Path) -> Path:
        run_cli("train", toy_store, toy_corpus / "train.json", "--model", tiny_model, "--out", folder / "run",
                "--config", "configs/train_tiny.yaml", "max_steps=6", "save_every=6", "data.batch_size=4",
                "data.num_workers=0", cwd=Path(__file__).parent.parent)
        return folder / "run" / "final"

    return built_once(tmp_path_factory, "trained", build)


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random SigLIP and DINOv2 towers (what `init-tiny --family` writes), for LongVU's two groups."""
    from dualfocus.encoders.tiny import write_tiny_encoder

    families = ("siglip", "dinov2")

    def build(folder: Path) -> Path:
        for family in families:
            write_tiny_encoder(folder / family, family)
        return folder

    root = built_once(tmp_path_factory, "encoders", build)
    return {family: root / family for family in families}


@pytest.fixture(scope="session")
def streams_store(tmp_path_factory, toy_corpus, tiny_model, tiny_encoders) -> Path:
    """The toy corpus with every stream the connectors read, from one `extract` run of the CLI (one decode, six
    groups; encoder groups in float32): eva (semantic, spatiotemporal), qavit (cut = hidden[1], QA-ViT's input: the
    tiny tower has 3 blocks), slowfast (grid = grid@8x8), siglip and dino (grid = grid@8x8, LongVU's) and pixels
    (112 px frames and boxes, Video-Panda's). Two shard writers, so every group is written in two slots."""
    def build(folder: Path) -> Path:
        run_cli("extract", toy_corpus / "videos", "--out", folder / "store", "--model", tiny_model,
                "--encoder", f"qavit={tiny_model}", "encoders.qavit.taps.cut=hidden[1]",
                "--encoder", f"slowfast={tiny_model}", "encoders.slowfast.taps.grid=grid@8x8",
                "--encoder", f"siglip={tiny_encoders['siglip']}", "encoders.siglip.taps.grid=grid@8x8",
                "--encoder", f"dino={tiny_encoders['dinov2']}", "encoders.dino.taps.grid=grid@8x8",
                "--pixels", "112", "store.dtype=float32", "--writers", "2", "store.videos_per_shard=4", "--no-progress")
        return folder / "store"

    return built_once(tmp_path_factory, "streams", build)


def connector_data(cfg, store: Path, qa: Path, model: Path, max_frames: int | None):
    """(dataset, prepared samples, collate) of what the connector ``cfg`` reads from ``store``, checked as train
    checks it (streams, shapes, taps)."""
    import functools

    from dualfocus.connectors.registry import connector_class
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset

    system = connector_class(cfg.name)
    expected = system.expected_streams(cfg, str(model))
    prepared = prepare_samples(str(store), str(qa), str(model), with_answers=True, expected=expected,
                               taps=system.expected_taps(cfg, str(model)))
    dataset = FeatureQADataset(str(store), prepared.samples, max_frames, tuple(expected))
    return dataset, prepared, functools.partial(collate, qformer_pad_id=prepared.qformer_pad_id,
                                                llm_pad_id=prepared.pad_token_id or 0)


def generate_then_ask(store: Path, export: Path, corpus: Path, work: Path) -> list[dict]:
    """``generate --greedy`` on two test questions of ``corpus``, then ``ask`` on the first one's video (both
    through the CLI from ``export`` alone) and the lmms-eval model on it; asserts all three agree and returns
    the predictions."""
    import json

    questions = json.loads((corpus / "test_q.json").read_text())[:2]
    (work / "q.json").write_text(json.dumps(questions))
    preds = work / "preds.jsonl"
    one_thread = {"OMP_NUM_THREADS": "1"}
    run_cli("generate", store, work / "q.json", "--checkpoint", export, "--out", preds, "--greedy",
            "sampling.max_new_tokens=3", "--no-progress", env=one_thread)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [str(q["question_id"]) for q in questions]
    video = corpus / "videos" / f"{rows[0]['video_id']}.mp4"
    proc = run_cli("ask", video, rows[0]["question"], "--checkpoint", export, "--greedy", "sampling.max_new_tokens=3",
                   env=one_thread)
    assert proc.stdout.strip() == rows[0]["pred"].strip()
    assert lmms_answer(export, video, rows[0]["question"], max_new_tokens=3) == rows[0]["pred"].strip()
    return rows


def lmms_answer(export: Path, video: Path, question: str, max_new_tokens: int) -> str:
    """The lmms-eval model's greedy answer (``evaluate/lmms_model.py``, called as lmms-eval calls it: one
    ``generate_until`` Instance, the video from ``doc_to_visual``), from the raw video."""
    from lmms_eval.api.instance import Instance

    from dualfocus.evaluate.lmms_model import DualFocusLMM

    lm = DualFocusLMM(checkpoint=str(export), batch_size="1", device="cpu")
    lm.task_dict = {"toy": {"test": [{"video": str(video)}]}}
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1},
                       arguments=(question, {"max_new_tokens": max_new_tokens, "do_sample": False, "until": ["\n\n"]},
                                  lambda doc: [doc["video"]], 0, "toy", "test"))
    (answer,) = lm.generate_until([request])
    return answer.strip()


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: the tiny model's ops are too small to share between threads, and on
    a busy CPU OpenMP threads waiting for each other make a step up to 10x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def store_fingerprint(store: Path) -> dict:
    """What an export records of a DualFocus store: the default group's fingerprint plus the sampling."""
    from dualfocus.store import FeatureStore
    from dualfocus.connectors.dualfocus import DUALFOCUS_STREAMS

    return FeatureStore.open(store).fingerprint(DUALFOCUS_STREAMS)


def copy_store_with_overflow(src: Path, dst: Path, n_frames: int, failed: str | None = None) -> Path:
    """A copy of the store ``src`` at ``dst`` plus what an extract run can also leave behind, written with
    the store's own writer: a video ``overflow_clip`` of ``n_frames`` frames whose features are inf (as an
    fp16 overflow leaves them) and, when ``failed`` names one, a failed video of that id."""
    import shutil

    import numpy as np

    from dualfocus.store import FeatureStore, GroupWriter

    shutil.copytree(src, dst)
    store = FeatureStore.open(dst)
    group = store.group_info("semantic")
    with GroupWriter(dst, group.name, taps=group.taps, fingerprint=group.fingerprint, sampling=store.sampling,
                     format=group.format) as writer:
        if failed:
            writer.add_failed(failed, f"videos/{failed}.mp4", "DecodeError: moov atom not found")
        writer.begin_video("overflow_clip", "videos/overflow_clip.mp4", {"n_frames": n_frames, "duration_s": float(n_frames)})
        writer.add_frames({name: np.full((n_frames, *tap.shape), np.inf, np.float32) for name, tap in group.taps.items()},
                          np.arange(n_frames, dtype=np.float32))
        writer.end_video()
    return dst
