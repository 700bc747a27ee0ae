"""Streaming training reads of WebDataset stores (``train/streaming.py``): the order's properties, reads front
to back within each shard, exact resume, worker and rank splits, features equal to the indexed dataset's, and
one end-to-end run of the real CLI (extract --format webdataset, train, --resume)."""

from __future__ import annotations

import functools
import json
from itertools import islice
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli

from dualfocus.pipeline.config import ConfigError, load_config
from dualfocus.store import FeatureStore, GroupWriter
from dualfocus.store.tar_shard import TarShardReader
from dualfocus.train.config import TrainConfig
from dualfocus.data.batch import collate
from dualfocus.data.samples import FeatureQADataset, Tokenised
from dualfocus.train.streaming import StreamingQADataset, buffer_shuffle, wants_streaming

pytestmark = pytest.mark.long(minutes=3)

REPO = Path(__file__).resolve().parent.parent
P, M, D = 3, 2, 4                       # semantic tokens, motion tokens, width
LENGTHS = [5, 9, 2, 7, 12, 3, 6, 8, 4, 10, 11, 1, 6, 7]   # frames per video; several above MAX_FRAMES
MAX_FRAMES = 4
VIDEOS_PER_SHARD = 3                    # 14 videos -> 5 shards, the last one short
BATCH = 3


def write_store(root: Path, fmt: str) -> Path:
    """A store of LENGTHS videos, 3 per shard, written by the store's own writer."""
    rng = np.random.default_rng(0)
    with GroupWriter(root, "eva", taps={"semantic": (P, D), "spatiotemporal": (M, D)}, format=fmt,
                     fingerprint={"model": "synthetic"}, sampling={"fps": 1.0, "max_frames": None},
                     videos_per_shard=VIDEOS_PER_SHARD) as writer:
        for k, t in enumerate(LENGTHS):
            writer.begin_video(f"clip{k:02d}", f"/videos/clip{k:02d}.mp4", {"n_frames": t})
            arrays = {"semantic": rng.standard_normal((t, P, D)), "spatiotemporal": rng.standard_normal((t, M, D))}
            writer.add_frames(arrays, np.arange(t, dtype=np.float32))
            writer.end_video()
    return root


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("wds") / "store", "webdataset")


@pytest.fixture(scope="module")
def samples() -> list[Tokenised]:
    """1-3 samples per video (a video's samples apart in index order), so one read serves several samples."""
    rng = np.random.default_rng(1)
    out = [Tokenised(video_id=f"clip{k:02d}", n_frames=t, qformer_ids=[101, 7 + j, 102], prefix_ids=[1],
                     text_ids=[5, 6], text_labels=[5, 6], question_id=f"q{k}-{j}")
           for k, t in enumerate(LENGTHS) for j in range(1 + k % 3)]
    return [out[i] for i in rng.permutation(len(out))]


def streaming(store: Path, samples, **kwargs) -> StreamingQADataset:
    kwargs = {"max_frames": MAX_FRAMES, "batch_size": BATCH, "seed": 5, **kwargs}
    return StreamingQADataset(str(store), samples, **kwargs)


def indices(batches) -> list[list[int]]:
    return [[x["index"] for x in batch] for batch in batches]


def take(dataset: StreamingQADataset, position: tuple[int, int], n: int) -> list[list[dict]]:
    dataset.position = position
    return list(islice(iter(dataset), n))


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, str]]:
    """Every (shard path, member) read through ``TarShardReader``, in order."""
    seen = []
    original = TarShardReader._read_npy

    def recording(self, member, frame_indices):
        seen.append((str(self.path), member))
        return original(self, member, frame_indices)

    monkeypatch.setattr(TarShardReader, "_read_npy", recording)
    return seen


def assert_front_to_back(reads: list[tuple[str, str]]) -> None:
    """Within each shard, the videos read lie at non-decreasing offsets, and none is read twice."""
    per_shard: dict[str, list[str]] = {}
    for path, member in reads:
        keys = per_shard.setdefault(path, [])
        key = member.split(".")[0]
        if not keys or keys[-1] != key:
            keys.append(key)
    for path, keys in per_shard.items():
        members = TarShardReader(Path(path)).members
        offsets = [min(o for name, (o, _) in members.items() if name.startswith(key + ".")) for key in keys]
        assert offsets == sorted(offsets), (path, keys)
        assert len(set(keys)) == len(keys), (path, keys)


# ---------------------------------------------------------------- the order
def test_buffer_shuffle_is_a_permutation_that_lags_file_order_by_less_than_the_buffer():
    items = list(range(100))
    mixed = buffer_shuffle(items, 8, np.random.default_rng(0))
    assert sorted(mixed) == items and mixed != items
    # the i-th item out was read among the first i + 8 (what bounds the videos a worker holds ahead)
    assert all(x < i + 8 for i, x in enumerate(mixed))
    assert buffer_shuffle(items, 1, np.random.default_rng(0)) == items


