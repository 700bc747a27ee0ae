"""Training and inference samples: QA annotations joined with the feature store, tokenised, batched.

Legend: ``T`` frames after the ``max_frames`` cap, ``P`` vision tokens per frame, ``M`` motion tokens
per frame, ``d_v`` vision width, ``L`` Q-Former question tokens.

Every sample is tokenised once up front (cheap); DataLoader workers only read feature arrays, so reading
overlaps compute. Annotations whose video is missing from the store or failed there are counted and
reported; zero usable annotations is an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dualfocus.pipeline.errors import UserError
from dualfocus.pipeline.qa import IdMatcher, QAItem
from dualfocus.pipeline.sampling import uniform_indices


@dataclass
class JoinReport:
    """How many annotations could be used, and why the others could not."""

    total: int = 0
    usable: int = 0
    missing_video: int = 0
    failed_video: int = 0
    examples: list[str] = field(default_factory=list)
    missing: list[dict] = field(default_factory=list)
    """Every unusable entry: ``{"question_id", "video", "reason"}``."""

    def line(self) -> str:
        return (f"annotations: {self.total} | usable {self.usable} | video not in store {self.missing_video} | "
                f"video failed at extract {self.failed_video}")


def join_with_store(items: list[QAItem], store, streams: Sequence[str]) -> tuple[list[QAItem], JoinReport]:
    """Keep items whose video is ``ok`` in every group of ``store`` the ``streams`` come from (ids matched
    leniently); count the rest."""
    table = store.status(streams)
    status = dict(zip(table["video_id"].astype(str), table["status"]))
    match = IdMatcher(status.keys())
    report = JoinReport(total=len(items))
    kept = []
    for item in items:
        vid = match(item.video_id)
        if vid is None or status[vid] == "missing":
            report.missing_video += 1
            if len(report.examples) < 5:
                report.examples.append(item.video_id)
            report.missing.append({"question_id": item.question_id, "video": item.video_id,
                                   "reason": "video not in store"})
        elif status[vid] != "ok":
            report.failed_video += 1
            report.missing.append({"question_id": item.question_id, "video": item.video_id,
                                   "reason": "video failed at extract"})
        else:
            kept.append(QAItem(video_id=vid, question=item.question, answer=item.answer, question_id=item.question_id))
    report.usable = len(kept)
    return kept, report


def check_store_streams(store, streams: Sequence[str], store_path: str, model_dir: str) -> None:
    """Refuse a store that lacks a stream the connector reads, naming each and the extract command adding them."""
    from dualfocus.store import MissingStreamError

    missing = []
    for stream in streams:
        try:
            store.resolve(stream)
        except MissingStreamError:
            missing.append(stream)
    if missing:
        have = ", ".join(store.streams()) or "no streams"
        raise UserError(f"the feature store at {store_path} lacks the stream(s) {', '.join(missing)} this connector "
                        f"reads (it has {have}); add them with: dualfocus extract CORPUS --model {model_dir} "
                        f"--out {store_path}")


def check_store_matches_model(store, model_dir: str, streams: Sequence[str] = ("semantic", "spatiotemporal")) -> None:
    """Refuse a store whose per-frame shapes do not fit the model's Q-Former, naming both."""
    from dualfocus.extract.run import stream_shapes

    want = [tuple(shape) for shape in stream_shapes(model_dir)]
    have = [tuple(store.tap_shape(s)) for s in streams]
    if have != want:
        raise UserError(
            f"feature store holds frames of {' / '.join(f'{s} {list(h)}' for s, h in zip(streams, have))} "
            f"(tokens, width), but the model at {model_dir} expects {' / '.join(str(list(w)) for w in want)}: "
            "extract the store with this model's vision tower")


@dataclass
class Tokenised:
    """A sample's token ids (see ``train/prompt.py``)."""

    video_id: str
    n_frames: int
    qformer_ids: list[int]
    prefix_ids: list[int]
    text_ids: list[int]
    text_labels: list[int]
    question_id: str = ""
    question: str = ""


DUALFOCUS_STREAMS = ("semantic", "spatiotemporal")
"""The streams DualFocus reads: the post-LN vision output and the pooled second-to-last state (`extract`'s
default group)."""


