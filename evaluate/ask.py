"""``run_ask``: one video, one question, no feature store: decode -> encode -> connector -> LLM.

The video goes through extract's own stages (``extract.stages.encode_video``: the decode and encode
functions the Ray pipeline runs) with the settings recorded in the checkpoint's store fingerprint (fps,
max_frames, image size, decode backend, encoder compute dtype), and is rounded to the store's dtype by
``store.dtypes.round_trip``. So ``ask`` sees the numbers ``generate`` reads from the store and, under
greedy decoding, gives the same answer for the same video and question.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from dualfocus.evaluate.predictor import SamplingConfig
from dualfocus.pipeline.devices import device_problem

# What a fingerprint written before a key existed implies for it (the defaults of that time).
LEGACY_FINGERPRINT = {"decode_backend": "decord", "compute_dtype": "auto"}


@dataclass
class AskConfig:
    """Settings of ``dualfocus ask``."""

    checkpoint: str = ""
    """RUN_DIR/final export written by `dualfocus train`."""
    model: str | None = None
    """Base model directory; null = the one recorded in the checkpoint."""
    decode_timeout_s: float = 60.0
    """Wall-clock limit without progress while decoding the video."""
    llm_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype the connector and the LLM both run in; null = the one the checkpoint was trained with."""
    device: str = "auto"
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" or "cuda:N"; vision tower and LLM both."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> list[str]:
        problems = [] if self.checkpoint else ["checkpoint is required"]
        if self.decode_timeout_s <= 0:
            problems.append(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if problem := device_problem(self.device):
            problems.append(f"device {problem}")
        return problems


@dataclass(frozen=True)
class FrameSettings:
    """How the store behind a checkpoint turned a video into features (from its fingerprint)."""

    fps: float
    max_frames: int | None
    image_size: int
    decode_backend: str
    compute_dtype: str
    storage_dtype: str


def frame_settings(fingerprint: dict, export_path, group: str | None = None) -> FrameSettings:
    """``FrameSettings`` of a store fingerprint (of ``group``'s keys, ``group.key``, when the export read several
    groups); keys it predates take ``LEGACY_FINGERPRINT``'s values.

    A fingerprint without the keys every store has had, or with a value this version cannot run, is a
    one-line ``UserError`` naming the export file and the key.
    """
    from dualfocus.extract.decode import BACKENDS
    from dualfocus.pipeline.devices import COMPUTE_DTYPES
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store.dtypes import FEATURE_DTYPES

    where = Path(export_path) / "dualfocus.json"
    fp = {**LEGACY_FINGERPRINT, **group_of(fingerprint if isinstance(fingerprint, dict) else {}, group)}
    key = f"store_fingerprint.{group}." if group else "store_fingerprint."
    missing = [k for k in ("fps", "max_frames", "image_size", "dtype") if k not in fp]
    if missing:
        raise UserError(f"{where}: {key.rstrip('.')} lacks {', '.join(missing)}; is it a dualfocus export?")
    allowed = {"decode_backend": BACKENDS, "compute_dtype": ("auto", *COMPUTE_DTYPES), "dtype": FEATURE_DTYPES}
    for name, values in allowed.items():
        if fp[name] not in values:
            raise UserError(f"{where}: {key}{name} must be one of {', '.join(values)}, got {fp[name]!r}")
    return FrameSettings(fps=fp["fps"], max_frames=fp["max_frames"], image_size=fp["image_size"],
                         decode_backend=fp["decode_backend"], compute_dtype=fp["compute_dtype"],
                         storage_dtype=fp["dtype"])


def encoder_dir(fingerprint: dict, model_dir: str, base_hash: str, export_path) -> str:
    """The encoder a group was extracted with: the base model when the group's config hash is the base model's
    (the DualFocus groups), else the directory its fingerprint records (LongVU's SigLIP and DINOv2)."""
    from dualfocus.pipeline.errors import UserError

    recorded = fingerprint.get("model")
    if recorded is None or fingerprint.get("config_hash") == base_hash:
        return model_dir
    if not Path(recorded).exists():
        raise UserError(f"{Path(export_path) / 'dualfocus.json'}: the encoder this export's features came from is "
                        f"not at {recorded} (store_fingerprint ... model)")
    return recorded


def stream_groups(fingerprint: dict, streams: list[str]) -> dict[str | None, list[str]]:
    """Which group of the fingerprint holds each stream: ``{None: streams}`` for a one-group fingerprint, else
    ``{group: [streams]}`` (a group's ``taps`` record names its streams; a pixels group holds ``frames`` and
    ``box``; the DualFocus default group, whose fingerprint predates that record, holds ``semantic`` and
    ``spatiotemporal``)."""
    groups = sorted({k.split(".", 1)[0] for k in fingerprint if "." in k})
    if not groups:
        return {None: list(streams)}
    out: dict[str | None, list[str]] = {}
    for stream in streams:
        group, _, tap = stream.rpartition(".")
        if not group:
            group = next((g for g in groups if tap in (fingerprint.get(f"{g}.taps") or {})), None) or next(
                (g for g in groups if fingerprint.get(f"{g}.kind") == "pixels" and tap in ("frames", "box")), None) or next(
                (g for g in groups if f"{g}.taps" not in fingerprint and tap in ("semantic", "spatiotemporal")), None)
        out.setdefault(group, []).append(stream)
    return out


def video_features(video: str, model_dir: str, settings: FrameSettings, device: str, timeout_s: float,
                   taps: dict[str, str]) -> dict[str, np.ndarray]:
    """``{stream: [t, tokens, d]}`` of one video for ``taps`` (stream -> tap of the model's vision tower), as a
    store with ``settings`` would return them."""
    from dualfocus.extract.config import DecodeConfig, EncoderConfig
    from dualfocus.extract.stages import DecodeStage, EncodeStage, encode_video
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store.dtypes import round_trip

    names = {stream: stream.rpartition(".")[2] for stream in taps}
    spec = {"name": "ask", "model": model_dir, "taps": {names[s]: tap for s, tap in taps.items()}, "image_size": None,
            "dtype": settings.storage_dtype}
    encode = EncodeStage(groups=[spec], device=device, compute_dtype=settings.compute_dtype,
                         batch_frames=EncoderConfig().batch_frames, threads=None)
    decode = DecodeStage(fps=settings.fps, max_frames=settings.max_frames, size=settings.image_size,
                         chunk_frames=DecodeConfig().chunk_frames, backend=settings.decode_backend, timeout_s=timeout_s)
    try:
        result = encode_video({"video_id": video, "path": video}, decode, encode)
    finally:
        decode.close()
    if result["error"]:
        what = "encode" if result["error"].startswith("encoder failed") else "read"
        raise UserError(f"cannot {what} video {video}: {result['error']}")
    return {stream: round_trip(result[f"ask/{names[stream]}"], settings.storage_dtype) for stream in taps}


def video_pixels(video: str, fingerprint: dict, timeout_s: float, taps: dict[str, str]) -> dict[str, np.ndarray]:
    """``{stream: array}`` of one video for a pixels group (``fingerprint``: its keys, sampling included): the
    decoded uint8 frames ``[t, L, L, 3]`` (tap ``pixels``) and their valid boxes ``[t, 2]`` (tap ``box``), as the
    store holds them."""
    from dualfocus.extract.config import DecodeConfig
    from dualfocus.extract.resize import FrameViews
    from dualfocus.extract.stages import DecodeStage
    from dualfocus.pipeline.errors import UserError

    fp = {**LEGACY_FINGERPRINT, **fingerprint}
    decode = DecodeStage(fps=fp["fps"], max_frames=fp["max_frames"], size=FrameViews(square=None,
                         long_side=fp["long_side"]), chunk_frames=DecodeConfig().chunk_frames,
                         backend=fp["decode_backend"], timeout_s=timeout_s)
    try:
        rows = list(decode({"video_id": video, "path": video}))
    finally:
        decode.close()
    if rows and rows[-1]["error"]:
        raise UserError(f"cannot read video {video}: {rows[-1]['error']}")
    arrays = {"pixels": np.concatenate([r["pixels"] for r in rows]), "box": np.concatenate([r["box"] for r in rows])}
    return {stream: arrays[tap] for stream, tap in taps.items()}


def group_of(fingerprint: dict, group: str | None) -> dict:
    """A group's fingerprint keys (``group.key`` prefix removed) plus the store's sampling keys."""
    if group is None:
        return dict(fingerprint)
    return {**{k: v for k, v in fingerprint.items() if "." not in k},
            **{k[len(group) + 1:]: v for k, v in fingerprint.items() if k.startswith(group + ".")}}


def run_ask(video: str, question: str, cfg: AskConfig) -> str:
    """The connector's answer to ``question`` about ``video`` (``VideoQA`` without a store)."""
    from dualfocus.evaluate.video_qa import VideoQA

    qa = VideoQA(cfg.checkpoint, model=cfg.model, llm_dtype=cfg.llm_dtype, device=cfg.device,
                 decode_timeout_s=cfg.decode_timeout_s)
    return qa.answer([(video, question)], cfg.sampling)[0]
