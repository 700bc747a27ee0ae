"""The frozen encoder on its own (no Ray): pooling, batching of chunk rows into forwards, and a check
that the tiny model's tower gives features worth comparing. Parity with Hugging Face through the real
pipeline is in test_extract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualfocus.extract.encoder import FrameEncoder, pool_tokens
from dualfocus.extract.stages import encode_chunks


def test_pool_tokens_averages_consecutive_groups_of_four():
    hidden = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)  # [n, p, d]
    expected = torch.stack([hidden[:, 0:4].mean(1), hidden[:, 4:8].mean(1)], dim=1)
    torch.testing.assert_close(pool_tokens(hidden), expected)
    with pytest.raises(ValueError, match="not divisible"):
        pool_tokens(torch.zeros(1, 6, 3))


def test_frame_encoder_shapes_and_dtype(tiny_model):
    frames = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    semantic, motion = FrameEncoder(tiny_model, device="cpu")(frames)
    assert semantic.shape == (3, 257, 64) and motion.shape == (3, 64, 64)
    assert semantic.dtype == motion.dtype == np.float32


def test_tiny_model_gives_informative_features(tiny_model):
    """A random tower initialised at InstructBLIP's 1e-10 outputs ~1e-7, which stores as fp16 zeros and
    makes every comparison of features vacuous."""
    frames = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    semantic, motion = FrameEncoder(tiny_model, device="cpu")(frames)
    assert semantic.astype(np.float16).astype(np.float32).std() > 0.1
    assert motion.astype(np.float16).astype(np.float32).std() > 0.01


class CountingEncoder:
    """Fake encoder: every token of a frame holds the frame's pixel [0, 0, 0]; records forward sizes."""

    def __init__(self, fail: bool = False):
        self.calls: list[int] = []
        self.fail = fail

    def __call__(self, frames):
        if self.fail:
            raise RuntimeError("CUDA out of memory\nmore details")
        self.calls.append(len(frames))
        ids = frames[:, 0, 0, 0].astype(np.float32)
        semantic = np.broadcast_to(ids[:, None, None], (len(frames), 5, 2))   # [n, P, D]
        motion = np.broadcast_to(-ids[:, None, None], (len(frames), 1, 2))    # [n, M, D]
        return semantic.copy(), motion.copy()


def chunk_batch(counts: list[int], errors: list[str] | None = None) -> dict:
    """A batch of chunk rows whose frames are numbered 0, 1, 2, ... across the rows."""
    frames, start = [], 0
    for c in counts:
        f = np.zeros((c, 4, 4, 3), np.uint8)
        f[:, 0, 0, 0] = np.arange(start, start + c)
        frames.append(f)
        start += c
    holder = np.empty(len(counts), dtype=object)
    holder[:] = frames
    return {"video_id": np.array([f"v{i}" for i in range(len(counts))]), "frames": holder,
            "error": np.array(errors or [""] * len(counts), dtype=object)}


def test_encode_chunks_batches_frames_across_rows_and_splits_them_back():
    encoder = CountingEncoder()
    out = encode_chunks(chunk_batch([3, 0, 4]), encoder, batch_frames=5)
    assert encoder.calls == [5, 2]
    assert "frames" not in out
    assert [len(s) for s in out["semantic"]] == [3, 0, 4]
    np.testing.assert_array_equal(out["semantic"][2][:, 0, 0], [3, 4, 5, 6])
    np.testing.assert_array_equal(out["spatiotemporal"][0][:, 0, 0], [0, -1, -2])
    assert out["semantic"][0].dtype == np.float16
    assert list(out["error"]) == ["", "", ""]


def test_encoder_failure_fails_every_row_of_the_batch_but_keeps_earlier_errors():
    out = encode_chunks(chunk_batch([2, 0], ["", "file not found"]), CountingEncoder(fail=True), batch_frames=8)
    assert list(out["error"]) == ["encoder failed: RuntimeError: CUDA out of memory", "file not found"]
    assert [len(s) for s in out["semantic"]] == [0, 0]
