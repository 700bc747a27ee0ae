"""Learned relative-time embedding added to the spatio-temporal (motion) tokens.

Shape legend: b batch, t frames (right-padded), m motion tokens per frame, d width.

A frame's index is its position among the clip's valid frames scaled to 0..n_positions-1, so the first
frame of every clip is 0 and the last is n_positions-1 whatever the clip length:
    index(i, n) = round(i * (n_positions - 1) / (n - 1)),  n == 1 -> 0
Rounding is half-up and done in integer arithmetic, so indices are exact and platform independent
(n=5, 1000 positions -> [0, 250, 500, 749, 999]).
"""

from __future__ import annotations

import torch
from torch import nn


def _scaled_index(rank: torch.Tensor, n_frames: torch.Tensor, n_positions: int) -> torch.Tensor:
    """round-half-up(rank * (n_positions - 1) / (n_frames - 1)) on integer tensors; 0 when n_frames <= 1."""
    span = (n_frames - 1).clamp(min=1)
    # floor(x + 1/2) with x = rank * top / span, kept in integers: (2 * rank * top + span) // (2 * span)
    return (2 * rank * (n_positions - 1) + span) // (2 * span)


def relative_time_index(n_frames: int, n_positions: int = 1000) -> torch.Tensor:
    """Embedding indices of the frames of one clip with `n_frames` frames: LongTensor [n_frames]."""
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if n_positions < 1:
        raise ValueError(f"n_positions must be >= 1, got {n_positions}")
    rank = torch.arange(n_frames, dtype=torch.long)
    return _scaled_index(rank, torch.tensor(n_frames, dtype=torch.long), n_positions)


class RelativeTimeEmbedding(nn.Module):
    """Adds `embedding[index(frame)]` to every motion token of every valid frame.

    Valid frames are counted in order along t (they need not be a prefix, although they usually are);
    frames whose mask is False are returned unchanged.

    Init: normal, std 0.02 -- the usual init for learned position tables (BERT, ViT, the Video-LLaMA
    frame-position embedding this follows). It is small next to the ViT features it is added to, so the
    motion stream starts almost unchanged, yet the 1000 rows differ from the first step. Exact identity
    at init is not needed here: with the paper's zero-init FFP gates the motion path cannot move the
    output at init anyway (and with open gates, as in the tiny recipe, the fused branch is random at
    init whatever this table holds). nn.Embedding's default N(0, 1) would swamp the features, so it is
    not kept.

    forward(motion [b, t, m, d], frame_mask [b, t] bool | None) -> [b, t, m, d]
    """

    def __init__(self, dim: int, n_positions: int = 1000):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if n_positions < 1:
            raise ValueError(f"n_positions must be >= 1, got {n_positions}")
        self.n_positions = n_positions
        self.embedding = nn.Embedding(n_positions, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def indices(self, frame_mask: torch.Tensor) -> torch.Tensor:
        """frame_mask [b, t] bool -> embedding indices [b, t] long (0 at masked frames)."""
        valid = frame_mask.bool()
        n_valid = valid.sum(dim=1, keepdim=True)  # [b, 1]
        rank = valid.long().cumsum(dim=1) - 1  # [b, t], position among the valid frames
        index = _scaled_index(rank.clamp(min=0), n_valid, self.n_positions)
        return index.masked_fill(~valid, 0)

    def forward(self, motion: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        if motion.ndim != 4:
            raise ValueError(f"expected motion [b, t, m, d], got {tuple(motion.shape)}")
        if frame_mask is None:
            frame_mask = torch.ones(motion.shape[:2], dtype=torch.bool, device=motion.device)
        if frame_mask.shape != motion.shape[:2]:
            raise ValueError(
                f"frame_mask must be [b, t] = {tuple(motion.shape[:2])}, got {tuple(frame_mask.shape)}"
            )
        time = self.embedding(self.indices(frame_mask))[:, :, None, :]  # [b, t, 1, d]
        return torch.where(frame_mask.bool()[:, :, None, None], motion + time.to(motion.dtype), motion)
