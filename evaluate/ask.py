"""``run_ask``: one video, one question, no feature store: decode -> encode -> connector -> LLM.

Frames are sampled, encoded and rounded to the storage dtype exactly as ``extract`` would have stored
them (settings read from the checkpoint's store fingerprint), so ``ask`` and ``generate`` give the same
answer for the same video and question under greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dualfocus.evaluate.predictor import SamplingConfig


@dataclass
class AskConfig:
    """Settings of ``dualfocus ask``."""

    checkpoint: str = ""
    """RUN_DIR/final export written by `dualfocus train`."""
    model: str | None = None
    """Base model directory; null = the one recorded in the checkpoint."""
    decode_timeout_s: float = 60.0
    """Wall-clock limit without progress while decoding the video."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def check(self) -> list[str]:
        problems = [] if self.checkpoint else ["checkpoint is required"]
        if self.decode_timeout_s <= 0:
            problems.append(f"decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        return problems


def round_to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a value becomes after a round trip through the store's dtype (float32 result)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).bfloat16().float().numpy()
    return x.astype(np.float32)


def video_features(video: str, model_dir: str, fingerprint: dict, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(semantic ``[t, p+1, d]``, spatiotemporal ``[t, p/4, d]``) for one video, as extract stores them."""
    from dualfocus.extract.decode import DecodeError
    from dualfocus.extract.decode_worker import DecodeWorker
    from dualfocus.extract.encoder import FrameEncoder
    from dualfocus.pipeline.errors import UserError

    encoder = FrameEncoder(model_dir)
    semantic, motion = [], []
    try:
        with DecodeWorker(stall_timeout_s=timeout_s) as worker:
            _, _, chunks = worker.decode(video, fingerprint["fps"], fingerprint["max_frames"],
                                         fingerprint["image_size"], 16, "decord")
            for frames in chunks:
                sem, mot = encoder(frames)
                semantic.append(round_to_storage(sem, fingerprint["dtype"]))
                motion.append(round_to_storage(mot, fingerprint["dtype"]))
    except DecodeError as e:
        raise UserError(f"cannot read video {video}: {e}") from e
    return np.concatenate(semantic), np.concatenate(motion)


def run_ask(video: str, question: str, cfg: AskConfig) -> str:
    """The connector's answer to ``question`` about ``video``."""
    from dualfocus.evaluate.predictor import Predictor, check_export_matches
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer
    from dualfocus.pipeline.qa import QAItem
    from dualfocus.train.checkpoint import read_export
    from dualfocus.pipeline.sampling import uniform_indices
    from dualfocus.train.data import collate, tokenise
    from dualfocus.train.prompt import PromptBuilder

    meta, _ = read_export(cfg.checkpoint)
    model_dir = check_export_matches(meta, cfg.model, None, cfg.checkpoint)
    semantic, motion = video_features(video, model_dir, meta["store_fingerprint"], cfg.decode_timeout_s)
    keep = uniform_indices(len(semantic), meta["max_frames"])
    q_tok = load_qformer_tokenizer(model_dir)
    item = QAItem(video_id=video, question=question, question_id="ask")
    (sample,) = tokenise([item], {video: len(keep)}, PromptBuilder(load_llm_tokenizer(model_dir)), q_tok,
                         with_answers=False)
    batch = collate([{"semantic": torch.from_numpy(semantic[keep]), "spatiotemporal": torch.from_numpy(motion[keep]),
                      "sample": sample, "index": 0}], q_tok.pad_token_id or 0)
    return Predictor(cfg.checkpoint, model_dir).answer(batch, cfg.sampling)[0]
