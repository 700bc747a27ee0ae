"""Toy corpus v2 (``toy-corpus --kind v2``): v1's clips plus questions whose answer needs time.

v1 (:mod:`dualfocus.pipeline.toy`) asks about colour, shape and direction, which one frame (or two)
answers, so every connector learns it. v2 mixes five kinds of clips, each with its own questions and a
``type`` per question in ``test_a.json`` (so ``dualfocus score`` reports accuracy per type):

=================  ==========================================================  =========================
clip kind          what the clip shows                                          question types (answers)
=================  ==========================================================  =========================
``plain``          v1: one shape crossing the frame, 3-5 s                      ``color`` ``shape``
                                                                                ``direction`` (as v1)
``colour_change``  v1's motion, but the shape switches colour once, at a        ``colour_start``
                   random frame in the middle third, 4-6 s                      ``colour_end`` (colours),
                                                                                ``shape`` ``direction``
``order``          two shapes of distinct colours appear one after the other    ``order`` (shape)
                   (first in the first 20 % of the clip, second at 40-60 %) and
                   stay put, 4-6 s
``count``          one shape moving back and forth, reversing at the frame      ``count`` (one two three),
                   edge k = 1..3 times, 5-7 s whatever k                        ``color`` ``shape``
``long``           120-130 s: the shape sits still except for one 6-10 s        ``long_direction``
                   segment at a random time where it crosses the frame          (direction), ``color``
                                                                                ``shape``
=================  ==========================================================  =========================

A clip is asked v1's questions too wherever they have one answer (``QUESTION_TYPES``): about 2.8 questions a clip
instead of 1.7, so a connector meets colours and shapes on every kind of clip, the ground its time questions
stand on.

Every answer is one word the tiny model's tokenizer holds as one token (colours, shapes, directions,
one/two/three). Answers are balanced per clip kind and type: each split deals every kind's attributes
from reshuffled cycles, as v1 does. Files and layout are v1's (``videos/toy2_00000.mp4``, ``train.json``,
``test_q.json``, ``test_a.json``, ``corpus.csv``), so extract, train, generate and score run unchanged.

Each clip is described by a JSON-able dict (its kind, attributes, the frames where things happen and
a ``seed`` for its geometry); :func:`clip_frames` renders it, so tests can check the frames against
the QA. Everything is a pure function of ``seed``; long clips repeat one frame array through their
static stretches, which x264 encodes almost for free.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dualfocus.pipeline.toy import (BACKGROUND, COLORS, DIRECTIONS, QUESTIONS, SHAPES, _add_question, _balanced_attributes,
                                    _draw, _render_clip, _split, _write_qa_files, write_mp4)

KINDS = ("plain", "colour_change", "order", "count", "long")
_SHORT_KINDS = KINDS[:-1]
NUMBERS = ("one", "two", "three")
LONG_SECONDS = (120, 130)
"""Range of a long clip's length in seconds."""

QUESTIONS_V2: dict[str, tuple[str, ...]] = {
    "colour_start": (
        "What colour is the shape at the start?",
        "What color is the object at the start of the video?",
    ),
    "colour_end": (
        "What colour is the shape at the end?",
        "What color is the object at the end of the video?",
    ),
    "order": (
        "Which shape appears first?",
        "Which shape is shown first in the video?",
    ),
    "count": (
        "How many times does the shape bounce?",
        "How many times does the object bounce off the edge?",
    ),
    "long_direction": QUESTIONS["direction"],
}
QUESTION_TYPES = {"plain": ("color", "shape", "direction"),
                  "colour_change": ("colour_start", "colour_end", "shape", "direction"),
                  "order": ("order",), "count": ("count", "color", "shape"), "long": ("long_direction", "color", "shape")}
"""The question types each clip kind is asked: its own, and v1's wherever the clip gives them one answer (not
colour on a clip that changes colour, nor direction on one that bounces, nor anything single-shape when two are
shown)."""


