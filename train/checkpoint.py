"""Run-directory bookkeeping: resumable DeepSpeed checkpoints, RNG state, and the final export.

RUN_DIR/
    train_config.yaml        resolved config of the run (compared on --resume)
    checkpoints/stepNNNNNNN/ DeepSpeed checkpoint of the trainable weights + optimiser + scheduler
                             (frozen LLM excluded), each rank's RNG (rng_rankN.pt) and our client
                             state (client_state.pt: step, data position, streamed or not, world
                             size; written last)
    metrics.jsonl            one line per logged step
    loss.png                 loss curve, written at the end
    final/connector.safetensors + final/dualfocus.json   the export that generate/ask load
                             (written by ``connectors/export.py``)
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_LAYOUT = "video_llm"
"""Recorded in each checkpoint's client state: weights named ``connector.*`` inside ``VideoLLM``. Checkpoints
without it predate the connector library (weights named ``semantic.*``, ``ffp.*``) and are refused on resume
rather than loaded partially."""


def rng_state() -> dict:
    """Every RNG a training step touches (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_tags(run_dir: Path) -> list[str]:
    """Step checkpoint tags in step order."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step\d+", p.name)]
    return sorted(tags, key=lambda t: int(t[4:]))


def latest_complete_tag(run_dir: Path) -> str | None:
    """Newest checkpoint whose ``client_state.pt`` was written (written last, so it marks completeness)."""
    for tag in reversed(checkpoint_tags(run_dir)):
        if (Path(run_dir) / "checkpoints" / tag / "client_state.pt").is_file():
            return tag
    return None


def save_checkpoint(engine, run_dir: Path, step: int, client: dict, keep: int) -> str:
    """DeepSpeed checkpoint of the trainable state and every rank's RNG, then (rank 0, once all ranks are
    done) our client state, which marks the checkpoint complete; then prune old ones. Every rank calls it."""
    import torch.distributed as dist

    tag = f"step{step:07d}"
    root = Path(run_dir) / "checkpoints"
    engine.save_checkpoint(str(root), tag=tag, client_state={}, exclude_frozen_parameters=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    _save_atomically(rng_state(), root / tag / f"rng_rank{rank}.pt")  # ranks draw different dropout masks
    dist.barrier()
    if rank == 0:
        _save_atomically({**client, "world": world}, root / tag / "client_state.pt")
        for old in checkpoint_tags(run_dir)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    return tag


def _save_atomically(obj, path: Path) -> None:
    torch.save(obj, path.with_name(path.name + ".tmp"))
    path.with_name(path.name + ".tmp").rename(path)


def read_client_state(run_dir: Path, tag: str) -> dict:
    """Step, data position (``micro_batches``) and world size of a complete checkpoint."""
    client = torch.load(Path(run_dir) / "checkpoints" / tag / "client_state.pt", weights_only=False)
    client.setdefault("world", 1)  # written before multi-rank runs recorded it: one process
    return client


def load_checkpoint(engine, run_dir: Path, tag: str) -> dict:
    """Restore weights, optimiser, scheduler and this rank's RNG; returns the client state."""
    import torch.distributed as dist

    root = Path(run_dir) / "checkpoints"
    engine.load_checkpoint(str(root), tag=tag, load_module_strict=False)
    client = read_client_state(run_dir, tag)
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    set_rng_state(client.pop("rng") if "rng" in client else torch.load(rng_file, weights_only=False))
    return client
