"""Semantic stream: the instruction-aware Q-Former run on cached vision features.

Shape legend: N frames in the batch (all videos' frames flattened), P vision tokens per frame
(p patches + CLS), d_v vision width, L question tokens, q learned queries, d_q Q-Former width.

This is the Q-Former half of `InstructBlipForConditionalGeneration.get_image_features`; the vision
half ran once at extract time and its post-layernorm output is what the feature store holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import InstructBlipForConditionalGeneration, InstructBlipQFormerModel


class SemanticStream(nn.Module):
    """Learned queries read each frame, conditioned on the question (InstructBLIP's Q-Former).

    The queries and the question tokens share self-attention (queries first, then the question);
    the queries cross-attend to the frame's vision tokens. Only the q query rows are returned.

    Args:
        qformer: an already-built `InstructBlipQFormerModel`.
        query_tokens: the learned queries, [1, q, d_q].

    forward(frames [N, P, d_v], question_ids [N, L] long, question_mask [N, L] long/bool | None)
        -> [N, q, d_q]
    `question_mask` is 1/True for real question tokens, 0/False for padding (defaults to all ones).
    """

    def __init__(self, qformer: InstructBlipQFormerModel, query_tokens: nn.Parameter):
        super().__init__()
        if query_tokens.ndim != 3 or query_tokens.shape[0] != 1:
            raise ValueError(f"query_tokens must be [1, q, d_q], got {tuple(query_tokens.shape)}")
        self.qformer = qformer
        self.query_tokens = query_tokens

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def forward(
        self,
        frames: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n_frames = frames.shape[0]
        if question_ids.shape[0] != n_frames:
            raise ValueError(
                f"question_ids has {question_ids.shape[0]} rows but frames has {n_frames}; "
                "repeat each video's question once per frame"
            )
        queries = self.query_tokens.expand(n_frames, -1, -1)  # [N, q, d_q]
        if question_mask is None:
            question_mask = torch.ones_like(question_ids)
        query_mask = torch.ones(queries.shape[:2], dtype=torch.long, device=frames.device)
        attention_mask = torch.cat([query_mask, question_mask.to(frames.device, torch.long)], dim=1)  # [N, q+L]
        frame_mask = torch.ones(frames.shape[:2], dtype=torch.long, device=frames.device)  # [N, P]
        out = self.qformer(
            input_ids=question_ids,
            attention_mask=attention_mask,
            query_embeds=queries,
            encoder_hidden_states=frames,
            encoder_attention_mask=frame_mask,
            return_dict=True,
        )
        return out.last_hidden_state[:, : self.num_queries]  # [N, q, d_q]


def semantic_stream_from_instructblip(model: InstructBlipForConditionalGeneration) -> SemanticStream:
    """Wrap the Q-Former and query tokens of an InstructBLIP model; shares (does not copy) them."""
    return SemanticStream(model.qformer, model.query_tokens)
