"""Load the parts of an InstructBLIP-layout checkpoint from a local directory, one part at a time.

A model directory holds ``config.json`` (``model_type: instructblip``), safetensors weights (one file or
an index of shards) whose keys start with ``vision_model.``, ``qformer.``, ``query_tokens`` and
``language_model.``, the LLM tokenizer at the top level, the Q-Former tokenizer in ``qformer_tokenizer/``
and ``preprocessor_config.json``. A real InstructBLIP-Vicuna checkpoint and the tiny model written by
``dualfocus init-tiny`` share this layout, so every stage loads both with the same code.

Each loader reads only the tensors of its own part: extract never touches the 7B LLM's weights.
A part is built with its parameters on the meta device and each tensor is read straight into its final
dtype and device (``build_and_load``), so loading costs about one copy of the part, not a random copy
plus the checkpoint. Nothing is downloaded: every path must exist locally.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
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


def checked_model_dir(path: str | Path) -> Path:
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

    path = checked_model_dir(path)
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

    raw = json.loads((checked_model_dir(path) / "config.json").read_text())
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


def _names_by_file(path: Path, prefix: str) -> dict[Path, list[str]]:
    """The tensor names under ``prefix``, grouped by the safetensors file holding them."""
    wanted: dict[Path, list[str]] = {}
    for name, file in weight_files(path).items():
        if name.startswith(prefix):
            wanted.setdefault(file, []).append(name)
    if not wanted:
        raise ModelLoadError(f"{path} holds no weights under {prefix!r}")
    return wanted


def _open_weights(file: Path, device: str = "cpu"):
    # pread copies each tensor into its own buffer. The default mmap backend would leave every page of the
    # file it touched resident until the file is closed: a second copy of the weights at the peak.
    from safetensors import safe_open

    return safe_open(str(file), framework="pt", device=device, backend="pread")


def load_weights(path: str | Path, prefix: str) -> dict:
    """Tensors whose names start with ``prefix``, with the prefix stripped (only those are read)."""
    path = checked_model_dir(path)
    out = {}
    for file, names in _names_by_file(path, prefix).items():
        with _open_weights(file) as f:
            for name in names:
                out[name[len(prefix):]] = f.get_tensor(name)
    return out


@contextmanager
def parameters_on_meta():
    """Inside this block every parameter a module registers goes to the meta device (shape and dtype, no
    memory); buffers are built as usual, so values computed at construction (the rotary ``inv_freq``,
    ``position_ids``) are exactly those of a normal construction. Random initialisation on meta is free.

    The hook is global while the block runs: build modules in it from one thread only.
    """
    import torch
    from torch.nn.modules.module import register_module_parameter_registration_hook

    def to_meta(module, name, param):
        if param is None or param.is_meta:
            return None
        return torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _short(names: list[str]) -> str:
    return f"{names[:3]}{'...' if len(names) > 3 else ''}"


def build_and_load(build, path: str | Path, prefix: str, what: str, dtype: str | None = None,
                   device: str = "cpu"):
    """``build()`` a module with its parameters on the meta device, then give every parameter the tensor
    ``prefix + name`` of the checkpoint, read straight onto ``device`` and cast to ``dtype`` (floating
    tensors; the dtype the module was built with when None). Tied weights are tied again afterwards.

    Peak memory is the finished module plus one tensor in flight, never a random copy beside the loaded one.
    A tensor the module lacks, one it has that the checkpoint lacks, or a shape that differs is a
    ``ModelLoadError`` naming ``path``.
    """
    import torch

    path = checked_model_dir(path)
    cast_to = None if dtype is None else torch_dtype(dtype)
    with parameters_on_meta():
        module = build()
    expected = module.state_dict(keep_vars=True)  # parameters and persistent buffers; tied ones under each name
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: dict[str, str] = {}  # key -> "checkpoint shape vs module shape"
    for file, names in _names_by_file(path, prefix).items():
        with _open_weights(file, device=str(device)) as f:
            for name in names:
                key = name[len(prefix):]
                target = expected.get(key)
                if target is None:
                    unexpected.append(key)
                    continue
                tensor = f.get_tensor(name)
                if tensor.shape != target.shape:
                    mismatched[key] = f"{key} {list(tensor.shape)} vs {list(target.shape)}"
                    continue
                floating = tensor.is_floating_point() and target.is_floating_point()
                state[key] = tensor.to(cast_to if floating and cast_to is not None else target.dtype)
                del tensor  # when the cast made a copy, the read buffer goes before the next read
    tied: dict[int, list[str]] = {}  # a tied parameter is one object under several names
    for key, value in expected.items():
        tied.setdefault(id(value), []).append(key)
    seen = set(state) | set(mismatched)
    missing = [key for key, value in expected.items()
               if not seen.intersection(tied[id(value)])
               and (isinstance(value, torch.nn.Parameter) or not key.endswith("position_ids"))]
    if not (missing or unexpected or mismatched):
        module.load_state_dict(state, strict=False, assign=True)
        if hasattr(module, "tie_weights"):  # assigning a tensor to one side of a tie unties it
            module.tie_weights()
        missing = [key for key, value in module.state_dict(keep_vars=True).items() if value.is_meta]
    if missing or unexpected or mismatched:
        problems = [f"missing {_short(missing)}"] if missing else []
        problems += [f"unexpected {_short(unexpected)}"] if unexpected else []
        problems += [f"other shapes {_short(list(mismatched.values()))}"] if mismatched else []
        raise ModelLoadError(f"{path}: the {what} weights do not match its config ({', '.join(problems)})")
    return module.to(device)  # buffers; the parameters are already there


def torch_dtype(name: str):
    """``"bfloat16"`` -> ``torch.bfloat16``; a clear error for a name that is not a floating dtype."""
    import torch

    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype such as float32 or bfloat16, got {name!r}")
    return value


def load_vision_model(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """The frozen vision tower (``InstructBlipVisionModel``) in eval mode, on ``device`` in ``dtype``."""
    from transformers import InstructBlipVisionModel

    cfg = load_config(path)
    model = build_and_load(lambda: InstructBlipVisionModel(cfg.vision_config), path, "vision_model.",
                           "vision tower", dtype=dtype, device=device)
    return model.to(torch_dtype(dtype)).eval().requires_grad_(False)  # .to: floating buffers too


def load_qformer(path: str | Path, device: str = "cpu"):
    """(``InstructBlipQFormerModel``, query_tokens ``[1, q, d_q]`` Parameter) from the checkpoint, in fp32."""
    import torch
    from transformers import InstructBlipQFormerModel

    cfg = load_config(path)
    qformer = build_and_load(lambda: InstructBlipQFormerModel(cfg.qformer_config), path, "qformer.", "Q-Former",
                             dtype="float32", device=device)
    query = load_weights(path, "query_tokens")[""]
    return qformer, torch.nn.Parameter(query.float().to(device))


def load_llm(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """The causal LM (frozen by the caller) from the checkpoint's ``language_model.*`` weights.

    No random weights are made: the model is built on the meta device and each tensor is read straight
    onto ``device`` in ``dtype`` (peak host memory about one copy of the LLM; none when ``device`` is a GPU).
    """
    from transformers import AutoModelForCausalLM

    cfg = load_config(path)
    build = lambda: AutoModelForCausalLM.from_config(cfg.text_config, dtype=torch_dtype(dtype))  # noqa: E731
    model = build_and_load(build, path, "language_model.", "language model", device=device)
    return model.eval()


def load_llm_tokenizer(path: str | Path):
    """The LLM tokenizer at the top of the model directory (pad falls back to unk, then eos)."""
    from transformers import AutoTokenizer

    path = checked_model_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def load_qformer_tokenizer(path: str | Path):
    """The Q-Former (BERT-style) tokenizer from ``qformer_tokenizer/``."""
    from transformers import AutoTokenizer

    sub = checked_model_dir(path) / "qformer_tokenizer"
    if not sub.is_dir():
        raise ModelLoadError(f"{path} has no qformer_tokenizer/ directory")
    return AutoTokenizer.from_pretrained(str(sub), local_files_only=True, use_fast=True)


def load_image_spec(path: str | Path) -> ImageSpec:
    """Square input size and normalisation of the vision tower, from preprocessor_config.json."""
    path = checked_model_dir(path)
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
