"""Configuration of ``dualfocus train``: model, data and optimiser dataclasses composed in ``TrainConfig``.

The optimiser recipe lives here and only here; the DeepSpeed JSON (``deepspeed``) holds the ZeRO stage and
precision, and ``train/loop.py`` fills batch size, accumulation and clipping into it from this config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dualfocus.connectors.dualfocus import DualFocusConfig
from dualfocus.connectors.registry import ConnectorConfig


@dataclass
class DataConfig:
    """How samples are read from the feature store and batched."""

    max_frames: int | None = 32
    """Frames per video at train time (uniform subsampling); caps the 32 tokens/s growth."""
    batch_size: int = 4
    """Samples per micro-batch per process."""
    num_workers: int = 1
    """DataLoader worker processes reading the store while the model computes."""
    cache_mb: int = 0
    """Keep up to this many MiB of features read in RAM, per reading process (each DataLoader worker, or the
    training process with ``num_workers: 0``), so later epochs skip the store for them (data/read_cache.py).
    Worth it when the training set fits: Zarr reads cost ~1 ms of CPU per frame and stream. Not used when
    streaming."""
    max_answer_tokens: int = 256
    """Longer answers are cut, and a cut answer gets no EOS label (it must not teach stopping mid-answer)."""
    max_question_tokens: int = 64
    """Question tokens the Q-Former reads (its own tokenizer, CLS/SEP included), and the most question tokens
    a connector embedding the question with the LLM reads; longer questions are cut. Recorded in the export so
    inference cuts the same way."""
    shuffle: bool = True
    """Shuffle with a seeded permutation per epoch (reproducible, resumable); streaming, a seeded shard order and
    an in-shard buffer."""
    streaming: bool | Literal["auto"] = "auto"
    """Read WebDataset shards as streams: shards in a seeded order per epoch, each read front to back, samples
    mixed by a small buffer within a shard (train/streaming.py). auto = stream when every group read is
    WebDataset; false = random access by sample (any store); true on a Zarr store is an error."""

    def check(self) -> list[str]:
        problems = []
        if self.max_frames is not None and self.max_frames < 1:
            problems.append(f"max_frames must be >= 1 or null, got {self.max_frames}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be >= 0, got {self.num_workers}")
        if self.cache_mb < 0:
            problems.append(f"cache_mb must be >= 0, got {self.cache_mb}")
        if self.max_answer_tokens < 1:
            problems.append(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if self.max_question_tokens < 3:
            problems.append(f"max_question_tokens must be >= 3 (CLS, a token, SEP), got {self.max_question_tokens}")
        return problems


@dataclass
class OptimConfig:
    """AdamW with linear warmup then a constant rate (the paper's recipe by default)."""

    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    betas: list[float] = field(default_factory=lambda: [0.95, 0.999])
    """AdamW betas (paper: 0.95, 0.999)."""
    weight_decay: float = 0.005
    """AdamW weight decay (paper: 0.005)."""
    warmup_steps: int = 1000
    """Linear warmup steps, then constant (paper: 1000)."""
    grad_clip: float = 1.0
    """Gradient norm clip (paper: 1.0); 0 disables."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    gate_lr_scale: float = 1.0
    """Learning rate of the FFP fusion gates as a multiple of lr (paper: 1). Lets zero-init gates open
    within a short budget while every other parameter keeps the base rate."""

    def check(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0, got {self.grad_clip}")
        if self.grad_accum < 1:
            problems.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.gate_lr_scale <= 0:
            problems.append(f"gate_lr_scale must be > 0, got {self.gate_lr_scale}")
        return problems


@dataclass
class TrainConfig:
    """Everything ``dualfocus train`` needs; saved as RUN_DIR/train_config.yaml."""

    store: str = ""
    """Feature store written by `dualfocus extract`."""
    annotations: str = ""
    """Training QA: VideoInstruct JSON list or JSONL."""
    model: str = ""
    """Local InstructBLIP-layout model directory (Q-Former init, frozen LLM, tokenizers)."""
    out: str = ""
    """Run directory: checkpoints, metrics.jsonl, loss curve, final/ export."""
    max_steps: int | None = None
    """Optimiser steps to run; null = `epochs` full passes."""
    epochs: float = 3.0
    """Passes over the data when max_steps is null (paper: 3)."""
    save_every: int = 500
    """Checkpoint every N optimiser steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Step checkpoints kept on disk (oldest removed first)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    seed: int = 0
    """Seed for data order, dropout and initialisation of new modules."""
    llm_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Dtype of the frozen LLM's weights, and the precision DeepSpeed trains the connector in: the DeepSpeed
    JSON's bf16/fp16 sections are filled from it (bfloat16 -> bf16, float16 -> fp16, float32 -> neither);
    a JSON that enables another precision is refused."""
    deepspeed: str = "configs/ds_zero2_bf16.json"
    """DeepSpeed JSON (ZeRO stage, precision); a path, or a name under the package's configs/."""
    connector: ConnectorConfig = field(default_factory=DualFocusConfig)
    """The connector: ``connector.name`` picks the system (``dualfocus``, ``dualfocus-qavit``; ``--connector``)
    and the rest of the section is that system's config."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def check(self) -> list[str]:
        problems = []
        for name in ("store", "annotations", "model", "out"):
            if not getattr(self, name):
                problems.append(f"{name} is required")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        for name in ("save_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        return problems


# Keys that may differ between a run and its --resume without changing what is being trained.
RESUME_FREE_KEYS = {"max_steps", "epochs", "save_every", "keep_checkpoints", "log_every", "data.num_workers", "data.cache_mb", "out"}
