"""``run_train`` in-process (one DeepSpeed group for the whole pytest process): exact resume, the
annotation join's counts, and the stop on a non-finite loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_store_with_overflow
import torch

from dualfocus.pipeline.config import load_config
from dualfocus.pipeline.errors import UserError
from dualfocus.train.config import TrainConfig
from dualfocus.train.loop import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def extended_store(toy_store, tmp_path_factory) -> Path:
    """The toy store plus what an extract run can also leave behind: a failed video and a video whose
    features overflowed to inf (both written with the store's own writer)."""
    return copy_store_with_overflow(toy_store, tmp_path_factory.mktemp("extended") / "store", n_frames=3,
                                    failed="broken_clip")




def write_annotations(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def train_config(store: Path, annotations: Path, model: Path, out: Path, max_steps: int,
                 *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "train_tiny.yaml",
                       ["data.batch_size=2", "data.max_frames=2", "data.num_workers=0", "log_every=1", *overrides],
                       {"store": str(store), "annotations": str(annotations), "model": str(model), "out": str(out),
                        "max_steps": max_steps})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(extended_store, toy_corpus, tiny_model, tmp_path):
    """10 steps, then --resume to 20, ends with the very same weights as 20 steps in one go.

    12 usable samples in batches of 2 make 6 batches per epoch, so the resumed half starts mid-epoch and
    crosses two epoch boundaries; warmup lasts 15 steps, so it starts mid-warmup; dropout is on in the
    Q-Former and the FFP, so the RNG must be restored too.
    """
    toy = json.loads((toy_corpus / "train.json").read_text())[:12]
    extra = [{"video_id": "broken_clip", "q": "What shape is it?", "a": "circle"},
             {"video_id": "never_extracted", "q": "What color is it?", "a": "red"},
             {"video_id": "never_extracted.mp4", "q": "Where does it go?", "a": "up"}]
    annotations = write_annotations(tmp_path / "qa.json", toy[:5] + extra + toy[5:])
    overrides = ("optim.warmup_steps=15", "save_every=5", "connector.ffp_dropout=0.1")
    split, whole = tmp_path / "split", tmp_path / "whole"

    first = run_train(train_config(extended_store, annotations, tiny_model, split, 10, *overrides), progress=False)
    second = run_train(train_config(extended_store, annotations, tiny_model, split, 20, *overrides), resume=True,
                       progress=False)
    full = run_train(train_config(extended_store, annotations, tiny_model, whole, 20, *overrides), progress=False)

    assert (first.start_step, first.steps, second.start_step, second.steps) == (0, 10, 10, 20)
    assert first.usable == full.usable == ("annotations: 15 | usable 12 | video not in store 2 | "
                                           "video failed at extract 1")
    assert (second.samples, full.samples) == (20, 40)

    from safetensors.torch import load_file

    a = load_file(str(split / "final" / "connector.safetensors"))
    b = load_file(str(whole / "final" / "connector.safetensors"))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert differing == []
    # the weights did move (the gates start at 0), so the equality above is not trivially true
    assert not torch.equal(a["ffp.blocks.0.gate"], torch.zeros(1))

    m_split, m_whole = metrics(split), metrics(whole)
    assert [m["step"] for m in m_split] == list(range(1, 21))
    assert [(m["loss"], m["lr"], m["epoch"]) for m in m_split] == [(m["loss"], m["lr"], m["epoch"]) for m in m_whole]
    # linear warmup over 15 steps from lr/15, then constant; each line holds the rate its step used
    assert [m["lr"] for m in m_whole] == pytest.approx([1e-3 * min(1.0, s / 15) for s in range(1, 21)])
    assert [m["epoch"] for m in m_whole] == [s // 6 for s in range(1, 21)]
    # save_every=5 and keep_checkpoints=2: the two newest checkpoints are kept
    assert sorted(p.name for p in (split / "checkpoints").glob("step*")) == ["step0000015", "step0000020"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(extended_store, toy_corpus, tiny_model, tmp_path):
    toy = json.loads((toy_corpus / "train.json").read_text())
    overflow = [{"video_id": "overflow_clip", "q": "What shape is it?", "a": "circle"}] * 2
    # no shuffling: steps 1 and 2 read normal clips, step 3 the clip whose features are inf
    annotations = write_annotations(tmp_path / "qa.json", toy[:4] + overflow + toy[4:8])
    run = tmp_path / "run"
    cfg = train_config(extended_store, annotations, tiny_model, run, 5, "data.shuffle=false", "save_every=1",
                       "keep_checkpoints=3")
    with pytest.raises(UserError) as err:
        run_train(cfg, progress=False)
    message = str(err.value)
    assert "loss became nan at step 3" in message and "Last good checkpoint: step0000002" in message
    assert "\n" not in message
    assert sorted(p.name for p in (run / "checkpoints").glob("step*")) == ["step0000001", "step0000002"]
    assert (run / "checkpoints" / "step0000002" / "client_state.pt").is_file()
    assert not (run / "final").exists()
    assert [m["step"] for m in metrics(run)] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in metrics(run))
