"""Video decoding: sample frames at a fixed rate, decode only those, resize to the encoder's size.

Two backends share the :class:`VideoDecoder` protocol: :class:`DecordDecoder` (default) and
:class:`PyAVDecoder` (FFmpeg bundled with PyAV; the fallback when decord fails on a file).
:func:`decode_video` is the entry point used by the extract stage.

Frames leave this module as uint8 RGB ``[k, size, size, 3]`` chunks (``k <= chunk_frames``), or as a dict of
views per chunk when the pixels group is written too (:class:`FrameViews`), so the memory held at any time is
bounded by ``chunk_frames``, never by the video length.
Normalisation with the encoder's mean/std happens in the encoder, not here.

Legend: ``t`` sampled frames, ``n`` native frames of the file, ``k`` frames in one chunk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dualfocus.extract.resize import FrameViews, resize_stack
from dualfocus.pipeline.sampling import uniform_indices

BACKENDS = ("decord", "pyav")


class DecodeError(RuntimeError):
    """A video could not be decoded; ``str(err)`` is a short human-readable reason."""


@dataclass
class VideoInfo:
    """What a backend learned about a file before decoding it."""

    duration_s: float
    native_fps: float
    n_native_frames: int
    width: int
    height: int
    backend: str  # the backend that probed the file


def sample_timestamps(duration_s: float, fps: float, max_frames: int | None) -> np.ndarray:
    """Sample times ``0, 1/fps, 2/fps, ... < duration_s`` in seconds, float64 ``[t]``.

    ``t = min(max_frames, ceil(duration_s * fps))`` with a floor of 1: a clip shorter than one
    sample interval, or one of unknown (0, NaN) duration, still gives ``[0.0]``. Above
    ``max_frames`` the grid is subsampled uniformly to exactly ``max_frames`` times (indices
    ``round(linspace(0, n - 1, max_frames))``), keeping the first and the last.
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    n = 1
    if math.isfinite(duration_s) and duration_s > 0:
        # The tolerance keeps e.g. 0.3 s at 10 fps (0.30000000000000004 * 10) at 3 samples, not 4.
        n = max(1, math.ceil(duration_s * fps - 1e-9))
    times = np.arange(n, dtype=np.float64) / fps
    return times[uniform_indices(n, max_frames)]


class VideoDecoder(Protocol):
    """A decoding backend. ``read_frames`` decodes only the frames nearest to ``timestamps``."""

    name: str

    def probe(self, path: str) -> VideoInfo:
        """Open ``path`` and read its metadata; raises :class:`DecodeError`."""
        ...

    def read_frames(
        self, path: str, info: VideoInfo, timestamps: np.ndarray, size: int, chunk_frames: int
    ) -> Iterator[np.ndarray]:
        """Yield uint8 RGB chunks ``[k, size, size, 3]``, ``k <= chunk_frames``, in timestamp order.

        ``timestamps`` ``[t]`` are non-decreasing seconds from the first frame; each maps to the
        native frame whose start time is nearest (ties go to the earlier frame), clipped to the
        last frame. Raises :class:`DecodeError`.
        """
        ...


