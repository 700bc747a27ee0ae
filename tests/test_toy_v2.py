"""Toy corpus v2: determinism, every question type with balanced one-word answers, and clips whose
frames show what the QA says (colour change time, first shape, bounce count, long mostly-static clips)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dualfocus.extract.decode import decode_video
from dualfocus.pipeline.toy import BACKGROUND, COLORS, DIRECTIONS, SHAPES
from dualfocus.pipeline.toy_v2 import NUMBERS, QUESTION_TYPES, _deal_clips, clip_frames, make_toy_corpus_v2

FPS, SIZE = 4, 64  # small and slow enough for fast tests; long clips still last >= 120 s
ARGS = dict(n_videos=20, long_fraction=0.25, test_fraction=0.4, fps=FPS, size=SIZE)
ANSWERS = {"color": set(COLORS), "shape": set(SHAPES), "direction": set(DIRECTIONS), "colour_start": set(COLORS),
           "colour_end": set(COLORS), "order": set(SHAPES), "count": set(NUMBERS), "long_direction": set(DIRECTIONS)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy2") / "a"
    return out, make_toy_corpus_v2(out, seed=5, **ARGS)


def _hashes(out: Path) -> dict[str, str]:
    """sha256 of every file under ``out``, corpus.csv with the (absolute) output dir taken out."""
    hashes = {}
    for path in sorted(out.rglob("*")):
        if path.is_file():
            data = path.read_bytes().replace(str(out.resolve()).encode(), b"OUT")
            hashes[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return hashes


def _mask(frame: np.ndarray) -> np.ndarray:
    return np.abs(frame.astype(np.int32) - BACKGROUND).sum(-1) > 60  # [h, w] shape pixels


def _colour(frame: np.ndarray, mask: np.ndarray) -> str:
    mean_rgb = frame[mask].astype(np.float64).mean(0)
    return min(COLORS, key=lambda c: np.abs(mean_rgb - COLORS[c]).sum())


def _shape(mask: np.ndarray) -> str:
    """Circle, square or triangle from how much of its bounding box the shape fills (pi/4, 1, 1/2)."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return min({"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}.items(), key=lambda kv: abs(kv[1] - fill))[0]


def _clips(summary: dict, kind: str) -> list[dict]:
    found = [c for c in summary["clips"] if c["kind"] == kind]
    assert found, kind
    return found


def test_same_seed_gives_identical_files(corpus, tmp_path):
    out_a, _ = corpus
    make_toy_corpus_v2(tmp_path / "b", seed=5, **ARGS)
    hashes_a, hashes_b = _hashes(out_a), _hashes(tmp_path / "b")
    assert len(hashes_a) == 20 + 4 and hashes_a == hashes_b


def test_other_seed_gives_other_corpus(corpus, tmp_path):
    out_a, _ = corpus
    make_toy_corpus_v2(tmp_path, seed=6, **ARGS)
    a, b = _hashes(out_a), _hashes(tmp_path)
    assert a["train.json"] != b["train.json"] and a["test_a.json"] != b["test_a.json"]
    assert sum(a[k] != b[k] for k in a if k.startswith("videos")) >= 15


def test_every_question_type_in_both_splits_with_one_word_answers(corpus):
    out, summary = corpus
    train = json.loads((out / "train.json").read_text())
    test_q = json.loads((out / "test_q.json").read_text())
    test_a = json.loads((out / "test_a.json").read_text())
    assert {a["type"] for a in test_a} == set(ANSWERS) == set(summary["n_questions_per_type"]["train"])
    kinds = summary["n_clips_per_kind"]  # long: round(12 * 0.25) + round(8 * 0.25); the rest cycle per split
    assert kinds.pop("long") == 5 and sum(kinds.values()) == 15 and all(3 <= n <= 5 for n in kinds.values())
    assert summary["clip_seconds"]["long"][0] >= 120 and summary["clip_seconds"]["plain"][1] <= 5
    for a in test_a:
        assert a["answer"] in ANSWERS[a["type"]] and a["answer"].split() == [a["answer"]]
    assert all(row["a"] in set().union(*ANSWERS.values()) for row in train)
    assert [q["question_id"] for q in test_q] == [a["question_id"] for a in test_a]
    assert all(a["question_id"] == f"{q['video_name']}_{a['type']}" for q, a in zip(test_q, test_a))
    assert not {r["video_id"] for r in train} & {q["video_name"] for q in test_q}
    # The files hold exactly the QA of the clip descriptions.
    by_clip = {c["video_id"]: c for c in summary["clips"]}
    assert len(train) == summary["n_train_qa"] == sum(len(c["answers"]) for c in by_clip.values() if c["split"] == "train")
    assert all(row["a"] in by_clip[row["video_id"]]["answers"].values() for row in train)
    assert all(by_clip[q["video_name"]]["answers"][a["type"]] == a["answer"] for q, a in zip(test_q, test_a))
    assert all(set(c["answers"]) == set(QUESTION_TYPES[c["kind"]]) for c in by_clip.values())


