"""Bad input through the real ``dualfocus extract`` command.

One extract run over a CSV corpus mixing good videos with every kind of broken one (the hang comes from
the DecodeWorker's test hook) is shared by the per-case tests: each broken video must be a ``failed``
manifest row with a reason while the job goes on. Problems with the corpus, the model or the store are
refused before any work with a one-line error and exit status 2.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli
from media import index_coded_frames, write_audio_only, write_cut_at, write_flat_video, write_truncated

from dualfocus.extract.decode_worker import HANG_ENV
from dualfocus.pipeline.toy import write_mp4
from dualfocus.store import FeatureStore, safe_key
from dualfocus.store.manifest import latest, read_all

ODD_ID = "dir/sub.v 1"
GOOD = ["good0", "good1", "short", ODD_ID]
FAILED = ["missing", "empty", "truncated", "truncated_tail", "cut_between_packets", "text", "audio_only", "hang"]
TIMEOUT_S = 10  # a healthy 2-frame chunk never takes this long, even on a loaded machine


def make_bad_corpus(root: Path, toy_videos: list[Path]) -> Path:
    """Files for every case and ``corpus.csv`` listing them (relative paths, one missing)."""
    media = root / "media"
    media.mkdir()
    shutil.copy(toy_videos[0], media / "good0.mp4")
    shutil.copy(toy_videos[1], media / "good1.mp4")
    shutil.copy(toy_videos[2], media / "odd.mp4")
    shutil.copy(toy_videos[3], media / "hang_me.mp4")
    (media / "empty.mp4").write_bytes(b"")
    write_truncated(toy_videos[4], media / "truncated.mp4", 0.5)            # index (moov) at the end: unreadable
    write_mp4(media / "tail.mp4", index_coded_frames(50), 10, faststart=True)
    write_cut_at(media / "tail.mp4", media / "truncated_tail.mp4", 3.4)     # readable index, data cut at 3.4 s
    write_cut_at(media / "tail.mp4", media / "cut_between_packets.mp4", 3.4, boundary=True)   # decord: no error
    (media / "text.mp4").write_text("not a video, just text\n" * 20)
    write_audio_only(media / "audio_only.mp4")
    write_flat_video(media / "short.mp4", seconds=0.4, fps=10)              # shorter than 1 s at 1 fps
    rows = [("good0", "media/good0.mp4"), ("missing", "media/no_such_file.mp4"), ("empty", "media/empty.mp4"),
            ("truncated", "media/truncated.mp4"), ("truncated_tail", "media/truncated_tail.mp4"),
            ("cut_between_packets", "media/cut_between_packets.mp4"),
            ("text", "media/text.mp4"), ("audio_only", "media/audio_only.mp4"), ("short", "media/short.mp4"),
            ("hang", "media/hang_me.mp4"), (ODD_ID, "media/odd.mp4"), ("good1", "media/good1.mp4")]
    corpus = root / "corpus.csv"
    corpus.write_text("video_id,path\n" + "".join(f"{vid},{path}\n" for vid, path in rows))
    return corpus


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, tiny_model, toy_corpus):
    """(completed process, store dir, latest manifest rows by id) of one extract over the bad corpus.

    Chunks of 2 frames so the truncated tail and the hang (after 2 chunks) fail in the middle of a video.
    """
    root = tmp_path_factory.mktemp("bad")
    corpus = make_bad_corpus(root, sorted((toy_corpus / "videos").glob("*.mp4")))
    store = root / "store"
    proc = run_cli("extract", corpus, "--model", tiny_model, "--out", store, "--no-progress", "--max-failures", "3",
                   f"decode.timeout_s={TIMEOUT_S}", "decode.chunk_frames=2",
                   check=False, env={HANG_ENV: "hang_me@2"}, timeout=300)
    group = store / "groups" / "eva"
    rows = latest(read_all(group)) if (group / "group.json").exists() else pd.DataFrame()
    return proc, store, {r["video_id"]: r for r in rows.to_dict("records")}


def failed_row(bad_run, video_id: str) -> dict:
    proc, _, rows = bad_run
    assert video_id in rows, proc.stdout + proc.stderr
    row = rows[video_id]
    assert row["status"] == "failed" and row["error"] and row["length"] == 0 and pd.isna(row["shard"])
    return row


def test_every_video_gets_a_row_and_too_many_failures_exit_1(bad_run):
    proc, store, rows = bad_run
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"videos: 12 in corpus | ok {len(GOOD)} | failed {len(FAILED)} | skipped 0" in proc.stdout
    assert "too many failures" in proc.stdout
    for vid in FAILED:
        assert f"  {vid}: {rows[vid]['error']}" in proc.stdout
    assert sorted(rows) == sorted(GOOD + FAILED)
    assert sorted(v for v, r in rows.items() if r["status"] == "ok") == sorted(GOOD)


def test_good_videos_are_stored_despite_the_failures(bad_run, toy_corpus):
    _, store, rows = bad_run
    features = FeatureStore.open(store)
    assert sorted(features.video_ids()) == sorted(GOOD)
    for vid in GOOD:
        got, row = features[vid], rows[vid]
        expected = math.ceil(row["duration_s"] - 1e-9)          # 1 fps
        assert row["n_frames"] == row["length"] == len(got.timestamps) == expected
        # every frame range is intact after the aborted videos: timestamps restart at 0 per video
        np.testing.assert_array_equal(got.timestamps, np.arange(expected, dtype=np.float32))
        assert got["semantic"].shape == (expected, 257, 64) and got["spatiotemporal"].shape == (expected, 64, 64)


def test_missing_file(bad_run):
    assert failed_row(bad_run, "missing")["error"] == "file not found"


def test_zero_byte_file(bad_run):
    assert failed_row(bad_run, "empty")["error"] == "file is empty (0 bytes)"


def test_truncated_mp4_without_its_index(bad_run):
    assert failed_row(bad_run, "truncated")["error"].startswith("could not decode")


def test_truncated_mp4_fails_in_the_middle_of_the_video(bad_run):
    row = failed_row(bad_run, "truncated_tail")
    assert "truncated file?" in row["error"]
    assert row["n_frames"] == 5       # sampled frames known from the index; the chunks written were dropped


def test_mp4_cut_exactly_between_two_packets_is_not_stored_as_a_shorter_video(bad_run):
    assert "truncated file?" in failed_row(bad_run, "cut_between_packets")["error"]


def test_text_file_named_mp4(bad_run):
    assert failed_row(bad_run, "text")["error"].startswith("could not decode")


def test_container_without_a_video_stream(bad_run):
    assert failed_row(bad_run, "audio_only")["error"] == "no video stream"


def test_a_hanging_decoder_becomes_a_failure(bad_run):
    assert failed_row(bad_run, "hang")["error"] == f"decode timed out after {TIMEOUT_S}s"


def test_video_shorter_than_one_sample_interval_gives_one_frame(bad_run):
    _, store, rows = bad_run
    assert rows["short"]["status"] == "ok" and rows["short"]["n_frames"] == 1
    assert rows["short"]["duration_s"] < 1.0
    np.testing.assert_array_equal(FeatureStore.open(store)["short"].timestamps, [0.0])


def test_odd_id_is_stored_under_a_safe_key_and_readable_by_its_original_id(bad_run):
    _, store, rows = bad_run
    row = rows[ODD_ID]
    assert row["status"] == "ok" and row["key"] == safe_key(ODD_ID) != ODD_ID
    assert "/" not in row["key"] and "." not in row["key"] and " " not in row["key"]
    features = FeatureStore.open(store)[ODD_ID]
    assert features.video_id == ODD_ID and len(features.timestamps) == row["n_frames"]


# ---- refused before any work: one line on stderr, exit status 2, nothing written ----------------------------


def assert_refused(proc, *needles: str, one_line: bool = True) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error: "), proc.stderr
    assert len(lines) == 1 or not one_line, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_duplicate_ids_are_refused_naming_them(tmp_path, tiny_model):
    (tmp_path / "corpus.csv").write_text("video_id,path\nx,a.mp4\ny,b.mp4\nx,c.mp4\n")
    proc = run_cli("extract", tmp_path / "corpus.csv", "-m", tiny_model, "-o", tmp_path / "store", check=False)
    assert_refused(proc, "duplicate video_id", "'x'")
    assert "'y'" not in proc.stderr
    assert not (tmp_path / "store").exists()


def test_corpus_without_videos_is_a_clear_error(tmp_path, tiny_model):
    (tmp_path / "videos").mkdir()
    proc = run_cli("extract", tmp_path / "videos", "-m", tiny_model, "-o", tmp_path / "store", check=False)
    assert_refused(proc, "no videos found in", str(tmp_path / "videos"))
    assert not (tmp_path / "store").exists()


def not_a_model(kind: str, tmp_path: Path, tiny_model: Path) -> Path:
    """A directory (or path) that looks like a model to a careless eye but is not a usable vision model."""
    path = tmp_path / kind
    if kind == "nonexistent":
        return path
    path.mkdir()
    if kind == "no_config":
        (path / "weights.bin").write_bytes(b"\0" * 64)
    elif kind == "other_model_type":
        (path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    elif kind == "broken_config":
        (path / "config.json").write_text("{not json")
    elif kind in ("no_weights", "corrupt_weights"):
        shutil.copy(tiny_model / "config.json", path)
        shutil.copy(tiny_model / "preprocessor_config.json", path)
        if kind == "corrupt_weights":
            (path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return path


@pytest.mark.parametrize("kind", ["nonexistent", "other_model_type", "corrupt_weights"])
def test_unusable_model_dir_is_one_line_naming_the_path(kind, tmp_path, tiny_model, toy_corpus):
    model = not_a_model(kind, tmp_path, tiny_model)
    proc = run_cli("extract", toy_corpus / "videos", "-m", model, "-o", tmp_path / "store", check=False)
    assert_refused(proc, str(model))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("kind", ["no_config", "broken_config", "no_weights", "corrupt_weights"])
def test_unusable_model_dir_is_refused_before_any_work(kind, tmp_path, tiny_model, toy_corpus):
    """The same checks in-process (quicker than the CLI): a ModelLoadError (or, from the check of every group
    at once, a UserError) naming the path, nothing written."""
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import ModelLoadError

    model = not_a_model(kind, tmp_path, tiny_model)
    cfg = ExtractConfig(corpus=str(toy_corpus / "videos"), model=str(model), out=str(tmp_path / "store"))
    with pytest.raises((ModelLoadError, UserError), match=str(model)):
        run_extract(cfg, progress=False)
    assert not (tmp_path / "store").exists()


def test_store_with_another_fingerprint_is_refused_without_overwrite(bad_run, tiny_model, tmp_path):
    _, store, _ = bad_run
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("video_id,path\ngood0,x.mp4\n")
    parts = sorted((store / "groups" / "eva" / "manifest").iterdir())
    proc = run_cli("extract", corpus, "-m", tiny_model, "-o", store, "decode.fps=2", check=False)
    assert_refused(proc, str(store), "overwrite", one_line=False)
    assert "fps: store has 1.0, requested 2.0" in proc.stderr
    assert sorted((store / "groups" / "eva" / "manifest").iterdir()) == parts
