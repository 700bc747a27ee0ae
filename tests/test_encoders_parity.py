"""Parity: the taps ``load_encoder`` gives equal each tiny model's own transformers forward, bit for bit.

The references are computed here from the Hugging Face model's outputs (``last_hidden_state``,
``hidden_states``, ``post_layernorm``), with the slicing, pooling and resizing written out in the test, so
they do not go through ``dualfocus.encoders.taps``. Every family runs on its tiny model from
``write_tiny_encoder``; variants of a family (BLIP-2 layout, DINOv2 with registers, ConvNeXt V2, a full
SigLIP checkpoint with both towers) are written here from transformers classes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from dualfocus.encoders import FAMILIES, detect_family, inspect_encoder, load_encoder, write_tiny_encoder
from dualfocus.pipeline.models import ModelLoadError, load_image_spec, normalize_frames

VIT_TAPS = {"out": "post_ln", "first": "hidden[0]", "block1": "hidden[1]", "last": "hidden[-1]",
            "patches": "patches", "patches1": "patches[1]", "pool": "pool4", "pool1": "pool4[1]",
            "grid": "grid", "grid57": "grid@5x7"}
CONV_TAPS = {"grid": "grid", "grid57": "grid@5x7", "grid_native": "grid@7x7"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny model directory per family (and per variant), written once for this module."""
    root = tmp_path_factory.mktemp("encoders")
    dirs = {family: write_tiny_encoder(root / family, family) for family in FAMILIES}
    dirs["blip-2"] = _blip2_from_eva(dirs["eva"], root / "blip2")
    dirs["dinov2_with_registers"] = _save(root / "dinov2reg", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                          num_register_tokens=2, patch_size=14, **_VIT)
    dirs["convnextv2"] = _save(root / "convnextv2", "ConvNextV2Model", "ConvNextV2Config", hidden_sizes=[8, 16, 24, 32],
                               depths=[1, 1, 1, 1], image_size=224)
    dirs["siglip_full"] = _save(root / "siglip_full", "SiglipModel", "SiglipConfig", vision_config=dict(
        _VIT, intermediate_size=128, patch_size=16), text_config=dict(hidden_size=32, intermediate_size=64,
                                                                        num_hidden_layers=1, num_attention_heads=2))
    return dirs


_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=224)


def _save(out, model_class: str, config_class: str, **config):
    import transformers

    torch.manual_seed(1)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    model.save_pretrained(out)
    return out


def _blip2_from_eva(eva_dir, out):
    """A BLIP-2-layout directory (model_type blip-2) holding the tiny eva model's vision weights only."""
    from safetensors.torch import load_file, save_file
    from transformers import Blip2Config, InstructBlipConfig

    vision = InstructBlipConfig.from_pretrained(eva_dir).vision_config.to_dict()
    out.mkdir()
    (out / "config.json").write_text(Blip2Config(vision_config=vision).to_json_string())
    weights = load_file(eva_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k.startswith("vision_model.")}, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def frames():
    """Three random uint8 frames at 224 px (every tiny model's input size)."""
    return np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)


# --- references from the transformers models themselves -------------------------------------------------------

PREFIX = {"eva": 1, "siglip": 0, "dinov2": 1, "clip": 1, "dinov2_with_registers": 3, "siglip_full": 0}


def _hf_tower(kind, path):
    """The vision tower as transformers itself loads it (full models loaded whole, then their tower taken)."""
    import transformers

    if kind == "eva":
        return transformers.InstructBlipForConditionalGeneration.from_pretrained(path).vision_model
    if kind == "siglip_full":
        return transformers.SiglipModel.from_pretrained(path).vision_model
    name = {"siglip": "SiglipVisionModel", "clip": "CLIPVisionModel", "dinov2": "Dinov2Model",
            "dinov2_with_registers": "Dinov2WithRegistersModel", "convnext": "ConvNextModel",
            "convnextv2": "ConvNextV2Model"}[kind]
    return getattr(transformers, name).from_pretrained(path).eval()


