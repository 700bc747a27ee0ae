"""Frame sampling and the two decoding backends: agreement, nearest frames, bad files, memory."""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

from dualfocus.extract import decode as decode_mod
from dualfocus.extract.decode import DecodeError, decode_video, nearest_frames, sample_timestamps
from media import (
    index_coded_frames,
    read_index_code,
    write_audio_only,
    write_cut_at,
    write_flat_video,
    write_index_video,
    write_mkv,
    write_truncated,
)

BACKENDS = ("decord", "pyav")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def index_video(media) -> Path:
    return write_index_video(media / "index.mp4", n_frames=150, fps=25)  # 6 s


@pytest.fixture(scope="module")
def long_video(media) -> Path:
    return write_flat_video(media / "long.mp4", seconds=120, fps=5)


def _decode_all(path, fps, max_frames=None, size=32, backend="decord", chunk_frames=16):
    info, times, chunks = decode_video(path, fps, max_frames, size, chunk_frames, backend)
    return info, times, np.concatenate(list(chunks))


# -- sample_timestamps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "duration, fps, max_frames, expected_n",
    [
        (10.0, 1, None, 10),
        (10.5, 1, None, 11),
        (0.3, 10, None, 3),  # 0.3 * 10 is 3.0000000000000004 in floats
        (3.0, 2, None, 6),
        (0.4, 1, None, 1),  # shorter than one interval
        (0.0, 1, None, 1),  # unknown duration
        (float("nan"), 1, None, 1),
        (600.0, 1, 64, 64),
        (600.0, 1, 1, 1),
        (5.0, 1, 64, 5),
        (7.0, 1, 6, 6),
    ],
)
def test_sample_timestamps_count_and_grid(duration, fps, max_frames, expected_n):
    times = sample_timestamps(duration, fps, max_frames)
    assert times.dtype == np.float64 and times.shape == (expected_n,)
    assert times[0] == 0.0
    assert np.all(np.diff(times) > 0)
    grid = np.round(times * fps, 6)
    np.testing.assert_array_equal(grid, np.round(grid))  # every time is on the 1/fps grid
    if math.isfinite(duration) and duration > 0:
        assert times[-1] < duration
        full = max(1, math.ceil(duration * fps - 1e-9))
        assert expected_n == min(max_frames or full, full)
        if max_frames is not None and full > max_frames > 1:
            assert times[-1] == (full - 1) / fps  # the subsample spans the whole clip


def test_sample_timestamps_subsample_is_uniform():
    times = sample_timestamps(100.0, 1, 11)
    np.testing.assert_array_equal(times, [0, 10, 20, 30, 40, 50, 59, 69, 79, 89, 99])


@pytest.mark.parametrize("fps, max_frames", [(0, None), (-1, None), (1, 0)])
def test_sample_timestamps_rejects_bad_arguments(fps, max_frames):
    with pytest.raises(ValueError):
        sample_timestamps(10.0, fps, max_frames)


def test_nearest_frames_ties_go_to_the_earlier_frame():
    starts = np.arange(5) / 10  # 0.0 .. 0.4
    idx = nearest_frames(starts, np.array([0.0, 0.04, 0.05, 0.06, 0.39, 1.0]))
    np.testing.assert_array_equal(idx, [0, 0, 0, 1, 4, 4])


# -- backends on real files ----------------------------------------------------------------------


def test_backends_agree_on_a_toy_clip(media):
    from dualfocus.pipeline.toy import make_toy_corpus

    make_toy_corpus(media / "toy", n_videos=2, seed=1)
    path = media / "toy" / "videos" / "toy_00000.mp4"
    results = {b: _decode_all(path, fps=2, size=64, backend=b) for b in BACKENDS}
    (info_d, times_d, frames_d), (info_p, times_p, frames_p) = results["decord"], results["pyav"]
    assert info_d.n_native_frames == info_p.n_native_frames
    assert info_d.duration_s == pytest.approx(info_p.duration_s, abs=1e-3)
    np.testing.assert_array_equal(times_d, times_p)
    assert frames_d.shape == frames_p.shape == (len(times_d), 64, 64, 3)
    assert frames_d.dtype == frames_p.dtype == np.uint8
    assert np.abs(frames_d.astype(np.int16) - frames_p).mean() < 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fps", [1, 3, 7, 25, 35])  # odd rates: no exact ties at 25 fps
