"""Slow-Fast as a connector on the tiny model: the un-pooled grid from the store, fast tokens in the sequence,
slow tokens through the hybrid layers; what trains; padding; and the shipped default (bf16) through the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import connector_data, generate_then_ask, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = "encoders.slowfast.taps.grid=grid@8x8"


@pytest.fixture(scope="module")
def grid_store(streams_store) -> Path:
    """The toy corpus's 8x8 last-layer grids (group slowfast, float32), among other groups (conftest.py)."""
    return streams_store


@pytest.fixture(scope="module")
def parts(grid_store, toy_corpus, tiny_model):
    """(model, batch of 3 clips of different lengths, prepared) with the tiny recipe's connector config."""
    from dualfocus.connectors.registry import build_video_llm
    from dualfocus.connectors.slowfast import SlowFastConfig

    cfg = SlowFastConfig(grid_stream="slowfast.grid", grid_size=8, min_fast_frames=4)
    dataset, prepared, collate = connector_data(cfg, grid_store, toy_corpus / "train.json", tiny_model, 8)
    lengths = [s.n_frames for s in prepared.samples]
    picks = [lengths.index(n) for n in sorted(set(lengths))][:3]
    model = build_video_llm(cfg, str(tiny_model), seed=0).eval()
    return model, collate([dataset[i] for i in picks]), dataset, picks, collate


def set_alpha(model, value: float) -> None:
    with torch.no_grad():
        for alpha in model.connector.gate_parameters():
            alpha.fill_(value)


def test_fast_and_slow_token_counts_follow_the_strides(parts):
    model, batch, *_ = parts
    visual = model.connector.visual_tokens(batch, model.llm)
    slow, slow_mask = visual.layer_inputs
    for i, t in enumerate(batch.frame_mask.sum(1).tolist()):
        assert visual.mask[i].sum() == min(t, 4) * 16       # 8x8 grid, 2x2 pooled: 16 per frame; <= 4 fast frames
        assert slow_mask[i].sum() == t * 16                  # every frame, pooled, as slow tokens


def test_with_alpha_zero_the_llm_is_the_plain_frozen_llm(parts, tiny_model):
    """Exact in fp32: the same fast tokens through a separately loaded LLM (stock attention, no hybrid layers)."""
    from dualfocus.pipeline.models import load_llm

    model, batch, *_ = parts
    set_alpha(model, 0.0)
    plain = load_llm(tiny_model).eval()
    with torch.no_grad():
        visual = model.connector.visual_tokens(batch, model.llm)
        inputs = model.llm_inputs(visual, batch, with_labels=True)
        with model.connector.decoder_inputs(visual.layer_inputs, inputs):
            hybrid = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        reference = plain(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        set_alpha(model, 0.5)
        with model.connector.decoder_inputs(visual.layer_inputs, inputs):
            opened = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    assert torch.equal(hybrid, reference)
    assert not torch.allclose(opened, reference)
    set_alpha(model, 0.0)


def test_gradients_reach_the_projector_and_the_cross_attention_only(parts):
    model, batch, *_ = parts
    set_alpha(model, 0.5)
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).backward()
    named = dict(model.named_parameters())
    trainable = {k for k, p in named.items() if p.requires_grad}
    assert trainable and all(k.startswith(("connector.projector.", "connector.hybrid.cross.")) for k in trainable)
    assert all(named[k].grad is not None and named[k].grad.abs().sum() > 0 for k in trainable)
    assert all(p.grad is None for p in model.llm.parameters())
    state = model.connector.trainable_state_dict()
    assert {k.split(".")[-2] for k in state if k.startswith("hybrid.")} >= {"kv_proj", "gate_proj"}
    assert not [k for k in state if "layernorm" in k or k.startswith("llm")]
    model.zero_grad(set_to_none=True)
    model.eval()
    set_alpha(model, 0.0)


def test_batching_with_padding_never_changes_a_sample(parts):
    model, batch, dataset, picks, collate = parts
    set_alpha(model, 0.5)
    with torch.no_grad():
        alone = model(collate([dataset[picks[0]]]))
        for together in ([picks[0], picks[-1]], [picks[-1], picks[0]]):
            mixed = collate([dataset[i] for i in together])
            row = together.index(picks[0])
            one = replace(mixed, text_labels=[labels if i == row else [-100] * len(labels)
                                              for i, labels in enumerate(mixed.text_labels)])
            torch.testing.assert_close(model(one), alone, atol=1e-5, rtol=1e-5)
    set_alpha(model, 0.0)


def test_a_store_without_the_grid_is_refused_with_the_extract_command(toy_store, toy_corpus, tiny_model, tmp_path):
    proc = run_cli("train", str(toy_store), str(toy_corpus / "train.json"), "--model", str(tiny_model),
                   "--out", str(tmp_path / "run"), "--connector", "slowfast", "connector.grid_size=8", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"add them with: dualfocus extract CORPUS --out {toy_store} --encoder slowfast={tiny_model} \"{GRID}\"" \
        in proc.stderr


def test_default_precision_cli_train_then_generate_and_ask(grid_store, toy_corpus, tiny_model, tmp_path):
    """The shipped defaults (bf16) with --connector slowfast; generate and ask rebuild it from final/ alone (the
    hybrid layers included) and agree under greedy decoding."""
    store = tmp_path / "store"
    shutil.copytree(grid_store, store)
    run = tmp_path / "run"
    run_cli("train", str(store), str(toy_corpus / "train.json"), "--model", str(tiny_model), "--out", str(run),
            "--connector", "slowfast", "connector.grid_stream=slowfast.grid", "connector.grid_size=8",
            "connector.min_fast_frames=4", "max_steps=2",
            "save_every=2", "data.batch_size=2", "data.max_frames=4", "data.num_workers=0", "--no-progress",
            env={"OMP_NUM_THREADS": "1"})
    meta = json.loads((run / "final" / "dualfocus.json").read_text())
    assert (meta["connector"], meta["llm_dtype"], meta["streams"]) == ("slowfast", "bfloat16", ["slowfast.grid"])
    generate_then_ask(store, run / "final", toy_corpus, tmp_path)
