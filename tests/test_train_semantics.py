"""What a training step does to the frozen LLM: an LLM built with dropout never applies it, whether the
model is put in train mode directly or by the DeepSpeed engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dualfocus.connectors.dualfocus import DualFocusConfig, build_dualfocus
from dualfocus.connectors.prompt import PromptBuilder
from dualfocus.data.batch import collate
from dualfocus.data.samples import tokenise
from dualfocus.pipeline.qa import QAItem

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P, M, D_V = 257, 64, 64  # tiny model: 224 px frames, 14 px patches, vision width 64




@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with heavy attention dropout in its LLM (same weights)."""
    dest = tmp_path_factory.mktemp("dropout") / "model"
    shutil.copytree(tiny_model, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["text_config"]["attention_dropout"] = 0.5
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def a_batch(model_dir: Path) -> dict:
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer

    q_tok = load_qformer_tokenizer(model_dir)
    samples = tokenise([QAItem("v", "What color is the shape?", "red")], {"v": 2},
                       PromptBuilder(load_llm_tokenizer(model_dir)), q_tok, with_answers=True)
    g = torch.Generator().manual_seed(0)
    item = {"semantic": torch.randn(2, P, D_V, generator=g), "spatiotemporal": torch.randn(2, M, D_V, generator=g),
            "sample": samples[0], "index": 0}
    return collate([item], q_tok.pad_token_id)


def test_the_llm_stays_in_eval_mode_through_a_training_step(dropout_model_dir):
    model = build_dualfocus(str(dropout_model_dir), DualFocusConfig(ffp_heads=2))
    assert model.llm.config.attention_dropout == 0.5
    model.train()
    assert model.training and model.connector.semantic.training and model.connector.ffp.training  # it does train
    assert not any(m.training for m in model.llm.modules())

    modes = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: modes.append(mod.training)) for m in model.llm.modules()]
    loss = model(a_batch(dropout_model_dir))
    loss.backward()
    for h in hooks:
        h.remove()
    assert len(modes) > 10 and not any(modes)

    # the LLM with dropout 0.5 gives the same logits twice: no dropout fired
    x = torch.randn(1, 12, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.llm(inputs_embeds=x).logits, model.llm(inputs_embeds=x).logits)
    # and it would have fired had the LLM been in train mode, so the check above can fail
    model.llm.train()
    with torch.no_grad():
        assert not torch.equal(model.llm(inputs_embeds=x).logits, model.llm(inputs_embeds=x).logits)
    model.train()
    assert not model.llm.training


def test_the_deepspeed_engine_keeps_the_llm_in_eval(dropout_model_dir):
    """``engine.train()`` is what the loop calls; it must reach the same override."""
    from dualfocus.train.loop import init_distributed

    init_distributed()
    import deepspeed

    model = build_dualfocus(str(dropout_model_dir), DualFocusConfig(ffp_heads=2))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3),
                                      model_parameters=trainable,
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}})
    engine.train()
    assert engine.module.connector.ffp.training and not any(m.training for m in engine.module.llm.modules())
    loss = engine(a_batch(dropout_model_dir))
    engine.backward(loss)
    engine.step()
    assert not any(m.training for m in engine.module.llm.modules())