def test_answers_are_balanced_per_kind_and_type():
    clips = _deal_clips(np.random.default_rng(0), 400, 0.1, 10)
    counts: dict[tuple[str, str], Counter] = {}
    for clip in clips:
        for qtype, answer in clip["answers"].items():
            counts.setdefault((clip["kind"], qtype), Counter())[answer] += 1
    assert {qtype for _, qtype in counts} == set(ANSWERS)
    assert set(counts) == {(kind, qtype) for kind, types in QUESTION_TYPES.items() for qtype in types}
    for (kind, qtype), counter in counts.items():
        assert set(counter) == ANSWERS[qtype], (kind, qtype)
        spread = max(counter.values()) - min(counter.values())
        assert spread <= 1, (kind, qtype, counter)  # dealt from reshuffled cycles


def test_v1_questions_on_other_kinds_are_what_the_frames_show(corpus):
    """A count or long clip's colour and shape, a colour-change clip's shape and direction: one answer each, the
    one the frames show (the mask's mean colour and fill, the centroid's way from first to last frame)."""
    _, summary = corpus
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    asked = [c for c in summary["clips"] if c["kind"] in ("colour_change", "count", "long")]
    assert {c["kind"] for c in asked} == {"colour_change", "count", "long"}
    for clip in asked:
        frames = list(clip_frames(clip, SIZE))
        answers = clip["answers"]
        middle = frames[len(frames) // 2]
        assert _shape(_mask(middle)) == answers["shape"], clip
        if "color" in answers:
            assert {_colour(f, _mask(f)) for f in (frames[0], middle, frames[-1])} == {answers["color"]}, clip
        if "direction" in answers:
            centroids = [np.argwhere(_mask(frames[k]))[:, ::-1].mean(0) for k in (0, -1)]  # (x, y)
            assert np.dot(centroids[1] - centroids[0], step[answers["direction"]]) > SIZE / 3, clip


def test_colour_change_happens_at_the_recorded_frame(corpus):
    out, summary = corpus
    for clip in _clips(summary, "colour_change"):
        info, _, chunks = decode_video(out / "videos" / f"{clip['video_id']}.mp4", FPS, None, SIZE, backend="pyav")
        frames = np.concatenate(list(chunks))
        assert len(frames) == clip["n_frames"] == info.n_native_frames
        colours = [_colour(f, _mask(f)) for f in frames]
        change = clip["change_frame"]
        assert clip["n_frames"] / 3 <= change <= 2 * clip["n_frames"] / 3
        assert colours == [clip["answers"]["colour_start"]] * change + [clip["answers"]["colour_end"]] * (len(frames) - change)


def _reversals(positions: list[float]) -> int:
    steps = np.sign(np.diff(positions))
    steps = steps[steps != 0]
    return int((steps[1:] != steps[:-1]).sum())


def test_bounce_count_is_what_the_frames_show(corpus):
    _, summary = corpus
    clips = _clips(summary, "count") + [c for c in _deal_clips(np.random.default_rng(1), 40, 0.0, 10) if c["kind"] == "count"]
    assert {c["bounces"] for c in clips} == {1, 2, 3}
    for clip in clips:
        along = []
        for frame in clip_frames(clip, SIZE):
            ys, xs = np.nonzero(_mask(frame))
            coord = xs if clip["horizontal"] else ys
            along.append((coord.min() + coord.max()) / 2)  # bounding-box middle: monotone under monotone motion
        assert _reversals(along) == clip["bounces"] == NUMBERS.index(clip["answers"]["count"]) + 1, clip
        assert max(along) - min(along) > SIZE / 3  # it crosses the frame, not a jitter


def test_first_shape_appears_alone_before_the_second(corpus):
    _, summary = corpus
    for clip in _clips(summary, "order"):
        frames = list(clip_frames(clip, SIZE))
        first, second = clip["appear_frames"]
        assert 0 <= first < second < clip["n_frames"]
        assert all(not _mask(f).any() for f in frames[:first])
        alone = _mask(frames[second - 1])
        assert _shape(alone) == clip["answers"]["order"] == clip["shapes"][0]
        assert _colour(frames[second - 1], alone) == clip["colors"][0]
        last = _mask(frames[-1])
        assert last.sum() > alone.sum() * 1.3 and {_colour(frames[-1], last & ~alone)} == {clip["colors"][1]}


def test_long_clips_are_two_minutes_and_mostly_static(corpus):
    out, summary = corpus
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for clip in _clips(summary, "long"):
        info, _, _ = decode_video(out / "videos" / f"{clip['video_id']}.mp4", 1, None, SIZE, backend="pyav")
        assert info.n_native_frames == clip["n_frames"] >= 120 * FPS and info.native_fps == pytest.approx(FPS)
        frames = list(clip_frames(clip, SIZE))
        changed = [k for k in range(1, len(frames)) if not np.array_equal(frames[k], frames[k - 1])]
        m0, m1 = clip["move_frames"]
        assert changed and m0 < min(changed) and max(changed) < m1 and len(changed) < 0.1 * len(frames)
        assert (m1 - m0) <= 10 * FPS + 1
        centroids = [np.argwhere(_mask(frames[k]))[:, ::-1].mean(0) for k in (0, -1)]  # (x, y)
        assert np.dot(centroids[1] - centroids[0], step[clip["answers"]["long_direction"]]) > SIZE / 3


def test_v1_corpus_is_unchanged_by_importing_v2(tmp_path):
    from dualfocus.pipeline.toy import make_toy_corpus

    make_toy_corpus(tmp_path / "with_v2", n_videos=4, seed=2)
    script = ("import sys; from dualfocus.pipeline.toy import make_toy_corpus; "
              "make_toy_corpus(sys.argv[1], n_videos=4, seed=2); assert 'dualfocus.pipeline.toy_v2' not in sys.modules")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "alone")], check=True, timeout=120)
    assert _hashes(tmp_path / "with_v2") == _hashes(tmp_path / "alone")