def test_each_sample_is_the_nearest_native_frame(index_video, backend, fps):
    _, times, frames = _decode_all(index_video, fps, size=40, backend=backend, chunk_frames=5)
    native = np.arange(150) / 25
    expected = [int(np.argmin(np.abs(native - t) + 1e-9 * np.arange(150))) for t in times]
    assert [read_index_code(f) for f in frames] == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_samples_across_keyframes(media, backend):
    """Gaps longer than PyAVDecoder.seek_gap_s take the seeking path; the picks stay exact."""
    path = write_index_video(media / "gop.mp4", n_frames=600, fps=10, keyframe_interval=10)
    _, times, frames = _decode_all(path, fps=1, max_frames=7, size=40, backend=backend)
    np.testing.assert_array_equal(times, [0, 10, 20, 30, 39, 49, 59])  # round(linspace(0, 59, 7))
    assert [read_index_code(f) for f in frames] == [0, 100, 200, 300, 390, 490, 590]


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_shorter_than_one_interval_gives_one_frame(media, backend):
    path = write_flat_video(media / "short.mp4", seconds=0.3, fps=10)
    info, times, frames = _decode_all(path, fps=1, backend=backend)
    assert info.duration_s == pytest.approx(0.3, abs=0.01)
    np.testing.assert_array_equal(times, [0.0])
    assert frames.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_video_streams_bounded_chunks(long_video, backend):
    info, times, chunks = decode_video(long_video, 1, None, 24, chunk_frames=8, backend=backend)
    assert isinstance(chunks, types.GeneratorType)
    assert info.duration_s == pytest.approx(120, abs=0.5) and len(times) == 120
    sizes = []
    for chunk in chunks:
        assert chunk.shape[1:] == (24, 24, 3) and chunk.dtype == np.uint8
        sizes.append(len(chunk))
    assert sizes == [8] * 15


def test_max_frames_caps_a_long_video(long_video):
    _, times, frames = _decode_all(long_video, fps=1, max_frames=10)
    assert len(times) == len(frames) == 10
    assert times[0] == 0.0 and times[-1] == 119.0


# -- fallback from decord to PyAV ----------------------------------------------------------------


def test_decord_open_failure_falls_back_to_pyav(index_video, monkeypatch):
    def broken_probe(self, path):
        raise DecodeError("could not decode: simulated decord failure")

    monkeypatch.setattr(decode_mod.DecordDecoder, "probe", broken_probe)
    info, times, frames = _decode_all(index_video, fps=5, size=40)
    assert info.backend == "pyav"
    assert [read_index_code(f) for f in frames] == [5 * i for i in range(30)]


def test_decord_read_failure_resumes_with_pyav(index_video, monkeypatch):
    real_read = decode_mod.DecordDecoder.read_frames

    def fails_after_one_chunk(self, *args, **kwargs):
        chunks = real_read(self, *args, **kwargs)
        yield next(chunks)
        raise RuntimeError("simulated decord read failure")

    monkeypatch.setattr(decode_mod.DecordDecoder, "read_frames", fails_after_one_chunk)
    _, times, frames = _decode_all(index_video, fps=5, size=40, chunk_frames=4)
    assert len(frames) == len(times) == 30
    assert [read_index_code(f) for f in frames] == [5 * i for i in range(30)]


def test_unknown_backend_is_rejected(media):
    with pytest.raises(ValueError, match="backend"):
        decode_video(media / "x.mp4", 1, None, 32, backend="opencv")


