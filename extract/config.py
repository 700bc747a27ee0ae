"""Configuration of ``dualfocus extract``: one dataclass per component, composed in ``ExtractConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


def _group_name_problems(name: str) -> list[str]:
    """The store's rule for group names (``store.info.check_name``), as config problems."""
    from dualfocus.store.info import check_name

    try:
        check_name(name, "group")
    except ValueError as e:
        return [str(e)]
    return []


@dataclass
class DecodeConfig:
    """How frames are sampled and decoded."""

    fps: float = 1.0
    """Frames sampled per second of video (DualFocus: 1)."""
    max_frames: int | None = None
    """Cap on frames per video, reached by uniform subsampling; null = no cap."""
    backend: Literal["decord", "pyav"] = "decord"
    """Decoder tried first; PyAV is the fallback when decord fails on a file."""
    chunk_frames: int = 32
    """Frames decoded and shipped together; bounds memory per video in flight. Each chunk is one encoder call (run
    in forwards of at most encoder.batch_frames), so keep it at least encoder.batch_frames for full batches."""
    timeout_s: float = 60.0
    """Wall-clock limit without progress while decoding one video; past it the video fails."""

    def check(self) -> list[str]:
        problems = []
        if self.fps <= 0:
            problems.append(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            problems.append(f"max_frames must be >= 1 or null, got {self.max_frames}")
        if self.chunk_frames < 1:
            problems.append(f"chunk_frames must be >= 1, got {self.chunk_frames}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        return problems


@dataclass
class EncoderConfig:
    """The frozen vision tower."""

    device: str = "auto"
    """"auto" (cuda when available), "cuda", "cuda:1" or "cpu"."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the tower runs in; auto = bfloat16 on GPU, float32 on CPU. Resolved once and recorded in the
    store's fingerprint (compute_dtype), so a store is never continued in another precision."""
    batch_frames: int = 32
    """Frames per encoder forward."""
    threads: int | None = None
    """torch intra-op threads in each encoder actor; null = torch's default."""

    def check(self) -> list[str]:
        from dualfocus.pipeline.devices import device_problem

        problem = device_problem(self.device)
        problems = [f"device {problem}"] if problem else []
        if self.batch_frames < 1:
            problems.append(f"batch_frames must be >= 1, got {self.batch_frames}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 or null, got {self.threads}")
        return problems


@dataclass
class StoreConfig:
    """The feature store written."""

    format: Literal["zarr", "webdataset"] = "zarr"
    """Shard format: Zarr v3 (random access) or WebDataset tar (streaming)."""
    dtype: Literal["float16", "bfloat16", "float32", "int8"] = "float16"
    """Storage dtype of the feature arrays (int8: symmetric, one float16 scale per token, about half of float16's
    bytes; readers return floats)."""
    group: str = "eva"
    """Name of the stream group written (one per encoder; a store may hold several, see `dualfocus inspect`)."""
    videos_per_shard: int = 256
    """A shard is closed after this many videos (a video never spans shards)."""
    max_shard_mb: int = 2048
    """...or once it holds this many MiB, whichever comes first."""

    def check(self) -> list[str]:
        problems = []
        problems += _group_name_problems(self.group)
        if self.videos_per_shard < 1:
            problems.append(f"videos_per_shard must be >= 1, got {self.videos_per_shard}")
        if self.max_shard_mb < 1:
            problems.append(f"max_shard_mb must be >= 1, got {self.max_shard_mb}")
        return problems


@dataclass
class PixelsConfig:
    """The pixels group (Video-Panda trains its whole tower, so it reads frames, not features)."""

    long_side: int | None = None
    """Write the decoded frames as a group: aspect kept, long side resized to this (Video-Panda: 448; a smaller
    frame is kept, not upscaled), zero-padded to long_side x long_side with each frame's valid box; uint8, not
    normalised. null = no pixels group."""
    group: str = "pixels"
    """Name of the pixels group."""

    def check(self) -> list[str]:
        problems = []
        if self.long_side is not None and self.long_side < 1:
            problems.append(f"long_side must be >= 1 or null, got {self.long_side}")
        problems += _group_name_problems(self.group)
        return problems


@dataclass
class RayConfig:
    """Where and how wide the Ray Data pipeline runs."""

    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); null starts Ray locally."""
    decode_workers: int = 2
    """Most decoding actors (each owns one decoder child process and decodes one video at a time); the pool grows
    from decode_min_workers to this while encoders wait for frames."""
    decode_min_workers: int = 1
    """Fewest decoding actors."""
    decode_cpus: float = 1.0
    """CPUs reserved per decoding actor."""
    encoder_actors: int = 1
    """Encoder actors (one vision tower each)."""
    encoder_cpus: float = 1.0
    """CPUs reserved per encoder actor."""
    gpus_per_actor: float = 0.0
    """GPUs per encoder actor (0 on a CPU machine, 1 on a GPU node)."""
    writers: int | None = None
    """Shard writer actors, spread over the nodes, each owning its own shards; null = one per encoder actor."""
    writer_cpus: float = 1.0
    """CPUs reserved per writer actor (it compresses and writes)."""

    def check(self) -> list[str]:
        problems = []
        for name in ("decode_workers", "decode_min_workers", "encoder_actors"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decode_min_workers > self.decode_workers:
            problems.append(f"decode_min_workers ({self.decode_min_workers}) must be <= decode_workers "
                            f"({self.decode_workers})")
        if self.writers is not None and self.writers < 1:
            problems.append(f"writers must be >= 1 or null, got {self.writers}")
        for name in ("decode_cpus", "encoder_cpus", "gpus_per_actor", "writer_cpus"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        return problems

    def n_writers(self) -> int:
        return self.writers or self.encoder_actors


@dataclass
class ExtractConfig:
    """Everything ``dualfocus extract`` needs; the resolved copy is saved as STORE/extract_config.yaml."""

    corpus: str = ""
    """Directory of videos, or a CSV/JSON/JSONL/Parquet table with video_id, path."""
    model: str = ""
    """Local InstructBLIP-layout model directory (or one written by `dualfocus init-tiny`): the DualFocus group
    (`store.group`, taps semantic and spatiotemporal). May be empty when `encoders` names the groups."""
    encoders: dict = field(default_factory=dict)
    """More stream groups from the same decode: {name: {model: DIR, taps: {name: tap}, image_size: null,
    dtype: null}}. Families: eva (InstructBLIP/BLIP-2), siglip, dinov2, clip, convnext; taps: post_ln,
    hidden[k], patches[k], pool4[k], grid, grid@HxW (default: the DualFocus pair for eva, grid otherwise)."""
    out: str = ""
    """Feature store directory to create or resume."""
    overwrite: bool = False
    """Replace the stream groups this run writes (needed when a group's encoder fingerprint differs); the store's
    other groups stay."""
    limit: int | None = None
    """Process at most this many not-yet-extracted videos (a quick trial run)."""
    max_failures: int | float | None = 0.05
    """Failed videos tolerated: a count (int) or a fraction of the videos attempted (0..1); null = any.
    Exceeded => exit status 1 (the store still holds every good video)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    pixels: PixelsConfig = field(default_factory=PixelsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> list[str]:
        problems = []
        for name in ("corpus", "out"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        if not self.model and not self.encoders and self.pixels.long_side is None:
            problems.append("model is required (or encoders or pixels.long_side, naming the groups to write)")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1 or null, got {self.limit}")
        mf = self.max_failures
        if isinstance(mf, float) and not 0 <= mf <= 1:
            problems.append(f"max_failures as a fraction must be within 0..1, got {mf}")
        if isinstance(mf, int) and mf < 0:
            problems.append(f"max_failures as a count must be >= 0, got {mf}")
        return problems

    def failures_exceeded(self, failed: int, attempted: int) -> bool:
        """True when ``failed`` out of ``attempted`` videos goes past ``max_failures``."""
        if self.max_failures is None or failed == 0:
            return False
        if isinstance(self.max_failures, float):
            return failed > self.max_failures * attempted
        return failed > self.max_failures
