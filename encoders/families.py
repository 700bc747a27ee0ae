"""The encoder families we read, and what each one's config says about its input and its taps.

A family is a row of data (``Family``): which ``model_type`` values of ``config.json`` it covers, which
transformers classes read them, its fallback normalisation, how many prefix tokens precede the patches, and
where its final layer norm sits. Nothing here loads weights; ``forward.py`` does that.

===========  ==============================  ===========================================================
family       config.json model_type          prefix tokens, and what ``post_ln`` / ``grid`` are
===========  ==============================  ===========================================================
eva          instructblip, blip-2            CLS. post_ln: ``last_hidden_state`` (post_layernorm already
                                             applied); grid: the same without CLS. Only the tower's
                                             weights (``vision_model.*``) are read.
siglip       siglip, siglip_vision_model     none. post_ln = grid = ``last_hidden_state`` (post-LN).
dinov2       dinov2, dinov2_with_registers   CLS, then the registers. post_ln: ``last_hidden_state``
                                             (its final layernorm applied); grid: without the prefix.
clip         clip, clip_vision_model         CLS. transformers applies post_layernorm to the pooled CLS
                                             only; post_ln applies it to every token. grid is
                                             ``last_hidden_state`` without CLS, i.e. *before* that norm;
                                             hidden[0] is the embeddings after ``pre_layrnorm``.
convnext     convnext, convnextv2            none. No post_ln, hidden, patches or pool4 (stages differ
                                             in width); grid: the last stage's map ``[d, h, w]`` as
                                             ``[h*w, d]``.
===========  ==============================  ===========================================================

In every ViT family ``hidden[-1]`` is the last block's output *before* the final norm.
A full SigLIP/CLIP checkpoint (both towers) is read through its vision classes: the text tower is skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualfocus.encoders.taps import Geometry
from dualfocus.pipeline.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageSpec, ModelLoadError, checked_model_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class Family:
    """One family of frozen vision encoders (see the module table)."""

    name: str
    model_types: dict[str, tuple[str, str]]
    """``model_type`` -> (transformers config class, transformers model class) of the vision tower."""
    mean: tuple[float, float, float]
    """Normalisation used when preprocessor_config.json gives none."""
    std: tuple[float, float, float]
    layout: str = "vit"
    """``vit`` (a token sequence per block) or ``convnet`` (feature maps per stage)."""
    cls_token: bool = True
    """Whether a CLS token precedes the patches (registers, where a config has them, follow it)."""
    post_ln: str | None = "output"
    """Where ``post_ln`` comes from: ``output`` (``last_hidden_state`` is already normed), ``post_layernorm``
    (apply the model's ``post_layernorm`` to every token), or None (no such tap)."""
    resizable: bool = False
    """Whether the tower takes other input sizes than its config's (interpolated positions, or a convnet)."""


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("eva", {"instructblip": ("InstructBlipVisionConfig", "InstructBlipVisionModel"),
                   "blip-2": ("Blip2VisionConfig", "Blip2VisionModel")},
           OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    Family("siglip", {"siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
                      "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel")},
           HALF, HALF, cls_token=False),
    Family("dinov2", {"dinov2": ("Dinov2Config", "Dinov2Model"),
                      "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel")},
           IMAGENET_MEAN, IMAGENET_STD, resizable=True),
    Family("clip", {"clip": ("CLIPVisionConfig", "CLIPVisionModel"),
                    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel")},
           OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, post_ln="post_layernorm"),
    Family("convnext", {"convnext": ("ConvNextConfig", "ConvNextModel"),
                        "convnextv2": ("ConvNextV2Config", "ConvNextV2Model")},
           IMAGENET_MEAN, IMAGENET_STD, layout="convnet", cls_token=False, post_ln=None, resizable=True),
)}


