"""Where a model runs and in which precision: the ``device`` and compute-dtype settings of every stage.

One rule everywhere: device ``"auto"`` is the first CUDA GPU when torch sees one, else the CPU; compute
dtype ``"auto"`` is bfloat16 on a GPU and float32 on the CPU. Extract, generate and ask resolve their
settings through these functions, so a CPU-only machine runs the very code a GPU machine runs.
"""

from __future__ import annotations

import re

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def device_problem(name: str) -> str | None:
    """Why ``name`` is not a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``), or None when it is."""
    if isinstance(name, str) and (name in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", name)):
        return None
    return f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}"


def resolve_device(name: str, key: str = "device"):
    """The ``torch.device`` for a device setting; a one-line ``UserError`` naming ``key`` when it cannot be had.

    ``cuda``/``cuda:N`` on a machine where torch sees no such GPU is refused, never silently run on the CPU.
    """
    import torch

    from dualfocus.pipeline.errors import UserError

    problem = device_problem(name)
    if problem:
        raise UserError(f"{key} {problem}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{key} is {name!r}, but torch {torch.__version__} sees no CUDA GPU here "
                        f"(use {key}=cpu or {key}=auto)")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise UserError(f"{key} is {name!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def resolve_compute_dtype(name: str, on_gpu: bool) -> str:
    """A compute-dtype setting with ``auto`` replaced: bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return "bfloat16" if on_gpu else "float32"
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be 'auto' or one of {COMPUTE_DTYPES}, got {name!r}")
    return name