# -- bad files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_raise_decode_error_with_a_reason(media, index_video, backend):
    (media / "empty.mp4").write_bytes(b"")
    (media / "text.mp4").write_text("this is not a video\n" * 20)
    audio = write_audio_only(media / "audio.m4a")
    cases = {
        media / "missing.mp4": "file not found",
        media / "empty.mp4": "file is empty (0 bytes)",
        media / "text.mp4": "could not decode",
        audio: "no video stream",
        media: "not a regular file",
    }
    for path, reason in cases.items():
        with pytest.raises(DecodeError) as err:
            _decode_all(path, fps=1, backend=backend)
        assert reason in str(err.value), (path.name, str(err.value))
        assert len(str(err.value)) < 250


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("faststart", [False, True])
@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_truncated_file_gives_frames_or_a_clear_error(media, backend, faststart, fraction):
    """Index at the end (the muxer default): any cut loses it. Index first: the data runs out."""
    from dualfocus.pipeline.toy import write_mp4

    full = media / f"full_{faststart}.mp4"
    if not full.exists():
        write_mp4(full, index_coded_frames(150), 25, faststart=faststart)
    path = write_truncated(full, media / f"cut_{faststart}_{fraction}.mp4", fraction)
    try:
        _, times, frames = _decode_all(path, fps=5, size=40, backend=backend)
    except DecodeError as err:
        assert str(err).startswith(("could not decode", "video data ends")), str(err)
    else:  # only a tail was lost: every sample but the last few is exact
        codes = [read_index_code(f) for f in frames]
        assert len(codes) == len(times) == 30
        assert codes[:25] == [5 * i for i in range(25)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_a_streamable_mp4_reports_truncation(media, backend):
    from dualfocus.pipeline.toy import write_mp4

    full = media / "streamable.mp4"
    write_mp4(full, index_coded_frames(150), 25, faststart=True)
    path = write_truncated(full, media / "streamable_cut.mp4", 0.5)
    with pytest.raises(DecodeError, match=r"video data ends at .* \(truncated file\?\)"):
        _decode_all(path, fps=5, size=40, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seconds", [1.5, 3.4])
def test_a_file_cut_at_a_packet_boundary_is_reported_as_truncated(media, backend, seconds):
    """Cut exactly between two packets, decord's own index holds only what is left, so the file read as a whole,
    shorter video (stored as ok); the header's duration gives it away."""
    from dualfocus.pipeline.toy import write_mp4

    full = media / "boundary_full.mp4"
    if not full.exists():
        write_mp4(full, index_coded_frames(50), 10, faststart=True)
    path = write_cut_at(full, media / f"boundary_{seconds}.mp4", seconds, boundary=True)
    with pytest.raises(DecodeError, match=r"video data ends at .* \(truncated file\?\)"):
        _decode_all(path, fps=1, size=40, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_container_without_stream_metadata(media, backend):
    """Matroska stores no frame count or stream duration; both are measured instead."""
    path = write_mkv(media / "index.mkv", index_coded_frames(150), 25)
    info, _, frames = _decode_all(path, fps=3, size=40, backend=backend)
    assert info.n_native_frames == 150 and info.duration_s == pytest.approx(6.0, abs=0.05)
    assert [read_index_code(f) for f in frames][:6] == [0, 8, 17, 25, 33, 42]


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_bytes_give_frames_or_a_clear_error(index_video, media, backend):
    """Damaged packets are concealed or skipped by the codec; the call must not crash."""
    data = bytearray(index_video.read_bytes())
    rng = np.random.default_rng(0)
    for pos in rng.integers(len(data) // 10, len(data) * 6 // 10, 20):
        data[pos] = int(rng.integers(256))
    path = media / "corrupted.mp4"
    path.write_bytes(bytes(data))
    try:
        _, times, frames = _decode_all(path, fps=5, size=40, backend=backend)
    except DecodeError as err:
        assert str(err).startswith(("could not decode", "video data ends", "no ")), str(err)
    else:
        assert frames.shape == (len(times), 40, 40, 3)
