"""Loading a family's tower from a local directory, and running it once to expose its cuts.

Every tower comes back frozen (eval mode, no gradients) on the asked device in the asked dtype. Nothing is
downloaded (``local_files_only``). A checkpoint that lacks weights the tower needs, or holds them in other
shapes, is a ``ModelLoadError`` naming the path, never a silently random tower.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from dualfocus.encoders.families import Family
from dualfocus.encoders.taps import Cuts, Geometry, map_to_tokens
from dualfocus.pipeline.models import ModelLoadError


@contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars while loading (e.g. the text tower a full
    SigLIP/CLIP checkpoint holds is reported as unexpected; we skip it on purpose). Restored afterwards."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _load_eva(path: Path, model_type: str, dtype: str, device: str):
    from dualfocus.pipeline.models import build_and_load, load_vision_model, torch_dtype

    if model_type == "instructblip":
        return load_vision_model(path, dtype=dtype, device=device)
    # BLIP-2: the same EVA tower under ``vision_model.``, described by Blip2Config.vision_config
    from transformers import Blip2Config, Blip2VisionModel

    cfg = Blip2Config.from_pretrained(str(path), local_files_only=True).vision_config
    model = build_and_load(lambda: Blip2VisionModel(cfg), path, "vision_model.", "vision tower",
                           dtype=dtype, device=device)
    return model.to(torch_dtype(dtype)).eval().requires_grad_(False)


def _load_pretrained(family: Family, path: Path, model_type: str, dtype: str, device: str):
    import transformers

    from dualfocus.pipeline.models import torch_dtype

    model_class = getattr(transformers, family.model_types[model_type][1])
    try:
        with quiet_transformers():
            # mismatched shapes come back in ``info`` (and are refused below) rather than as an error that
            # points to the load report silenced here
            model, info = model_class.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype(dtype),
                                                      output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{path}: cannot load its {family.name} tower ({model_class.__name__}): {first}") from e
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = [f"missing {missing[:3]}"] if missing else []
        what += [f"other shapes {mismatched[:3]}"] if mismatched else []
        raise ModelLoadError(f"{path}: the {family.name} tower's weights do not match its config ({', '.join(what)})")
    return model.to(device).eval().requires_grad_(False)


def load_tower(family: Family, path: str | Path, model_type: str, dtype: str = "float32", device="cpu"):
    """The frozen vision tower of ``path`` (its ``model_type`` from config.json), on ``device`` in ``dtype``."""
    path = Path(path)
    if family.name == "eva":  # InstructBLIP/BLIP-2 checkpoints hold more than the tower: read only its weights
        return _load_eva(path, model_type, dtype, str(device))
    return _load_pretrained(family, path, model_type, dtype, device)


def run_tower(family: Family, model, pixel_values, geometry: Geometry, need_post_ln: bool = True) -> Cuts:
    """One forward of ``model`` on ``pixel_values [n, 3, S, S]``; the cuts every tap is taken from.

    Call it under ``torch.inference_mode()``. ``post_ln`` is computed only when ``need_post_ln``.
    """
    if family.layout == "convnet":
        out = model(pixel_values=pixel_values, return_dict=True)
        return Cuts(hidden=None, post_ln=None, grid=map_to_tokens(out.last_hidden_state))  # [n, d, h, w] -> [n, h*w, d]
    out = model(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
    last = out.last_hidden_state  # [n, T, d]
    post_ln = None
    if need_post_ln:
        # CLIP's tower applies post_layernorm to the pooled CLS only; here it is applied to every token
        post_ln = model.post_layernorm(last) if family.post_ln == "post_layernorm" else last
    return Cuts(hidden=tuple(out.hidden_states), post_ln=post_ln, grid=last[:, geometry.prefix_tokens:])  # [n, p, d]
