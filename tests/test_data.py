"""Reading training samples: QA files, the join with the store, the dataset, collation and the DataLoader."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from dualfocus.pipeline.errors import UserError
from dualfocus.pipeline.qa import QAItem, read_training_qa
from dualfocus.pipeline.sampling import uniform_indices as subsample_indices
from dualfocus.connectors.dualfocus import DualFocus, DualFocusConfig
from dualfocus.data.batch import collate
from dualfocus.data.samples import FeatureQADataset, check_store_shapes, check_store_streams, join_with_store
from dualfocus.train.sampler import ResumableBatches


# ---------------------------------------------------------------- frame subsampling
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9, 31, 100])
@pytest.mark.parametrize("cap", [1, 4, 8, None])
def test_subsample_keeps_all_frames_or_exactly_the_cap_spread_over_the_clip(n, cap):
    idx = subsample_indices(n, cap)
    if cap is None or n <= cap:
        assert idx.tolist() == list(range(n))
        return
    assert len(idx) == cap and (np.diff(idx) > 0).all() and idx[0] == 0
    if cap > 1:
        assert idx[-1] == n - 1
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # uniform up to rounding


# ---------------------------------------------------------------- QA files
def test_training_qa_reads_videoinstruct_json_and_jsonl(tmp_path):
    listed = tmp_path / "a.json"
    listed.write_text(json.dumps([{"video_id": "v1", "q": "Q1?", "a": "A1"},
                                  {"video_id": "v2", "q": "Q2?", "a": "A2"}]))
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"video_id": "v1", "question": "Q1?", "answer": "A1"}\n\n'
                     '{"video_id": "v2", "question": "Q2?", "answer": "A2"}\n')
    expected = [QAItem("v1", "Q1?", "A1"), QAItem("v2", "Q2?", "A2")]
    assert read_training_qa(listed) == expected
    assert read_training_qa(lines) == expected


@pytest.mark.parametrize("text, message", [
    ("", r"empty"),
    ("  \n", r"empty"),
    ("[]", r"no question-answer pairs"),
    ('[{"video_id": "v1", "q": "Q?", "a": "A"},\n {"video_id": "v2", "q": "Q?" "a": "A"}]',
     r"bad\.json: malformed JSON at line 2, column 31"),
    ('{"video_id": "v1", "question": "Q?", "answer": "A"}\n{"video_id": "v2", "question": \n',
     r"bad\.json: malformed JSON at line 2"),
    ('[{"video_id": "v1", "q": "Q?"}]', r"record 1 has no a / answer"),
    ('[["v1", "Q?", "A"]]', r"record 1 is not a JSON object"),
])
def test_bad_qa_files_are_refused_naming_file_and_place(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_training_qa(path)


# ---------------------------------------------------------------- join with the store
def test_join_keeps_ok_videos_and_counts_missing_and_failed_ones():
    table = pd.DataFrame({"video_id": ["clip_a", "clip_b", "v_clip_c", "clip_y"],
                          "status": ["ok", "failed", "ok", "missing"]})
    items = [QAItem("clip_a", "q", "a", "1"), QAItem("clip_a.mp4", "q", "a", "2"), QAItem("clip_c", "q", "a", "3"),
             QAItem("clip_b", "q", "a", "4"), QAItem("clip_z", "q", "a", "5"), QAItem("clip_y", "q", "a", "6")]
    kept, report = join_with_store(items, SimpleNamespace(status=lambda streams: table), ["semantic"])
    # names are matched leniently (extension, v_ prefix) and rewritten to the store's id
    assert [(i.video_id, i.question_id) for i in kept] == [("clip_a", "1"), ("clip_a", "2"), ("v_clip_c", "3")]
    assert (report.total, report.usable, report.missing_video, report.failed_video) == (6, 3, 2, 1)
    assert report.line() == "annotations: 6 | usable 3 | video not in store 2 | video failed at extract 1"
    assert report.examples == ["clip_z", "clip_y"]
    assert [(m["question_id"], m["reason"]) for m in report.missing] == [
        ("4", "video failed at extract"), ("5", "video not in store"), ("6", "video not in store")]


@pytest.mark.parametrize("semantic, motion, named", [
    ([257, 32], [64, 32], "[257, 32] / spatiotemporal [64, 32]"),     # another vision width
    ([197, 64], [49, 64], "[197, 64] / spatiotemporal [49, 64]"),     # another token count (16 px patches)
])
def test_store_from_another_vision_tower_is_refused_naming_both(tiny_model, semantic, motion, named):
    def store(shapes):
        return SimpleNamespace(tap_shape=lambda stream: {"semantic": shapes[0], "spatiotemporal": shapes[1]}[stream])

    expected = DualFocus.expected_streams(DualFocusConfig(), str(tiny_model))
    with pytest.raises(UserError) as err:
        check_store_shapes(store((semantic, motion)), expected, str(tiny_model))
    message = str(err.value)
    assert named in message and "expects [257, 64] / [64, 64]" in message and str(tiny_model) in message
    check_store_shapes(store(([257, 64], [64, 64])), expected, str(tiny_model))


# ---------------------------------------------------------------- dataset, collation, loader
@pytest.fixture(scope="module")
def prepared(toy_store, toy_corpus, tiny_model):
    from dualfocus.data.prepare import prepare_samples

    return prepare_samples(str(toy_store), str(toy_corpus / "train.json"), str(tiny_model), with_answers=True)


def test_prepare_uses_every_toy_annotation(prepared, toy_corpus):
    n = len(json.loads((toy_corpus / "train.json").read_text()))
    assert len(prepared.samples) == n and prepared.report.usable == n
    assert all(s.n_frames >= 1 and s.text_labels for s in prepared.samples)


def test_stored_features_carry_the_video(toy_store):
    """What training reads must depend on the frames, or no connector can learn the toy corpus."""
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(toy_store)
    a, b = (store.read(v) for v in store.video_ids()[:2])
    for f in (a, b):
        assert np.abs(f["spatiotemporal"].astype(np.float32)).max() > 1e-3
        assert f["semantic"].astype(np.float32).std() > 1e-2  # post-layernorm output: about unit scale
    assert np.abs(a["semantic"][0].astype(np.float32) - b["semantic"][0].astype(np.float32)).mean() > 1e-3


def test_dataset_reads_the_stored_frames_subsampled(prepared, toy_store):
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(toy_store)
    dataset = FeatureQADataset(str(toy_store), prepared.samples, max_frames=3)
    long = next(i for i, s in enumerate(prepared.samples) if s.n_frames == 5)
    x = dataset[long]
    assert x["index"] == long and x["sample"] is prepared.samples[long]
    assert x["semantic"].shape == (3, 257, 64) and x["spatiotemporal"].shape == (3, 64, 64)
    assert x["semantic"].dtype == torch.float32
    whole = store.read(prepared.samples[long].video_id)
    np.testing.assert_array_equal(x["semantic"].numpy(), whole["semantic"][[0, 2, 4]].astype(np.float32))
    np.testing.assert_array_equal(x["spatiotemporal"].numpy(), whole["spatiotemporal"][[0, 2, 4]].astype(np.float32))
    assert FeatureQADataset(str(toy_store), prepared.samples, max_frames=None)[long]["semantic"].shape[0] == 5


def test_read_cache_keeps_within_its_bound_and_freezes_what_it_keeps():
    from dualfocus.data.read_cache import ReadCache

    cache = ReadCache(max_bytes=3000)
    a = {"x": np.zeros((10, 100), np.float16)}  # 2000 bytes
    cache.put("a", a)
    cache.put("b", {"x": np.zeros((10, 100), np.float16)})  # would make 4000: not kept
    assert cache.get("a") is a and cache.get("b") is None and (cache.hits, cache.misses) == (1, 1)
    assert cache.bytes == 2000 and not a["x"].flags.writeable
    cache.put("c", {"x": np.zeros(500, np.float16)})  # 1000 more still fits
    assert cache.get("c") is not None and cache.bytes == 3000
    nothing = ReadCache(0)
    nothing.put("a", {"x": np.zeros(1, np.float16)})
    assert nothing.get("a") is None
    with pytest.raises(ValueError, match="max_bytes"):
        ReadCache(-1)


def test_cached_reads_equal_store_reads_and_are_private_copies(prepared, toy_store, monkeypatch):
    from dualfocus.store import FeatureStore

    plain = FeatureQADataset(str(toy_store), prepared.samples, max_frames=3)
    cached = FeatureQADataset(str(toy_store), prepared.samples, max_frames=3, cache_mb=64)
    n = len(prepared.samples)
    stored = [plain[i] for i in range(n)]
    for i in range(n):  # first epoch: reads the store, fills the cache
        x = cached[i]
        assert all(x[key].equal(stored[i][key]) for key in ("semantic", "spatiotemporal"))
    monkeypatch.setattr(FeatureStore, "read", lambda *a, **k: pytest.fail("a cached sample read the store"))
    for i in reversed(range(n)):  # second epoch: every sample from RAM, the same numbers
        x = cached[i]
        assert all(x[key].equal(stored[i][key]) for key in ("semantic", "spatiotemporal"))
    first = cached[0]
    first["semantic"].add_(1.0)  # a consumer writing into its batch must not change the next read
    assert cached[0]["semantic"].equal(stored[0]["semantic"])
    videos = {s.video_id for s in prepared.samples}
    assert len(cached._cache._entries) == len(videos) < n  # the questions of one video share one entry
    assert (cached._cache.misses, cached._cache.hits) == (len(videos), 2 * n + 2 - len(videos))


def test_float32_conversion_copies_only_read_only_float32_arrays():
    from dualfocus.data.samples import float32_writable

    half = np.ones((2, 3), np.float16)
    assert float32_writable(half).dtype == np.float32 and float32_writable(half).flags.writeable
    single = np.ones((2, 3), np.float32)
    assert float32_writable(single) is single  # a float32 store read is used as it is: no copy on the hot path
    single.flags.writeable = False  # as the read cache keeps it
    private = float32_writable(single)
    assert private is not single and private.flags.writeable and np.array_equal(private, single)


def test_collate_pads_frames_and_question_ids(prepared, toy_store):
    dataset = FeatureQADataset(str(toy_store), prepared.samples, max_frames=None)
    frames = [s.n_frames for s in prepared.samples]
    picks = [frames.index(3), frames.index(5), frames.index(4)]
    items = [dataset[i] for i in picks]
    batch = collate(items, qformer_pad_id=prepared.qformer_pad_id)
    assert batch.streams["semantic"].shape == (3, 5, 257, 64) and batch.streams["spatiotemporal"].shape == (3, 5, 64, 64)
    assert batch.frame_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 4 + [False]]
    for row, x in enumerate(items):
        t = x["semantic"].shape[0]
        sem = batch.streams["semantic"]
        assert sem[row, :t].equal(x["semantic"]) and (sem[row, t:] == 0).all()
        ids = x["sample"].qformer_ids
        assert batch.qformer_ids[row, :len(ids)].tolist() == ids
        assert (batch.qformer_ids[row, len(ids):] == prepared.qformer_pad_id).all()
        assert batch.qformer_mask[row].tolist() == [1] * len(ids) + [0] * (batch.qformer_ids.shape[1] - len(ids))
        assert batch.text_labels[row] == x["sample"].text_labels
        words = x["sample"].question_ids  # the question alone in the LLM's tokenizer, right-padded
        assert words and batch.question_ids[row, :len(words)].tolist() == words
        assert batch.question_mask[row].tolist() == [1] * len(words) + [0] * (batch.question_ids.shape[1] - len(words))
    assert batch.indices == picks


def test_dataloader_with_a_worker_gives_the_same_batches(prepared, toy_store):
    from functools import partial

    dataset = FeatureQADataset(str(toy_store), prepared.samples, max_frames=4)
    collate_fn = partial(collate, qformer_pad_id=prepared.qformer_pad_id)

    def first_batches(workers: int) -> list:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=ResumableBatches(len(dataset), 4, seed=5),
                                             num_workers=workers, collate_fn=collate_fn)
        it = iter(loader)
        return [next(it) for _ in range(3)]

    inline, worker = first_batches(0), first_batches(1)
    for a, b in zip(inline, worker):
        assert a.indices == b.indices
        for key in ("semantic", "spatiotemporal"):
            assert a.streams[key].equal(b.streams[key])
        for key in ("frame_mask", "qformer_ids", "qformer_mask", "question_ids", "question_mask"):
            assert getattr(a, key).equal(getattr(b, key))


def test_frames_planned_by_the_connector_are_the_frames_read(toy_store, toy_corpus, tiny_model):
    """A connector's plan_frames (LongVU drops redundant frames) runs once at prepare time; the dataset then
    reads exactly those stored frames, and max_frames subsamples them uniformly."""
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.store import FeatureStore

    calls = []

    def plan(read, samples):
        calls.append(len(samples))
        assert read(samples[0].video_id, ["semantic"])["semantic"].shape[0] == samples[0].n_frames
        return [tuple(range(0, s.n_frames, 2)) if i % 2 == 0 else None for i, s in enumerate(samples)]

    prepared = prepare_samples(str(toy_store), str(toy_corpus / "train.json"), str(tiny_model), with_answers=True,
                               plan_frames=plan)
    assert calls == [len(prepared.samples)]
    store = FeatureStore.open(toy_store)
    for max_frames in (None, 2):
        dataset = FeatureQADataset(str(toy_store), prepared.samples, max_frames=max_frames)
        for i in (0, 1):
            s = prepared.samples[i]
            planned = np.arange(0, s.n_frames, 2) if i == 0 else np.arange(s.n_frames)
            want = planned[subsample_indices(len(planned), max_frames)]
            assert (s.frames is None) == (i == 1)
            np.testing.assert_array_equal(dataset[i]["semantic"].numpy(),
                                          store.read(s.video_id, want)["semantic"].astype(np.float32))


def test_bytes_per_sample_counts_the_frames_each_sample_reads(prepared, toy_store):
    """Mean store bytes of a sample: its frames (capped by max_frames) times the stored frame size of each
    stream (the toy store: float16, semantic [257, 64] and spatiotemporal [64, 64])."""
    from dualfocus.data.samples import bytes_per_sample, frames_to_read
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(toy_store)
    assert store.frame_bytes("semantic") == 257 * 64 * 2 and store.frame_bytes("spatiotemporal") == 64 * 64 * 2
    frames = [len(frames_to_read(s, 3)) for s in prepared.samples]
    assert max(frames) == 3
    want = (257 + 64) * 64 * 2 * sum(frames) / len(frames)
    assert bytes_per_sample(prepared.samples, store, ["semantic", "spatiotemporal"], 3) == pytest.approx(want)
    assert bytes_per_sample([], store, ["semantic"], 3) == 0.0


def test_a_tap_several_groups_hold_is_named_not_reported_missing(streams_store):
    """``grid`` is a tap of the slowfast, siglip and dino groups: the message asks for group.tap instead of an
    extract command that would add a stream the store already has."""
    from dualfocus.data.samples import store_stream_problem
    from dualfocus.store import FeatureStore

    store = FeatureStore.open(streams_store)
    problem = store_stream_problem(store, ["grid", "eva.semantic"], "S", "M")
    assert "is a tap of several groups" in problem and "lacks" not in problem and "extract" not in problem
    assert all(f"{g}.grid" in problem for g in ("slowfast", "siglip", "dino"))
    assert store_stream_problem(store, ["slowfast.grid", "semantic"], "S", "M") == ""
    assert "lacks the stream(s) nope" in store_stream_problem(store, ["nope"], "S", "M")
    with pytest.raises(UserError, match="several groups"):
        check_store_streams(store, ["grid"], "S", "M")