@pytest.mark.parametrize("kwargs", [dict(n_videos=1), dict(n_videos=4, long_fraction=1.5),
                                    dict(n_videos=4, fps=2), dict(n_videos=4, size=95)])
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError, match="must be"):
        make_toy_corpus_v2(tmp_path, **kwargs)


def test_cli_renders_v2(tmp_path):
    """`toy-corpus --kind v2`: the v2 files, a summary line without the per-clip descriptions; a bad kind is named."""
    import json

    from conftest import run_cli

    proc = run_cli("toy-corpus", tmp_path / "toy", "--videos", "10", "--kind", "v2", "--seed", "1")
    assert "n_clips_per_kind=" in proc.stdout and "clips=" not in proc.stdout
    types = {a["type"] for a in json.loads((tmp_path / "toy" / "test_a.json").read_text())}
    assert types and types <= {"color", "shape", "direction", "colour_start", "colour_end", "order", "count",
                               "long_direction"}
    bad = run_cli("toy-corpus", tmp_path / "bad", "--kind", "v3", check=False)
    assert bad.returncode == 2 and "expected v1 or v2, got 'v3'" in bad.stderr


@pytest.mark.slow
def test_cli_renders_v2_and_extract_reads_every_clip_at_1_fps(tmp_path, tiny_model):
    """`toy-corpus --kind v2` then `extract` with the shipped defaults: every clip stored, long clips >= 120 frames
    (about 2 minutes here: the long clip's frames go through the encoder)."""
    import json

    from conftest import run_cli

    from dualfocus.store import FeatureStore

    run_cli("toy-corpus", tmp_path / "toy", "--videos", "10", "--kind", "v2", "--seed", "1")
    run_cli("extract", tmp_path / "toy" / "videos", "--model", tiny_model, "--out", tmp_path / "store", "--no-progress")
    store = FeatureStore.open(tmp_path / "store")
    table = store.status(["semantic"])
    assert (table["status"] == "ok").all() and len(table) == 10
    lengths = dict(zip(table["video_id"].astype(str), table["length"].astype(int)))
    kinds = json.loads((tmp_path / "toy" / "test_a.json").read_text()) + json.loads(
        (tmp_path / "toy" / "train.json").read_text())
    long_videos = {str(x.get("video_id") or x.get("video_name")) for x in kinds if x.get("type") == "long_direction"}
    assert all(lengths[v] >= 120 for v in long_videos if v in lengths)
    assert max(lengths.values()) >= 120
