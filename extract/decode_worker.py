"""Decoding in a long-lived child process, so a stuck decoder can be killed on a wall-clock limit.

decord can hang while holding the GIL on some broken files, which no thread-based timeout can
interrupt. :class:`DecodeWorker` runs :func:`~dualfocus.extract.decode.decode_video` in a child
process (``spawn`` context, started on first use and reused across videos) and streams the frame
chunks back over a pipe. When no message arrives for ``stall_timeout_s`` seconds the child is
killed, the caller gets :class:`DecodeError`, and the next call starts a fresh child.

Pipe protocol (``job`` is a per-call counter, so leftovers of an abandoned call are recognised):

    parent -> child:  ("decode", job, kwargs) | ("cancel", job) | ("exit",)
    child -> parent:  ("ready",) once, then per job
                      (job, "info", info_dict, timestamps [t]),
                      (job, "chunk", uint8 [k, size, size, 3]) ..., (job, "done")
                      or (job, "error", reason) at any point

Test hook: the child reads ``DUALFOCUS_DECODE_TEST_HANG`` (``"MARKER"`` or ``"MARKER@N"``); a path
containing MARKER makes the child sleep forever after sending N chunks (default 0: before anything).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np

from dualfocus.extract.decode import BACKENDS, DecodeError, VideoInfo, decode_video

HANG_ENV = "DUALFOCUS_DECODE_TEST_HANG"


class DecodeWorker:
    """One child process that decodes videos on request; not thread-safe (one call at a time).

    Args:
        stall_timeout_s: Longest wait for the next message from the child (probe, each chunk).
        start_timeout_s: Longest wait for a freshly spawned child to import and report ready.

    Usage::

        with DecodeWorker(stall_timeout_s=60) as worker:
            info, timestamps, chunks = worker.decode(path, fps=1, max_frames=64, size=224)
            for chunk in chunks:  # uint8 [k, 224, 224, 3]
                ...
    """

    def __init__(self, stall_timeout_s: float = 60.0, start_timeout_s: float = 120.0):
        if stall_timeout_s <= 0 or start_timeout_s <= 0:
            raise ValueError(
                f"timeouts must be > 0, got stall_timeout_s={stall_timeout_s}, "
                f"start_timeout_s={start_timeout_s}"
            )
        self.stall_timeout_s = stall_timeout_s
        self.start_timeout_s = start_timeout_s
        self._proc = None
        self._conn = None
        self._job = 0
        self._active: int | None = None  # job whose chunks have not all been read yet

    def decode(
        self,
        path: str,
        fps: float,
        max_frames: int | None,
        size: int,
        chunk_frames: int = 16,
        backend: str = "decord",
    ) -> tuple[VideoInfo, np.ndarray, Iterator[np.ndarray]]:
        """Like :func:`decode_video`, run in the child; the returned iterator reads from the pipe.

        Starting a new call abandons the previous call's iterator (it then raises DecodeError).
        """
        if backend not in BACKENDS:  # a config error, not a per-video one
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._abandon_active()
        self._ensure_started()
        self._job += 1
        job = self._job
        kwargs = dict(
            path=str(path), fps=fps, max_frames=max_frames, size=size,
            chunk_frames=chunk_frames, backend=backend,
        )  # fmt: skip
        try:
            self._conn.send(("decode", job, kwargs))
        except OSError:
            self._kill()
            raise DecodeError("decode process died before taking the request") from None
        msg = self._recv(job)
        if msg[1] == "error":
            raise DecodeError(msg[2])
        self._active = job
        return VideoInfo(**msg[2]), msg[3], self._chunks(job)

    def close(self) -> None:
        """Stop the child (politely if idle, otherwise by killing it) and reap it."""
        if self._proc is None:
            return
        if self._active is None and self._proc.is_alive():
            try:
                self._conn.send(("exit",))
                self._proc.join(timeout=5)
            except OSError:
                pass
        self._kill()

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, nothing left to clean
            pass

    # -- parent side -----------------------------------------------------------------------------

    def _chunks(self, job: int) -> Iterator[np.ndarray]:
        while True:
            if self._active != job:
                raise DecodeError("decode was abandoned by a later call on the same worker")
            msg = self._recv(job)
            if msg[1] == "chunk":
                yield msg[2]
            elif msg[1] == "done":
                self._active = None
                return
            else:
                self._active = None
                raise DecodeError(msg[2])

    def _recv(self, job: int | None, timeout: float | None = None) -> tuple:
        """Next message of ``job`` (``None``: the ready message); stale messages are dropped."""
        timeout = self.stall_timeout_s if timeout is None else timeout
        while True:
            try:
                ready = self._conn.poll(timeout)
                msg = self._conn.recv() if ready else None
            except (EOFError, OSError):
                if self._proc is not None:
                    self._proc.join(timeout=1)
                code = self._proc.exitcode if self._proc is not None else None
                self._kill()
                raise DecodeError(f"decode process died (exit code {code})") from None
            if msg is None:
                self._kill()
                raise DecodeError(f"decode timed out after {timeout:g}s")
            if job is None or msg[0] == job:
                return msg

    def _abandon_active(self) -> None:
        """Tell the child to stop the unfinished job and drain its remaining messages."""
        if self._active is None:
            return
        job, self._active = self._active, None
        try:
            self._conn.send(("cancel", job))
            while self._recv(job)[1] == "chunk":
                pass
        except OSError:
            self._kill()
        except DecodeError:
            pass  # the child was killed; the next call starts a fresh one

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        self._kill()
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(
            target=_child_main, args=(child_conn,), daemon=True, name="dualfocus-decode"
        )
        self._proc.start()
        child_conn.close()
        self._conn = parent_conn
        try:
            self._recv(None, timeout=self.start_timeout_s)
        except DecodeError as exc:
            raise DecodeError(f"decode process failed to start: {exc}") from None

    def _kill(self) -> None:
        """Kill and reap the child (no zombie), close the pipe; the next call starts afresh."""
        proc, conn = self._proc, self._conn
        self._proc, self._conn, self._active = None, None, None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
            if proc.exitcode is not None:
                proc.close()
        if conn is not None:
            conn.close()


# -- child side ----------------------------------------------------------------------------------


def _child_main(conn) -> None:
    """Serve decode requests until told to exit or the parent goes away."""
    _quiet_native_logs()
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "exit":
            return
        if msg[0] == "decode":
            if not _serve(conn, msg[1], msg[2]):
                return
        # a "cancel" for a job that already finished needs nothing


def _quiet_native_logs() -> None:
    """FFmpeg and decord print their own complaints about broken files straight to fd 2; every
    failure already comes back as a DecodeError with its reason (and lands in the manifest), so the
    child's native stderr is silenced unless DUALFOCUS_DECODE_STDERR=1 asks to keep it for debugging."""
    if os.environ.get("DUALFOCUS_DECODE_STDERR") == "1":
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


