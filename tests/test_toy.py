"""The synthetic toy corpus: determinism, split bookkeeping, clips that show what the QA says."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dualfocus.extract.decode import decode_video
from dualfocus.pipeline.toy import BACKGROUND, COLORS, DIRECTIONS, SHAPES, make_toy_corpus

QA_FILES = ("train.json", "test_q.json", "test_a.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy") / "a"
    return out, make_toy_corpus(out, n_videos=16, seed=3, test_fraction=0.25)


def _load(out: Path, name: str):
    return json.loads((out / name).read_text())


def test_same_seed_gives_identical_files_and_frames(corpus, tmp_path):
    out_a, _ = corpus
    out_b = tmp_path / "b"
    make_toy_corpus(out_b, n_videos=16, seed=3, test_fraction=0.25)
    for name in QA_FILES:
        assert (out_a / name).read_bytes() == (out_b / name).read_bytes(), name
    for video in ("toy_00000.mp4", "toy_00015.mp4"):
        frames = [
            np.concatenate(list(decode_video(out / "videos" / video, 10, None, 96)[2]))
            for out in (out_a, out_b)
        ]
        np.testing.assert_array_equal(frames[0], frames[1])


def test_other_seed_gives_other_corpus(corpus, tmp_path):
    out_a, _ = corpus
    make_toy_corpus(tmp_path, n_videos=16, seed=4, test_fraction=0.25)
    assert (out_a / "train.json").read_bytes() != (tmp_path / "train.json").read_bytes()


def test_counts_split_and_ids(corpus):
    out, summary = corpus
    assert (summary["n_videos"], summary["n_train"], summary["n_test"]) == (16, 12, 4)
    train, test_q, test_a = (_load(out, name) for name in QA_FILES)
    assert len(train) == summary["n_train_qa"] == 3 * 12
    assert len(test_q) == len(test_a) == summary["n_test_qa"] == 3 * 4

    train_ids = {row["video_id"] for row in train}
    test_ids = {row["video_name"] for row in test_q}
    assert not train_ids & test_ids
    assert train_ids | test_ids == {f"toy_{i:05d}" for i in range(16)}
    assert [q["question_id"] for q in test_q] == [a["question_id"] for a in test_a]
    assert all(a["question_id"] == f"{q['video_name']}_{a['type']}" for q, a in zip(test_q, test_a))

    with (out / "corpus.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["video_id"] for r in rows] == sorted(train_ids | test_ids)
    assert all(Path(r["path"]).is_absolute() and Path(r["path"]).is_file() for r in rows)
    assert all(Path(r["path"]).stem == r["video_id"] for r in rows)


def test_every_answer_appears_in_both_splits(corpus):
    out, _ = corpus
    train, test_a = _load(out, "train.json"), _load(out, "test_a.json")
    vocab = set(COLORS) | set(SHAPES) | set(DIRECTIONS)
    assert {row["a"] for row in train} == vocab
    assert {row["answer"] for row in test_a} == vocab
    assert {row["type"] for row in test_a} == {"color", "shape", "direction"}


def test_clips_show_the_answered_colour_and_direction(corpus):
    """At 1 fps the shape's centroid moves the stated way and its pixels have the stated colour."""
    out, _ = corpus
    answers: dict[str, dict[str, str]] = {}
    for row in _load(out, "train.json"):
        kind = "color" if row["a"] in COLORS else "shape" if row["a"] in SHAPES else "direction"
        answers.setdefault(row["video_id"], {})[kind] = row["a"]
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for video_id, attrs in list(answers.items())[:6]:
        _, times, chunks = decode_video(out / "videos" / f"{video_id}.mp4", 1, None, 96)
        frames = np.concatenate(list(chunks)).astype(np.int32)  # [t, 96, 96, 3]
        assert 3 <= len(times) <= 5
        centroids = []
        for frame in frames:
            mask = np.abs(frame - BACKGROUND).sum(-1) > 60  # [96, 96] shape pixels
            assert mask.mean() > 0.04  # the shape is big, not a speck
            ys, xs = np.nonzero(mask)
            centroids.append((xs.mean(), ys.mean()))
            mean_rgb = frame[mask].mean(0)
            nearest = min(COLORS, key=lambda c: np.abs(mean_rgb - COLORS[c]).sum())
            assert nearest == attrs["color"], video_id
        moved = np.subtract(centroids[-1], centroids[0])  # (dx, dy) in pixels
        assert np.dot(moved, step[attrs["direction"]]) > 30, (video_id, attrs, moved)


def test_decodes_with_both_backends_at_native_rate(corpus):
    out, _ = corpus
    path = out / "videos" / "toy_00001.mp4"
    for backend in ("decord", "pyav"):
        info, times, chunks = decode_video(path, 10, None, 96, backend=backend)
        frames = np.concatenate(list(chunks))
        assert info.backend == backend and info.native_fps == pytest.approx(10)
        assert (info.width, info.height) == (96, 96)
        assert 30 <= info.n_native_frames <= 50
        assert frames.shape == (info.n_native_frames, 96, 96, 3) == (len(times), 96, 96, 3)


@pytest.mark.parametrize(
    "kwargs",
    [dict(n_videos=1), dict(n_videos=4, test_fraction=1.5), dict(n_videos=4, size=95)],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="must be"):
        make_toy_corpus(tmp_path, **kwargs)


def test_shapes_are_told_apart_by_how_much_of_the_frame_they_cover(tmp_path):
    """The one shape cue a random frozen tower hands on (pipeline/toy.py, SHAPE_SIDE): over every clip of a
    corpus, the colour area of each shape lies in its own range (triangle < circle < square), with a gap."""
    make_toy_corpus(tmp_path, n_videos=36, seed=5)
    shape_of = {row["video_id"]: row["a"] for row in _load(tmp_path, "train.json") if row["a"] in SHAPES}
    answers = {a["question_id"]: a["answer"] for a in _load(tmp_path, "test_a.json")}
    shape_of.update({q["video_name"]: answers[q["question_id"]] for q in _load(tmp_path, "test_q.json")
                     if answers[q["question_id"]] in SHAPES})
    areas: dict[str, list[float]] = {shape: [] for shape in SHAPES}
    for video_id, shape in shape_of.items():
        _, _, chunks = decode_video(tmp_path / "videos" / f"{video_id}.mp4", 1, None, 96)
        for frame in np.concatenate(list(chunks)).astype(np.int32):
            areas[shape].append(float((np.abs(frame - BACKGROUND).sum(-1) > 60).mean()))
    assert all(len(a) >= 30 for a in areas.values())
    ranges = [(min(areas[s]), max(areas[s])) for s in ("triangle", "circle", "square")]
    for (_, top), (bottom, _) in zip(ranges, ranges[1:]):
        assert bottom - top > 0.003, ranges   # > 0.3 % of the frame (~28 px) between neighbouring shapes