def make_toy_corpus_v2(
    out_dir: str | Path,
    n_videos: int,
    seed: int = 0,
    long_fraction: float = 0.1,
    test_fraction: float = 0.2,
    fps: int = 10,
    size: int = 96,
) -> dict:
    """Render ``n_videos`` v2 toy clips and their QA files under ``out_dir``.

    Args:
        out_dir: Output directory (created if missing; existing files are overwritten).
        n_videos: Number of clips, at least 2.
        seed: Seed of the single RNG that drives split, kinds, attributes, timing and phrasing.
        long_fraction: Share of long clips in each split (rounded per split, so a split of fewer than
            ``0.5 / long_fraction`` clips has none); the other clips cycle through the four short kinds.
        test_fraction: Share of clips held out for test QA (as v1).
        fps: Frame rate of the encoded clips (>= 4, so three bounces in 5 s stay visible).
        size: Frame width and height in pixels (even, >= 32).

    Returns:
        v1's summary (``n_videos, n_train, n_test, n_train_qa, n_test_qa`` and the paths) plus
        ``n_clips_per_kind``, ``n_questions_per_type`` (``{"train": {...}, "test": {...}}``),
        ``clip_seconds`` (``{kind: [shortest, longest]}``) and ``clips``, the per-clip dicts that
        :func:`clip_frames` renders.
    """
    problems = []
    if n_videos < 2:
        problems.append(f"n_videos must be >= 2, got {n_videos}")
    if not 0.0 <= long_fraction <= 1.0:
        problems.append(f"long_fraction must be in [0, 1], got {long_fraction}")
    if not 0.0 < test_fraction < 1.0:
        problems.append(f"test_fraction must be in (0, 1), got {test_fraction}")
    if fps < 4:
        problems.append(f"fps must be >= 4, got {fps}")
    if size < 32 or size % 2:
        problems.append(f"size must be even and >= 32, got {size}")
    if problems:
        raise ValueError("; ".join(problems))

    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    n_test, test_ids = _split(rng, n_videos, test_fraction)
    split_clips = {split: _deal_clips(rng, n, long_fraction, fps)
                   for split, n in (("train", n_videos - n_test), ("test", n_test))}

    clips, train_qa, test_q, test_a, corpus_rows = [], [], [], [], []
    for i in range(n_videos):
        split = "test" if i in test_ids else "train"
        clip = {"video_id": f"toy2_{i:05d}", "split": split, **split_clips[split].pop(0)}
        clips.append(clip)
        path = videos_dir / f"{clip['video_id']}.mp4"
        write_mp4(path, clip_frames(clip, size), fps)
        corpus_rows.append((clip["video_id"], str(path.resolve())))
        for qtype, answer in clip["answers"].items():
            question = QUESTIONS_V2.get(qtype, QUESTIONS.get(qtype))
            question = question[int(rng.integers(len(question)))]
            _add_question(split, clip["video_id"], qtype, question, answer, train_qa, test_q, test_a)

    paths = _write_qa_files(out_dir, train_qa, test_q, test_a, corpus_rows)

    per_type = {split: {} for split in ("train", "test")}
    for clip in clips:
        for qtype in clip["answers"]:
            per_type[clip["split"]][qtype] = per_type[clip["split"]].get(qtype, 0) + 1
    seconds: dict[str, list[float]] = {}
    for clip in clips:
        lo, hi = seconds.setdefault(clip["kind"], [math.inf, 0.0])
        seconds[clip["kind"]] = [min(lo, clip["n_frames"] / fps), max(hi, clip["n_frames"] / fps)]
    return {
        "n_videos": n_videos,
        "n_train": n_videos - n_test,
        "n_test": n_test,
        "n_train_qa": len(train_qa),
        "n_test_qa": len(test_q),
        "out_dir": str(out_dir),
        "videos_dir": str(videos_dir),
        **{key: str(p) for key, p in paths.items()},
        "n_clips_per_kind": {kind: sum(c["kind"] == kind for c in clips) for kind in KINDS},
        "n_questions_per_type": per_type,
        "clip_seconds": {kind: seconds[kind] for kind in KINDS if kind in seconds},
        "clips": clips,
    }


def _cycle(rng: np.random.Generator, values: tuple, n: int) -> list:
    """``n`` values cycling through ``values`` in reshuffled rounds (balanced, seeded)."""
    rounds = math.ceil(n / len(values))
    return [v for _ in range(rounds) for v in rng.permutation(np.array(values, dtype=object)).tolist()][:n]


