"""The whole DualFocus composition on the tiny model: padding, labels, what trains and what is saved."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.dualfocus import DualFocusConfig, build_dualfocus
from dualfocus.connectors.prompt import IGNORE_INDEX, PromptBuilder
from dualfocus.data.batch import collate
from dualfocus.data.samples import tokenise
from dualfocus.pipeline.qa import QAItem

TRAINABLE_PREFIXES = ("semantic.", "time_embedding.", "ffp.")  # the DualFocus connector's three parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, M, D_V = 257, 64, 64  # tiny model: 224 px frames, 14 px patches, vision width 64




@pytest.fixture(scope="module")
def parts(tiny_model):
    """(model, tokenised samples, qformer pad id): a short and a long clip with different questions."""
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer

    model = build_dualfocus(str(tiny_model), DualFocusConfig(ffp_blocks=2, ffp_heads=8), seed=0)
    q_tok = load_qformer_tokenizer(tiny_model)
    items = [QAItem("short", "What color is the shape?", "red"),
             QAItem("long", "Which direction does the moving object go in the video?", "it moves to the left")]
    samples = tokenise(items, {"short": 2, "long": 4}, PromptBuilder(load_llm_tokenizer(tiny_model)), q_tok,
                       with_answers=True)
    return model, samples, q_tok.pad_token_id


def item(sample, index: int, seed: int) -> dict:
    """A dataset item with random features of the sample's frame count."""
    g = torch.Generator().manual_seed(seed)
    t = sample.n_frames
    return {"semantic": torch.randn(t, P, D_V, generator=g), "spatiotemporal": torch.randn(t, M, D_V, generator=g),
            "sample": sample, "index": index}


def per_sample_losses(model, batch) -> torch.Tensor:
    """Mean answer-token cross-entropy of each row, [b]."""
    inputs = model.llm_inputs(model.connector.visual_tokens(batch, model.llm), batch, with_labels=True)
    logits = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    labels = inputs.labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                           reduction="none")
    return ce.sum(1) / (labels != IGNORE_INDEX).sum(1)


@pytest.fixture
def open_gates(parts):
    """Gates at 0.5 so the motion stream (and its padding) reaches the LLM; reset afterwards."""
    model = parts[0]
    with torch.no_grad():
        for block in model.connector.ffp.blocks:
            block.gate.fill_(0.5)
    yield model
    with torch.no_grad():
        for block in model.connector.ffp.blocks:
            block.gate.zero_()


@pytest.mark.parametrize("position", [0, 1])
def test_padding_never_changes_a_samples_output(parts, open_gates, position):
    model, samples, pad_id = parts
    model.eval()
    short, long = item(samples[0], 0, seed=1), item(samples[1], 1, seed=2)
    alone = collate([short], pad_id)
    mixed = collate([short, long] if position == 0 else [long, short], pad_id)
    assert mixed.frame_mask.shape == (2, 4) and mixed.frame_mask[position].sum() == 2
    # whatever sits in the padding must not matter, not even NaN
    mixed.streams["semantic"][position, 2:] = float("nan")
    mixed.streams["spatiotemporal"][position, 2:] = float("nan")
    with torch.no_grad():
        vis_a = model.connector.visual_tokens(alone, model.llm)
        in_a = model.llm_inputs(vis_a, alone, with_labels=True)
        in_m = model.llm_inputs(model.connector.visual_tokens(mixed, model.llm), mixed, with_labels=True)
        loss_alone = model(alone)
        losses_mixed = per_sample_losses(model, mixed)
    n = in_a.inputs_embeds.shape[1]
    assert in_m.inputs_embeds.shape[1] > n  # the short sample really is padded in the mixed batch
    assert torch.isfinite(in_m.inputs_embeds).all()
    torch.testing.assert_close(in_m.inputs_embeds[position, :n], in_a.inputs_embeds[0], atol=1e-5, rtol=1e-5)
    assert in_m.attention_mask[position].tolist() == [1] * n + [0] * (in_m.attention_mask.shape[1] - n)
    assert in_m.labels[position, :n].equal(in_a.labels[0])
    assert (in_m.labels[position, n:] == IGNORE_INDEX).all()
    torch.testing.assert_close(losses_mixed[position], loss_alone, atol=1e-5, rtol=1e-5)
    # and the motion stream does reach the output (so the test above covers its padding too)
    with torch.no_grad():
        for block in model.connector.ffp.blocks:
            block.gate.zero_()
        closed = model.connector.visual_tokens(alone, model.llm)
    assert not torch.allclose(closed.embeds, vis_a.embeds)


