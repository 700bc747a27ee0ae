"""The connector interface: registry, the ``connector`` config section, export records, and a connector that
reaches inside the frozen LLM's decoder layers (the point Slow-Fast builds on), trained and served end to end."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from dualfocus.connectors.interface import Batch, Connector, VisualTokens
from dualfocus.connectors.registry import ConnectorConfig, connector_class, register
from dualfocus.pipeline.config import ConfigError, load_config
from dualfocus.pipeline.errors import UserError
from dualfocus.train.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REQUIRED = {"store": "s", "annotations": "a", "model": "m", "out": "o"}


# ---------------------------------------------------------------- a connector inside the decoder
@dataclass
class LayerBiasConfig(ConnectorConfig):
    name: str = "test-layer-bias"
    layer: int = 0
    """Decoder layer whose output gets the bias."""


class LayerBias(Connector):
    """Test connector: one visual token per frame (the projected CLS token), and inside decoder layer ``layer``
    a learned ``scale * mean(visual tokens)`` added to every position's hidden state, via a forward hook.

    The per-batch context reaches the hook through ``decoder_inputs`` only, so the same frozen LLM called
    outside a connector's call is unchanged."""

    name = "test-layer-bias"
    config_class = LayerBiasConfig

    def __init__(self, d_v: int, d_l: int, layer: int):
        super().__init__()
        self.proj = nn.Linear(d_v, d_l)
        self.scale = nn.Parameter(torch.full((d_l,), 0.5))
        self.layer = layer
        self._context: torch.Tensor | None = None

    def streams(self) -> tuple[str, ...]:
        return ("semantic",)

    def visual_tokens(self, batch: Batch, llm: nn.Module) -> VisualTokens:
        tokens = self.proj(batch.streams["semantic"][:, :, 0])                       # [b, T, d_l]
        mean = (tokens * batch.frame_mask[..., None]).sum(1) / batch.frame_mask.sum(1, keepdim=True)
        return VisualTokens(tokens, batch.frame_mask, layer_inputs=mean)           # [b, d_l]

    def attach(self, llm: nn.Module) -> None:
        llm.model.layers[self.layer].register_forward_hook(self._add)

    def _add(self, module, args, output):
        if self._context is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + (self.scale * self._context)[:, None, :].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    @contextlib.contextmanager
    def decoder_inputs(self, layer_inputs, inputs):
        self.last_inputs = inputs  # what the sequence looked like, for the tests
        self._context = layer_inputs
        try:
            yield
        finally:
            self._context = None

    @staticmethod
    def expected_streams(cfg, model_dir):
        from dualfocus.connectors.dualfocus import DualFocus, DualFocusConfig

        return {"semantic": DualFocus.expected_streams(DualFocusConfig(), model_dir)["semantic"]}

    @staticmethod
    def expected_taps(cfg, model_dir):
        return {"semantic": "post_ln"}

    @staticmethod
    def extract_args(cfg, model_dir, missing):
        return f"--model {model_dir}"

    @staticmethod
    def tokens_per_frame(cfg, model_dir):
        return 1

    @staticmethod
    def model_problems(cfg, model_dir):
        return []

    @classmethod
    def build(cls, cfg, model_dir, seed=0):
        from dualfocus.pipeline.models import load_config

        config = load_config(model_dir)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(config.vision_config.hidden_size, config.text_config.hidden_size, cfg.layer)


register("test-layer-bias", f"{__name__}:LayerBias")


@pytest.fixture(scope="module")
def layer_model(tiny_model):
    from dualfocus.connectors.registry import build_video_llm

    return build_video_llm(LayerBiasConfig(), str(tiny_model)).eval()


@pytest.fixture(scope="module")
def a_batch(toy_store, toy_corpus, tiny_model):
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset

    prepared = prepare_samples(str(toy_store), str(toy_corpus / "train.json"), str(tiny_model), with_answers=True)
    dataset = FeatureQADataset(str(toy_store), prepared.samples[:2], 3)
    return collate([dataset[0], dataset[1]], prepared.qformer_pad_id), prepared