def _distinct_pairs(rng: np.random.Generator, values: tuple, n: int) -> list[tuple]:
    """``n`` pairs ``(a, b)`` with ``a != b``; the a's and the b's are each dealt by :func:`_cycle`."""
    firsts, seconds = _cycle(rng, values, n), _cycle(rng, values, n)
    for j in range(n):  # break every a == b by swapping b's between pairs, which keeps the b's balanced
        if seconds[j] == firsts[j]:
            i = next((i for i in range(n) if seconds[i] != firsts[j] and seconds[j] != firsts[i]), None)
            if i is None:  # too few pairs to swap with
                seconds[j] = values[(values.index(firsts[j]) + 1) % len(values)]
            else:
                seconds[i], seconds[j] = seconds[j], seconds[i]
    return list(zip(firsts, seconds))


def _deal_clips(rng: np.random.Generator, n: int, long_fraction: float, fps: int) -> list[dict]:
    """``n`` clip descriptions for one split: kinds, balanced attributes, timing and answers."""
    n_long = round(n * long_fraction)
    kinds = ["long"] * n_long + _cycle(rng, _SHORT_KINDS, n - n_long)
    kinds = [kinds[j] for j in rng.permutation(n)]
    colours = tuple(COLORS)
    dealt = {}
    for kind in KINDS:
        m = kinds.count(kind)
        if kind == "plain":
            dealt[kind] = _balanced_attributes(rng, m)
            continue
        cols = dict(colors=_distinct_pairs(rng, colours, m), shapes=_distinct_pairs(rng, SHAPES, m),
                    direction=_cycle(rng, DIRECTIONS, m), bounces=_cycle(rng, (1, 2, 3), m))
        dealt[kind] = [{key: values[j] for key, values in cols.items()} for j in range(m)]

    clips = []
    for kind in kinds:
        a = dealt[kind].pop(0)
        clip = {"kind": kind, "seed": int(rng.integers(2**31))}
        if kind == "plain":
            n_frames = int(rng.integers(3 * fps, 5 * fps + 1))
            clip.update(a)
            answers = dict(a)
        elif kind == "colour_change":
            n_frames = int(rng.integers(4 * fps, 6 * fps + 1))
            change = int(rng.integers(math.ceil(n_frames / 3), 2 * n_frames // 3 + 1))
            clip.update(colors=list(a["colors"]), shape=a["shapes"][0], direction=a["direction"], change_frame=change)
            answers = {"colour_start": a["colors"][0], "colour_end": a["colors"][1], "shape": a["shapes"][0],
                       "direction": a["direction"]}
        elif kind == "order":
            n_frames = int(rng.integers(4 * fps, 6 * fps + 1))
            appear = [int(rng.integers(0, round(0.2 * n_frames) + 1)),
                      int(rng.integers(round(0.4 * n_frames), round(0.6 * n_frames) + 1))]
            clip.update(shapes=list(a["shapes"]), colors=list(a["colors"]), appear_frames=appear,
                        first_on_left=bool(rng.integers(2)))
            answers = {"order": a["shapes"][0]}
        elif kind == "count":
            n_frames = int(rng.integers(5 * fps, 7 * fps + 1))
            legs = [float(rng.uniform(0.05, 0.45)), a["bounces"] + float(rng.uniform(0.3, 0.8))]
            clip.update(color=a["colors"][0], shape=a["shapes"][0], bounces=a["bounces"], legs=legs,
                        horizontal=bool(rng.integers(2)), reverse=bool(rng.integers(2)))
            answers = {"count": NUMBERS[a["bounces"] - 1], "color": a["colors"][0], "shape": a["shapes"][0]}
        else:  # long
            n_frames = int(rng.integers(LONG_SECONDS[0] * fps, LONG_SECONDS[1] * fps + 1))
            move = int(rng.integers(6 * fps, 10 * fps + 1))
            start = int(rng.integers(0, n_frames - move + 1))
            clip.update(color=a["colors"][0], shape=a["shapes"][0], direction=a["direction"],
                        move_frames=[start, start + move])
            answers = {"long_direction": a["direction"], "color": a["colors"][0], "shape": a["shapes"][0]}
        clip["n_frames"] = n_frames
        clip["answers"] = answers
        clips.append(clip)
    return clips


def clip_frames(clip: dict, size: int) -> Iterator[np.ndarray]:
    """Frames ``[size, size, 3]`` uint8 of one clip description (as listed in the summary's ``clips``).

    Static stretches yield the same array object again; copy a frame before changing it.
    """
    rng = np.random.default_rng(clip["seed"])  # geometry only: the clip dict fixes what the QA asks
    n, kind = clip["n_frames"], clip["kind"]
    if kind == "plain":
        yield from _render_clip(rng, clip, n, size)
    elif kind == "colour_change":
        state = rng.bit_generator.state  # both colours follow the same path: render it twice, splice
        before = _render_clip(rng, {**clip, "color": clip["colors"][0]}, n, size)[: clip["change_frame"]]
        rng.bit_generator.state = state
        yield from before + _render_clip(rng, {**clip, "color": clip["colors"][1]}, n, size)[clip["change_frame"]:]
    elif kind == "order":
        yield from _order_frames(rng, clip, size)
    elif kind == "count":
        yield from _count_frames(rng, clip, size)
    elif kind == "long":
        yield from _long_frames(rng, clip, size)
    else:
        raise ValueError(f"unknown clip kind {kind!r}")


def _side_and_range(rng: np.random.Generator, size: int) -> tuple[float, float, float]:
    """Shape side (about a third of the frame) and the range [lo, hi] of its centre. The side is drawn from
    0.28-0.34 of the frame, v1's range before ``toy.SHAPE_SIDE`` (0.44-0.46); v2 keeps it so that the compare
    figures in the README stand (its circle and square areas overlap, as v1's did, which caps shape there)."""
    side = size * rng.uniform(0.28, 0.34)
    margin = size * 0.03
    return side, margin + side / 2, size - margin - side / 2


def _order_frames(rng: np.random.Generator, clip: dict, size: int) -> Iterator[np.ndarray]:
    side = size * rng.uniform(0.26, 0.3)
    cy = [rng.uniform(side / 2 + 2, size - side / 2 - 2) for _ in range(2)]
    cx = [size * 0.25, size * 0.75] if clip["first_on_left"] else [size * 0.75, size * 0.25]
    layers = [_draw(clip["shapes"][j], COLORS[clip["colors"][j]], cx[j], cy[j], side, size) for j in range(2)]
    empty = np.empty_like(layers[0])
    empty[:] = BACKGROUND
    both = np.where((layers[1] != empty).any(-1, keepdims=True), layers[1], layers[0])
    first, second = clip["appear_frames"]
    for k in range(clip["n_frames"]):
        yield both if k >= second else layers[0] if k >= first else empty


def _count_frames(rng: np.random.Generator, clip: dict, size: int) -> Iterator[np.ndarray]:
    side, lo, hi = _side_and_range(rng, size)
    cross = rng.uniform(lo, hi)
    s0, s1 = clip["legs"]  # path in legs (edge to edge): a reversal at every integer in between
    n = clip["n_frames"]
    for k in range(n):
        s = s0 + (s1 - s0) * k / (n - 1)
        tri = 1.0 - abs(1.0 - s % 2.0)  # 0 -> 1 -> 0: triangle wave, 1 at odd integers
        along = hi - (hi - lo) * tri if clip["reverse"] else lo + (hi - lo) * tri
        cx, cy = (along, cross) if clip["horizontal"] else (cross, along)
        yield _draw(clip["shape"], COLORS[clip["color"]], cx, cy, side, size)


def _long_frames(rng: np.random.Generator, clip: dict, size: int) -> Iterator[np.ndarray]:
    side, lo, hi = _side_and_range(rng, size)
    cross = rng.uniform(lo, hi)
    start, end = {"right": (lo, hi), "down": (lo, hi), "left": (hi, lo), "up": (hi, lo)}[clip["direction"]]
    horizontal = clip["direction"] in ("left", "right")
    m0, m1 = clip["move_frames"]

    def frame(along: float) -> np.ndarray:
        cx, cy = (along, cross) if horizontal else (cross, along)
        return _draw(clip["shape"], COLORS[clip["color"]], cx, cy, side, size)

    first, last = frame(start), frame(end)
    for k in range(clip["n_frames"]):
        if k < m0:
            yield first
        elif k >= m1 - 1:
            yield last
        else:
            yield frame(start + (end - start) * (k - m0) / (m1 - 1 - m0))
