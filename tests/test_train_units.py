"""Pieces of the training loop that need no model: batch order, LR schedule, DeepSpeed JSON, resume checks."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import yaml

from dualfocus.pipeline.config import ConfigError, load_config, save_config
from dualfocus.pipeline.errors import UserError
from dualfocus.train.config import TrainConfig
from dualfocus.train.loop import check_resume, deepspeed_config, save_run_config, warmup_then_constant
from dualfocus.train.sampler import ResumableBatches

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- batch order
def take(batches: ResumableBatches, k: int) -> list[list[int]]:
    return list(islice(batches, k))


def test_each_epoch_is_a_seeded_permutation_cut_into_batches():
    batches = ResumableBatches(10, 4, seed=7)
    assert batches.batches_per_epoch == 3
    epochs = [take(batches, 3), take(batches, 3)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [4, 4, 2]
        assert sorted(sum(epoch, [])) == list(range(10))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    assert take(ResumableBatches(10, 4, seed=7), 6) == epochs[0] + epochs[1]  # same seed, same order
    assert take(ResumableBatches(10, 4, seed=8), 3) != epochs[0]
    assert take(ResumableBatches(10, 4, seed=7, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("stop", [0, 1, 2, 3, 4, 7])
def test_resuming_at_a_position_continues_the_same_sequence(stop):
    reference = take(ResumableBatches(10, 4, seed=3), 12)
    first = ResumableBatches(10, 4, seed=3)
    head = take(first, stop)
    resumed = ResumableBatches(10, 4, seed=3, position=first.position)
    assert head + take(resumed, 12 - stop) == reference
    # the loop resumes from a count of micro-batches; that count maps to the same position
    per_epoch = first.batches_per_epoch
    assert first.position in {(stop // per_epoch, stop % per_epoch), (stop // per_epoch - 1, per_epoch)}


def test_ranks_take_disjoint_shares_of_whole_rounds():
    ranks = [take(ResumableBatches(11, 2, seed=1, rank=r, world=2), 3) for r in range(2)]
    single = take(ResumableBatches(11, 2, seed=1), 6)
    # 6 batches per epoch for one process; two ranks take alternate batches of the same order
    assert ranks[0] == single[0::2] and ranks[1] == single[1::2]
    assert ResumableBatches(11, 2, seed=1, rank=1, world=2).batches_per_epoch == 3


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        ResumableBatches(0, 4, seed=0)


# ---------------------------------------------------------------- learning-rate schedule
def test_warmup_is_linear_then_constant():
    factor = warmup_then_constant(4)
    assert [factor(s) for s in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert [warmup_then_constant(0)(s) for s in range(3)] == [1.0, 1.0, 1.0]


def test_scheduler_rates_step_by_step():
    import torch

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_constant(5))
    rates = []
    for _ in range(7):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3, 1e-3])


# ---------------------------------------------------------------- configs
def base_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "train_tiny.yaml", overrides,
                       {"store": "s", "annotations": "a.json", "model": "m", "out": str(tmp_path / "run")})


def test_shipped_train_config_loads(tmp_path):
    cfg = base_config(tmp_path)
    assert cfg.llm_dtype == "float32" and cfg.data.num_workers == 1 and cfg.optim.lr == 1e-3


def test_unknown_and_bad_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.bogus"):
        base_config(tmp_path, "optim.bogus=1")
    with pytest.raises(ConfigError) as err:
        base_config(tmp_path, "optim.lr=-1", "data.batch_size=0", "data.cache_mb=-5")
    assert all(key in str(err.value) for key in ("optim.lr", "data.batch_size", "data.cache_mb"))


def test_deepspeed_json_gets_batch_accumulation_and_clipping(tmp_path):
    cfg = base_config(tmp_path, "data.batch_size=3", "optim.grad_accum=2", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg, world=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"],
            ds["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 2},\n "optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
    ('{"zero_optimization": {"stage": 2}\n "bf16": {}}', r"malformed JSON at line 2, column 2"),
])
def test_bad_deepspeed_json_is_refused(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        deepspeed_config(base_config(tmp_path, f"deepspeed={path}"), world=1)


def fake_finished_run(cfg: TrainConfig) -> Path:
    """A run dir as `run_train` leaves it: the saved config and one complete checkpoint."""
    run = Path(cfg.out)
    save_run_config(cfg, run)
    (run / "checkpoints" / "step0000004").mkdir(parents=True)
    (run / "checkpoints" / "step0000004" / "client_state.pt").write_bytes(b"")
    return run


def test_fresh_run_into_a_finished_run_dir_is_refused(tmp_path):
    cfg = base_config(tmp_path)
    check_resume(cfg, Path(cfg.out), resume=False)  # nothing there yet
    run = fake_finished_run(cfg)
    with pytest.raises(UserError, match="already holds a training run; pass --resume"):
        check_resume(cfg, run, resume=False)
    check_resume(cfg, run, resume=True)


def test_resume_with_another_config_names_every_differing_key(tmp_path):
    run = fake_finished_run(base_config(tmp_path))
    # keys that do not change what is trained may differ
    check_resume(base_config(tmp_path, "max_steps=900", "data.num_workers=0", "data.cache_mb=0", "log_every=3"), run,
                 resume=True)
    with pytest.raises(UserError) as err:
        check_resume(base_config(tmp_path, "optim.lr=0.5", "connector.ffp_blocks=1"), run, resume=True)
    message = str(err.value)
    assert "optim.lr (0.001 -> 0.5)" in message and "connector.ffp_blocks (2 -> 1)" in message
    assert "data.batch_size" not in message


@pytest.mark.parametrize("recipe, key", [("slowfast", "temporal_stride"), ("longvu", "depth"),
                                         ("videopanda", "heads"), ("qavit", "ffp_blocks")])
def test_a_run_of_any_connector_resumes_and_still_names_a_changed_key(tmp_path, recipe, key):
    """The defaults that fill keys a saved config lacks are its own connector's: they once came from DualFocus's,
    so every other connector's run was refused on --resume (``connector.ffp_blocks (2 -> None)``, ...)."""
    def config(*overrides: str) -> TrainConfig:
        return load_config(TrainConfig, REPO / "configs" / f"train_{recipe}_tiny.yaml", overrides,
                           {"store": "s", "annotations": "a.json", "model": "m", "out": str(tmp_path / "run")})

    run = fake_finished_run(config())
    check_resume(config("max_steps=900"), run, resume=True)
    value = getattr(config().connector, key)
    with pytest.raises(UserError, match=rf"connector\.{key} \({value} -> {2 * value}\)"):
        check_resume(config(f"connector.{key}={2 * value}"), run, resume=True)
    with pytest.raises(UserError, match=r"connector\.name \("):
        check_resume(base_config(tmp_path), run, resume=True)


