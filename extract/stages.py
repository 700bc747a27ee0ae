"""The per-item work of ``dualfocus extract``, as plain functions plus the two Ray Data stage classes.

Rows travelling through the pipeline are *chunks*: a video yields one row per ``chunk_frames`` sampled
frames (memory per video in flight is bounded by a chunk, not by the video's length), and a video that
fails yields a single row whose ``error`` is set. Keys of a chunk row:

    video_id str, path str, chunk int, last bool, error str ("" when fine),
    n_frames int, duration_s float, native_fps float,
    timestamps float32 [k], frames uint8 [k, S, S, 3]            (after decoding)
    semantic [k, p+1, d], spatiotemporal [k, p/4, d]              (after encoding; frames dropped)

``encode_video`` runs one video through the same two stages in-process, for ``dualfocus ask``.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def _row(base: dict, **extra) -> dict:
    row = {"video_id": base["video_id"], "path": base["path"], "chunk": 0, "last": True, "error": "",
           "n_frames": 0, "duration_s": 0.0, "native_fps": 0.0}
    row.update(extra)
    return row


def decode_chunks(item: dict, decode_fn, *, fps: float, max_frames: int | None, size: int,
                  chunk_frames: int) -> Iterator[dict]:
    """Yield the chunk rows of one corpus row ``{video_id, path}``; never raises for a bad video.

    ``decode_fn(path, fps, max_frames, size, chunk_frames) -> (info, timestamps, chunk iterator)`` is
    the decoder (a DecodeWorker's ``decode`` in the pipeline, ``decode_video`` in tests).
    """
    empty = dict(frames=np.zeros((0, size, size, 3), np.uint8), timestamps=np.zeros((0,), np.float32))
    try:
        info, timestamps, chunks = decode_fn(item["path"], fps, max_frames, size, chunk_frames)
        meta = dict(n_frames=len(timestamps), duration_s=float(info.duration_s), native_fps=float(info.native_fps))
        start = 0
        pending = None  # hold one chunk back so the last one can be flagged
        for i, frames in enumerate(chunks):
            if pending is not None:
                yield pending
            k = len(frames)
            pending = _row(item, chunk=i, last=False, frames=np.asarray(frames, np.uint8),
                           timestamps=np.asarray(timestamps[start:start + k], np.float32), **meta)
            start += k
        if pending is None or start != len(timestamps):
            raise RuntimeError(f"decoder returned {start} of {len(timestamps)} sampled frames")
        pending["last"] = True
        yield pending
    except Exception as e:  # a bad video is a recorded failure, never a stopped job
        yield _row(item, chunk=-1, error=_reason(e), **empty)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    name = type(e).__name__
    return text if name == "DecodeError" and text else f"{name}: {text}" if text else name


def encode_chunks(batch: dict[str, Any], encoder, batch_frames: int, storage_dtype: str = "float16") -> dict[str, Any]:
    """Encode every frame of a batch of chunk rows, ``batch_frames`` frames per forward.

    ``encoder(frames uint8 [n, S, S, 3]) -> (semantic [n, p+1, d], spatiotemporal [n, p/4, d])``.
    Returns the batch with ``frames`` replaced by ``semantic`` and ``spatiotemporal`` (per row), in the
    dtype they travel to a ``storage_dtype`` store in (``store.dtypes.transfer_dtype``).
    """
    from dualfocus.store.dtypes import transfer_dtype

    out_dtype = transfer_dtype(storage_dtype)
    frames = list(batch["frames"])
    counts = [len(f) for f in frames]
    out = {k: v for k, v in batch.items() if k != "frames"}
    semantic_rows: list[np.ndarray] = []
    motion_rows: list[np.ndarray] = []
    errors = list(out["error"])
    try:
        allf = np.concatenate([f for f in frames if len(f)]) if sum(counts) else None
        sem_parts, mot_parts = [], []
        if allf is not None:
            for s in range(0, len(allf), batch_frames):
                sem, mot = encoder(allf[s:s + batch_frames])
                sem_parts.append(sem.astype(out_dtype, copy=False))
                mot_parts.append(mot.astype(out_dtype, copy=False))
            sem_all, mot_all = np.concatenate(sem_parts), np.concatenate(mot_parts)
        offset = 0
        for c in counts:
            if c:
                semantic_rows.append(sem_all[offset:offset + c])
                motion_rows.append(mot_all[offset:offset + c])
            offset += c
        shape_s, shape_m = (semantic_rows[0].shape[1:], motion_rows[0].shape[1:]) if semantic_rows else ((0, 0), (0, 0))
    except Exception as e:  # e.g. out of memory: every video in the batch fails, the job goes on
        reason = _reason(e)
        errors = [err or f"encoder failed: {reason}" for err in errors]
        semantic_rows, motion_rows, counts = [], [], [0] * len(counts)
        shape_s = shape_m = (0, 0)
    it_s, it_m = iter(semantic_rows), iter(motion_rows)
    out["semantic"] = _ragged([next(it_s) if c else np.zeros((0, *shape_s), out_dtype) for c in counts])
    out["spatiotemporal"] = _ragged([next(it_m) if c else np.zeros((0, *shape_m), out_dtype) for c in counts])
    out["error"] = np.array(errors, dtype=object)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array holding one ndarray per row (Ray stores it as a variable-shaped tensor column)."""
    holder = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        holder[i] = a
    return holder


class DecodeStage:
    """Ray Data ``flat_map`` stage: corpus row -> chunk rows, decoding in a child process with a time limit."""

    def __init__(self, fps: float, max_frames: int | None, size: int, chunk_frames: int, backend: str,
                 timeout_s: float):
        from dualfocus.extract.decode_worker import DecodeWorker

        self.worker = DecodeWorker(stall_timeout_s=timeout_s)
        self.kw = dict(fps=fps, max_frames=max_frames, size=size, chunk_frames=chunk_frames)
        self.backend = backend

    def _decode(self, path, fps, max_frames, size, chunk_frames):
        return self.worker.decode(path, fps, max_frames, size, chunk_frames, self.backend)

    def __call__(self, item: dict) -> Iterator[dict]:
        yield from decode_chunks(item, self._decode, **self.kw)

    def close(self) -> None:
        """Stop the decoder child process (a Ray actor's ends with the actor)."""
        self.worker.close()


class EncodeStage:
    """Ray Data ``map_batches`` stage: chunk rows -> chunk rows with both feature streams."""

    def __init__(self, model_dir: str, device: str, compute_dtype: str, batch_frames: int, storage_dtype: str,
                 threads: int | None):
        import torch

        from dualfocus.extract.encoder import FrameEncoder

        if threads:
            torch.set_num_threads(threads)
        self.encoder = FrameEncoder(model_dir, device=device, compute_dtype=compute_dtype)
        self.batch_frames = batch_frames
        self.storage_dtype = storage_dtype

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return encode_chunks(batch, self.encoder, self.batch_frames, self.storage_dtype)


def encode_video(item: dict, decode: DecodeStage, encode: EncodeStage) -> dict[str, Any]:
    """One corpus row through extract's two stages in this process, its chunks joined (what ``ask`` runs).

    Returns ``{"error", "semantic" [t, p+1, d], "spatiotemporal" [t, p/4, d], "timestamps" [t]}`` in the
    transfer dtype, before the store's rounding; ``error`` is "" when fine, the arrays are absent otherwise.
    """
    parts: dict[str, list[np.ndarray]] = {"semantic": [], "spatiotemporal": [], "timestamps": []}
    for row in decode(item):
        if not row["error"]:
            row = {k: v[0] for k, v in encode({k: [v] for k, v in row.items()}).items()}  # a batch of one row
        if row["error"]:
            return {"error": row["error"]}
        for key, chunks in parts.items():
            chunks.append(row[key])
    return {"error": "", **{key: np.concatenate(chunks) for key, chunks in parts.items()}}
