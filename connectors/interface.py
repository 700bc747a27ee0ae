"""What every connector is to the rest of the project: the batch it reads, the tokens it gives the LLM, and
the ``Connector`` base class (streams, trainable weights, save/load, modules inside decoder layers).

Legend: ``b`` batch, ``T`` padded frames, ``L`` question tokens, ``N`` visual tokens per sample (padded),
``d_l`` LLM width.

The trainer, ``generate`` and ``ask`` know a connector only through this file: ``VideoLLM``
(``video_llm.py``) calls ``visual_tokens`` and splices the result at ``<video>``; ``attach`` and
``decoder_inputs`` let a connector reach inside the frozen LLM's decoder layers (Slow-Fast's cross-attention)
without copying the decoder's code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Batch:
    """A collated batch (``data/batch.py::collate``).

    streams: stream name -> features ``[b, T, ...]`` float (zero-padded past each sample's frames)
    frame_mask: ``[b, T]`` bool, True at real frames
    qformer_ids / qformer_mask: the question in the Q-Former's tokenizer ``[b, L]`` (padded; mask 1 = token)
    question_ids / question_mask: the question alone in the LLM's tokenizer ``[b, L']`` (no BOS; padded)
    prefix_ids / text_ids / text_labels: per-sample LLM ids around ``<video>`` (``prompt.py``); labels are
        None at inference
    samples / indices: the tokenised samples and their dataset indices, for bookkeeping
    """

    streams: dict[str, torch.Tensor]
    frame_mask: torch.Tensor
    qformer_ids: torch.Tensor
    qformer_mask: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    prefix_ids: list[list[int]]
    text_ids: list[list[int]]
    text_labels: list[list[int]] | None
    samples: list = field(default_factory=list)
    indices: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.frame_mask.shape[0]

    def to(self, device, dtype: torch.dtype | None = None, non_blocking: bool = False) -> "Batch":
        """The tensors on ``device``; the stream features also cast to ``dtype`` (ids and masks keep theirs)."""
        streams = {k: v.to(device=device, dtype=dtype or v.dtype, non_blocking=non_blocking)
                   for k, v in self.streams.items()}
        moved = {name: getattr(self, name).to(device, non_blocking=non_blocking)
                 for name in ("frame_mask", "qformer_ids", "qformer_mask", "question_ids", "question_mask")}
        return replace(self, streams=streams, **moved)

    def without_labels(self) -> "Batch":
        return replace(self, text_labels=None)


@dataclass
class LLMInputs:
    """The spliced sequence the LLM receives (``VideoLLM.llm_inputs``): ``inputs_embeds [b, S, d_l]``,
    ``attention_mask [b, S]`` (1 at a token), ``labels [b, S]`` (None at inference) and ``visual_mask [b, S]``
    bool, True at the spliced visual tokens (so a decoder-layer module can tell text rows from visual ones)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    visual_mask: torch.Tensor | None = None


@dataclass
class VisualTokens:
    """What a connector gives the LLM for a batch.

    embeds ``[b, N, d_l]`` and mask ``[b, N]`` bool: each sample's visual tokens are ``embeds[i][mask[i]]``, in
    order, spliced at ``<video>``. layer_inputs: anything the connector's decoder-layer modules need for this
    batch (e.g. Slow-Fast's slow tokens); ``VideoLLM`` hands it to ``decoder_inputs`` around the LLM call.
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    layer_inputs: Any = None


def pad_rows(rows: list[torch.Tensor], width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample token lists ``[m_i, width]`` -> ``[b, max m_i, width]`` zero-padded (``like``'s dtype and device)
    and the mask ``[b, max m_i]`` bool, True at real tokens: the layout ``VisualTokens`` wants."""
    m = max([r.shape[0] for r in rows] + [0])
    out = like.new_zeros(len(rows), m, width)
    mask = torch.zeros(len(rows), m, dtype=torch.bool, device=like.device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


class Connector(nn.Module):
    """Base of every connector. A subclass sets ``name`` and ``config_class``, implements ``streams`` and
    ``visual_tokens``, and the static builders the registry lists (``registry.py``).

    Trainable weights: the connector's whole state except the parameters with ``requires_grad=False`` (frozen
    pieces it holds, such as the QA-ViT's frozen ViT blocks, come from the base model and are neither trained
    nor saved) and the buffers of modules with only frozen parameters. ``trainable_state_dict`` /
    ``load_trainable_state_dict`` are what checkpoints and the ``final/`` export hold.

    Decoder-layer modules: a connector that works inside the LLM overrides ``attach(llm)`` to register its
    hooks (or wrappers) on chosen decoder layers, keeping the added modules as its own submodules so they train
    and save with it, and ``decoder_inputs`` to make a batch's ``VisualTokens.layer_inputs`` and the spliced
    sequence (``LLMInputs``: which rows are visual, which are padding) visible to them for the duration of one
    LLM call: a forward, or a whole ``generate``, whose cached steps add text rows after that sequence.
    """

    name: ClassVar[str] = ""

    def streams(self) -> tuple[str, ...]:
        """The store streams (``group.tap`` or an unambiguous ``tap``) this connector reads, in ``Batch.streams``."""
        raise NotImplementedError

    def visual_tokens(self, batch: Batch, llm: nn.Module) -> VisualTokens:
        """The batch's visual tokens for ``llm`` (the frozen LLM, for its embedding table if needed)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ inside the LLM
    def attach(self, llm: nn.Module) -> None:
        """Install this connector's modules in ``llm``'s decoder layers; none by default."""

    @contextlib.contextmanager
    def decoder_inputs(self, layer_inputs: Any, inputs: LLMInputs) -> Iterator[None]:
        """Make ``layer_inputs`` and the sequence ``inputs`` visible to the attached modules during one LLM
        call; nothing by default."""
        yield

    # ------------------------------------------------------------------ weights
    def trainable_names(self) -> set[str]:
        """State-dict keys of everything but the frozen parameters and the buffers of wholly frozen modules."""
        params = dict(self.named_parameters())
        frozen = {n for n, p in params.items() if not p.requires_grad}
        trains = {n.rpartition(".")[0] for n in params if n not in frozen}
        frozen_owners = {n.rpartition(".")[0] for n in frozen} - trains
        return {k for k in self.state_dict() if k not in frozen and k.rpartition(".")[0] not in frozen_owners}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        keep = self.trainable_names()
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by ``trainable_state_dict``; a mismatch names what is missing or unexpected."""
        keep = self.trainable_names()
        unexpected = sorted(k for k in state if k not in keep)
        missing = sorted(k for k in keep if k not in state)
        if unexpected or missing:
            raise ValueError(f"{self.name} connector weights do not match: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.load_state_dict(state, strict=False)

    def gate_parameters(self) -> list[nn.Parameter]:
        """Scalar gates that ``optim.gate_lr_scale`` applies to; none by default."""
        return []
