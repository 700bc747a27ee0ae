"""DualFocus in QA-ViT mode as a connector: the cut stream from the store, the question-aware top blocks, what
trains, and the shipped default (bf16) through the real CLI: extract the cut, train, generate, ask."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dualfocus.pipeline.errors import UserError
from conftest import connector_data, generate_then_ask, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

START = 1  # depth // 2 of the tiny tower's 3 blocks
CUT = f"encoders.qavit.taps.cut=hidden[{START}]"


@pytest.fixture(scope="module")
def cut_store(streams_store) -> Path:
    """The toy corpus in float32 with eva (semantic, spatiotemporal) and qavit (the cut entering block 1), among
    other groups (conftest.py)."""
    return streams_store


def test_top_blocks_from_the_stored_cut_reproduce_the_stored_vision_output(cut_store, tiny_model):
    """Question path off, gates 0: blocks 1..2 and the final norm, run on the cached cut, give the post-LN output
    the store holds (fp32, as the encoder computed it in extract)."""
    from dualfocus.connectors.qavit import QuestionAwareTop
    from dualfocus.pipeline.models import load_config, load_vision_model
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(cut_store)
    top = QuestionAwareTop(load_vision_model(tiny_model), START, load_config(tiny_model).text_config.hidden_size)
    for video in store.video_ids()[:3]:
        feats = store.read(video, streams=["cut", "semantic"])
        assert feats["cut"].dtype == np.float32 and feats["semantic"].dtype == np.float32
        with torch.no_grad():
            out = top(torch.from_numpy(feats["cut"]))
        torch.testing.assert_close(out, torch.from_numpy(feats["semantic"]), atol=1e-5, rtol=1e-5)
    assert not np.allclose(feats["cut"], feats["semantic"], atol=1e-2)  # the blocks do something


@pytest.fixture(scope="module")
def qavit_parts(cut_store, toy_corpus, tiny_model):
    from dualfocus.connectors.dualfocus import DualFocusQAViTConfig
    from dualfocus.connectors.registry import build_video_llm

    cfg = DualFocusQAViTConfig(ffp_heads=2, gate_init=1.0)
    dataset, _, collate = connector_data(cfg, cut_store, toy_corpus / "train.json", tiny_model, 3)
    return build_video_llm(cfg, str(tiny_model), seed=0), collate([dataset[i] for i in range(3)])


def test_gradients_reach_the_adapters_qformer_and_ffp_only(qavit_parts):
    model, batch = qavit_parts
    model.train()
    model.zero_grad(set_to_none=True)
    model(batch).backward()
    connector = model.connector
    for block in connector.qavit.blocks:
        assert all(p.grad is None and not p.requires_grad for p in block.block.parameters())   # frozen ViT block
        assert all(p.grad is not None for p in block.question_proj.parameters())
        assert all(p.grad is not None for p in block.parallel_mlp.parameters())
        assert block.gate.grad is not None and block.gate.grad.abs().item() > 0   # tanh'(0) = 1: the gate can open
    assert all(p.grad is None for p in connector.qavit.post_layernorm.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None for p in connector.semantic.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in connector.ffp.parameters())
    state = connector.trainable_state_dict()
    assert "qavit.blocks.0.gate" in state and "qavit.blocks.1.question_proj.fc1.weight" in state
    assert not [k for k in state if ".block." in k or k.startswith("qavit.post_layernorm")]  # from the base model
    assert set(connector.gate_parameters()) >= {block.gate for block in connector.qavit.blocks}
    model.zero_grad(set_to_none=True)
    model.eval()


def test_the_question_reaches_the_vision_features(qavit_parts):
    from dataclasses import replace

    model, batch = qavit_parts
    other = replace(batch, question_ids=batch.question_ids.flip(0), question_mask=batch.question_mask.flip(0))
    with torch.no_grad():
        a = model.connector.semantic_frames(batch.streams["cut"], batch, model.llm)
        b = model.connector.semantic_frames(batch.streams["cut"], other, model.llm)
    assert (a[batch.frame_mask] - b[batch.frame_mask]).abs().max() > 1e-4
    assert (a[~batch.frame_mask] == 0).all()


def test_a_cut_at_the_wrong_block_is_refused_naming_both(cut_store, toy_corpus, tiny_model):
    from dualfocus.data.prepare import prepare_samples

    expected = {"cut": (257, 64), "spatiotemporal": (64, 64)}
    prepare_samples(str(cut_store), str(toy_corpus / "train.json"), str(tiny_model), with_answers=True,
                    expected=expected, taps={"cut": "hidden[-3]"})   # the same layer counted from the end
    with pytest.raises(UserError, match=r"has the wrong cut for this connector: cut holds hidden\[1\], not hidden\[2\]"):
        prepare_samples(str(cut_store), str(toy_corpus / "train.json"), str(tiny_model), with_answers=True,
                        expected=expected, taps={"cut": "hidden[2]"})


def test_a_store_without_the_cut_is_refused_with_the_extract_command(toy_store, toy_corpus, tiny_model, tmp_path):
    proc = run_cli("train", str(toy_store), str(toy_corpus / "train.json"), "--model", str(tiny_model),
                   "--out", str(tmp_path / "run"), "--connector", "dualfocus-qavit", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"lacks the stream(s) cut this connector reads (it has eva.semantic, eva.spatiotemporal); add them with: " \
           f"dualfocus extract CORPUS --out {toy_store} --encoder qavit={tiny_model} \"{CUT}\"" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_default_precision_cli_train_then_generate_and_ask(cut_store, toy_corpus, tiny_model, tmp_path):
    """The shipped defaults (bf16 LLM, the bf16 DeepSpeed JSON) with --connector dualfocus-qavit; then generate
    and ask rebuild the connector from final/ alone and agree on a video under greedy decoding."""
    store = tmp_path / "store"
    shutil.copytree(cut_store, store)
    run = tmp_path / "run"
    run_cli("train", str(store), str(toy_corpus / "train.json"), "--model", str(tiny_model), "--out", str(run),
            "--connector", "dualfocus-qavit", "max_steps=2", "save_every=2", "data.batch_size=2",
            "data.max_frames=3", "data.num_workers=0", "--no-progress", env={"OMP_NUM_THREADS": "1"})
    meta = json.loads((run / "final" / "dualfocus.json").read_text())
    assert (meta["connector"], meta["llm_dtype"], meta["streams"]) == ("dualfocus-qavit", "bfloat16",
                                                                       ["cut", "spatiotemporal"])
    assert meta["connector_config"]["question_tokens"] == 32 and meta["connector_config"]["start_block"] is None
    generate_then_ask(store, run / "final", toy_corpus, tmp_path)
