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


def frame_settings(fingerprint: dict, export_path) -> FrameSettings:
    """``FrameSettings`` of a store fingerprint; keys it predates take ``LEGACY_FINGERPRINT``'s values.

    A fingerprint without the keys every store has had, or with a value this version cannot run, is a
    one-line ``UserError`` naming the export file and the key.
    """
    from dualfocus.extract.decode import BACKENDS
    from dualfocus.pipeline.devices import COMPUTE_DTYPES
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store.dtypes import FEATURE_DTYPES

    where = Path(export_path) / "dualfocus.json"
    fp = {**LEGACY_FINGERPRINT, **(fingerprint if isinstance(fingerprint, dict) else {})}
    missing = [k for k in ("fps", "max_frames", "image_size", "dtype") if k not in fp]
    if missing:
        raise UserError(f"{where}: store_fingerprint lacks {', '.join(missing)}; is it a dualfocus export?")
    allowed = {"decode_backend": BACKENDS, "compute_dtype": ("auto", *COMPUTE_DTYPES), "dtype": FEATURE_DTYPES}
    for key, values in allowed.items():
        if fp[key] not in values:
            raise UserError(f"{where}: store_fingerprint.{key} must be one of {', '.join(values)}, got {fp[key]!r}")
    return FrameSettings(fps=fp["fps"], max_frames=fp["max_frames"], image_size=fp["image_size"],
                         decode_backend=fp["decode_backend"], compute_dtype=fp["compute_dtype"],
                         storage_dtype=fp["dtype"])


def video_features(video: str, model_dir: str, settings: FrameSettings, device: str,
                   timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(semantic ``[t, p+1, d]``, spatiotemporal ``[t, p/4, d]``) of one video, as a store would return them."""
    from dualfocus.extract.config import DecodeConfig, EncoderConfig, StoreConfig
    from dualfocus.extract.groups import DUALFOCUS_TAPS
    from dualfocus.extract.stages import DecodeStage, EncodeStage, encode_video
    from dualfocus.pipeline.errors import UserError
    from dualfocus.store.dtypes import round_trip

    group = StoreConfig().group
    spec = {"name": group, "model": model_dir, "taps": DUALFOCUS_TAPS, "image_size": None,
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
    return (round_trip(result[f"{group}/semantic"], settings.storage_dtype),
            round_trip(result[f"{group}/spatiotemporal"], settings.storage_dtype))


def run_ask(video: str, question: str, cfg: AskConfig) -> str:
    """The connector's answer to ``question`` about ``video``."""
    import torch

    from dualfocus.evaluate.predictor import Predictor, check_export_matches, inference_dtype
    from dualfocus.pipeline.devices import resolve_device
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer
    from dualfocus.pipeline.qa import QAItem
    from dualfocus.pipeline.sampling import uniform_indices
    from dualfocus.evaluate.generate import DEFAULT_QUESTION_TOKENS
    from dualfocus.train.checkpoint import read_export
    from dualfocus.train.checks import ModelLimits, check_context_length
    from dualfocus.train.data import collate, tokenise
    from dualfocus.train.prompt import PromptBuilder

    meta, _ = read_export(cfg.checkpoint)
    model_dir = check_export_matches(meta, cfg.model, None, cfg.checkpoint)
    settings = frame_settings(meta.get("store_fingerprint"), cfg.checkpoint)
    resolve_device(cfg.device)                      # settings that cannot run fail before the video is decoded
    inference_dtype(meta, cfg.llm_dtype, cfg.checkpoint)
    semantic, motion = video_features(video, model_dir, settings, cfg.device, cfg.decode_timeout_s)
    keep = uniform_indices(len(semantic), meta["max_frames"])
    q_tok = load_qformer_tokenizer(model_dir)
    item = QAItem(video_id=video, question=question, question_id="ask")
    (sample,) = tokenise([item], {video: len(keep)}, PromptBuilder(load_llm_tokenizer(model_dir)), q_tok,
                         with_answers=False,
                         max_question_tokens=meta.get("max_question_tokens", DEFAULT_QUESTION_TOKENS))
    check_context_length([sample], None, ModelLimits.of(model_dir), frames_key="the checkpoint's max_frames")
    batch = collate([{"semantic": torch.from_numpy(semantic[keep]), "spatiotemporal": torch.from_numpy(motion[keep]),
                      "sample": sample, "index": 0}], q_tok.pad_token_id or 0)
    return Predictor(cfg.checkpoint, model_dir, dtype=cfg.llm_dtype, device=cfg.device).answer(batch, cfg.sampling)[0]
