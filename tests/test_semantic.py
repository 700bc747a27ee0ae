"""Parity of the semantic stream with InstructBLIP's own image-feature path."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.semantic import SemanticStream, semantic_stream_from_instructblip

N_QUERIES = 32


@pytest.fixture(scope="module")
def tiny_instructblip():
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, LlamaConfig

    torch.manual_seed(0)
    config = InstructBlipConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        ),
        qformer_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=2,
            vocab_size=100,
            max_position_embeddings=64,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=128,
        ).to_dict(),
        num_query_tokens=N_QUERIES,
    )
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # the HF init leaves the queries at zero; make them distinct
        model.query_tokens.normal_(std=0.5)
    return model


def hf_query_output(model, pixel_values, ids, mask):
    out = model.get_image_features(pixel_values=pixel_values, qformer_input_ids=ids, qformer_attention_mask=mask)
    return out.qformer_outputs.last_hidden_state[:, :N_QUERIES]


def test_builder_shares_the_modules(tiny_instructblip):
    stream = semantic_stream_from_instructblip(tiny_instructblip)
    assert isinstance(stream, SemanticStream)
    assert stream.qformer is tiny_instructblip.qformer
    assert stream.query_tokens is tiny_instructblip.query_tokens
    assert stream.num_queries == N_QUERIES


def test_matches_instructblip_get_image_features(tiny_instructblip):
    model = tiny_instructblip
    stream = semantic_stream_from_instructblip(model)
    torch.manual_seed(1)
    pixel_values = torch.randn(3, 3, 224, 224)
    ids = torch.randint(1, 100, (3, 7))
    # right padding of different lengths per row
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    with torch.no_grad():
        frames = model.vision_model(pixel_values=pixel_values).last_hidden_state  # [N, 257, 64]
        got = stream(frames, ids, mask)
        want = hf_query_output(model, pixel_values, ids, mask)
    assert frames.shape == (3, 257, 64)
    assert got.shape == (3, N_QUERIES, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_question_changes_output_and_padding_does_not(tiny_instructblip):
    stream = semantic_stream_from_instructblip(tiny_instructblip)
    torch.manual_seed(2)
    frames = torch.randn(1, 257, 64)
    short = torch.randint(1, 100, (1, 4))
    padded = torch.cat([short, torch.randint(1, 100, (1, 5))], dim=1)  # pad with junk ids, masked out
    padded_mask = torch.tensor([[1] * 4 + [0] * 5])
    other = torch.randint(1, 100, (1, 4))
    with torch.no_grad():
        ref = stream(frames, short, None)
        torch.testing.assert_close(stream(frames, padded, padded_mask), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(stream(frames, padded, padded_mask.bool()), ref, rtol=0, atol=1e-5)
        assert (stream(frames, other, None) - ref).abs().max() > 1e-3  # the question is really read
        assert (stream(frames + 1.0, short, None) - ref).abs().max() > 1e-3  # the frame is really read


def test_rejects_mismatched_rows(tiny_instructblip):
    stream = semantic_stream_from_instructblip(tiny_instructblip)
    with pytest.raises(ValueError, match="question_ids"):
        stream(torch.randn(2, 257, 64), torch.ones(3, 4, dtype=torch.long))


def test_qformer_dropout_setting_makes_training_mode_deterministic(tiny_instructblip):
    """``set_dropout`` (DualFocusConfig.qformer_dropout) reaches the Q-Former's attention and hidden dropout:
    at 0, two training-mode passes agree; at the model's own 0.1 they differ."""
    import copy

    from dualfocus.connectors.dualfocus import set_dropout

    qformer = copy.deepcopy(tiny_instructblip.qformer).train()
    stream = SemanticStream(qformer, tiny_instructblip.query_tokens)
    frames = torch.randn(2, 257, 64)
    ids = torch.randint(0, 100, (2, 5))

    def twice():
        torch.manual_seed(0)
        a = stream(frames, ids)
        return a, stream(frames, ids)

    a, b = twice()
    assert not torch.allclose(a, b)
    set_dropout(qformer, 0.0)
    a, b = twice()
    torch.testing.assert_close(a, b)
    assert all(m.p == 0.0 for m in qformer.modules() if isinstance(m, torch.nn.Dropout))
