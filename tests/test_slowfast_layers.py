"""Slow-Fast hybrid decoder layers on a tiny random Llama: identity at alpha 0, which rows cross-attend, a
hand-written reference of one hybrid layer, cached generation, gradients, slow padding, init and cleanup."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dualfocus.connectors.interface import LLMInputs
from dualfocus.connectors.slowfast_layers import SlowFastLayers, default_layers, text_rows

torch.set_num_threads(1)

D, N_LAYERS, HEADS, KV_HEADS = 64, 4, 4, 2
DH = D // HEADS


def tiny_llm(attention_bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=D, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         attention_bias=attention_bias, initializer_range=0.1)
    llm = LlamaForCausalLM(config).eval()
    llm.requires_grad_(False)
    return llm


def build(layers=None, alpha: float = 0.0, attention_bias: bool = False):
    """A frozen tiny LLM with hybrid layers attached, and an untouched copy of it."""
    llm = tiny_llm(attention_bias)
    plain = copy.deepcopy(llm)
    slowfast = SlowFastLayers(llm, default_layers(N_LAYERS) if layers is None else layers)
    slowfast.attach(llm)
    with torch.no_grad():
        for cross in slowfast.cross.values():
            cross.alpha.fill_(alpha)
            cross.gate_proj.bias.fill_(1.0)  # a clearly open gate so the cross term is well above rounding
    return llm, plain, slowfast


def batch(seed: int = 1):
    """3 left-padded samples (pads 0, 3, 5) with visual rows; slow tokens: 5, 3 (+2 padded), 0 real."""
    g = torch.Generator().manual_seed(seed)
    b, S, m = 3, 12, 5
    embeds = torch.randn(b, S, D, generator=g)
    mask = torch.ones(b, S, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    visual = torch.zeros(b, S, dtype=torch.bool)
    visual[0, 2:6] = True
    visual[1, 5:8] = True
    visual[2, 6:9] = True
    slow = torch.randn(b, m, D, generator=g)
    slow_mask = torch.zeros(b, m, dtype=torch.bool)
    slow_mask[0] = True
    slow_mask[1, :3] = True
    slow[1, 3:] = 50.0  # padded slow tokens: large garbage that must not matter
    return LLMInputs(embeds, mask, None, visual), slow, slow_mask


def logits(llm, inputs: LLMInputs) -> torch.Tensor:
    with torch.no_grad():
        return llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits


def test_alpha_zero_is_the_plain_llm_exactly():
    llm, plain, slowfast = build(alpha=0.0)
    inputs, slow, slow_mask = batch()
    with slowfast.slow_context(slow, slow_mask, inputs):
        out = logits(llm, inputs)
    assert torch.equal(out, logits(plain, inputs))


def test_nonzero_alpha_changes_text_rows_but_not_visual_or_slowless_samples():
    llm, plain, slowfast = build(alpha=0.7)
    inputs, slow, slow_mask = batch()
    with slowfast.slow_context(slow, slow_mask, inputs):
        out = logits(llm, inputs)
    ref = logits(plain, inputs)
    real = inputs.attention_mask.bool()
    assert not torch.allclose(out[0], ref[0], atol=1e-4)
    assert not torch.allclose(out[1][real[1]], ref[1][real[1]], atol=1e-4)
    assert torch.equal(out[2], ref[2])  # sample 2 has no slow tokens
    # Visual rows get no cross term of their own: with every real row declared visual, nothing changes.
    all_visual = LLMInputs(inputs.inputs_embeds, inputs.attention_mask, None, real.clone())
    with slowfast.slow_context(slow, slow_mask, all_visual):
        assert torch.equal(logits(llm, all_visual), ref)


def test_one_hybrid_layer_matches_a_hand_written_reference():
    llm, _, slowfast = build(layers=[0], alpha=0.7)
    inputs, slow, slow_mask = batch()
    layer = llm.model.layers[0]
    captured = []
    hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        logits(llm, inputs)
        with slowfast.slow_context(slow, slow_mask, inputs):
            logits(llm, inputs)
    finally:
        hook.remove()
    plain_attn, hybrid_attn = captured  # o_proj's input in the plain call, then in the hybrid one
    b, S, _ = inputs.inputs_embeds.shape
    cross = slowfast.cross["0"]
    with torch.no_grad():
        h = layer.input_layernorm(inputs.inputs_embeds)
        q = layer.self_attn.q_proj(h).view(b, S, HEADS, DH).transpose(1, 2)
        cos, sin = llm.model.rotary_emb(h, torch.arange(S)[None])
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)                                   # [b, H, S, dh]
        s = layer.input_layernorm(slow)
        k = (s @ layer.self_attn.k_proj.weight.T).view(b, -1, KV_HEADS, DH)          # no RoPE on slow keys
        v = (s @ layer.self_attn.v_proj.weight.T).view(b, -1, KV_HEADS, DH)
        kv_head = torch.arange(HEADS) // (HEADS // KV_HEADS)
        k, v = k[:, :, kv_head], v[:, :, kv_head]                                    # [b, m, H, dh]
        scores = torch.einsum("bhnd,bmhd->bhnm", q, k) * DH ** -0.5
        scores = scores.masked_fill(~slow_mask[:, None, None, :], float("-inf"))
        c = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1).nan_to_num(), v).reshape(b, S, -1)
        gate = torch.tanh(plain_attn @ cross.gate_proj.weight.T + cross.gate_proj.bias) * torch.tanh(cross.alpha)
        rows = inputs.attention_mask.bool() & ~inputs.visual_mask & slow_mask.any(1)[:, None]
        expected = plain_attn + rows[..., None] * gate * c
    torch.testing.assert_close(hybrid_attn, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hybrid_attn, plain_attn, atol=1e-3)


def test_text_rows_in_prefill_decoding_and_cacheless_reruns():
    text = torch.tensor([[False, True, True], [True, False, True]])
    assert torch.equal(text_rows(text, 3, 3), text)                                  # prefill / training
    assert torch.equal(text_rows(text, 1, 5), torch.ones(2, 1, dtype=torch.bool))    # a cached decode step
    rerun = text_rows(text, 5, 5)                                                    # whole sequence, no cache
    assert torch.equal(rerun, torch.cat([text, torch.ones(2, 2, dtype=torch.bool)], 1))


def test_cached_generation_equals_a_cacheless_greedy_loop():
    llm, plain, slowfast = build(alpha=0.7)
    llm.generation_config.eos_token_id = None
    inputs, slow, slow_mask = batch()
    inputs = LLMInputs(inputs.inputs_embeds[:2], inputs.attention_mask[:2], None, inputs.visual_mask[:2])
    slow, slow_mask = slow[:2], slow_mask[:2]
    steps = 6
    with slowfast.slow_context(slow, slow_mask, inputs):
        generated = llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                 max_new_tokens=steps, do_sample=False, pad_token_id=0)
        embeds, mask, tokens = inputs.inputs_embeds, inputs.attention_mask, []
        with torch.no_grad():
            for _ in range(steps):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
                token = out.logits[:, -1].argmax(-1)
                tokens.append(token)
                embeds = torch.cat([embeds, llm.get_input_embeddings()(token)[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    loop = torch.stack(tokens, 1)
    assert generated.shape == (2, steps) and torch.equal(generated, loop)


def test_gradients_reach_only_the_new_parameters_and_the_slow_tokens():
    llm, _, slowfast = build(alpha=0.7)
    inputs, slow, slow_mask = batch()
    slow.requires_grad_(True)
    with slowfast.slow_context(slow, slow_mask, inputs):
        out = llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    out.square().mean().backward()
    for name, p in slowfast.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert slow.grad is not None and slow.grad[:2].abs().sum() > 0
    assert slow.grad[1, 3:].abs().sum() == 0 and slow.grad[2].abs().sum() == 0  # padding and slow-less sample
    assert all(p.grad is None for p in llm.parameters())


def test_alpha_zero_still_trains_alpha():
    llm, _, slowfast = build(alpha=0.0)
    inputs, slow, slow_mask = batch()
    with slowfast.slow_context(slow, slow_mask, inputs):
        out = llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
    out.square().mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in slowfast.gate_parameters())


def test_slow_padding_is_masked():
    llm, plain, slowfast = build(alpha=0.7)
    inputs, slow, slow_mask = batch()
    with slowfast.slow_context(slow, slow_mask, inputs):
        batched = logits(llm, inputs)
    alone_inputs = LLMInputs(inputs.inputs_embeds[1:2], inputs.attention_mask[1:2], None, inputs.visual_mask[1:2])
    with slowfast.slow_context(slow[1:2, :3], slow_mask[1:2, :3], alone_inputs):
        alone = logits(llm, alone_inputs)
    real = inputs.attention_mask[1].bool()
    torch.testing.assert_close(batched[1][real], alone[0][real], atol=1e-5, rtol=1e-5)
    assert torch.equal(batched[2], logits(plain, inputs)[2])


def test_kv_proj_starts_from_k_and_v_proj():
    llm, _, slowfast = build(attention_bias=True)
    for key, cross in slowfast.cross.items():
        attn = llm.model.layers[int(key)].self_attn
        rows = KV_HEADS * DH
        assert torch.equal(cross.kv_proj.weight[:rows], attn.k_proj.weight)
        assert torch.equal(cross.kv_proj.weight[rows:], attn.v_proj.weight)
        assert torch.equal(cross.kv_proj.bias, torch.cat([attn.k_proj.bias, attn.v_proj.bias]))
        assert cross.kv_proj.weight.requires_grad and cross.kv_proj.weight.data_ptr() != attn.k_proj.weight.data_ptr()
    assert not any(k.startswith("_norm") or "layernorm" in k for k in slowfast.state_dict())
    llm, _, slowfast = build(layers=[1])
    assert torch.equal(slowfast.cross["1"].kv_proj.bias, torch.zeros(2 * KV_HEADS * DH))


def test_bad_layer_indices_are_named():
    llm = tiny_llm()
    with pytest.raises(ValueError, match=r"-1.*7|7.*-1") as err:
        SlowFastLayers(llm, [0, 7, -1])
    assert "4 decoder layers" in str(err.value)
    with pytest.raises(ValueError, match="repeated"):
        SlowFastLayers(llm, [1, 1])


def test_default_layers():
    assert default_layers(28) == [0, 7, 14, 21]
    assert default_layers(4) == [0, 1, 2, 3]
    assert default_layers(2) == [0, 1]


def test_plain_llm_outside_the_context_also_after_an_exception():
    llm, plain, slowfast = build(alpha=0.7)
    inputs, slow, slow_mask = batch()
    ref = logits(plain, inputs)
    with slowfast.slow_context(slow, slow_mask, inputs):
        assert not torch.equal(logits(llm, inputs), ref)
    assert torch.equal(logits(llm, inputs), ref)
    with pytest.raises(RuntimeError, match="boom"):
        with slowfast.slow_context(slow, slow_mask, inputs):
            raise RuntimeError("boom")
    assert torch.equal(logits(llm, inputs), ref)