def decode_video(
    path: str | Path,
    fps: float,
    max_frames: int | None,
    size: int,
    chunk_frames: int = 16,
    backend: str = "decord",
) -> tuple[VideoInfo, np.ndarray, Iterator[np.ndarray]]:
    """Probe ``path`` and return ``(info, timestamps [t], chunks)`` with chunks decoded lazily.

    ``chunks`` yields uint8 ``[k, size, size, 3]`` arrays whose lengths sum to ``t``. With
    ``backend="decord"``, a file decord cannot open or read is handed to PyAV (mid-stream failures
    resume with PyAV at the first frame not yet yielded). Every failure surfaces as
    :class:`DecodeError` with a short reason, from this call or from the iterator.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    bad = size.problems() if isinstance(size, FrameViews) else ([] if size >= 1 else [f"size must be >= 1, got {size}"])
    if bad or chunk_frames < 1:
        raise ValueError("; ".join(bad + ([] if chunk_frames >= 1 else [f"chunk_frames must be >= 1, got {chunk_frames}"])))
    path = str(path)
    _check_file(path)
    decoders: list[VideoDecoder] = [DecordDecoder(), PyAVDecoder()]
    if backend == "pyav":
        decoders = decoders[1:]

    info, reason = None, ""
    while decoders:
        decoder = decoders.pop(0)
        try:
            info = decoder.probe(path)
            break
        except DecodeError as exc:
            reason = str(exc)
    if info is None:
        raise DecodeError(reason)
    timestamps = sample_timestamps(info.duration_s, fps, max_frames)
    chunks = _read_with_fallback(decoder, decoders, path, info, timestamps, size, chunk_frames)
    return info, timestamps, chunks


def _read_with_fallback(
    decoder: VideoDecoder,
    fallbacks: list[VideoDecoder],
    path: str,
    info: VideoInfo,
    timestamps: np.ndarray,
    size: int,
    chunk_frames: int,
) -> Iterator[np.ndarray]:
    """Chunks from ``decoder``; on failure the next fallback decodes the frames not yet yielded."""
    done = 0
    try:
        for chunk in decoder.read_frames(path, info, timestamps, size, chunk_frames):
            done += len(chunk)
            yield chunk
        return
    except Exception as exc:  # noqa: BLE001 - every backend failure becomes a DecodeError
        error = exc if isinstance(exc, DecodeError) else DecodeError(_reason(exc))
        if not fallbacks:
            raise error from exc
    fallback = fallbacks[0]
    yield from _read_with_fallback(
        fallback, fallbacks[1:], path, fallback.probe(path), timestamps[done:], size, chunk_frames
    )


class DecordDecoder:
    """decord ``VideoReader`` on CPU with one thread; each chunk is a single ``get_batch`` call."""

    name = "decord"

    def probe(self, path: str) -> VideoInfo:
        vr = self._open(path)
        try:
            n, fps = len(vr), float(vr.get_avg_fps())
            times = self._frame_times(vr)  # [n, 2] or None
            first = vr[0].shape  # decord has no width/height getter; decode one frame
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(_reason(exc)) from exc
        if times is not None:
            duration = float(times[-1, 1] - times[0, 0])
        else:
            duration = n / fps if fps > 0 else 0.0
        declared = _declared_duration(path)
        if declared is not None and declared - duration > max(0.5, 2 / fps if fps > 0 else 0.5):
            # decord indexes the packets it can read: a file cut at a packet boundary looks like a shorter
            # video to it, with no error. The header still says how long the stream was.
            raise DecodeError(f"video data ends at {duration:.2f}s, before the {declared:.2f}s its header "
                              "declares (truncated file?)")
        return VideoInfo(duration, fps, n, int(first[1]), int(first[0]), self.name)

    def read_frames(
        self, path: str, info: VideoInfo, timestamps: np.ndarray, size: int, chunk_frames: int
    ) -> Iterator[np.ndarray]:
        vr = self._open(path)
        n = len(vr)
        try:
            times = self._frame_times(vr)
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(_reason(exc)) from exc
        if times is not None:
            starts = times[:, 0] - times[0, 0]
        else:  # no usable per-frame times: assume a constant frame rate
            starts = np.arange(n, dtype=np.float64) / (info.native_fps or 1.0)
        indices = nearest_frames(starts, timestamps)  # [t]
        for lo in range(0, len(indices), chunk_frames):
            wanted = indices[lo : lo + chunk_frames]  # [k]
            unique, inverse = np.unique(wanted, return_inverse=True)
            try:
                batch = vr.get_batch(unique.tolist()).asnumpy()  # [u, h, w, 3]
            except Exception as exc:  # noqa: BLE001
                raise DecodeError(_reason(exc)) from exc
            yield resize_stack((batch[j] for j in inverse), size)

    def _open(self, path: str):
        import decord

        try:
            return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(_reason(exc)) from exc

    @staticmethod
    def _frame_times(vr) -> np.ndarray | None:
        """``[n, 2]`` (start, end) seconds of every frame per decord; None if unusable."""
        times = np.asarray(vr.get_frame_timestamp(np.arange(len(vr))), dtype=np.float64)
        if times.shape != (len(vr), 2) or not np.all(np.isfinite(times)):
            return None
        if np.any(np.diff(times[:, 0]) < 0):
            return None
        return times


class PyAVDecoder:
    """PyAV (FFmpeg) decoder on one thread: decodes forward, seeking ahead over long gaps."""

    name = "pyav"
    seek_gap_s = 4.0  # seek instead of decoding through when the next sample is this far ahead

    def probe(self, path: str) -> VideoInfo:
        with self._open(path) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else 0.0
            n = stream.frames
            duration = _stream_duration(stream) or 0.0
            if n <= 0 or duration <= 0:
                # No per-stream metadata (e.g. Matroska). The container duration may cover a longer
                # audio track, so measure the video packets instead (demuxing only, no decoding).
                try:
                    n, duration = _scan_packets(container, stream)
                except Exception as exc:  # noqa: BLE001
                    raise DecodeError(_reason(exc)) from exc
            if fps <= 0 and duration > 0:
                fps = n / duration
            if duration <= 0 and fps > 0:
                duration = n / fps
            width, height = stream.codec_context.width, stream.codec_context.height
        return VideoInfo(duration, fps, int(n), int(width), int(height), self.name)

    def read_frames(
        self, path: str, info: VideoInfo, timestamps: np.ndarray, size: int, chunk_frames: int
    ) -> Iterator[np.ndarray]:
        with self._open(path) as container:
            try:
                picked = (f.to_ndarray(format="rgb24") for f in self._pick(container, timestamps))
                chunk: list[np.ndarray] = []
                for frame in picked:  # [h, w, 3]
                    chunk.append(frame)
                    if len(chunk) == chunk_frames:
                        yield resize_stack(chunk, size)
                        chunk = []
                if chunk:
                    yield resize_stack(chunk, size)
            except DecodeError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise DecodeError(_reason(exc)) from exc

    def _pick(self, container, timestamps: np.ndarray) -> Iterator:
        """Yield one ``av.VideoFrame`` per timestamp: the frame whose start time is nearest.

        Times are measured from the first decoded frame. ``prev`` and ``cur`` are
        ``(seconds, frame)`` pairs around the target: ``prev.seconds < target <= cur.seconds``.
        """
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one core per decode task, as with decord
        frames = self._timed_frames(container, stream)
        prev, cur = None, next(frames, None)
        if cur is None:
            raise DecodeError("no decodable video frames")
        origin, can_seek = cur[0], True
        rate = float(stream.average_rate or 0)
        slack = max(0.5, 2 / rate) if rate > 0 else 0.5  # overshoot of the last frame tolerated
        for target in timestamps + origin:
            if can_seek and cur is not None and target - cur[0] > self.seek_gap_s:
                sought = self._timed_frames(container, stream, seek_to=target)
                landed = next(sought, None)
                if landed is not None:
                    # Landed behind the current frame (sparse keyframes): stop seeking here.
                    can_seek = landed[0] > cur[0]
                    frames, prev, cur = sought, None, landed
            while cur is not None and cur[0] < target:
                prev, cur = cur, next(frames, None)
            if cur is None and target - prev[0] > slack:
                raise DecodeError(
                    f"video data ends at {prev[0] - origin:.2f}s, before the sample at "
                    f"{target - origin:.2f}s (truncated file?)"
                )
            if cur is None or (prev is not None and target - prev[0] <= cur[0] - target):
                yield prev[1]
            else:
                yield cur[1]

    @staticmethod
    def _timed_frames(container, stream, seek_to: float | None = None) -> Iterator:
        """``(seconds, frame)`` pairs in presentation order, from the keyframe before ``seek_to``.

        Seconds are the frame's own pts; frames without one continue at the nominal rate.
        Packets the codec rejects as invalid are skipped, as the ffmpeg command line does; frames
        missing at the end are reported by :meth:`_pick`.
        """
        import av

        if seek_to is not None:
            container.seek(int(seek_to / stream.time_base), stream=stream, backward=True)
        last, step = None, 1.0 / float(stream.average_rate or 25)
        for packet in container.demux(stream):  # ends with an empty packet that flushes
            try:
                decoded = stream.decode(packet)
            except av.error.InvalidDataError:
                continue
            for frame in decoded:
                time = frame.time
                if time is None:  # no pts: continue from the previous frame at the nominal rate
                    time = last + step if last is not None else 0.0
                last = time
                yield float(time), frame

    @staticmethod
    def _open(path: str):
        import av

        try:
            container = av.open(path)
        except Exception as exc:  # noqa: BLE001
            raise DecodeError(_reason(exc)) from exc
        if not container.streams.video:
            container.close()
            raise DecodeError("no video stream")
        return container


def _declared_duration(path: str) -> float | None:
    """The video stream's duration in seconds as its container header declares it (no decoding), or None when
    the header gives none (e.g. Matroska) or cannot be read."""
    import av

    try:
        with av.open(path) as container:
            return _stream_duration(container.streams.video[0])
    except Exception:  # noqa: BLE001 - no usable header: nothing to compare with
        return None


def _stream_duration(stream) -> float | None:
    """A PyAV stream's duration in seconds from its header, or None when it gives none."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def nearest_frames(frame_starts: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Index ``[t]`` of the frame whose start (``[n]``, sorted) is nearest; ties go earlier."""
    right = np.searchsorted(frame_starts, timestamps, side="left")
    right = np.clip(right, 0, len(frame_starts) - 1)
    left = np.clip(right - 1, 0, None)
    take_left = np.abs(timestamps - frame_starts[left]) <= np.abs(frame_starts[right] - timestamps)
    return np.where(take_left, left, right).astype(np.int64)


def _scan_packets(container, stream) -> tuple[int, float]:
    """Count the video packets and measure their time span, for files without stream metadata."""
    n, lo, hi = 0, math.inf, -math.inf
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue
        n += 1
        start = float(packet.pts * stream.time_base)
        lo = min(lo, start)
        hi = max(hi, start + float((packet.duration or 0) * stream.time_base))
    container.seek(0, stream=stream)
    return n, (hi - lo if n else 0.0)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DecodeError("file not found")
    if not os.path.isfile(path):
        raise DecodeError("not a regular file")
    if os.path.getsize(path) == 0:
        raise DecodeError("file is empty (0 bytes)")


def _reason(exc: BaseException) -> str:
    """A one-line reason from a backend exception, without paths or decord's source locations."""
    message = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    message = message.strip().splitlines()[-1] if message.strip() else type(exc).__name__
    if "cannot find video stream" in message:
        return "no video stream"
    return f"could not decode: {message[:200]}"
