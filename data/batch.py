"""``collate``: dataset items -> one typed ``Batch`` (``connectors/interface.py``), padding frames and questions.

Legend: ``b`` samples, ``T`` the most frames of any sample, ``L`` the longest question.
"""

from __future__ import annotations

import torch

from dualfocus.connectors.interface import Batch


def _pad_ids(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``[b, L]`` and their mask (1 at a token), L at least 1."""
    L = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def collate(items: list[dict], qformer_pad_id: int = 0, llm_pad_id: int = 0) -> Batch:
    """Items of ``FeatureQADataset`` (``{stream: [t, ...], "sample": Tokenised, "index": int}``) -> a ``Batch``.

    Every stream is zero-padded to ``[b, T, ...]`` (``frame_mask`` marks the real frames); the Q-Former and LLM
    question ids are right-padded with their masks; the LLM prompt ids stay per-sample lists (``VideoLLM``
    splices them around the visual tokens).
    """
    samples = [x["sample"] for x in items]
    names = [k for k in items[0] if k not in ("sample", "index")]
    lengths = [items[i][names[0]].shape[0] for i in range(len(items))]
    T = max(lengths)
    frame_mask = torch.zeros(len(items), T, dtype=torch.bool)
    streams = {}
    for name in names:
        out = torch.zeros(len(items), T, *items[0][name].shape[1:])
        for i, x in enumerate(items):
            out[i, : x[name].shape[0]] = x[name]
        streams[name] = out
    for i, t in enumerate(lengths):
        frame_mask[i, :t] = True
    qformer_ids, qformer_mask = _pad_ids([s.qformer_ids for s in samples], qformer_pad_id)
    question_ids, question_mask = _pad_ids([s.question_ids for s in samples], llm_pad_id)
    return Batch(streams=streams, frame_mask=frame_mask, qformer_ids=qformer_ids, qformer_mask=qformer_mask,
                 question_ids=question_ids, question_mask=question_mask,
                 prefix_ids=[s.prefix_ids for s in samples], text_ids=[s.text_ids for s in samples],
                 text_labels=[s.text_labels for s in samples], samples=samples, indices=[x["index"] for x in items])
