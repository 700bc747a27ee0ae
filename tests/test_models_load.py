"""Loading without random weights: each part is built on the meta device and filled from the checkpoint.

Parity against the plain way (build normally with random weights, then ``load_state_dict``): same tensors,
same dtypes, same buffers (the rotary ``inv_freq`` is computed at construction, not loaded), same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dualfocus.pipeline.models import (ModelLoadError, load_config, load_llm, load_qformer, load_vision_model,
                                       load_weights, parameters_on_meta)


def normally_built_llm(model_dir: Path, dtype: torch.dtype):
    """The reference: random weights first, then the checkpoint copied over them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(load_config(model_dir).text_config, dtype=dtype)
    missing, unexpected = model.load_state_dict(load_weights(model_dir, "language_model."), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # lm_head is missing only when tied
    return model.eval()


def edited_copy(model_dir: Path, out: Path, tensors=None, text_config: dict | None = None, shards: int = 1) -> Path:
    """A copy of ``model_dir`` with its tensors passed through ``tensors(dict) -> dict``, its text config
    updated, and the weights written in ``shards`` files with an index when more than one."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    state = load_file(out / "model.safetensors")
    state = tensors(state) if tensors else state
    if text_config:
        raw = json.loads((out / "config.json").read_text())
        raw["text_config"].update(text_config)
        (out / "config.json").write_text(json.dumps(raw))
    if shards > 1:
        (out / "model.safetensors").unlink()
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({n: state[n].contiguous() for n in part}, out / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({n: t.contiguous() for n, t in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def assert_same_llm(loaded, reference, vocab_size: int):
    params = dict(loaded.state_dict())
    ref_params = dict(reference.state_dict())
    assert params.keys() == ref_params.keys()
    for key, value in params.items():
        assert value.dtype == ref_params[key].dtype, key
        assert torch.equal(value, ref_params[key]), key
    buffers = dict(loaded.named_buffers())  # non-persistent ones too: the rotary inv_freq
    ref_buffers = dict(reference.named_buffers())
    assert buffers.keys() == ref_buffers.keys() and any("inv_freq" in k for k in buffers)
    for key, value in buffers.items():
        assert value.dtype == ref_buffers[key].dtype and torch.equal(value, ref_buffers[key]), key
    tokens = torch.randint(0, vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, reference(tokens).logits)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llm_equals_a_normally_built_one(tiny_model, dtype):
    loaded = load_llm(tiny_model, dtype=dtype)
    assert not loaded.training
    assert all(not t.is_meta and t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    assert all(p.dtype == getattr(torch, dtype) for p in loaded.parameters())
    assert_same_llm(loaded, normally_built_llm(tiny_model, getattr(torch, dtype)),
                    load_config(tiny_model).text_config.vocab_size)


def test_parameters_on_meta_keeps_computed_buffers_and_ends_with_the_block(tiny_model):
    from transformers import AutoModelForCausalLM

    text_config = load_config(tiny_model).text_config
    with parameters_on_meta():
        empty = AutoModelForCausalLM.from_config(text_config)
    normal = AutoModelForCausalLM.from_config(text_config)
    assert all(p.is_meta for p in empty.parameters())
    empty_buffers = dict(empty.named_buffers())
    assert empty_buffers and empty_buffers.keys() == dict(normal.named_buffers()).keys()
    for key, value in normal.named_buffers():
        assert not empty_buffers[key].is_meta and torch.equal(empty_buffers[key], value), key
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the hook is gone after the block


def test_tied_embeddings_are_tied_again_after_loading(tiny_model, tmp_path):
    def drop_lm_head(state):
        return {k: v for k, v in state.items() if k != "language_model.lm_head.weight"}

    model_dir = edited_copy(tiny_model, tmp_path / "tied", drop_lm_head, {"tie_word_embeddings": True})
    loaded = load_llm(model_dir)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert_same_llm(loaded, normally_built_llm(model_dir, torch.float32), load_config(model_dir).text_config.vocab_size)


def test_a_sharded_checkpoint_loads_the_same(tiny_model, tmp_path):
    model_dir = edited_copy(tiny_model, tmp_path / "sharded", shards=3)
    assert not (model_dir / "model.safetensors").exists()
    assert_same_llm(load_llm(model_dir, dtype="bfloat16"), normally_built_llm(tiny_model, torch.bfloat16),
                    load_config(tiny_model).text_config.vocab_size)


@pytest.mark.parametrize("case, fragment", [
    ("missing", "missing ['model.norm.weight']"),
    ("unexpected", "unexpected ['model.extra.weight']"),
    ("other width", "other shapes"),
])
def test_weights_that_do_not_fit_the_config_are_one_line_errors(tiny_model, tmp_path, case, fragment):
    edits = {
        "missing": dict(tensors=lambda s: {k: v for k, v in s.items() if k != "language_model.model.norm.weight"}),
        "unexpected": dict(tensors=lambda s: {**s, "language_model.model.extra.weight": torch.zeros(3)}),
        "other width": dict(text_config={"intermediate_size": 2 * load_config(tiny_model).text_config.intermediate_size}),
    }
    model_dir = edited_copy(tiny_model, tmp_path / "bad", **edits[case])
    with pytest.raises(ModelLoadError) as info:
        load_llm(model_dir, dtype="bfloat16")
    message = str(info.value)
    assert str(model_dir) in message and "language model weights do not match" in message
    assert fragment in message and "\n" not in message


def test_vision_tower_and_qformer_equal_normally_built_ones(tiny_model):
    from transformers import InstructBlipQFormerModel, InstructBlipVisionModel

    cfg = load_config(tiny_model)
    vision = load_vision_model(tiny_model, dtype="bfloat16")
    reference = InstructBlipVisionModel(cfg.vision_config)
    reference.load_state_dict(load_weights(tiny_model, "vision_model."))
    reference = reference.to(torch.bfloat16).eval()
    assert not any(p.requires_grad for p in vision.parameters())
    pixels = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(vision(pixels).last_hidden_state, reference(pixels).last_hidden_state)

    qformer, query_tokens = load_qformer(tiny_model)
    reference = InstructBlipQFormerModel(cfg.qformer_config)
    reference.load_state_dict(load_weights(tiny_model, "qformer."), strict=False)
    loaded_state, ref_state = qformer.state_dict(), reference.state_dict()
    assert loaded_state.keys() == ref_state.keys()
    for key, value in loaded_state.items():
        assert value.dtype == ref_state[key].dtype and torch.equal(value, ref_state[key]), key
    for (key, value), (_, ref) in zip(qformer.named_buffers(), reference.named_buffers()):
        assert torch.equal(value, ref), key  # position_ids, built at construction
    assert query_tokens.dtype == torch.float32 and query_tokens.requires_grad
    assert torch.equal(query_tokens.data, load_weights(tiny_model, "query_tokens")[""].float())
