"""Tiny random encoders of every family, in the layout of a real checkpoint, for tests and CI.

Each is a few layers of width 64 at 224 px (the ViTs with their real patch sizes, so the token counts are
those of the real models: 257 for eva/clip/dinov2 at 14 px, 196 for siglip at 16 px), written as
config.json + model.safetensors + preprocessor_config.json and read back by ``load_encoder`` with the very
code that reads a real one. ``eva`` is the InstructBLIP-layout model of ``dualfocus init-tiny``.

Weights use each class's own initialisation (normal/lecun/xavier at ~0.02 scale), which gives a tower
whose features differ from frame to frame, except two things a random tower gets wrong: the ViTs' patch
positions are replaced by smooth 2-D sin-cos ones at the scale of the patch embeddings (as the tiny EVA tower's),
so the features say where things are; ConvNeXt's layer scale starts at 1 instead of 1e-6, so its blocks, not
only its stem and downsampling convs, shape the features.
"""

from __future__ import annotations

import json
from pathlib import Path

from dualfocus.encoders.families import FAMILIES

WIDTH = 64
LAYERS = 3
IMAGE_SIZE = 224


def _vision_tower(family: str):
    """(transformers model, preprocessor_config dict) of a tiny tower of ``family`` (not eva)."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, Dinov2Config,
                              Dinov2Model, SiglipVisionConfig, SiglipVisionModel)

    fam = FAMILIES[family]
    vit = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=WIDTH // 16, image_size=IMAGE_SIZE)
    if family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**vit, intermediate_size=4 * WIDTH, patch_size=16))
        pre = {"image_processor_type": "SiglipImageProcessor", "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**vit, intermediate_size=4 * WIDTH, patch_size=14))
        pre = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": IMAGE_SIZE},
               "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True}
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**vit, patch_size=14))
        pre = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": IMAGE_SIZE},
               "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True}
    else:  # convnext: 4 stages, 224 px -> a 7x7 grid of width 64
        model = ConvNextModel(ConvNextConfig(hidden_sizes=[16, 32, 48, WIDTH], depths=[1, 1, 1, 1],
                                             image_size=IMAGE_SIZE, layer_scale_init_value=1.0))
        pre = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": IMAGE_SIZE},
               "crop_pct": 0.875}
    pre.update({"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": list(fam.mean), "image_std": list(fam.std)})
    return model, pre


def _honest_positions(model, family: str) -> None:
    """Give a tiny ViT smooth 2-D sin-cos patch positions at the scale of its patch embeddings (as the tiny EVA
    tower of ``pipeline/tiny.py`` has). Each class's own init leaves the position signal 9x (SigLIP) to 25x
    (DINOv2, CLIP) weaker than the patch content, and the tower then blurs where things are: LongVU on the tiny
    SigLIP and DINOv2 grids learned colour alone, while the same connector on the tiny EVA grid learned shape and
    direction too. ConvNeXt has no position embedding."""
    import torch

    from dualfocus.pipeline.tiny import sincos_positions

    if family == "convnext":
        return
    emb = model.vision_model.embeddings if hasattr(model, "vision_model") else model.embeddings
    if family == "dinov2":
        patch, table, prefix = emb.patch_embeddings.projection.weight, emb.position_embeddings[0], 1
    else:  # siglip (no CLS), clip (CLS first)
        patch, table, prefix = emb.patch_embedding.weight, emb.position_embedding.weight, 0 if family == "siglip" else 1
    content_std = float(patch.detach().std()) * patch[0].numel() ** 0.5       # std of a patch embedding for unit-std pixels
    grid = int(round((table.shape[0] - prefix) ** 0.5))
    with torch.no_grad():
        table[prefix:] = sincos_positions(grid, table.shape[1]) * (content_std / 0.71)   # sin/cos have std ~0.71
        table[:prefix].normal_(0.0, content_std)


def write_tiny_encoder(out_dir: str | Path, family: str, seed: int = 0, reading_steps: int = 0) -> Path:
    """Write a tiny random encoder of ``family`` to ``out_dir`` and return the path. ``reading_steps`` (eva
    only, whose directory holds the LLM too): steps of reading practice for its LLM (``TinyModelConfig``)."""
    import torch

    from dualfocus.pipeline.errors import UserError

    if family not in FAMILIES:
        raise UserError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "eva":
        from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

        return write_tiny_model(out_dir, TinyModelConfig(seed=seed, reading_steps=reading_steps))
    if reading_steps:
        raise UserError(f"--reading-steps trains the LLM of the eva model; a {family} tower has no LLM")
    from dualfocus.encoders.forward import quiet_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, pre = _vision_tower(family)
    _honest_positions(model, family)
    with quiet_transformers():
        model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out