def test_the_decoder_module_changes_the_loss_trains_and_is_saved(layer_model, a_batch):
    batch, _ = a_batch
    model = layer_model
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    assert model.connector.scale.grad is not None and model.connector.scale.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())
    assert set(model.trainable_state_dict()) == {"proj.weight", "proj.bias", "scale"}
    seen = model.connector.last_inputs  # the visual rows are where VideoLLM spliced the frames, and only there
    assert seen.visual_mask.sum(1).tolist() == batch.frame_mask.sum(1).tolist()
    for i in range(len(batch)):
        rows = seen.visual_mask[i].nonzero().flatten().tolist()
        first = len(batch.prefix_ids[i])
        assert rows == list(range(first, first + int(batch.frame_mask[i].sum())))
    with torch.no_grad():
        saved = model.connector.scale.clone()
        model.connector.scale.zero_()
        without = model(batch)
        model.connector.scale.copy_(saved)
    assert not torch.allclose(loss.detach(), without)
    model.zero_grad(set_to_none=True)


def test_generation_with_the_kv_cache_sees_the_decoder_module_at_every_step(layer_model, a_batch, tiny_model):
    """Greedy generate (KV cache) equals a greedy loop that reruns the whole sequence each step: the hook's
    context holds for the new tokens of every cached step, as Slow-Fast's cross-attention needs."""
    from dataclasses import replace

    batch, prepared = a_batch
    model = layer_model
    one = replace(batch.without_labels(), streams={k: v[:1] for k, v in batch.streams.items()},
                  frame_mask=batch.frame_mask[:1], qformer_ids=batch.qformer_ids[:1],
                  qformer_mask=batch.qformer_mask[:1], question_ids=batch.question_ids[:1],
                  question_mask=batch.question_mask[:1], prefix_ids=batch.prefix_ids[:1],
                  text_ids=[batch.text_ids[0][: batch.text_labels[0].count(-100)]])
    cached = model.generate(one, max_new_tokens=6, pad_token_id=prepared.pad_token_id)[0]
    with torch.no_grad():
        visual = model.connector.visual_tokens(one, model.llm)
        inputs = model.llm_inputs(visual, one, with_labels=False, pad_left=True)
        embeds, mask, manual = inputs.inputs_embeds, inputs.attention_mask, []
        embed = model.llm.get_input_embeddings()
        with model.connector.decoder_inputs(visual.layer_inputs, inputs):
            for _ in range(6):
                logits = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, -1]
                token = int(logits.argmax(-1))
                manual.append(token)
                embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], dim=1)
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    assert cached and cached == manual[: len(cached)]
    # and the module matters: the same loop without the context picks other tokens or other logits
    with torch.no_grad():
        plain = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits[:, -1]
        with model.connector.decoder_inputs(visual.layer_inputs, inputs):
            hooked = model.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits[:, -1]
    assert not torch.allclose(plain, hooked)


def test_a_registered_connector_trains_exports_and_is_rebuilt_from_the_export_alone(tmp_path, toy_store, toy_corpus,
                                                                                    tiny_model, a_batch):
    from dualfocus.connectors.export import read_export
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.evaluate.predictor import Predictor, SamplingConfig
    from dualfocus.train.loop import run_train

    cfg = load_config(TrainConfig,
                      overrides=["connector.name=test-layer-bias", "connector.layer=1", "max_steps=2", "save_every=2",
                                 "data.batch_size=2", "data.max_frames=3", "data.num_workers=0", "llm_dtype=float32",
                                 "deepspeed=configs/ds_zero2_cpu.json", "optim.lr=1e-3", "optim.warmup_steps=0"],
                      values={"store": str(toy_store), "annotations": str(toy_corpus / "train.json"),
                              "model": str(tiny_model), "out": str(tmp_path / "run")})
    assert isinstance(cfg.connector, LayerBiasConfig) and cfg.connector.layer == 1
    summary = run_train(cfg, progress=False)
    meta, state = read_export(summary.export)
    assert meta.connector == "test-layer-bias" and meta.connector_config == {"name": "test-layer-bias", "layer": 1}
    assert meta.streams == ["semantic"] and set(state) == {"proj.weight", "proj.bias", "scale"}
    predictor = Predictor(summary.export, str(tiny_model), device="cpu")
    assert isinstance(predictor.model.connector, LayerBias) and predictor.model.connector.layer == 1
    assert torch.equal(predictor.model.connector.scale.float(), state["scale"])
    batch = a_batch[0].without_labels()
    assert len(predictor.answer(batch, SamplingConfig(greedy=True, max_new_tokens=2))) == 2
    out = tmp_path / "preds.jsonl"
    run_generate(GenerateConfig(store=str(toy_store), questions=str(toy_corpus / "test_q.json"),
                                checkpoint=summary.export, out=str(out), device="cpu",
                                sampling=SamplingConfig(greedy=True, max_new_tokens=2)), progress=False)
    assert len(out.read_text().splitlines()) == len(json.loads((toy_corpus / "test_q.json").read_text()))