def test_each_epoch_holds_every_sample_once_shard_after_shard(wds_store, samples):
    data = streaming(wds_store, samples)
    n = len(samples)
    assert data.batches_per_epoch == -(-n // BATCH) and len(data.shards) == 5
    manifest = FeatureStore.open(wds_store).groups["eva"].manifest
    video_shard = dict(zip(manifest["video_id"], manifest["shard"]))
    shard_of = {i: data.shards.index(video_shard[s.video_id]) for i, s in enumerate(samples)}
    for epoch in range(3):
        batches = data.epoch_batches(epoch)
        order = sum(batches, [])
        assert sorted(order) == list(range(n))
        assert [len(b) for b in batches[:-1]] == [BATCH] * (len(batches) - 1)
        # each shard's samples come as one run, the runs in the epoch's shard order
        runs = [shard_of[i] for k, i in enumerate(order) if k == 0 or shard_of[order[k - 1]] != shard_of[i]]
        assert runs == [s for s in data.shard_order(epoch) if any(shard_of[i] == s for i in order)]


def test_shard_order_changes_with_epoch_and_seed_and_shuffle_false_keeps_file_order(wds_store, samples):
    data = streaming(wds_store, samples)
    orders = [data.shard_order(e) for e in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert streaming(wds_store, samples, seed=6).shard_order(0) != orders[0]
    assert data.epoch_order(0) != data.epoch_order(1)
    fixed = streaming(wds_store, samples, shuffle=False)
    assert fixed.shard_order(0) == fixed.shard_order(3) == list(range(5))
    by_video = sorted(range(len(samples)), key=lambda i: (samples[i].video_id, i))  # clips are written in id order
    assert fixed.epoch_order(0) == fixed.epoch_order(1) == by_video


def test_each_shard_is_read_front_to_back_and_each_video_once(wds_store, samples, reads, monkeypatch):
    data = streaming(wds_store, samples)
    per = data.batches_per_epoch
    take(data, (1, 0), per)                       # one whole epoch
    assert_front_to_back(reads)
    assert len({(p, m.split(".")[0]) for p, m in reads}) == len(LENGTHS)   # every video, once
    # a worker reads only its batches' videos, and also front to back
    reads.clear()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    mine = take(data, (1, 0), per // 2)
    assert indices(mine) == data.epoch_batches(1)[1::2][:per // 2]
    assert_front_to_back(reads)


@pytest.mark.parametrize("stop", [0, 1, 4, 9, 12, 16])
def test_resume_from_a_position_gives_the_tail_of_the_uninterrupted_run(wds_store, samples, reads, stop):
    data = streaming(wds_store, samples)
    per = data.batches_per_epoch                  # 9 batches: the stops cover the first, mid and a later epoch
    whole = indices(take(data, (0, 0), 3 * per))
    reads.clear()
    tail = take(data, (stop // per, stop % per), 3 * per - stop)
    assert indices(tail) == whole[stop:]
    # the skipped samples were not read: each epoch reads the videos of its batches still to come, once each
    epoch = stop // per
    to_come = [data.epoch_batches(epoch)[stop % per:]] + [data.epoch_batches(e) for e in range(epoch + 1, 3)]
    videos = [m.split(".")[0] for _, m in reads if m.endswith(".timestamps.npy")]
    assert len(videos) == sum(len({samples[i].video_id for b in batches for i in b}) for batches in to_come)


def test_workers_0_and_2_give_the_same_batches(wds_store, samples):
    data = streaming(wds_store, samples)
    per = data.batches_per_epoch
    collate_fn = functools.partial(collate, qformer_pad_id=0)

    def loader_batches(workers: int, position: tuple[int, int], n: int) -> list[dict]:
        data.position = position
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers, collate_fn=collate_fn)
        return list(islice(iter(loader), n))

    for position in [(0, 0), (1, 5)]:
        n = 2 * per + 1
        one, two = loader_batches(0, position, n), loader_batches(2, position, n)
        assert [b.indices for b in one] == [b.indices for b in two]
        assert all(torch.equal(a.streams[k], b.streams[k]) for a, b in zip(one, two) for k in ("semantic", "spatiotemporal"))


def test_ranks_take_disjoint_equal_contiguous_runs(wds_store, samples):
    single = streaming(wds_store, samples)
    n_batches = single.batches_per_epoch              # 9: three whole rounds for three ranks, 4 for two (one cut)
    for world in (2, 3):
        ranks = [streaming(wds_store, samples, rank=r, world=world) for r in range(world)]
        per = n_batches // world
        assert all(r.batches_per_epoch == per for r in ranks)
        for epoch in range(2):
            shares = [r.epoch_batches(epoch) for r in ranks]
            assert sum(shares, []) == single.epoch_batches(epoch)[:per * world]
            seen = [i for share in shares for b in share for i in b]
            assert len(seen) == len(set(seen))


def streamed_and_indexed(store: Path, samples) -> list[tuple[dict, dict]]:
    """(streamed item, indexed item) for every sample of one streamed epoch, after checking each comes once."""
    indexed = FeatureQADataset(str(store), samples, MAX_FRAMES)
    data = streaming(store, samples)
    batches = take(data, (0, 0), data.batches_per_epoch)
    assert sorted(x["index"] for b in batches for x in b) == list(range(len(samples)))
    return [(item, indexed[item["index"]]) for b in batches for item in b]


def test_features_equal_the_indexed_dataset(wds_store, samples):
    for item, want in streamed_and_indexed(wds_store, samples):
        assert item["sample"] is want["sample"]
        for name in ("semantic", "spatiotemporal"):
            assert item[name].dtype == want[name].dtype == torch.float32
            assert torch.equal(item[name], want[name])
        assert item["semantic"].shape[0] == min(item["sample"].n_frames, MAX_FRAMES)


# ---------------------------------------------------------------- data.streaming
def test_data_streaming_resolves_by_store_format(wds_store, tmp_path):
    zarr_store = str(write_store(tmp_path / "zarr", "zarr"))
    assert wants_streaming("auto", str(wds_store)) and not wants_streaming("auto", zarr_store)
    assert wants_streaming(True, str(wds_store)) and not wants_streaming(False, str(wds_store))
    assert not wants_streaming(False, zarr_store)
    with pytest.raises(ConfigError, match=r"^data\.streaming=true .* group\(s\) 'eva' \(zarr\) of .*zarr.* "
                                          r"set data\.streaming to auto or false$"):
        wants_streaming(True, zarr_store)
    required = {"store": "s", "annotations": "a", "model": "m", "out": "o"}
    assert load_config(TrainConfig, values=required).data.streaming == "auto"
    assert load_config(TrainConfig, overrides=["data.streaming=false"], values=required).data.streaming is False
    with pytest.raises(ConfigError, match="data.streaming must be"):
        load_config(TrainConfig, overrides=["data.streaming=sometimes"], values=required)


# ---------------------------------------------------------------- end to end
def train(store, annotations, model, out, *extra):
    # one OpenMP thread: the tiny model's ops are too small to split, and on a busy CPU threads stall each other
    return run_cli("train", store, annotations, "--model", model, "--out", out, "--config",
                   REPO / "configs" / "train_tiny.yaml", "--no-progress", "save_every=3", "log_every=1", *extra,
                   env={"OMP_NUM_THREADS": "1"})


def test_cli_trains_on_a_webdataset_store_by_streaming_and_resumes_exactly(toy_corpus, tiny_model, tmp_path):
    """extract --format webdataset (3 videos a shard), then 3 steps + --resume to 6 against 6 in one go, with
    the shipped tiny recipe (batch 8, one DataLoader worker): 30 samples make 4 batches an epoch, so the resumed
    half starts mid-epoch and crosses into the next."""
    store = tmp_path / "store"
    run_cli("extract", toy_corpus / "videos", "--model", tiny_model, "--out", store, "--format", "webdataset",
            "--no-progress", "store.videos_per_shard=3", env={"OMP_NUM_THREADS": "1"})
    assert len(list((store / "groups" / "eva").glob("shard-*.tar"))) == 4
    annotations = toy_corpus / "train.json"
    split, whole = tmp_path / "split", tmp_path / "whole"
    train(store, annotations, tiny_model, split, "max_steps=3")
    second = train(store, annotations, tiny_model, split, "max_steps=6", "--resume")
    train(store, annotations, tiny_model, whole, "max_steps=6")
    assert "steps: 6 (resumed at step 3)" in second.stdout

    client = torch.load(split / "checkpoints" / "step0000006" / "client_state.pt", weights_only=False)
    assert client["streaming"] is True and client["micro_batches"] == 6

    from safetensors.torch import load_file

    a = load_file(str(split / "final" / "connector.safetensors"))
    b = load_file(str(whole / "final" / "connector.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not torch.equal(a["ffp.blocks.0.gate"], torch.ones(1))       # the gates (init 1.0) did move

    def metrics(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    m_split, m_whole = metrics(split), metrics(whole)
    assert [m["step"] for m in m_split] == list(range(1, 7))
    assert [(m["loss"], m["lr"], m["epoch"]) for m in m_split] == [(m["loss"], m["lr"], m["epoch"]) for m in m_whole]
    assert [m["epoch"] for m in m_whole] == [0, 0, 0, 1, 1, 1]


def test_planned_frames_stream_as_they_index(wds_store, samples):
    """Samples whose connector planned their frames (some videos, other frame sets for the same video) read the
    same features streamed as indexed."""
    from dataclasses import replace

    planned = [replace(s, frames=tuple(range(0, s.n_frames, 2))) if i % 3 == 0 else s for i, s in enumerate(samples)]
    for item, want in streamed_and_indexed(wds_store, planned):
        assert all(torch.equal(item[name], want[name]) for name in ("semantic", "spatiotemporal"))
    indexed, whole = (FeatureQADataset(str(wds_store), s, MAX_FRAMES) for s in (planned, samples))
    assert any(indexed[i]["semantic"].shape[0] != whole[i]["semantic"].shape[0] for i in range(0, len(samples), 3))
