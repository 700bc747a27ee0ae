"""Two ranks on CPU (torchrun, gloo): training, checkpoints, exact resume, the export, identical weights on
both ranks, the global loss in the metrics, and a NaN on one rank stopping both with the same message.

Each torchrun launch starts two Python processes that import torch, transformers and DeepSpeed, so the
launches are few: one run of 6 steps (through ``two_rank_driver.py``, which records each rank's local
losses and weights), one ``--resume`` from its step-4 checkpoint, and one run that meets a NaN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_store_with_overflow
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.long(minutes=2)

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
DRIVER = Path(__file__).resolve().parent / "two_rank_driver.py"
DUALFOCUS = Path(sys.executable).parent / "dualfocus"
# 30 samples in batches of 3 make 10 batches, 5 per rank and epoch: step 6 starts the second epoch.
RECIPE = ["--config", str(REPO / "configs" / "train_tiny.yaml"), "--no-progress", "save_every=2", "keep_checkpoints=3",
          "log_every=1", "data.batch_size=3", "data.max_frames=2", "data.num_workers=0", "optim.warmup_steps=4",
          "connector.ffp_dropout=0.1"]


def torchrun(log_dir: Path, *command, timeout: float = 600) -> subprocess.CompletedProcess:
    """Two local ranks; each rank's stdout/stderr go to files under ``log_dir`` (see ``rank_log``)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    # --monitor-interval: when one rank exits, torchrun stops the others at its next look; give a rank that
    # is about to print its own error the time to do so.
    args = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "--monitor-interval", "3",
            "--log-dir", str(log_dir), "--redirects", "3", *map(str, command)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)


def rank_log(log_dir: Path, rank: int, stream: str) -> str:
    (path,) = log_dir.glob(f"*/attempt_0/{rank}/{stream}.log")
    return path.read_text()


def expect_success(proc: subprocess.CompletedProcess, log_dir: Path) -> None:
    if proc.returncode != 0:
        logs = "\n".join(f"--- rank {r} stderr\n{rank_log(log_dir, r, 'stderr')[-3000:]}" for r in (0, 1))
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(toy_store, toy_corpus, tiny_model, tmp_path_factory) -> dict:
    """6 steps on two ranks in one go; then a fresh run dir holding only what that run had on disk after
    its step-4 checkpoint (config, checkpoint, metrics of steps 1-4) resumed to step 6 by the real CLI.
    A checkpoint is the same files whether the run went on or died after writing it."""
    root = tmp_path_factory.mktemp("two_ranks")
    train = ["train", toy_store, toy_corpus / "train.json", "--model", tiny_model, *RECIPE]
    whole, split, record = root / "whole", root / "split", root / "record"
    proc = torchrun(root / "logs_whole", DRIVER, record, *train, "--out", whole, "--max-steps", "6")
    expect_success(proc, root / "logs_whole")

    (split / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "train_config.yaml", split)
    shutil.copytree(whole / "checkpoints" / "step0000004", split / "checkpoints" / "step0000004")
    (split / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(whole) if m["step"] <= 4))
    proc = torchrun(root / "logs_split", DUALFOCUS, *train, "--out", split, "--max-steps", "6", "--resume")
    expect_success(proc, root / "logs_split")
    return {"whole": whole, "split": split, "record": record, "logs_whole": root / "logs_whole",
            "logs_split": root / "logs_split"}


