"""Small media files for the decoding tests, written on demand (plain helpers, not fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualfocus.pipeline.toy import write_mp4

N_BITS = 10  # index code: 8 vertical stripes, most significant bit on the left


def index_coded_frames(n_frames: int, width: int = 80, height: int = 32) -> list[np.ndarray]:
    """Frames ``[height, width, 3]`` whose stripes spell the frame index in binary (white = 1)."""
    stripe = width // N_BITS
    frames = []
    for i in range(n_frames):
        frame = np.zeros((height, width, 3), dtype=np.uint8)
        for bit in range(N_BITS):
            if (i >> (N_BITS - 1 - bit)) & 1:
                frame[:, bit * stripe : (bit + 1) * stripe] = 255
        frames.append(frame)
    return frames


def read_index_code(frame: np.ndarray) -> int:
    """Inverse of :func:`index_coded_frames` for a frame ``[h, w, 3]`` of any size."""
    h, w = frame.shape[:2]
    stripe = w / N_BITS
    value = 0
    for bit in range(N_BITS):
        centre = frame[h // 4 : 3 * h // 4, int((bit + 0.3) * stripe) : int((bit + 0.7) * stripe)]
        value = (value << 1) | int(centre.mean() > 127)
    return value


def write_index_video(
    path: Path, n_frames: int, fps: int, keyframe_interval: int | None = None
) -> Path:
    """An MP4 of ``n_frames`` (< 1024) index-coded frames at ``fps``."""
    write_mp4(path, index_coded_frames(n_frames), fps, keyframe_interval)
    return path


def write_flat_video(path: Path, seconds: float, fps: int, size: int = 32) -> Path:
    """A low-resolution MP4 of ``seconds * fps`` frames whose grey level ramps with time."""
    n = max(1, round(seconds * fps))
    frames = (np.full((size, size, 3), (i * 7) % 256, dtype=np.uint8) for i in range(n))
    write_mp4(path, frames, fps)
    return path


def write_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """An AAC-in-MP4 file with no video stream."""
    import av

    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [channels=1, s]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``src``'s bytes."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def write_cut_at(src: Path, dst: Path, seconds: float, boundary: bool = False) -> Path:
    """``src`` cut half-way into its first packet (in file order) shown at or after ``seconds``, as a broken download
    ends: with the index at the front (faststart) the file still opens, and the data runs out at about ``seconds``.
    A byte position, not a share of the file, so the cut stays put in time wherever the encoder spends its bits.
    ``boundary``: cut exactly where that packet starts instead (decord then sees a whole, shorter video)."""
    import av

    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        pos, size = min((packet.pos, packet.size) for packet in container.demux(stream)
                        if packet.pts is not None and packet.pos is not None and packet.pts * stream.time_base >= seconds)
    dst.write_bytes(src.read_bytes()[: pos + (0 if boundary else size // 2)])
    return dst


def write_mkv(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    """A Matroska file: no per-stream frame count or duration, so readers must measure them."""
    import av

    with av.open(str(path), mode="w", format="matroska") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
