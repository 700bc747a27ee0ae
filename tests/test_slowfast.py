"""Slow-Fast's token budget: per-frame pooling and fast frames for short, exact-multiple and long clips."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.slowfast import fast_frames, pool_frames


def clip(t: int, p: int = 4, d: int = 3) -> torch.Tensor:
    """Frame i holds the value i everywhere, so averages over frames are easy to read."""
    return torch.arange(t, dtype=torch.float64)[:, None, None].expand(t, p, d).clone()


@pytest.mark.parametrize("t, frames, firsts", [
    (8, 8, [0, 1]),                 # short: t // 4 < 16 -> adaptive to min(t, 16) = t, frames as they are
    (40, 16, [1.0, 3.0]),           # short of 16 x 4: adaptive average to 16 frames (bins [0, 3), [2, 5), ...)
    (64, 16, [1.5, 5.5]),           # exact multiple: runs of 4
    (66, 16, [1.5, 5.5]),           # a partial last run is dropped (avg_pool3d floors)
    (100, 25, [1.5, 5.5]),          # long: t // 4 frames
    (1, 1, [0]),                    # an image
])
def test_fast_frames_follow_the_strides(t, frames, firsts):
    out = fast_frames(clip(t), temporal_stride=4, sampling_stride=1, min_frames=16)
    assert out.shape == (frames, 4, 3)
    assert out[:2, 0, 0].tolist() == firsts[:len(out[:2])]
    assert out[-1, 0, 0] <= t - 1


def test_sampling_stride_picks_frames_before_pooling():
    # 128 frames, every 2nd (64 of them: 0, 2, ...), then runs of 4 -> 16 fast frames
    out = fast_frames(clip(128), temporal_stride=4, sampling_stride=2, min_frames=16)
    assert out.shape[0] == 16 and out[0, 0, 0].item() == (0 + 2 + 4 + 6) / 4
    # fewer than min_frames frames: sampling is skipped, the clip is kept whole
    assert fast_frames(clip(10), 4, sampling_stride=2, min_frames=16).shape[0] == 10


def test_tiny_recipe_budget():
    """configs/train_slowfast_tiny.yaml: 8 frames, stride 4, at least 4 fast frames -> pairs averaged."""
    out = fast_frames(clip(8), temporal_stride=4, sampling_stride=1, min_frames=4)
    assert out[:, 0, 0].tolist() == [0.5, 2.5, 4.5, 6.5]


def test_frames_are_pooled_2x2_on_the_grid_but_an_image_is_not():
    h = w = 4
    grid = torch.arange(h * w, dtype=torch.float64).reshape(1, h * w, 1).expand(3, h * w, 2).clone()  # [t, hw, d]
    out = pool_frames(grid, (h, w), 2)
    assert out.shape == (3, 4, 2)
    # the top-left window holds tokens 0, 1, 4, 5 (row-major)
    assert out[0, :, 0].tolist() == [(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4, (8 + 9 + 12 + 13) / 4,
                                     (10 + 11 + 14 + 15) / 4]
    assert pool_frames(grid[:1], (h, w), 2).shape == (1, 16, 2)
    assert pool_frames(grid, (h, w), 1) is grid
