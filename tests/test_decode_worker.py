"""DecodeWorker: decoding in a child process with a wall-clock limit that survives hangs."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from dualfocus.extract.decode import DecodeError, decode_video
from dualfocus.extract.decode_worker import HANG_ENV, DecodeWorker
from media import write_audio_only, write_flat_video

# Long enough that a loaded machine never stalls a healthy decode this long, short enough to keep the
# two hang tests quick. Elapsed-time bounds below only catch a hang, never a slow run.
STALL_S = 4.0


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("worker")
    clip = write_flat_video(root / "clip.mp4", seconds=20, fps=5)
    paths = {"clip": clip, "audio": write_audio_only(root / "audio.m4a")}
    for name in ("hang_me_early", "hang_me_late@1"):  # "@1": hang after the first chunk
        paths[name] = root / f"{name.split('@')[0]}.mp4"
        shutil.copy(clip, paths[name])
    return paths


@pytest.fixture
def worker(monkeypatch):
    # Read by the child only, which inherits the environment when it is spawned.
    monkeypatch.setenv(HANG_ENV, "hang_me_early")
    with DecodeWorker(stall_timeout_s=STALL_S) as w:
        yield w


def _assert_reaped(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_worker_matches_in_process_decoding(worker, videos):
    info, times, chunks = worker.decode(videos["clip"], 1, None, 24, chunk_frames=8)
    frames = np.concatenate(list(chunks))
    ref_info, ref_times, ref_chunks = decode_video(videos["clip"], 1, None, 24, chunk_frames=8)
    assert info == ref_info
    np.testing.assert_array_equal(times, ref_times)
    np.testing.assert_array_equal(frames, np.concatenate(list(ref_chunks)))


def test_worker_reuses_one_child(worker, videos):
    for _ in range(3):
        _, _, chunks = worker.decode(videos["clip"], 1, 4, 16)
        assert sum(len(c) for c in chunks) == 4
        pid = worker._proc.pid
        assert worker._proc.is_alive()
    assert worker._proc.pid == pid


def test_hang_becomes_decode_error_and_worker_recovers(worker, videos):
    _, _, chunks = worker.decode(videos["clip"], 1, 2, 16)
    list(chunks)
    old_pid = worker._proc.pid

    start = time.monotonic()
    with pytest.raises(DecodeError, match=rf"decode timed out after {STALL_S:g}s"):
        worker.decode(videos["hang_me_early"], 1, None, 16)
    assert time.monotonic() - start < STALL_S + 60
    _assert_reaped(old_pid)

    _, times, chunks = worker.decode(videos["clip"], 1, None, 16, chunk_frames=8)
    assert sum(len(c) for c in chunks) == len(times) == 20


def test_hang_mid_stream_raises_from_the_iterator(monkeypatch, videos):
    monkeypatch.setenv(HANG_ENV, "hang_me_late@1")
    with DecodeWorker(stall_timeout_s=STALL_S) as worker:
        _, times, chunks = worker.decode(videos["hang_me_late@1"], 1, None, 16, chunk_frames=4)
        assert len(next(chunks)) == 4
        start = time.monotonic()
        with pytest.raises(DecodeError, match="timed out"):
            next(chunks)
        assert time.monotonic() - start < STALL_S + 60
        _, _, chunks = worker.decode(videos["clip"], 1, None, 16)
        assert sum(len(c) for c in chunks) == 20


def test_child_errors_come_back_as_decode_errors(worker, videos, tmp_path):
    with pytest.raises(DecodeError, match="^file not found$"):
        worker.decode(tmp_path / "missing.mp4", 1, None, 16)
    with pytest.raises(DecodeError, match="^no video stream$"):
        worker.decode(videos["audio"], 1, None, 16)
    pid = worker._proc.pid
    _, _, chunks = worker.decode(videos["clip"], 1, 3, 16)
    assert sum(len(c) for c in chunks) == 3
    assert worker._proc.pid == pid  # errors do not cost a restart


def test_abandoned_iterator_does_not_leak_into_the_next_call(worker, videos):
    _, _, first = worker.decode(videos["clip"], 5, None, 16, chunk_frames=2)  # 50 chunks
    assert len(next(first)) == 2
    _, times, second = worker.decode(videos["clip"], 1, None, 16, chunk_frames=8)
    assert [len(c) for c in second] == [8, 8, 4] and len(times) == 20
    with pytest.raises(DecodeError, match="abandoned"):
        next(first)


def test_child_killed_mid_stream_is_reported_and_replaced(worker, videos):
    # 224 px chunks of 8 frames (1.2 MB) fill the pipe, so the child is still mid-job when killed.
    _, _, chunks = worker.decode(videos["clip"], 5, None, 224, chunk_frames=8)
    next(chunks)
    pid = worker._proc.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DecodeError, match=r"decode process died \(exit code -9\)"):
        for _ in chunks:
            pass
    _assert_reaped(pid)
    _, _, chunks = worker.decode(videos["clip"], 1, 2, 16)
    assert sum(len(c) for c in chunks) == 2


def test_child_dead_between_calls_is_replaced_silently(worker, videos):
    list(worker.decode(videos["clip"], 1, 2, 16)[2])
    os.kill(worker._proc.pid, signal.SIGKILL)
    worker._proc.join(5)
    _, _, chunks = worker.decode(videos["clip"], 1, 2, 16)
    assert sum(len(c) for c in chunks) == 2


def test_close_reaps_the_child(videos):
    worker = DecodeWorker(stall_timeout_s=STALL_S)
    assert worker._proc is None  # started lazily
    with worker:
        _, _, chunks = worker.decode(videos["clip"], 1, 5, 16, chunk_frames=2)
        next(chunks)  # leave a job unfinished: close() must still end the child
        pid = worker._proc.pid
    _assert_reaped(pid)
    worker.close()  # idempotent


def test_rejects_bad_timeouts():
    with pytest.raises(ValueError, match="stall_timeout_s"):
        DecodeWorker(stall_timeout_s=0)
