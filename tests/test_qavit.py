"""QA-ViT top blocks (connectors/qavit.py) on a tiny random InstructBLIP vision model, CPU only."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.qavit import QuestionAwareTop, QuestionProjection

D_L = 16  # LLM width of the fake question embeddings
N, L = 2, 6  # frames, question tokens


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def vision_model():
    """A 4-block InstructBLIP ViT (width 32, 4 heads, 2x2 patches + CLS = 5 tokens) with nonzero q/v biases.

    The config's default initializer_range is 1e-10, which leaves the attention weights ~0 (every token
    attends uniformly, whatever the question); 0.2 (about 1/sqrt(32)) makes attention depend on its keys.
    """
    from transformers import InstructBlipVisionConfig, InstructBlipVisionModel

    torch.manual_seed(0)
    cfg = InstructBlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                   num_attention_heads=4, image_size=28, patch_size=14, initializer_range=0.2)
    vm = InstructBlipVisionModel(cfg).eval()
    with torch.no_grad():
        assert vm.encoder.layers[0].self_attn.qkv.weight.std() > 0.1
        for layer in vm.encoder.layers:  # transformers 5 keeps the biases as qkv.bias = [q_bias; 0; v_bias]
            bias = layer.self_attn.qkv.bias
            bias[:32].normal_(std=0.5)
            bias[64:].normal_(std=0.5)
        for norm in [vm.post_layernorm, *(m for layer in vm.encoder.layers for m in (layer.layer_norm1,
                                                                                       layer.layer_norm2))]:
            norm.weight.normal_(1.0, 0.2)
            norm.bias.normal_(std=0.2)
    return vm


def hf_forward(vm, start: int = 2):
    """(hidden state entering block `start`, HF's last_hidden_state), both [N, 5, 32]."""
    pixels = torch.randn(N, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = vm(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[start], out.last_hidden_state


def question_and_mask(n_real: int = 4):
    question = torch.randn(N, L, D_L, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(N, L, dtype=torch.long)
    mask[:, :n_real] = 1
    return question, mask


def set_gates(top: QuestionAwareTop, value: float) -> None:
    with torch.no_grad():
        for block in top.blocks:
            block.gate.fill_(value)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("start", [1, 2, 3])
def test_no_question_equals_hf_vision_model(vision_model, start):
    hidden, last = hf_forward(vision_model, start)
    with torch.no_grad():
        # In InstructBLIP, last_hidden_state is already post_layernorm(encoder output); hidden_states[-1] is
        # the encoder output before that norm. QuestionAwareTop applies the norm too, so compare with last.
        torch.testing.assert_close(vision_model.post_layernorm(hf_forward(vision_model, 4)[0]), last)
        got = QuestionAwareTop(vision_model, start=start, d_l=D_L)(hidden)
    assert got.shape == last.shape
    torch.testing.assert_close(got, last, atol=1e-5, rtol=0)


def reference_block(block, x, question_tokens, key_mask):
    """The reference QA block written out naively: the full [question ; norm1(x)] sequence through the HF
    qkv Linear, softmax over all keys (padding at -inf), visual rows kept. question_tokens are already
    projected ([N, L, d_v]); key_mask [N, L] with 1 = real token."""
    attn = block.self_attn
    n, p, d = x.shape
    seq = torch.cat([question_tokens, block.layer_norm1(x)], dim=1)  # [N, L+P, d_v]
    q, k, v = attn.qkv(seq).reshape(n, seq.shape[1], 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) * attn.scale  # [N, h, L+P, L+P]
    keys = torch.cat([key_mask.bool(), torch.ones(n, p, dtype=torch.bool)], dim=1)
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    rows = (scores.softmax(dim=-1) @ v)[:, :, -p:]  # visual rows only: [N, h, P, d_v/h]
    x = x + attn.projection(rows.transpose(1, 2).reshape(n, p, d))
    return x + block.mlp(block.layer_norm2(x))  # gate 0


def test_block_matches_a_naive_reference(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model, start=2, d_l=D_L)
    with torch.no_grad():
        for p in top.blocks[0].question_proj.parameters():  # a projection that moves tokens a lot
            p.normal_(std=0.5)
    question, mask = question_and_mask(n_real=4)
    block = top.blocks[0]
    with torch.no_grad():
        expected = reference_block(block.block, hidden, block.question_proj(question), mask)
        got = block(hidden, question, mask)
    assert max_diff(got, block(hidden)) > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_padding_is_masked_and_the_question_is_live(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model, start=2, d_l=D_L)
    question, mask = question_and_mask(n_real=4)
    with torch.no_grad():
        none = top(hidden)
        all_padding = top(hidden, question, torch.zeros_like(mask))
        real = top(hidden, question, mask)
        noisy_padding = question.clone()
        noisy_padding[:, 4:] += 10.0
        real_noisy_padding = top(hidden, noisy_padding, mask)
        unmasked = top(hidden, question)  # the reference behaviour: every question token is a key
    # Not bitwise: the softmax and value sums run over L+P instead of P terms (differences ~5e-7).
    torch.testing.assert_close(all_padding, none, atol=1e-5, rtol=0)
    assert max_diff(real, none) > 1e-3
    torch.testing.assert_close(real_noisy_padding, real, atol=1e-5, rtol=0)
    assert max_diff(unmasked, real) > 1e-4


def test_gate_zero_switches_off_the_parallel_mlp(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model, start=2, d_l=D_L)
    question, mask = question_and_mask()
    block = top.blocks[0]
    assert block.parallel_mlp.fc1.weight is not block.block.mlp.fc1.weight
    torch.testing.assert_close(block.parallel_mlp.fc1.weight, block.block.mlp.fc1.weight, atol=0, rtol=0)

    def perturbed_pair():
        with torch.no_grad():
            before = top(hidden, question, mask)
            for blk in top.blocks:
                for p in blk.parallel_mlp.parameters():
                    p.add_(torch.randn_like(p))
            return before, top(hidden, question, mask)

    before, after = perturbed_pair()
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    set_gates(top, 0.5)
    before, after = perturbed_pair()
    assert max_diff(after, before) > 1e-3


def test_only_adapters_train_and_frozen_weights_are_shared(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model, start=2, d_l=D_L)
    set_gates(top, 0.3)  # so the parallel MLPs get nonzero gradients too
    question, mask = question_and_mask()
    top(hidden, question, mask).square().mean().backward()

    trainable = dict(top.named_trainable_parameters())
    assert len(trainable) == 2 * (6 + 4 + 1)  # 2 blocks x (question_proj 6 + parallel_mlp 4 + gate)
    assert [id(p) for p in top.trainable_parameters()] == [id(p) for p in trainable.values()]
    state = top.state_dict()
    vm_params = {id(p) for p in vision_model.parameters()}
    for name, param in top.named_parameters():
        if name in trainable:
            assert name in state and param.requires_grad and id(param) not in vm_params, name
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None and id(param) in vm_params, name
    for i, layer in enumerate(vision_model.encoder.layers[2:]):
        frozen = top.blocks[i].block
        assert frozen is layer
        assert frozen.self_attn.qkv.weight is layer.self_attn.qkv.weight
        assert frozen.self_attn.qkv.bias is layer.self_attn.qkv.bias
    assert top.post_layernorm.weight is vision_model.post_layernorm.weight


def test_start_is_validated_and_defaults_to_half_depth(vision_model):
    for bad in (0, 4, -1, 2.0):
        with pytest.raises(ValueError, match=rf"0 < start < depth=4, got {bad!r}"):
            QuestionAwareTop(vision_model, start=bad, d_l=D_L)
    assert QuestionAwareTop.default_start(39) == 19
    assert QuestionAwareTop.default_start(4) == 2


def test_input_shapes_are_validated(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model, start=2, d_l=D_L)
    question, mask = question_and_mask()
    with pytest.raises(ValueError, match=r"question must be \[N=2, L, 16\], got \[2, 6, 8\].*"
                                         r"question_mask must be \[2, 6\], got \[2, 5\]"):
        top(hidden, question[..., :8], mask[:, :5])


def test_question_projection_init():
    torch.manual_seed(0)
    proj = QuestionProjection(64, 128)
    assert torch.equal(proj.norm.weight, torch.ones(64)) and torch.equal(proj.norm.bias, torch.zeros(64))
    for fc in (proj.fc1, proj.fc2):
        assert torch.equal(fc.bias, torch.zeros_like(fc.bias))
        assert 0.018 < fc.weight.std().item() < 0.022
    assert proj(torch.randn(3, 5, 64)).shape == (3, 5, 128)


def test_bfloat16_vision_model_with_float32_adapters(vision_model):
    hidden, _ = hf_forward(vision_model)
    top = QuestionAwareTop(vision_model.to(torch.bfloat16), start=2, d_l=D_L)
    question, mask = question_and_mask()
    with torch.no_grad():
        out = top(hidden.bfloat16(), question, mask)
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape and torch.isfinite(out).all()
    assert top.blocks[0].question_proj.fc1.weight.dtype == torch.float32
