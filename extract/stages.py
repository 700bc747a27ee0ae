"""The per-item work of ``dualfocus extract``, as plain functions plus the two Ray Data stage classes.

Rows travelling through the pipeline are *chunks*: a video yields one row per ``chunk_frames`` sampled
frames (memory per video in flight is bounded by a chunk, not by the video's length), and a video that
fails yields a single row whose ``error`` is set. Keys of a chunk row:

    video_id str, path str, chunk int, last bool, error str ("" when fine),
    n_frames int, duration_s float, native_fps float,
    need str (groups that still lack the video, comma-separated; "" = all)
    timestamps float32 [k], frames uint8 [k, S, S, 3]            (after decoding)
    pixels uint8 [k, L, L, 3], box int32 [k, 2]                   (when the pixels group is written)
    <group>/<tap> [k, ...], <group>/error str                     (after encoding; frames dropped)

``encode_video`` runs one video through the same two stages in-process, for ``dualfocus ask``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np


def _row(base: dict, **extra) -> dict:
    row = {"video_id": base["video_id"], "path": base["path"], "need": base.get("need", ""), "chunk": 0,
           "last": True, "error": "", "n_frames": 0, "duration_s": 0.0, "native_fps": 0.0}
    row.update(extra)
    return row


def decode_chunks(item: dict, decode_fn, *, fps: float, max_frames: int | None, size,
                  chunk_frames: int) -> Iterator[dict]:
    """Yield the chunk rows of one corpus row ``{video_id, path}``; never raises for a bad video.

    ``decode_fn(path, fps, max_frames, size, chunk_frames) -> (info, timestamps, chunk iterator)`` is
    the decoder (a DecodeWorker's ``decode`` in the pipeline, ``decode_video`` in tests); ``size`` is the square
    frame size, or a ``resize.FrameViews`` when the pixels group is written too.
    """
    from dualfocus.extract.resize import FrameViews

    if isinstance(size, FrameViews):  # chunks are dicts: square frames for the encoders, pixels and boxes
        square, long = size.square or 0, size.long_side
        empty = dict(frames=np.zeros((0, square, square, 3), np.uint8), pixels=np.zeros((0, long, long, 3), np.uint8),
                     box=np.zeros((0, 2), np.int32))
    else:
        empty = dict(frames=np.zeros((0, size, size, 3), np.uint8))
    empty["timestamps"] = np.zeros((0,), np.float32)
    try:
        info, timestamps, chunks = decode_fn(item["path"], fps, max_frames, size, chunk_frames)
        meta = dict(n_frames=len(timestamps), duration_s=float(info.duration_s), native_fps=float(info.native_fps))
        start = 0
        pending = None  # hold one chunk back so the last one can be flagged
        for i, chunk in enumerate(chunks):
            if pending is not None:
                yield pending
            views = chunk if isinstance(chunk, dict) else {"frames": chunk}
            k = len(views["frames"])
            pending = _row(item, chunk=i, last=False, **{name: np.asarray(a) for name, a in views.items()},
                           timestamps=np.asarray(timestamps[start:start + k], np.float32), **meta)
            start += k
        if pending is None or start != len(timestamps):
            raise RuntimeError(f"decoder returned {start} of {len(timestamps)} sampled frames")
        pending["last"] = True
        yield pending
    except Exception as e:  # a bad video is a recorded failure, never a stopped job
        yield _row(item, chunk=-1, error=one_line_reason(e), **empty)


def one_line_reason(e: BaseException) -> str:
    """``Type: first line`` of an exception (a DecodeError's own text alone)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    name = type(e).__name__
    return text if name == "DecodeError" and text else f"{name}: {text}" if text else name


@dataclass(frozen=True)
class EncoderGroup:
    """One group's encoder as ``encode_chunks`` sees it: ``encode(frames uint8 [n, S, S, 3]) -> {tap: [n, ...]}``,
    the per-frame shape of each tap, and the dtype the arrays travel in (``store.dtypes.transfer_dtype``)."""

    name: str
    encode: Callable[[np.ndarray], dict[str, np.ndarray]]
    shapes: dict[str, tuple[int, ...]]
    transfer: np.dtype


def encode_chunks(batch: dict[str, Any], groups: Sequence[EncoderGroup], batch_frames: int) -> dict[str, Any]:
    """Encode the frames of a batch of chunk rows with every group's encoder, ``batch_frames`` frames per forward.

    A row's ``need`` (comma-separated group names; absent or "" = every group) says which groups encode it.
    Returns the batch with ``frames`` replaced by one ``<group>/<tap>`` array per row (``[k, ...]``, empty where
    the group does not encode the row) and ``<group>/error``: an encoder that fails (e.g. out of memory) fails
    the batch's videos in its own group only, and the job goes on.
    """
    frames = list(batch["frames"])
    n = len(frames)
    out = {k: v for k, v in batch.items() if k != "frames"}
    needs = [set(s.split(",")) if s else None for s in batch.get("need", [""] * n)]
    for group in groups:
        rows = [i for i in range(n) if (needs[i] is None or group.name in needs[i]) and not out["error"][i]]
        per_row: dict[int, dict[str, np.ndarray]] = {}
        error = ""
        try:
            with_frames = [i for i in rows if len(frames[i])]
            if with_frames:
                allf = np.concatenate([frames[i] for i in with_frames])
                parts = [group.encode(allf[s:s + batch_frames]) for s in range(0, len(allf), batch_frames)]
                taps = {tap: np.concatenate([p[tap] for p in parts]).astype(group.transfer, copy=False)
                        for tap in group.shapes}
                offset = 0
                for i in with_frames:
                    k = len(frames[i])
                    per_row[i] = {tap: arr[offset:offset + k] for tap, arr in taps.items()}
                    offset += k
        except Exception as e:  # noqa: BLE001 - recorded per video, never a stopped job
            error, per_row = f"encoder failed: {one_line_reason(e)}", {}
        for tap, shape in group.shapes.items():
            empty = np.zeros((0, *shape), group.transfer)
            out[f"{group.name}/{tap}"] = _ragged([per_row[i][tap] if i in per_row else empty for i in range(n)])
        out[f"{group.name}/error"] = np.array([error if i in rows else "" for i in range(n)], dtype=object)
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
    """Ray Data ``map_batches`` stage: chunk rows -> chunk rows with every group's taps.

    ``groups``: one plain dict per group, ``{"name", "model", "taps": {name: tap}, "image_size", "dtype"}``
    (``extract.groups.GroupPlan.stage_spec``); each group's frozen encoder is loaded once per actor. With
    ``writers`` (``WriterActor`` handles) the encoded rows go straight to them and the stage returns only
    progress rows (``writer_actor.progress_rows``).
    """

    def __init__(self, groups: list[dict], device: str, compute_dtype: str, batch_frames: int,
                 threads: int | None, writers: list | None = None):
        import torch

        from dualfocus.encoders import load_encoder
        from dualfocus.store.dtypes import transfer_dtype

        if threads:
            torch.set_num_threads(threads)
        self.groups = []
        for spec in groups:
            encoder = load_encoder(spec["model"], device=device, compute_dtype=compute_dtype,
                                   image_size=spec.get("image_size"))
            taps = dict(spec["taps"])
            self.groups.append(EncoderGroup(spec["name"], lambda frames, e=encoder, t=taps: e(frames, t),
                                            encoder.tap_shapes(taps), transfer_dtype(spec["dtype"])))
        self.batch_frames = batch_frames
        self.router = router_for(writers)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = encode_chunks(batch, self.groups, self.batch_frames)
        return self.router.push(out) if self.router else out


def router_for(writers: list | None):
    """A ``writer_actor.Router`` over ``writers``, or None (rows are returned, not pushed)."""
    if not writers:
        return None
    from dualfocus.extract.writer_actor import Router

    return Router(writers)


def encode_video(item: dict, decode: DecodeStage, encode: EncodeStage) -> dict[str, Any]:
    """One corpus row through extract's two stages in this process, its chunks joined (what ``ask`` runs).

    Returns ``{"error", "timestamps" [t], "<group>/<tap>" [t, ...] for every group}`` in the transfer dtypes,
    before the store's rounding; ``error`` is "" when fine (the first error otherwise, arrays absent).
    """
    columns = ["timestamps"] + [f"{g.name}/{tap}" for g in encode.groups for tap in g.shapes]
    parts: dict[str, list[np.ndarray]] = {key: [] for key in columns}
    for row in decode(item):
        if not row["error"]:
            row = {k: v[0] for k, v in encode({k: [v] for k, v in row.items()}).items()}  # a batch of one row
        error = row["error"] or next((row[f"{g.name}/error"] for g in encode.groups if row[f"{g.name}/error"]), "")
        if error:
            return {"error": error}
        for key, chunks in parts.items():
            chunks.append(row[key])
    return {"error": "", **{key: np.concatenate(chunks) for key, chunks in parts.items()}}