def _serve(conn, job: int, kwargs: dict) -> bool:
    """Decode one video and stream it to the parent; False when the parent asked to exit."""
    hang_after = _test_hang_after(kwargs["path"])
    try:
        if hang_after == 0:
            _sleep_forever()
        info, timestamps, chunks = decode_video(**kwargs)
        conn.send((job, "info", asdict(info), timestamps))
        for i, chunk in enumerate(chunks, start=1):
            conn.send((job, "chunk", chunk))
            if hang_after == i:
                _sleep_forever()
            if conn.poll():  # the parent may cancel this job or ask us to exit
                request = conn.recv()
                if request[0] == "exit":
                    return False
                if request[0] == "cancel" and request[1] == job:
                    chunks.close()
                    break
        conn.send((job, "done"))
    except DecodeError as exc:
        conn.send((job, "error", str(exc)))
    except Exception as exc:  # noqa: BLE001 - anything else still becomes a per-video error
        conn.send((job, "error", f"decode failed: {type(exc).__name__}: {exc}"))
    return True


def _test_hang_after(path: str) -> int | None:
    """Chunks to send before hanging, per the test hook in :data:`HANG_ENV`, or None."""
    spec = os.environ.get(HANG_ENV)
    if not spec:
        return None
    marker, _, after = spec.partition("@")
    return int(after or 0) if marker and marker in path else None


def _sleep_forever() -> None:
    while True:
        time.sleep(3600)