class FeatureQADataset(torch.utils.data.Dataset):
    """Map-style dataset over tokenised samples; the ``streams`` are read from the store on demand."""

    def __init__(self, store_path: str, samples: list[Tokenised], max_frames: int | None,
                 streams: Sequence[str] = DUALFOCUS_STREAMS):
        self.store_path = store_path
        self.streams = tuple(streams)
        self.samples = samples
        self.max_frames = max_frames
        self._store = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from dualfocus.store import FeatureStore

        if self._store is None:
            self._store = FeatureStore.open(self.store_path)
        s = self.samples[i]
        feats = self._store.read(s.video_id, uniform_indices(s.n_frames, self.max_frames), streams=self.streams)
        # semantic [t, P, d_v], spatiotemporal [t, M, d_v]
        out = {name: torch.from_numpy(np.asarray(feats[name], dtype=np.float32)) for name in self.streams}
        return {**out, "sample": s, "index": i}


def tokenise(items: list[QAItem], n_frames: dict[str, int], prompt, qformer_tokenizer, with_answers: bool,
             max_question_tokens: int = 64) -> list[Tokenised]:
    """Token ids for each item: Q-Former question ids and the LLM prompt pieces."""
    out = []
    for item in items:
        pieces = prompt(item.question, item.answer if with_answers else None)
        qids = qformer_tokenizer(item.question, truncation=True, max_length=max_question_tokens)["input_ids"]
        text = pieces.suffix + pieces.answer
        out.append(Tokenised(video_id=item.video_id, n_frames=int(n_frames[item.video_id]), qformer_ids=list(qids),
                             prefix_ids=list(pieces.prefix), text_ids=text, text_labels=pieces.labels_after_video(),
                             question_id=item.question_id, question=item.question))
    return out


def collate(batch: list[dict], qformer_pad_id: int = 0) -> dict:
    """Pad frames and Q-Former ids; keep LLM ids as per-sample lists (spliced in ``DualFocus.llm_inputs``).

    Returns semantic ``[b, T, P, d_v]``, spatiotemporal ``[b, T, M, d_v]``, frame_mask ``[b, T]``,
    qformer_ids/qformer_mask ``[b, L]`` and lists ``prefix_ids``, ``text_ids``, ``text_labels``.
    """
    b = len(batch)
    T = max(x["semantic"].shape[0] for x in batch)
    P, d = batch[0]["semantic"].shape[1:]
    M = batch[0]["spatiotemporal"].shape[1]
    semantic = torch.zeros(b, T, P, d)
    motion = torch.zeros(b, T, M, d)
    frame_mask = torch.zeros(b, T, dtype=torch.bool)
    L = max(len(x["sample"].qformer_ids) for x in batch)
    q_ids = torch.full((b, L), qformer_pad_id, dtype=torch.long)
    q_mask = torch.zeros(b, L, dtype=torch.long)
    for i, x in enumerate(batch):
        t = x["semantic"].shape[0]
        semantic[i, :t] = x["semantic"]
        motion[i, :t] = x["spatiotemporal"]
        frame_mask[i, :t] = True
        ids = x["sample"].qformer_ids
        q_ids[i, : len(ids)] = torch.tensor(ids)
        q_mask[i, : len(ids)] = 1
    samples = [x["sample"] for x in batch]
    return {"semantic": semantic, "spatiotemporal": motion, "frame_mask": frame_mask, "qformer_ids": q_ids,
            "qformer_mask": q_mask, "prefix_ids": [s.prefix_ids for s in samples],
            "text_ids": [s.text_ids for s in samples], "text_labels": [s.text_labels for s in samples],
            "samples": samples, "indices": [x["index"] for x in batch]}


def count_frames(store, streams: Sequence[str]) -> dict[str, int]:
    """video_id -> stored frame count, for videos ok in every group of ``streams``."""
    table = store.status(streams)
    ok = table[table["status"] == "ok"]
    return dict(zip(ok["video_id"].astype(str), ok["length"].astype(int)))


def answer_vocabulary(items: list[QAItem]) -> Counter:
    """Answer frequencies (for reporting the majority-class baseline)."""
    return Counter(i.answer.strip().lower() for i in items)
