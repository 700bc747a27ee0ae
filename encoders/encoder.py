"""A frozen vision encoder of any family, turning uint8 frames into named taps in one forward.

``inspect_encoder(path)`` reads only config files: family, input spec, geometry, so tap shapes and the
store fingerprint are known before any weights are read. ``load_encoder(path)`` adds the loaded tower.

    enc = load_encoder("models/siglip", device="cuda", compute_dtype="bfloat16")
    enc.tap_shapes({"grid": "grid@24x24"})        # {"grid": (576, 1152)}
    feats = enc(frames_uint8, {"grid": "grid@24x24"})  # {"grid": float32 [n, 576, 1152]}

Legend: ``n`` frames, ``S`` the encoder's input size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualfocus.encoders.families import Family, find_family, geometry, image_spec, vision_config
from dualfocus.encoders.taps import Geometry, check_taps, parse_tap, tap_shape
from dualfocus.pipeline.models import ImageSpec


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder directory's config files say: no weights are read to build one."""

    family: Family
    model_type: str
    path: Path
    spec: ImageSpec
    geometry: Geometry

    def check_taps(self, taps: Mapping[str, str]) -> list[str]:
        """Every problem with ``{name: tap}`` for this encoder, all at once (empty when fine)."""
        return check_taps(taps, self.geometry)

    def tap_shapes(self, taps: Mapping[str, str]) -> dict[str, tuple[int, int]]:
        """``{name: (tokens, width)}`` per frame; a ``ValueError`` listing every problem otherwise."""
        problems = self.check_taps(taps)
        if problems:
            raise ValueError("; ".join(problems))
        return {name: tap_shape(text, self.geometry) for name, text in taps.items()}

    def fingerprint(self, taps: Mapping[str, str], compute_dtype: str) -> dict:
        """Everything that changes the numbers of these taps (JSON-able); stores compare it on resume."""
        from dualfocus.pipeline.models import config_hash

        self.tap_shapes(taps)  # refuses taps this encoder cannot give
        return {
            "family": self.family.name,
            "model": str(self.path.resolve()),
            "config_hash": config_hash(self.path),
            "image_size": self.spec.size,
            "image_mean": list(self.spec.mean),
            "image_std": list(self.spec.std),
            "compute_dtype": compute_dtype,
            "taps": {name: str(parse_tap(text)) for name, text in taps.items()},
        }


def inspect_encoder(path: str | Path, image_size: int | None = None) -> EncoderInfo:
    """Family, input spec and geometry of the encoder at ``path`` from its config files alone.

    ``image_size`` overrides the input size for families that take other sizes (dinov2, convnext).
    """
    path = Path(path)
    family, model_type = find_family(path)
    cfg = vision_config(family, model_type, path)
    spec = image_spec(family, cfg, path, image_size)
    return EncoderInfo(family=family, model_type=model_type, path=path, spec=spec,
                       geometry=geometry(family, cfg, spec.size, f"{family.name} model {path}"))


def prepare_frames(frames_uint8: Any, spec: ImageSpec):
    """uint8 frames ``[n, H, W, 3]`` -> float32 ``pixel_values [n, 3, S, S]`` on the CPU.

    Frames not already ``S x S`` are resized with PIL bicubic (aspect ignored), as the decoders do;
    frames at size are only normalised, giving exactly ``normalize_frames`` of them.
    """
    from PIL import Image

    from dualfocus.pipeline.models import normalize_frames

    frames = np.asarray(frames_uint8.numpy() if hasattr(frames_uint8, "numpy") else frames_uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    size = spec.size
    if frames.shape[1:3] != (size, size):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC)) for f in frames])
    return normalize_frames(np.ascontiguousarray(frames), spec)  # [n, 3, S, S]


class Encoder:
    """A loaded frozen encoder: ``EncoderInfo`` plus its tower on a device, in a compute dtype."""

    def __init__(self, info: EncoderInfo, model: Any, device: Any, compute_dtype: str):
        self.info = info
        self.model = model
        self.device = device
        self.compute_dtype = compute_dtype

    @property
    def family(self) -> str:
        return self.info.family.name

    @property
    def path(self) -> Path:
        return self.info.path

    @property
    def spec(self) -> ImageSpec:
        return self.info.spec

    @property
    def geometry(self) -> Geometry:
        return self.info.geometry

    def check_taps(self, taps: Mapping[str, str]) -> list[str]:
        """Every problem with ``{name: tap}`` for this encoder, all at once (empty when fine)."""
        return self.info.check_taps(taps)

    def tap_shapes(self, taps: Mapping[str, str]) -> dict[str, tuple[int, int]]:
        """``{name: (tokens, width)}`` of one frame of each tap."""
        return self.info.tap_shapes(taps)

    def fingerprint(self, taps: Mapping[str, str]) -> dict:
        """Family, model path, config hash, input spec, compute dtype and taps (JSON-able)."""
        return self.info.fingerprint(taps, self.compute_dtype)

    def prepare(self, frames_uint8: Any):
        """uint8 ``[n, H, W, 3]`` -> float32 ``pixel_values [n, 3, S, S]`` (see ``prepare_frames``)."""
        return prepare_frames(frames_uint8, self.spec)

    def __call__(self, frames_uint8: Any, taps: Mapping[str, str]) -> dict[str, np.ndarray]:
        """uint8 ``[n, H, W, 3]`` -> ``{name: float32 numpy [n, tokens, width]}``, from one forward.

        The taps are checked before any work. Pixels are normalised and cast on the CPU, then moved, so
        every device sees the same input numbers.
        """
        import torch

        from dualfocus.encoders.forward import run_tower
        from dualfocus.encoders.taps import take

        shapes = self.tap_shapes(taps)
        parsed = {name: parse_tap(text) for name, text in taps.items()}
        pixels = self.prepare(frames_uint8).to(getattr(torch, self.compute_dtype)).to(self.device)
        with torch.inference_mode():
            cuts = run_tower(self.info.family, self.model, pixels, self.geometry,
                             need_post_ln=any(t.kind == "post_ln" for t in parsed.values()))
            out = {name: take(tap, cuts, self.geometry).float().cpu().numpy() for name, tap in parsed.items()}
        for name, array in out.items():  # the shapes promised before any work are the shapes given
            if array.shape[1:] != shapes[name]:
                raise RuntimeError(f"tap {name}={taps[name]!r} of {self.geometry.model} gave {list(array.shape[1:])}, "
                                   f"expected {list(shapes[name])}")
        return out


def load_encoder(path: str | Path, device: str = "cpu", compute_dtype: str = "float32",
                 image_size: int | None = None) -> Encoder:
    """The frozen encoder at ``path`` (family from its config.json), ready to turn frames into taps.

    ``device``: ``auto``/``cpu``/``cuda``/``cuda:N``; ``compute_dtype``: ``auto`` (bfloat16 on a GPU, float32
    on the CPU), ``float32``, ``bfloat16`` or ``float16``; ``image_size`` as in ``inspect_encoder``.
    """
    from dualfocus.encoders.forward import load_tower
    from dualfocus.pipeline.devices import resolve_compute_dtype, resolve_device

    info = inspect_encoder(path, image_size)
    torch_device = resolve_device(device, key="encoder.device")
    dtype = resolve_compute_dtype(compute_dtype, on_gpu=torch_device.type == "cuda")
    model = load_tower(info.family, info.path, info.model_type, dtype=dtype, device=str(torch_device))
    return Encoder(info, model, torch_device, dtype)
