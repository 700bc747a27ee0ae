"""The frozen encoder on its own (no Ray): pooling, batching of chunk rows into forwards, and a check
that the tiny model's tower gives features worth comparing. Parity with Hugging Face through the real
pipeline is in test_extract.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualfocus.extract.encoder import FrameEncoder, pool_tokens
from dualfocus.extract.stages import EncoderGroup, encode_chunks


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
        return {"semantic": semantic.copy(), "spatiotemporal": motion.copy()}


def group(encoder, name="eva") -> EncoderGroup:
    return EncoderGroup(name, encoder, {"semantic": (5, 2), "spatiotemporal": (1, 2)}, np.dtype("<f2"))


def chunk_batch(counts: list[int], errors: list[str] | None = None, need: list[str] | None = None) -> dict:
    """A batch of chunk rows whose frames are numbered 0, 1, 2, ... across the rows."""
    frames, start = [], 0
    for c in counts:
        f = np.zeros((c, 4, 4, 3), np.uint8)
        f[:, 0, 0, 0] = np.arange(start, start + c)
        frames.append(f)
        start += c
    holder = np.empty(len(counts), dtype=object)
    holder[:] = frames
    batch = {"video_id": np.array([f"v{i}" for i in range(len(counts))]), "frames": holder,
             "error": np.array(errors or [""] * len(counts), dtype=object)}
    if need is not None:
        batch["need"] = np.array(need, dtype=object)
    return batch


def test_encode_chunks_batches_frames_across_rows_and_splits_them_back():
    encoder = CountingEncoder()
    out = encode_chunks(chunk_batch([3, 0, 4]), [group(encoder)], batch_frames=5)
    assert encoder.calls == [5, 2]
    assert "frames" not in out
    assert [len(s) for s in out["eva/semantic"]] == [3, 0, 4]
    np.testing.assert_array_equal(out["eva/semantic"][2][:, 0, 0], [3, 4, 5, 6])
    np.testing.assert_array_equal(out["eva/spatiotemporal"][0][:, 0, 0], [0, -1, -2])
    assert out["eva/semantic"][0].dtype == np.float16 and out["eva/semantic"][1].shape == (0, 5, 2)
    assert list(out["error"]) == ["", "", ""] and list(out["eva/error"]) == ["", "", ""]


def test_encoder_failure_fails_the_batch_in_its_own_group_only():
    out = encode_chunks(chunk_batch([2, 1, 0], ["", "", "file not found"]),
                        [group(CountingEncoder(fail=True), "eva"), group(CountingEncoder(), "dino")], batch_frames=8)
    assert list(out["eva/error"]) == ["encoder failed: RuntimeError: CUDA out of memory"] * 2 + [""]
    assert list(out["dino/error"]) == ["", "", ""] and list(out["error"]) == ["", "", "file not found"]
    assert [len(s) for s in out["eva/semantic"]] == [0, 0, 0]
    assert [len(s) for s in out["dino/semantic"]] == [2, 1, 0]


def test_each_group_encodes_only_the_rows_that_need_it():
    eva, dino = CountingEncoder(), CountingEncoder()
    out = encode_chunks(chunk_batch([2, 3, 1], need=["eva,dino", "dino", ""]), [group(eva, "eva"), group(dino, "dino")],
                        batch_frames=8)
    assert eva.calls == [3] and dino.calls == [6]          # row 1 is already in eva; "" means every group
    assert [len(s) for s in out["eva/semantic"]] == [2, 0, 1]
    np.testing.assert_array_equal(out["eva/semantic"][2][:, 0, 0], [5])
    np.testing.assert_array_equal(out["dino/semantic"][1][:, 0, 0], [2, 3, 4])
