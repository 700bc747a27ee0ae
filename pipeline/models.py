"""Load the parts of an InstructBLIP-layout checkpoint from a local directory, one part at a time.

A model directory holds ``config.json`` (``model_type: instructblip``), safetensors weights (one file or
an index of shards) whose keys start with ``vision_model.``, ``qformer.``, ``query_tokens`` and
``language_model.``, the LLM tokenizer at the top level, the Q-Former tokenizer in ``qformer_tokenizer/``
and ``preprocessor_config.json``. A real InstructBLIP-Vicuna checkpoint and the tiny model written by
``dualfocus init-tiny`` share this layout, so every stage loads both with the same code.

Each loader reads only the tensors of its own part: extract never touches the 7B LLM's weights.
Nothing is downloaded: every path must exist locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(ValueError):
    """A model directory is missing, or its files are not what a stage needs (message names the path)."""


@dataclass(frozen=True)
class ImageSpec:
    """How frames are prepared for the vision tower: square size and per-channel mean/std (0..1 scale)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json, so it is not a model directory")
    return path


def load_config(path: str | Path):
    """The ``InstructBlipConfig`` of a model directory; a clear error when it is another kind of model."""
    from transformers import InstructBlipConfig

    path = _model_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    model_type = raw.get("model_type")
    if model_type != "instructblip":
        raise ModelLoadError(
            f"{path} is not an InstructBLIP-layout model (config.json model_type={model_type!r}); "
            "dualfocus needs its vision tower, Q-Former and LLM"
        )
    return InstructBlipConfig.from_pretrained(path, local_files_only=True)


def config_hash(path: str | Path) -> str:
    """A short stable hash of config.json (part of the feature store's encoder fingerprint)."""
    import hashlib

    raw = json.loads((_model_dir(path) / "config.json").read_text())
    raw.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise ModelLoadError(f"{path} has no model.safetensors or model.safetensors.index.json")


def load_weights(path: str | Path, prefix: str) -> dict:
    """Tensors whose names start with ``prefix``, with the prefix stripped (only those are read)."""
    from safetensors import safe_open

    path = _model_dir(path)
    files = weight_files(path)
    wanted: dict[Path, list[str]] = {}
    for name, file in files.items():
        if name.startswith(prefix):
            wanted.setdefault(file, []).append(name)
    if not wanted:
        raise ModelLoadError(f"{path} holds no weights under {prefix!r}")
    out = {}
    for file, names in wanted.items():
        with safe_open(str(file), framework="pt") as f:
            for name in names:
                out[name[len(prefix):]] = f.get_tensor(name)
    return out


def _load_into(module, path: Path, prefix: str, what: str):
    state = load_weights(path, prefix)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: the {what} weights do not match its config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )
    return module


def load_vision_model(path: str | Path, dtype: str = "float32"):
    """The frozen vision tower (``InstructBlipVisionModel``) in eval mode."""
    import torch
    from transformers import InstructBlipVisionModel

    cfg = load_config(path)
    model = InstructBlipVisionModel(cfg.vision_config)
    _load_into(model, Path(path), "vision_model.", "vision tower")
    return model.to(getattr(torch, dtype)).eval().requires_grad_(False)


def load_qformer(path: str | Path):
    """(``InstructBlipQFormerModel``, query_tokens ``[1, q, d_q]`` Parameter) from the checkpoint."""
    import torch
    from transformers import InstructBlipQFormerModel

    cfg = load_config(path)
    qformer = InstructBlipQFormerModel(cfg.qformer_config)
    _load_into(qformer, Path(path), "qformer.", "Q-Former")
    query = load_weights(path, "query_tokens")[""]
    return qformer, torch.nn.Parameter(query.float())


def load_llm(path: str | Path, dtype: str = "float32"):
    """The causal LM (frozen by the caller) from the checkpoint's ``language_model.*`` weights."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = load_config(path)
    model = AutoModelForCausalLM.from_config(cfg.text_config, dtype=getattr(torch, dtype))
    _load_into(model, Path(path), "language_model.", "language model")
    if getattr(cfg.text_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_llm_tokenizer(path: str | Path):
    """The LLM tokenizer at the top of the model directory (pad falls back to unk, then eos)."""
    from transformers import AutoTokenizer

    path = _model_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_qformer_tokenizer(path: str | Path):
    """The Q-Former (BERT-style) tokenizer from ``qformer_tokenizer/``."""
    from transformers import AutoTokenizer

    sub = _model_dir(path) / "qformer_tokenizer"
    if not sub.is_dir():
        raise ModelLoadError(f"{path} has no qformer_tokenizer/ directory")
    return AutoTokenizer.from_pretrained(str(sub), local_files_only=True, use_fast=True)


def load_image_spec(path: str | Path) -> ImageSpec:
    """Square input size and normalisation of the vision tower, from preprocessor_config.json."""
    path = _model_dir(path)
    size = int(load_config(path).vision_config.image_size)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        raw = json.loads(pre.read_text())
        mean = tuple(raw.get("image_mean", mean))
        std = tuple(raw.get("image_std", std))
    return ImageSpec(size=size, mean=tuple(map(float, mean)), std=tuple(map(float, std)))


def normalize_frames(frames_uint8, spec: ImageSpec, dtype=None):
    """uint8 frames ``[n, H, W, 3]`` (numpy or torch) -> float ``pixel_values [n, 3, H, W]``."""
    import torch

    x = torch.as_tensor(np.asarray(frames_uint8) if not isinstance(frames_uint8, torch.Tensor) else frames_uint8)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # [n, 3, H, W]
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x if dtype is None else x.to(dtype)
