"""Synthetic toy corpus: one coloured shape moving across a plain background.

Every clip shows a single shape (circle, square or triangle, nearly half the frame wide) in
one colour (red, green, blue, yellow) crossing a plain grey frame edge to edge in one direction
(left, right, up, down) over 3-5 seconds. The corpus comes with VideoInstruct-style training QA
and zero-shot-style test QA (colour, shape, direction), so a correct pipeline can learn it in
minutes and a broken one cannot.

Layout written by :func:`make_toy_corpus`::

    out_dir/
      videos/toy_00000.mp4 ...   # video_id == file stem
      train.json                 # [{"video_id", "q", "a"}], 3 questions per training video
      test_q.json                # [{"video_name", "question", "question_id"}] for held-out videos
      test_a.json                # [{"answer", "type", "question_id"}]
      corpus.csv                 # video_id,path (absolute paths)

Everything is a pure function of ``seed``: the QA files are byte-identical across runs and the
rendered frames are identical (the encoder runs single-threaded).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (150, 150, 150)
# Side of a shape's bounding box as a share of the frame, drawn per clip. How much of the frame is coloured is
# the one shape cue a random frozen tower (init-tiny) hands on: its patch tokens are nearly linear in the pixels,
# and circle and square differ otherwise only at their four corners, a cue no reader on these features learned.
# So the sides vary by +-2 % only, and the three shapes never overlap in area (triangle 1/2, circle pi/4, square 1
# of the box); and the box is nearly half the frame, so that circle and square differ by ~11 of 256 patches.
# Before: 0.28-0.34 (areas overlapped; the best rule on area told 85 % of circles from squares, and every reader
# stalled there); 0.30-0.32 (no overlap, but a ~5-patch difference the connector did not learn in the budget).
# README, "Toy learning", has the figures.
SHAPE_SIDE = (0.44, 0.46)

QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the shape?",
        "Which colour is the moving object?",
        "What is the color of the object in the video?",
    ),
    "shape": (
        "What shape is the object?",
        "Which shape moves in the video?",
        "What kind of shape is shown in the video?",
    ),
    "direction": (
        "In which direction does the shape move?",
        "Which way is the object moving?",
        "Where does the shape go: left, right, up or down?",
    ),
}


def make_toy_corpus(
    out_dir: str | Path,
    n_videos: int,
    seed: int = 0,
    test_fraction: float = 0.2,
    fps: int = 10,
    size: int = 96,
) -> dict:
    """Render ``n_videos`` toy clips and their QA files under ``out_dir``.

    Args:
        out_dir: Output directory (created if missing; existing files are overwritten).
        n_videos: Number of clips, at least 2 (one training and one held-out clip).
        seed: Seed of the single RNG that drives split, attributes, motion and phrasing.
        test_fraction: Share of clips held out for test QA (rounded; at least 1, at most
            n_videos - 1).
        fps: Frame rate of the encoded clips.
        size: Frame width and height in pixels (even, >= 32).

    Returns:
        A summary dict: ``n_videos, n_train, n_test, n_train_qa, n_test_qa`` and the paths
        ``out_dir, videos_dir, train_json, test_q_json, test_a_json, corpus_csv`` as strings.
    """
    problems = []
    if n_videos < 2:
        problems.append(f"n_videos must be >= 2, got {n_videos}")
    if not 0.0 < test_fraction < 1.0:
        problems.append(f"test_fraction must be in (0, 1), got {test_fraction}")
    if fps < 1:
        problems.append(f"fps must be >= 1, got {fps}")
    if size < 32 or size % 2:
        problems.append(f"size must be even and >= 32, got {size}")
    if problems:
        raise ValueError("; ".join(problems))

    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    n_test, test_ids = _split(rng, n_videos, test_fraction)
    # Attributes are dealt separately to each split from reshuffled cycles, so every colour,
    # shape and direction shows up in a split as soon as it has 4 clips.
    split_attrs = {
        split: _balanced_attributes(rng, n)
        for split, n in (("train", n_videos - n_test), ("test", n_test))
    }

    train_qa, test_q, test_a, corpus_rows = [], [], [], []
    for i in range(n_videos):
        video_id = f"toy_{i:05d}"
        split = "test" if i in test_ids else "train"
        attrs = split_attrs[split].pop(0)
        path = videos_dir / f"{video_id}.mp4"
        n_frames = int(rng.integers(3 * fps, 5 * fps + 1))
        write_mp4(path, _render_clip(rng, attrs, n_frames, size), fps)
        corpus_rows.append((video_id, str(path.resolve())))
        for kind in ("color", "shape", "direction"):
            question = QUESTIONS[kind][int(rng.integers(len(QUESTIONS[kind])))]
            _add_question(split, video_id, kind, question, attrs[kind], train_qa, test_q, test_a)

    paths = _write_qa_files(out_dir, train_qa, test_q, test_a, corpus_rows)

    return {
        "n_videos": n_videos,
        "n_train": n_videos - n_test,
        "n_test": n_test,
        "n_train_qa": len(train_qa),
        "n_test_qa": len(test_q),
        "out_dir": str(out_dir),
        "videos_dir": str(videos_dir),
        **{key: str(p) for key, p in paths.items()},
    }


def _split(rng: np.random.Generator, n_videos: int, test_fraction: float) -> tuple[int, set[int]]:
    """(n_test, the clip numbers held out for testing): at least one clip in each split."""
    n_test = min(max(1, round(n_videos * test_fraction)), n_videos - 1)
    return n_test, set(rng.choice(n_videos, size=n_test, replace=False).tolist())


def _add_question(split: str, video_id: str, qtype: str, question: str, answer: str, train_qa: list,
                  test_q: list, test_a: list) -> None:
    """One question of a clip: a training QA row, or a test question and its typed answer (id ``video_qtype``)."""
    if split == "train":
        train_qa.append({"video_id": video_id, "q": question, "a": answer})
    else:
        qid = f"{video_id}_{qtype}"
        test_q.append({"video_name": video_id, "question": question, "question_id": qid})
        test_a.append({"answer": answer, "type": qtype, "question_id": qid})


def _write_qa_files(out_dir: Path, train_qa: list, test_q: list, test_a: list,
                    corpus_rows: list[tuple[str, str]]) -> dict[str, Path]:
    """train.json, test_q.json, test_a.json and corpus.csv under ``out_dir``; their paths by summary key."""
    paths = {
        "train_json": out_dir / "train.json",
        "test_q_json": out_dir / "test_q.json",
        "test_a_json": out_dir / "test_a.json",
        "corpus_csv": out_dir / "corpus.csv",
    }
    for key, rows in (("train_json", train_qa), ("test_q_json", test_q), ("test_a_json", test_a)):
        paths[key].write_text(json.dumps(rows, indent=1) + "\n")
    with paths["corpus_csv"].open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["video_id", "path"])
        writer.writerows(corpus_rows)
    return paths


def write_mp4(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: int,
    keyframe_interval: int | None = None,
    faststart: bool = False,
) -> None:
    """Encode RGB frames ``[h, w, 3]`` uint8 (h, w even) to an MP4 at a constant ``fps``.

    Uses libx264 (yuv420p) when the PyAV build has it, else MPEG-4 Part 2. Encoding runs on one
    thread, with x264's macroblock-tree rate control off, so the output depends only on the frames. ``keyframe_interval`` (frames) overrides the
    codec's default GOP length; ``faststart`` puts the index (moov atom) before the frame data.
    """
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.thread_count = 1
                if keyframe_interval is not None:
                    stream.codec_context.gop_size = keyframe_interval
                if codec == "libx264":
                    # mbtree off: with it, the libx264 in PyAV 18.1's wheels wrote different bytes for the same frames
                    # on some clips (3 of 44 toy clips, 4 encodes each, one thread); without it, 0 of 44 x 12.
                    stream.codec_context.options = {"crf": "18", "preset": "fast", "x264-params": "mbtree=0"}
                else:
                    stream.codec_context.bit_rate = 2_000_000
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"no frames given for {path}")
        for packet in stream.encode():
            container.mux(packet)


def _balanced_attributes(rng: np.random.Generator, n: int) -> list[dict[str, str]]:
    """``n`` attribute dicts; each attribute cycles through its values in reshuffled rounds."""

    def cycle(values: tuple[str, ...]) -> list[str]:
        rounds = math.ceil(n / len(values))
        return [v for _ in range(rounds) for v in rng.permutation(values).tolist()][:n]

    colors, shapes, directions = cycle(tuple(COLORS)), cycle(SHAPES), cycle(DIRECTIONS)
    return [{"color": c, "shape": s, "direction": d} for c, s, d in zip(colors, shapes, directions)]


def _render_clip(
    rng: np.random.Generator, attrs: dict[str, str], n_frames: int, size: int
) -> list[np.ndarray]:
    """Frames ``[size, size, 3]`` uint8: one shape crossing the frame in ``attrs['direction']``."""
    side = size * rng.uniform(*SHAPE_SIDE)  # shape bounding box, nearly half the frame
    margin = size * 0.03
    lo, hi = margin + side / 2, size - margin - side / 2  # range of the shape's centre
    cross = rng.uniform(lo, hi)  # fixed coordinate across the direction of motion
    start, end = {"right": (lo, hi), "down": (lo, hi), "left": (hi, lo), "up": (hi, lo)}[
        attrs["direction"]
    ]
    horizontal = attrs["direction"] in ("left", "right")
    frames = []
    for k in range(n_frames):
        along = start + (end - start) * k / max(n_frames - 1, 1)
        cx, cy = (along, cross) if horizontal else (cross, along)
        frames.append(_draw(attrs["shape"], COLORS[attrs["color"]], cx, cy, side, size))
    return frames


def _draw(
    shape: str, color: tuple[int, int, int], cx: float, cy: float, side: float, size: int
) -> np.ndarray:
    """One frame ``[size, size, 3]`` uint8 with ``shape`` centred at (cx, cy) in pixel units."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    dx, dy, r = xs - cx, ys - cy, side / 2
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex up, base at the bottom of the bounding box
        mask = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    frame = np.empty((size, size, 3), dtype=np.uint8)
    frame[:] = BACKGROUND
    frame[mask] = color
    return frame