def test_a_run_saved_before_a_key_existed_resumes_with_that_keys_default(tmp_path):
    import yaml

    run = fake_finished_run(base_config(tmp_path))
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    del saved["data"]["max_question_tokens"], saved["connector"]["gate_kind"]  # as an older version wrote it
    (run / "train_config.yaml").write_text(yaml.safe_dump(saved))
    check_resume(base_config(tmp_path), run, resume=True)
    with pytest.raises(UserError, match=r"data.max_question_tokens \(64 -> 32\)"):
        check_resume(base_config(tmp_path, "data.max_question_tokens=32"), run, resume=True)


def test_resume_compares_paths_not_how_they_were_written(tmp_path, monkeypatch):
    """A run started with relative paths resumes when they are given absolute, and from another directory; an
    older run dir whose saved paths are relative resumes from the directory it was started in."""
    monkeypatch.chdir(tmp_path)
    run = fake_finished_run(base_config(tmp_path))  # store "s", model "m": relative to tmp_path
    absolute = {"store": str(tmp_path / "s"), "model": str(tmp_path / "m"), "annotations": str(tmp_path / "a.json")}
    check_resume(base_config(tmp_path, *(f"{k}={v}" for k, v in absolute.items())), run, resume=True)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    check_resume(base_config(tmp_path, "store=../s", "model=../m", "annotations=../a.json"), run, resume=True)
    with pytest.raises(UserError, match=r"store \("):  # the same relative name here is another store
        check_resume(base_config(tmp_path, "model=../m", "annotations=../a.json"), run, resume=True)
    monkeypatch.chdir(tmp_path)
    save_config(base_config(tmp_path), run / "train_config.yaml")  # as written before paths were saved absolute
    check_resume(base_config(tmp_path, *(f"{k}={v}" for k, v in absolute.items())), run, resume=True)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    cfg = base_config(tmp_path)
    save_config(cfg, Path(cfg.out) / "train_config.yaml")
    incomplete = Path(cfg.out) / "checkpoints" / "step0000002"
    incomplete.mkdir(parents=True)  # client_state.pt missing: the save was interrupted
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        check_resume(cfg, Path(cfg.out), resume=True)


def test_saved_config_round_trips(tmp_path):
    cfg = base_config(tmp_path, "optim.betas=[0.8, 0.9]")
    path = save_config(cfg, tmp_path / "c.yaml")
    assert load_config(TrainConfig, path) == cfg
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.8, 0.9]
    assert json.loads(json.dumps(yaml.safe_load(path.read_text())))  # plain data only
