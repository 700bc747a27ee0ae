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


def store_stream_problem(store, streams: Sequence[str], store_path: str, model_dir: str, extract_args=None) -> str:
    """Why ``store`` cannot give the connector's ``streams`` ("" when it can): a bare tap name several groups hold
    (name the group), or the streams it lacks and the extract command adding them (``extract_args(missing) ->
    str``: the connector's arguments for it; default ``--model MODEL``)."""
    from dualfocus.store import MissingStreamError

    missing, ambiguous = [], []
    for stream in streams:
        try:
            store.resolve(stream)
        except MissingStreamError:
            holders = [] if "." in stream else store.groups_with(stream)
            if holders:
                ambiguous.append(f"{stream} ({' or '.join(f'{g}.{stream}' for g in holders)})")
            else:
                missing.append(stream)
    if ambiguous:
        return (f"{', '.join(ambiguous)} is a tap of several groups of the feature store at {store_path}: name the "
                "group (group.tap) in the connector's config")
    if not missing:
        return ""
    have = ", ".join(store.streams()) or "no streams"
    args = extract_args(missing) if extract_args else f"--model {model_dir}"
    return (f"the feature store at {store_path} lacks the stream(s) {', '.join(missing)} this connector reads (it "
            f"has {have}); add them with: dualfocus extract CORPUS --out {store_path} {args}")


def check_store_streams(store, streams: Sequence[str], store_path: str, model_dir: str,
                        extract_args=None) -> None:
    """Refuse a store that cannot give a stream the connector reads (``store_stream_problem`` says why)."""
    problem = store_stream_problem(store, streams, store_path, model_dir, extract_args)
    if problem:
        raise UserError(problem)


def check_store_shapes(store, expected: dict[str, tuple[int, ...]], model_dir: str) -> None:
    """Refuse a store whose per-frame shapes differ from what the connector expects of this model, naming both."""
    have = {stream: tuple(store.tap_shape(stream)) for stream in expected}
    if any(have[s] != tuple(want) for s, want in expected.items()):
        raise UserError(
            f"feature store holds frames of {' / '.join(f'{s} {list(h)}' for s, h in have.items())} "
            f"(tokens, width), but the model at {model_dir} expects "
            f"{' / '.join(str(list(w)) for w in expected.values())}: extract the store with this model's vision tower")


def check_store_taps(store, expected: dict[str, str], depth: int, store_path: str) -> None:
    """Refuse a stream whose stored tap is not the cut the connector needs (``hidden[-2]`` and ``hidden[K]``
    name the same layer of a ``depth``-block tower), naming the stream, both taps and the store."""
    from dualfocus.encoders.taps import parse_tap

    def canonical(text: str):
        tap = parse_tap(text)
        return (tap.kind, None if tap.layer is None else tap.layer % (depth + 1), tap.size)

    wrong = []
    for stream, want in expected.items():
        group, tap = store.resolve(stream)
        info = store.groups[group].info
        have = info.taps[tap].spec
        if info.kind != "encoder":  # the pixels group's arrays are named, not encoder cuts: compared as written
            same = have == want
        else:
            same = bool(have) and canonical(have) == canonical(want)
        if not same:
            wrong.append(f"{stream} holds {have}, not {want}")
    if wrong:
        raise UserError(f"the feature store at {store_path} has the wrong cut for this connector: {'; '.join(wrong)} "
                        "(extract another group with the tap this connector reads)")


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
    question_ids: list[int] = field(default_factory=list)
    """The question alone in the LLM's tokenizer (no special tokens), for connectors that embed it."""
    frames: tuple[int, ...] | None = None
    """Stored frames to read, when the connector plans them (``plan_frames``, e.g. LongVU's redundancy drop);
    None = every stored frame. ``max_frames`` subsamples either uniformly."""


def frames_to_read(sample: Tokenised, max_frames: int | None) -> np.ndarray:
    """Indices of the stored frames a sample reads: its planned frames (or all), at most ``max_frames`` of them
    spread uniformly."""
    if sample.frames is None:
        return uniform_indices(sample.n_frames, max_frames)
    planned = np.asarray(sample.frames, dtype=np.int64)
    return planned[uniform_indices(len(planned), max_frames)]


def bytes_per_sample(samples: Sequence[Tokenised], store, streams: Sequence[str], max_frames: int | None) -> float:
    """Mean store bytes one sample reads: the frames it reads (``frames_to_read``) times each stream's stored
    frame size, summed over ``streams``."""
    if not samples:
        return 0.0
    per_frame = sum(store.frame_bytes(s) for s in streams)
    return per_frame * sum(len(frames_to_read(s, max_frames)) for s in samples) / len(samples)


class FeatureQADataset(torch.utils.data.Dataset):
    """Map-style dataset over tokenised samples; the ``streams`` are read from the store on demand."""

    def __init__(self, store_path: str, samples: list[Tokenised], max_frames: int | None,
                 streams: Sequence[str] = ("semantic", "spatiotemporal"), cache_mb: int = 0):
        from dualfocus.data.read_cache import ReadCache

        self.store_path = store_path
        self.streams = tuple(streams)
        self.samples = samples
        self.max_frames = max_frames
        self._store = None  # opened lazily, once per worker process
        self._cache = ReadCache(cache_mb << 20)  # each worker process fills its own copy

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from dualfocus.store import FeatureStore

        if self._store is None:
            self._store = FeatureStore.open(self.store_path)
        s = self.samples[i]
        frames = frames_to_read(s, self.max_frames)
        key = (s.video_id, frames.tobytes())
        feats = self._cache.get(key)
        if feats is None:
            read = self._store.read(s.video_id, frames, streams=self.streams)
            feats = {name: read[name] for name in self.streams}
            self._cache.put(key, feats)
        # each stream [t, ...] (e.g. DualFocus: semantic [t, P, d_v], spatiotemporal [t, M, d_v])
        out = {name: torch.from_numpy(float32_writable(feats[name])) for name in self.streams}
        return {**out, "sample": s, "index": i}


def float32_writable(array: np.ndarray) -> np.ndarray:
    """``array`` as float32 the caller may write to: converted (a new array) from the stored dtype, and copied only
    when it is float32 already and read-only (an array the read cache keeps)."""
    out = np.asarray(array, dtype=np.float32)
    return out if out.flags.writeable else out.copy()


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
                             question_id=item.question_id, question=item.question,
                             question_ids=prompt.question_ids(item.question, max_question_tokens)))
    return out


def count_frames(store, streams: Sequence[str]) -> dict[str, int]:
    """video_id -> stored frame count, for videos ok in every group of ``streams``."""
    table = store.status(streams)
    ok = table[table["status"] == "ok"]
    return dict(zip(ok["video_id"].astype(str), ok["length"].astype(int)))


def answer_vocabulary(items: list[QAItem]) -> Counter:
    """Answer frequencies (for reporting the majority-class baseline)."""
    return Counter(i.answer.strip().lower() for i in items)