# ---------------------------------------------------------------- registry and config section
def test_the_connector_name_picks_the_config_dataclass():
    from dualfocus.connectors.dualfocus import DualFocusConfig, DualFocusQAViTConfig

    default = load_config(TrainConfig, values=REQUIRED)
    assert type(default.connector) is DualFocusConfig and default.connector.name == "dualfocus"
    qavit = load_config(TrainConfig, values=REQUIRED, overrides=["connector.name=dualfocus-qavit",
                                                                 "connector.question_tokens=16", "connector.ffp_heads=2"])
    assert type(qavit.connector) is DualFocusQAViTConfig
    assert (qavit.connector.question_tokens, qavit.connector.ffp_heads) == (16, 2)
    assert connector_class("dualfocus-qavit").config_class is DualFocusQAViTConfig


def test_unknown_connector_and_keys_of_another_connector_are_named():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, values=REQUIRED, overrides=["connector.name=slowfst"])
    assert str(err.value).startswith("connector.name: unknown connector 'slowfst'; known: dualfocus, dualfocus-qavit, slowfast, longvu, videopanda")
    with pytest.raises(ConfigError, match="unknown config key 'connector.question_tokens'"):
        load_config(TrainConfig, values=REQUIRED, overrides=["connector.question_tokens=16"])  # a QA-ViT key
    with pytest.raises(ConfigError, match="connector.question_tokens must be >= 1, got 0"):
        load_config(TrainConfig, values=REQUIRED, overrides=["connector.name=dualfocus-qavit",
                                                             "connector.question_tokens=0"])


def test_export_records_of_format_1_read_as_dualfocus(tmp_path):
    from safetensors.torch import save_file

    from dualfocus.connectors.dualfocus import DualFocusConfig
    from dualfocus.connectors.export import read_export

    old = {"format_version": 1, "base_model": "/m", "base_model_hash": "abc", "store_fingerprint": {"fps": 1.0},
           "connector": {"ffp_blocks": 3, "ffp_heads": 2, "ffp_dropout": 0.0, "time_positions": 1000,
                         "gate_init": 1.0}, "llm_dtype": "float32", "connector_dtype": "float32", "max_frames": 8,
           "step": 5}
    (tmp_path / "dualfocus.json").write_text(json.dumps(old))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "connector.safetensors"))
    meta, _ = read_export(tmp_path)
    assert (meta.connector, meta.streams, meta.max_question_tokens, meta.step) == (
        "dualfocus", ["semantic", "spatiotemporal"], 64, 5)
    assert meta.connector_config_object() == DualFocusConfig(ffp_blocks=3, ffp_heads=2, gate_init=1.0)


@pytest.mark.parametrize("change, message", [
    ({"connector": "nope"}, "connector_config: unknown connector 'nope'"),
    ({"connector_config": {"name": "dualfocus", "ffp_blockz": 2}}, "unknown config key 'ffp_blockz'"),
    ({"base_model_hash": "<drop>"}, "is not a dualfocus export record: missing base_model_hash"),
])
def test_a_bad_export_record_is_one_line_naming_the_file(tmp_path, change, message):
    from safetensors.torch import save_file

    from dualfocus.connectors.export import read_export

    record = {"connector": "dualfocus", "connector_config": {"name": "dualfocus"}, "base_model": "/m",
              "base_model_hash": "abc", "store_fingerprint": {}}
    record = {k: v for k, v in {**record, **change}.items() if v != "<drop>"}
    (tmp_path / "dualfocus.json").write_text(json.dumps(record))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "connector.safetensors"))
    with pytest.raises(UserError) as err:
        meta, _ = read_export(tmp_path)
        meta.connector_config_object(str(tmp_path / "dualfocus.json"))
    assert str(err.value).startswith(str(tmp_path / "dualfocus.json")) and message in str(err.value)
    assert "\n" not in str(err.value)