def _reference(kind, path, pixel_values):
    """{tap name: float32 numpy} of VIT_TAPS (or CONV_TAPS) from the tower's own outputs."""
    model = _hf_tower(kind, path).eval()
    with torch.inference_mode():
        if kind.startswith("convnext"):
            feature_map = model(pixel_values=pixel_values).last_hidden_state  # [n, d, 7, 7]
            n, d = feature_map.shape[:2]
            expected = {"grid": feature_map.reshape(n, d, 49).permute(0, 2, 1),
                        "grid57": F.interpolate(feature_map, size=(5, 7), mode="bilinear", align_corners=False)
                        .reshape(n, d, 35).permute(0, 2, 1),
                        "grid_native": feature_map.reshape(n, d, 49).permute(0, 2, 1)}
            return {k: v.float().numpy() for k, v in expected.items()}
        out = model(pixel_values=pixel_values, output_hidden_states=True)
        hs, last, skip = out.hidden_states, out.last_hidden_state, PREFIX[kind]
        n, _, d = last.shape
        side = int(round((last.shape[1] - skip) ** 0.5))
        post_ln = model.post_layernorm(last) if kind == "clip" else last  # CLIP's output is before its final LN
        grid_map = last[:, skip:].permute(0, 2, 1).reshape(n, d, side, side)
        expected = {
            "out": post_ln, "first": hs[0], "block1": hs[1], "last": hs[len(hs) - 1],
            "patches": hs[len(hs) - 2][:, skip:], "patches1": hs[1][:, skip:],
            "pool": hs[len(hs) - 2][:, skip:].reshape(n, -1, 4, d).mean(dim=2),
            "pool1": hs[1][:, skip:].reshape(n, -1, 4, d).mean(dim=2),
            "grid": last[:, skip:],
            "grid57": F.interpolate(grid_map, size=(5, 7), mode="bilinear", align_corners=False)
            .reshape(n, d, 35).permute(0, 2, 1),
        }
        if kind == "clip":  # independent evidence that post_ln is CLIP's final LN: its CLS row is the pooled output
            assert torch.equal(post_ln[:, 0], out.pooler_output)
        return {k: v.float().numpy() for k, v in expected.items()}


KINDS = ["eva", "siglip", "dinov2", "clip", "convnext", "dinov2_with_registers", "convnextv2", "siglip_full"]


@pytest.mark.parametrize("kind", KINDS)
def test_taps_equal_the_models_own_forward(tiny, frames, kind):
    enc = load_encoder(tiny[kind])
    taps = CONV_TAPS if kind.startswith("convnext") else VIT_TAPS
    pixel_values = enc.prepare(frames)
    assert torch.equal(pixel_values, normalize_frames(frames, enc.spec))  # frames at size: normalised only
    got = enc(frames, taps)
    expected = _reference(kind, tiny[kind], pixel_values)
    shapes = enc.tap_shapes(taps)
    for name in taps:
        assert got[name].dtype == np.float32
        assert got[name].shape == (len(frames), *shapes[name]), name
        assert np.array_equal(got[name], expected[name]), f"{kind} {name}={taps[name]}"
    varied = got["grid"].std(axis=0).mean()  # a tiny tower whose features do not depend on the frame is no test
    assert varied > 1e-3, varied


def test_each_family_is_detected_with_its_geometry(tiny):
    expected = {  # family, depth, width, prefix tokens, grid
        "eva": ("eva", 3, 64, 1, (16, 16)), "blip-2": ("eva", 3, 64, 1, (16, 16)),
        "siglip": ("siglip", 3, 64, 0, (14, 14)), "siglip_full": ("siglip", 2, 32, 0, (14, 14)),
        "dinov2": ("dinov2", 3, 64, 1, (16, 16)), "dinov2_with_registers": ("dinov2", 2, 32, 3, (16, 16)),
        "clip": ("clip", 3, 64, 1, (16, 16)), "convnext": ("convnext", 4, 64, 0, (7, 7)),
        "convnextv2": ("convnext", 4, 32, 0, (7, 7)),
    }
    for kind, (family, depth, width, prefix, grid) in expected.items():
        assert detect_family(tiny[kind]) == family
        g = inspect_encoder(tiny[kind]).geometry  # config files only
        assert (g.depth, g.width, g.prefix_tokens, g.grid) == (depth, width, prefix, grid), kind


def test_blip2_layout_gives_the_same_taps_as_instructblip(tiny, frames):
    taps = {"semantic": "post_ln", "spatiotemporal": "pool4", "qavit": "hidden[1]"}
    a, b = load_encoder(tiny["eva"])(frames, taps), load_encoder(tiny["blip-2"])(frames, taps)
    for name in taps:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eva_post_ln_and_pool4_are_the_dualfocus_streams_bit_for_bit(tiny, frames, dtype):
    from dualfocus.extract.encoder import FrameEncoder

    semantic, motion = FrameEncoder(tiny["eva"], device="cpu", compute_dtype=dtype)(frames)
    got = load_encoder(tiny["eva"], compute_dtype=dtype)(frames, {"s": "post_ln", "m": "pool4"})
    assert got["s"].shape == semantic.shape == (3, 257, 64) and got["m"].shape == motion.shape == (3, 64, 64)
    assert np.array_equal(got["s"], semantic) and np.array_equal(got["m"], motion)


def test_eva_spec_is_the_pipeline_spec(tiny):
    assert load_encoder(tiny["eva"]).spec == load_image_spec(tiny["eva"])


def test_frames_at_another_size_are_resized_like_the_decoders(tiny):
    from dualfocus.extract.resize import resize_stack

    enc = load_encoder(tiny["siglip"])
    odd = np.random.default_rng(1).integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    assert torch.equal(enc.prepare(odd), normalize_frames(resize_stack(odd, 224), enc.spec))
    assert enc(odd, {"g": "grid"})["g"].shape == (2, 196, 64)
    with pytest.raises(ValueError, match="uint8"):
        enc.prepare(odd.astype(np.float32))


