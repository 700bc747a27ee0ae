"""Checks that run before the LLM loads: connector vs model widths, the DeepSpeed JSON's precision vs
``llm_dtype``, and samples too long for the LLM's context (unit, then through the real CLI)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from dualfocus.pipeline.config import load_config
from dualfocus.pipeline.errors import UserError
from dualfocus.connectors.limits import ModelLimits, check_context_length, question_problems, sequence_length
from dualfocus.train.config import TrainConfig
from dualfocus.data.samples import Tokenised
from dualfocus.train.loop import deepspeed_config

REPO = Path(__file__).resolve().parent.parent
LIMITS = ModelLimits(llm_width=64, llm_positions=200, qformer_positions=512, query_tokens=32)


def model_copy(tiny_model: Path, dest: Path, **text_config) -> Path:
    """The tiny model with some ``text_config`` values changed (same weights)."""
    shutil.copytree(tiny_model, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["text_config"].update(text_config)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def sample(n_frames: int, text: int, video: str = "vid", question: str = "What is it?") -> Tokenised:
    return Tokenised(video_id=video, n_frames=n_frames, qformer_ids=[1, 2], prefix_ids=[1] * 10,
                     text_ids=[2] * (text - 10), text_labels=[-100] * (text - 10), question=question)


# ---------------------------------------------------------------- connector vs model
def test_limits_come_from_the_model_config(tiny_model):
    assert ModelLimits.of(str(tiny_model)) == ModelLimits(llm_width=64, llm_positions=2048, qformer_positions=512,
                                                         query_tokens=32)


def test_heads_that_do_not_divide_the_width_and_too_long_questions_are_named(tiny_model):
    from dualfocus.connectors.dualfocus import DualFocus, DualFocusConfig

    assert question_problems(LIMITS, 64) == [] and DualFocus.model_problems(DualFocusConfig(ffp_heads=8), tiny_model) == []
    assert DualFocus.model_problems(DualFocusConfig(ffp_heads=6), tiny_model) == [
        "connector.ffp_heads (6) must divide the LLM width (64, text_config.hidden_size)"]
    assert question_problems(LIMITS, 600) == ["data.max_question_tokens (600) exceeds the Q-Former's 512 positions "
                                              "(qformer_config.max_position_embeddings)"]


def test_build_refuses_bad_heads_before_loading_the_llm(tiny_model, monkeypatch):
    import dualfocus.pipeline.models as models
    from dualfocus.connectors.dualfocus import DualFocusConfig as ConnectorConfig
    from dualfocus.connectors.dualfocus import build_dualfocus

    def no_load(*args, **kwargs):
        raise AssertionError("the LLM was loaded before the cheap check")

    monkeypatch.setattr(models, "load_llm", no_load)
    with pytest.raises(UserError, match=r"connector.ffp_heads \(6\) must divide the LLM width \(64"):
        build_dualfocus(str(tiny_model), ConnectorConfig(ffp_heads=6))


# ---------------------------------------------------------------- context length
def test_sequence_length_counts_prefix_capped_frames_and_text():
    assert sequence_length(sample(n_frames=9, text=40), None, 32) == (9, 40 + 9 * 32)
    assert sequence_length(sample(n_frames=9, text=40), 4, 32) == (4, 40 + 4 * 32)
    assert sequence_length(sample(n_frames=3, text=40), 4, 32) == (3, 40 + 3 * 32)


def test_too_long_samples_are_refused_with_the_numbers_and_a_cap_that_fits():
    samples = [sample(2, 40), sample(6, 40, "long_a"), sample(8, 50, "long_b", "Where does it go?")]
    check_context_length(samples, 2, LIMITS)  # 40 + 2·32 = 104 and 50 + 64 = 114 fit in 200
    with pytest.raises(UserError) as err:
        check_context_length(samples, None, LIMITS)
    message = str(err.value)
    assert message == ("2 of 3 samples exceed the LLM's context of 200 tokens (text_config.max_position_embeddings): "
                       "question 'Where does it go?' on video long_b needs 8 frames (data.max_frames=null) x 32 "
                       "visual tokens + 50 text tokens = 306; set data.max_frames to at most 4")
    check_context_length(samples, 4, LIMITS)  # the advice holds: 50 + 4·32 = 178 (and 40 + 4·32)
    with pytest.raises(UserError, match="^1 of 3 samples .* long_b needs 5 frames .data.max_frames=5. "):
        check_context_length(samples, 5, LIMITS)


def test_generation_counts_the_new_tokens_and_text_too_long_for_one_frame_is_named():
    with pytest.raises(UserError, match=r"needs 3 frames \(max_frames=null\) x 32 visual tokens \+ 140 text tokens "
                                        r"\(incl. 100 to generate\) = 236; set max_frames to at most 1$"):
        check_context_length([sample(3, 40)], None, LIMITS, new_tokens=100, frames_key="max_frames")
    with pytest.raises(UserError, match="even one frame does not fit next to 190 text tokens"):
        check_context_length([sample(1, 190)], 1, LIMITS)


# ---------------------------------------------------------------- precision
def base_config(tmp_path: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, overrides,
                       {"store": "s", "annotations": "a.json", "model": "m", "out": str(tmp_path / "run")})


@pytest.mark.parametrize("llm_dtype, bf16, fp16", [("bfloat16", True, False), ("float16", False, True),
                                                   ("float32", False, False)])
def test_precision_sections_follow_llm_dtype(tmp_path, llm_dtype, bf16, fp16):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}, "fp16": {"loss_scale_window": 100}}')
    ds = deepspeed_config(base_config(tmp_path, f"llm_dtype={llm_dtype}", f"deepspeed={path}"), world=1)
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16)
    assert ds["fp16"]["loss_scale_window"] == 100  # the rest of a section is kept


def test_shipped_deepspeed_jsons_agree_with_their_recipes(tmp_path):
    paper = load_config(TrainConfig, REPO / "configs" / "train_paper.yaml", (),
                        {"store": "s", "annotations": "a.json", "model": "m", "out": str(tmp_path / "run")})
    tiny = load_config(TrainConfig, REPO / "configs" / "train_tiny.yaml", (),
                       {"store": "s", "annotations": "a.json", "model": "m", "out": str(tmp_path / "run")})
    assert deepspeed_config(paper, world=8)["bf16"]["enabled"] is True
    assert deepspeed_config(tiny, world=1)["bf16"]["enabled"] is False
    assert deepspeed_config(base_config(tmp_path), world=1)["bf16"]["enabled"] is True  # the defaults agree too


@pytest.mark.parametrize("content, llm_dtype, named", [
    ('{"bf16": {"enabled": true}}', "float32", "bf16.enabled=true disagrees with llm_dtype=float32"),
    ('{"bfloat16": {"enabled": true}}', "float16", "bfloat16.enabled=true disagrees with llm_dtype=float16"),
    ('{"fp16": {"enabled": false}}', "float16", "fp16.enabled=false disagrees with llm_dtype=float16"),
    ('{"bf16": true}', "bfloat16", "'bf16' must be an object"),
])
def test_a_json_that_enables_another_precision_is_refused(tmp_path, content, llm_dtype, named):
    path = tmp_path / "ds.json"
    path.write_text(content)
    with pytest.raises(UserError) as err:
        deepspeed_config(base_config(tmp_path, f"llm_dtype={llm_dtype}", f"deepspeed={path}"), world=1)
    assert named in str(err.value) and str(path) in str(err.value)


# ---------------------------------------------------------------- through the real CLI
def test_cli_refuses_precision_mismatch_and_too_long_samples_before_loading(toy_store, toy_corpus, tiny_model,
                                                                           tmp_path):
    """The shipped tiny recipe with a default bf16 JSON, then a model whose context the clips overflow."""
    base = ["train", toy_store, toy_corpus / "train.json", "--config", REPO / "configs" / "train_tiny.yaml",
            "--no-progress"]
    proc = run_cli(*base, "--model", tiny_model, "--out", tmp_path / "a", "deepspeed=configs/ds_zero2_bf16.json",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "ds_zero2_bf16.json: bf16.enabled=true disagrees with llm_dtype=float32" in proc.stderr

    short = model_copy(tiny_model, tmp_path / "short_context", max_position_embeddings=128)
    proc = run_cli(*base, "--model", short, "--out", tmp_path / "b", "data.max_frames=null", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("error: ") and "exceed the LLM's context of 128 tokens" in line
    assert "(data.max_frames=null) x 32 visual tokens" in line and "set data.max_frames to at most 2" in line
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.parametrize("overrides, short_context, named", [
    (["connector.ffp_heads=6"], False, "connector.ffp_heads (6) must divide the LLM width"),
    (["data.max_question_tokens=600"], False, "data.max_question_tokens (600) exceeds"),
    (["deepspeed=configs/ds_zero2_bf16.json"], False, "bf16.enabled=true disagrees with llm_dtype=float32"),
    (["data.max_frames=null"], True, "set data.max_frames to at most 2"),
])
def test_run_train_checks_before_starting_deepspeed_or_loading_the_llm(toy_store, toy_corpus, tiny_model, tmp_path,
                                                                      monkeypatch, overrides, short_context, named):
    import dualfocus.pipeline.models as models
    import dualfocus.train.loop as loop

    def too_early(*args, **kwargs):
        raise AssertionError("reached before the cheap checks ran")

    monkeypatch.setattr(models, "load_llm", too_early)
    monkeypatch.setattr(loop, "init_distributed", too_early)
    model = model_copy(tiny_model, tmp_path / "short", max_position_embeddings=128) if short_context else tiny_model
    cfg = load_config(TrainConfig, REPO / "configs" / "train_tiny.yaml", overrides,
                      {"store": str(toy_store), "annotations": str(toy_corpus / "train.json"), "model": str(model),
                       "out": str(tmp_path / "run")})
    with pytest.raises(UserError, match=re.escape(named)):
        loop.run_train(cfg, progress=False)
    assert not (tmp_path / "run").exists()