def test_two_ranks_train_checkpoint_and_export(runs, toy_store):
    whole, logs = runs["whole"], runs["logs_whole"]
    out0, out1 = rank_log(logs, 0, "stdout"), rank_log(logs, 1, "stdout")
    # only rank 0 reports, with global figures: 6 steps x 3 samples x 2 ranks
    assert "steps: 6 | loss" in out0 and "samples: 36 in" in out0 and f"export: {whole / 'final'}" in out0
    assert "steps:" not in out1 and "export:" not in out1
    assert sorted(p.name for p in (whole / "checkpoints").glob("step*")) == ["step0000002", "step0000004",
                                                                            "step0000006"]
    for tag in ("step0000002", "step0000004", "step0000006"):
        folder = whole / "checkpoints" / tag
        assert {"client_state.pt", "rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= {f.name for f in folder.iterdir()}
        client = torch.load(folder / "client_state.pt", weights_only=False)
        assert (client["step"], client["micro_batches"], client["world"]) == (int(tag[4:]), int(tag[4:]), 2)
    meta = json.loads((whole / "final" / "dualfocus.json").read_text())
    assert (meta["step"], meta["llm_dtype"], meta["connector_dtype"], meta["max_question_tokens"]) == \
        (6, "float32", "float32", 64)


def test_both_ranks_hold_the_same_weights_after_every_checkpointed_step(runs):
    record = runs["record"]
    by_step = {}
    for step in (2, 4, 6):
        rank0 = load_file(str(record / f"rank0_step{step}.safetensors"))
        rank1 = load_file(str(record / f"rank1_step{step}.safetensors"))
        assert rank0.keys() == rank1.keys()
        assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
        by_step[step] = rank0
    # the weights moved between checkpoints (so the equality is not that of untouched weights) ...
    assert any(not torch.equal(by_step[2][k], by_step[6][k]) for k in by_step[2])
    # ... and the export is what both ranks held at the end
    exported = load_file(str(runs["whole"] / "final" / "connector.safetensors"))
    assert all(torch.equal(exported[k], by_step[6][k]) for k in exported)


def test_metrics_log_the_loss_averaged_over_ranks(runs):
    record = runs["record"]
    local = [[json.loads(x) for x in (record / f"rank{r}_losses.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(local[0]) == len(local[1]) == 6
    for a, b in zip(*local):  # each step, the ranks read different samples
        assert not set(a["indices"]) & set(b["indices"])
    logged = [m["loss"] for m in metrics(runs["whole"])]
    assert logged == pytest.approx([(a["loss"] + b["loss"]) / 2 for a, b in zip(*local)], abs=2e-6)
    assert any(abs(a["loss"] - b["loss"]) > 1e-3 for a, b in zip(*local))  # so the average is not trivially either


def test_resume_on_two_ranks_continues_exactly(runs):
    whole, split = runs["whole"], runs["split"]
    assert "steps: 6 (resumed at step 4)" in rank_log(runs["logs_split"], 0, "stdout")
    a = load_file(str(split / "final" / "connector.safetensors"))
    b = load_file(str(whole / "final" / "connector.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [(m["step"], m["loss"], m["lr"], m["epoch"]) for m in metrics(split)] == \
        [(m["step"], m["loss"], m["lr"], m["epoch"]) for m in metrics(whole)]
    assert [m["epoch"] for m in metrics(whole)] == [0, 0, 0, 0, 1, 1]  # the resumed steps cross an epoch


def test_resuming_with_another_number_of_processes_is_refused(runs):
    from dualfocus.pipeline.config import load_config
    from dualfocus.pipeline.errors import UserError
    from dualfocus.train.config import TrainConfig
    from dualfocus.train.loop import run_train

    cfg = load_config(TrainConfig, runs["split"] / "train_config.yaml")
    before = (runs["split"] / "train_config.yaml").read_text()
    with pytest.raises(UserError, match=r"^--resume: .*split was trained by 2 process\(es\), this run has 1; "
                                        r"resume with 2 "):
        run_train(cfg, resume=True, progress=False)
    assert (runs["split"] / "train_config.yaml").read_text() == before


@pytest.fixture(scope="module")
def store_with_an_overflowing_clip(toy_store, tmp_path_factory) -> Path:
    """The toy store plus one clip whose features are inf (as an fp16 overflow at extract leaves them)."""
    return copy_store_with_overflow(toy_store, tmp_path_factory.mktemp("overflow") / "store", n_frames=2)


def test_a_nan_on_one_rank_stops_both_with_the_same_message(store_with_an_overflowing_clip, toy_corpus, tiny_model,
                                                            tmp_path):
    toy = json.loads((toy_corpus / "train.json").read_text())
    # unshuffled batches of 2: rank 0 reads samples 0-1 then 4-5, rank 1 reads 2-3 then 6-7 (the inf clip),
    # so at step 2 only rank 1's own loss is NaN
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(toy[:6] + [{"video_id": "overflow_clip", "q": "What shape is it?", "a": "circle"}]
                             + toy[6:12]))
    run, logs = tmp_path / "run", tmp_path / "logs"
    proc = torchrun(logs, DUALFOCUS, "train", store_with_an_overflowing_clip, qa, "--model", tiny_model, "--out", run,
                    *RECIPE, "--max-steps", "4", "save_every=1", "data.batch_size=2", "data.shuffle=false",
                    timeout=300)  # a hang would end here, not in the CI job's timeout
    assert proc.returncode != 0
    expected = ("error: loss became nan at step 2; stopped without saving. "
                "Last good checkpoint: step0000001")
    for rank in (0, 1):
        errors = [line for line in rank_log(logs, rank, "stderr").splitlines() if line.startswith("error:")]
        assert errors == [expected], (rank, rank_log(logs, rank, "stderr")[-3000:])
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step0000001"]
    assert (run / "checkpoints" / "step0000001" / "client_state.pt").is_file()
    assert not (run / "final").exists()
    assert [m["step"] for m in metrics(run)] == [1]