def test_llm_inputs_splice_video_between_prefix_and_question(parts):
    model, samples, pad_id = parts
    model.eval()
    batch = collate([item(samples[0], 0, 1), item(samples[1], 1, 2)], pad_id)
    q = model.connector.semantic.num_queries
    with torch.no_grad():
        visual = model.connector.visual_tokens(batch, model.llm)
        inputs = model.llm_inputs(visual, batch, with_labels=True)
    tokens = visual.embeds
    embed = model.llm.get_input_embeddings()
    for i, s in enumerate(samples):
        n_video = s.n_frames * q
        pre, txt = len(s.prefix_ids), len(s.text_ids)
        row = inputs.inputs_embeds[i]
        assert row[:pre].equal(embed(torch.tensor(s.prefix_ids)))
        assert row[pre:pre + n_video].equal(tokens[i, :n_video])
        assert row[pre + n_video:pre + n_video + txt].equal(embed(torch.tensor(s.text_ids)))
        labels = inputs.labels[i]
        # prefix, video tokens and question are never learned; the answer + EOS are, at their own positions
        assert (labels[:pre + n_video] == IGNORE_INDEX).all()
        assert labels[pre + n_video:pre + n_video + txt].tolist() == s.text_labels
        assert [x for x in labels.tolist() if x != IGNORE_INDEX] == [x for x in s.text_labels if x != IGNORE_INDEX]
        assert inputs.attention_mask[i].sum() == pre + n_video + txt


def test_closed_gates_give_mlp_s_of_each_frames_queries_in_frame_order(parts):
    model, samples, pad_id = parts
    model.eval()
    batch = collate([item(samples[0], 0, 1), item(samples[1], 1, 2)], pad_id)
    connector = model.connector
    with torch.no_grad():
        visual = connector.visual_tokens(batch, model.llm)
        for i, s in enumerate(samples):
            t, ids = s.n_frames, torch.tensor([s.qformer_ids] * s.n_frames)
            queries = connector.semantic(batch.streams["semantic"][i, :t], ids, torch.ones_like(ids))  # [t, q, d_q]
            expected = connector.ffp.mlp_s(queries.reshape(-1, queries.shape[-1]))                   # [t·q, d_l]
            torch.testing.assert_close(visual.embeds[i][visual.mask[i]], expected, atol=1e-5, rtol=1e-5)


def test_frozen_llm_gets_no_gradient_and_every_trainable_part_does(parts):
    model, samples, pad_id = parts
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(collate([item(samples[0], 0, 1), item(samples[1], 1, 2)], pad_id))
    loss.backward()
    named = dict(model.named_parameters())
    llm = {k: p for k, p in named.items() if k.startswith("llm.")}
    trainable = {k: p for k, p in named.items() if p.requires_grad}
    assert llm and trainable
    assert all(p.grad is None and not p.requires_grad for p in llm.values())
    assert set(trainable) == {k for k in named if k.startswith(tuple("connector." + p for p in TRAINABLE_PREFIXES))}
    assert [k for k, p in trainable.items() if p.grad is None] == []
    # at init the gates are 0, so the gate is where the fusion blocks first learn from
    assert all(block.gate.grad.abs().item() > 0 for block in model.connector.ffp.blocks)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_trainable_state_dict_holds_the_connector_only(parts, tiny_model):
    model = parts[0]
    state = model.trainable_state_dict()
    assert state and not [k for k in state if k.startswith("llm.")]
    assert set(state) == {k for k, p in model.connector.named_parameters() if p.requires_grad}
    assert all(k.startswith(TRAINABLE_PREFIXES) for k in state)
    fresh = build_dualfocus(str(tiny_model), DualFocusConfig(ffp_blocks=2, ffp_heads=8), seed=1)
    assert not fresh.connector.ffp.mlp_s[0].weight.equal(model.connector.ffp.mlp_s[0].weight)
    fresh.load_trainable_state_dict(state)
    assert all(fresh.connector.state_dict()[k].equal(v) for k, v in state.items())
    with pytest.raises(ValueError, match="missing"):
        fresh.load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("ffp.")})
    with pytest.raises(ValueError, match="unexpected"):
        fresh.load_trainable_state_dict({**state, "llm.lm_head.weight": torch.zeros(1)})


def test_build_refuses_heads_that_do_not_divide_the_llm_width(tiny_model):
    with pytest.raises(ValueError, match="ffp_heads"):
        build_dualfocus(str(tiny_model), DualFocusConfig(ffp_heads=7))