def supported() -> str:
    """``"eva (instructblip, blip-2), siglip (...), ..."`` for messages."""
    return ", ".join(f"{f.name} ({', '.join(f.model_types)})" for f in FAMILIES.values())


def read_config_json(path: str | Path) -> dict:
    """The raw config.json of a model directory; a ``ModelLoadError`` naming the path when it is missing."""
    file = checked_model_dir(path) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file} is not a JSON object")
    return raw


def find_family(path: str | Path) -> tuple[Family, str]:
    """(family, model_type) of the model directory ``path``, from its config.json."""
    model_type = read_config_json(path).get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family, model_type
    raise ModelLoadError(f"{path}: config.json model_type {model_type!r} is not a supported vision encoder; "
                         f"supported families: {supported()}")


def detect_family(path: str | Path) -> str:
    """The family name (``eva``, ``siglip``, ``dinov2``, ``clip``, ``convnext``) of a model directory."""
    return find_family(path)[0].name


def vision_config(family: Family, model_type: str, path: str | Path):
    """The transformers config of the vision tower (a composite config's ``vision_config`` where needed)."""
    import transformers

    config_class = getattr(transformers, family.model_types[model_type][0])
    try:
        return config_class.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot read its config.json as {config_class.__name__}: {e}") from e


def _square(value: Any) -> int:
    """An image or patch size that may be an int or an (h, w) pair -> one int (the height)."""
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def _preprocessor_size(pre: dict) -> int | None:
    """The square size a Hugging Face image processor ends with: its crop, else its resize target."""
    for key in ("crop_size", "size"):
        value = pre.get(key)
        if isinstance(value, dict):
            for sub in ("height", "shortest_edge"):
                if sub in value:
                    return int(value[sub])
        elif isinstance(value, (int, float)) and value > 0:
            return int(value)
    return None


def image_spec(family: Family, cfg: Any, path: str | Path, image_size: int | None = None) -> ImageSpec:
    """Input size and normalisation of the tower.

    Size: ``image_size`` when given (only for families that take other sizes); otherwise the config's size
    for towers with fixed position embeddings (eva, siglip, clip), and the preprocessor's crop/resize target,
    else the config's size, for dinov2 and convnext. Mean/std: preprocessor_config.json, else the family's.
    """
    pre_file = Path(path) / "preprocessor_config.json"
    try:
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{pre_file} is not valid JSON: {e}") from e
    native = _square(cfg.image_size)
    if image_size is not None:
        if not family.resizable and int(image_size) != native:
            raise ModelLoadError(f"{path}: a {family.name} tower takes only its config's image size {native}, "
                                 f"got image_size={image_size}")
        size = int(image_size)
    elif family.resizable:
        size = _preprocessor_size(pre) or native
    else:
        size = native
    mean = tuple(float(x) for x in pre.get("image_mean", family.mean))
    std = tuple(float(x) for x in pre.get("image_std", family.std))
    return ImageSpec(size=size, mean=mean, std=std)


def geometry(family: Family, cfg: Any, size: int, model: str) -> Geometry:
    """Depth, width, prefix tokens and last-layer grid of the tower at input ``size`` (config arithmetic only)."""
    if family.layout == "convnet":
        side = size // _square(cfg.patch_size)  # stem: a patch_size conv with stride patch_size
        for _ in range(1, cfg.num_stages):
            side //= 2  # every later stage opens with a 2x2 stride-2 conv
        return Geometry(model=model, depth=int(cfg.num_stages), width=int(cfg.hidden_sizes[-1]), prefix_tokens=0,
                        grid=(side, side), has_post_ln=False, has_tokens=False)
    side = size // _square(cfg.patch_size)
    prefix = int(family.cls_token) + int(getattr(cfg, "num_register_tokens", 0) or 0)
    return Geometry(model=model, depth=int(cfg.num_hidden_layers), width=int(cfg.hidden_size), prefix_tokens=prefix,
                    grid=(side, side), has_post_ln=family.post_ln is not None)
