"""Tiny random encoders of every family, in the layout of a real checkpoint, for tests and CI.

Each is a few layers of width 64 at 224 px (the ViTs with their real patch sizes, so the token counts are
those of the real models: 257 for eva/clip/dinov2 at 14 px, 196 for siglip at 16 px), written as
config.json + model.safetensors + preprocessor_config.json and read back by ``load_encoder`` with the very
code that reads a real one. ``eva`` is the InstructBLIP-layout model of ``dualfocus init-tiny``.

Weights use each class's own initialisation (normal/lecun/xavier at ~0.02 scale), which gives a tower
whose features differ from frame to frame; ConvNeXt's layer scale starts at 1 instead of 1e-6, so its
blocks, not only its stem and downsampling convs, shape the features.
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


def write_tiny_encoder(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random encoder of ``family`` to ``out_dir`` and return the path."""
    import torch

    from dualfocus.pipeline.errors import UserError

    if family not in FAMILIES:
        raise UserError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family == "eva":
        from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

        return write_tiny_model(out_dir, TinyModelConfig(seed=seed))
    from dualfocus.encoders.forward import quiet_transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model, pre = _vision_tower(family)
    with quiet_transformers():
        model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return out