def test_a_layer_beyond_the_depth_is_refused_before_any_forward(tiny, frames):
    enc = load_encoder(tiny["dinov2"])
    calls = []
    enc.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError) as err:
        enc(frames, {"ok": "post_ln", "qavit": "hidden[4]", "odd": "pool4[-5]"})
    message = str(err.value)
    assert "taps.qavit" in message and "taps.odd" in message and "depth 3" in message
    assert str(tiny["dinov2"]) in message
    assert calls == []
    enc(frames, {"ok": "hidden[3]"})
    assert calls == [1]  # one forward, and the hook does see it


def test_fingerprint_names_what_changes_the_numbers(tiny):
    enc = load_encoder(tiny["siglip"])
    fp = enc.fingerprint({"grid": "grid@24x24", "mid": "patches[-2]"})
    assert json.loads(json.dumps(fp)) == fp
    assert fp["family"] == "siglip" and fp["image_size"] == 224 and fp["compute_dtype"] == "float32"
    assert fp["model"] == str(tiny["siglip"].resolve()) and len(fp["config_hash"]) == 16
    assert fp["taps"] == {"grid": "grid@24x24", "mid": "patches"}  # canonical spelling
    with pytest.raises(ValueError, match="taps.bad"):
        enc.fingerprint({"bad": "hidden[7]"})


def test_an_unsupported_model_is_refused_in_one_line(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError) as err:
        load_encoder(bert)
    message = str(err.value)
    assert "\n" not in message and str(bert) in message and "'bert'" in message
    assert all(family in message for family in FAMILIES)


def test_missing_directories_and_configs_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="not found: .*nowhere"):
        detect_family(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=f"{tmp_path} has no config.json"):
        load_encoder(tmp_path)


def test_resizable_families_take_another_input_size(tiny, frames):
    enc = load_encoder(tiny["dinov2"], image_size=112)
    assert enc.spec.size == 112 and enc.geometry.grid == (8, 8)
    assert enc(frames, {"p": "pool4", "g": "grid@4x4"})["p"].shape == (3, 16, 64)
    with pytest.raises(ModelLoadError, match="only its config's image size 224"):
        load_encoder(tiny["clip"], image_size=112)


def test_cli_init_tiny_writes_the_family_asked_for(tmp_path):
    out = run_cli("init-tiny", tmp_path / "sig", "--family", "siglip").stdout
    assert f"tiny model written to {tmp_path / 'sig'}" in out
    assert detect_family(tmp_path / "sig") == "siglip"
    with pytest.raises(ValueError, match="family must be one of eva, siglip, dinov2, clip, convnext, got 'vit'"):
        write_tiny_encoder(tmp_path / "x", "vit")  # a UserError: the CLI prints it as one line, exit status 2


def test_weights_that_do_not_fit_the_config_are_refused(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny["siglip"], tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    del weights["post_layernorm.weight"]
    weights["encoder.layers.0.mlp.fc1.weight"] = weights["encoder.layers.0.mlp.fc1.weight"][:10]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_encoder(broken)
    message = str(err.value)
    assert str(broken) in message and "post_layernorm.weight" in message and "encoder.layers.0.mlp.fc1" in message


@pytest.mark.parametrize("family", ["siglip", "dinov2", "clip"])
def test_tiny_towers_know_where_things_are(tiny, family):
    """The tiny ViTs' patch positions are smooth (a patch is more like its neighbour than a far patch) and as
    strong as the patch content: with each class's own init they were 9-25x weaker, and LongVU on the tiny
    SigLIP/DINOv2 grids learned colour alone. The same image content at two places must give grids that differ
    where the content moved."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny[family])
    emb = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
    if family == "dinov2":
        patch, table = emb.patch_embeddings.projection.weight, emb.position_embeddings[0, 1:]
    else:
        patch, table = emb.patch_embedding.weight, emb.position_embedding.weight[0 if family == "siglip" else 1:]
    table = table.detach()
    side = int(round(table.shape[0] ** 0.5))
    content = float(patch.detach().std()) * patch[0].numel() ** 0.5
    assert 0.7 * content < float(table.std()) < 1.3 * content
    cos = torch.nn.functional.cosine_similarity
    assert cos(table[0], table[1], dim=0) > cos(table[0], table[side * side - 1], dim=0) + 0.3

    square = np.full((2, 224, 224, 3), 128, np.uint8)
    square[0, 20:80, 20:80] = (220, 30, 30)
    square[1, 140:200, 140:200] = (220, 30, 30)
    grid = np.asarray(load_encoder(tiny[family])(square, {"g": "grid@4x4"})["g"], dtype=np.float32)  # [2, 16, d]
    moved = np.linalg.norm(grid[0] - grid[1], axis=-1).reshape(4, 4)
    assert moved[0, 0] > 2 * moved[0, 3] and moved[3, 3] > 2 * moved[3, 0]
