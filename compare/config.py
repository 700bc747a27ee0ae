"""Configuration of ``dualfocus compare``: which connectors, with which recipes, under which shared settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from dualfocus.evaluate.judge import JudgeConfig

TINY_RECIPES = {
    "dualfocus": "configs/train_tiny.yaml",
    "dualfocus-qavit": "configs/train_qavit_tiny.yaml",
    "slowfast": "configs/train_slowfast_tiny.yaml",
    "longvu": "configs/train_longvu_tiny.yaml",
    "videopanda": "configs/train_videopanda_tiny.yaml",
}
"""The shipped recipe of each connector, sized for the tiny model on a 2-core CPU."""

SHARED_KEYS = ("max_steps", "seed", "data.batch_size")
"""Train keys every connector of a comparison runs with the same value (set here, not in the recipes)."""


@dataclass
class CompareConfig:
    """Everything ``dualfocus compare`` needs; saved as OUT/compare_config.yaml."""

    store: str = ""
    """Feature store holding every stream the connectors read (one extraction for all of them)."""
    train: str = ""
    """Training QA (VideoInstruct JSON or JSONL)."""
    test_q: str = ""
    """Held-out questions (test_q.json or JSONL)."""
    test_a: str = ""
    """Their answers (test_a.json or JSONL; "type" gives the per-type columns)."""
    model: str = ""
    """Base model directory (the frozen LLM and, for DualFocus, the Q-Former init)."""
    out: str = ""
    """Comparison directory: one sub-directory per connector, the table (.md, .json) and the picture (.png)."""
    connectors: list[str] = field(default_factory=lambda: list(TINY_RECIPES))
    """Connectors to train, in table order (``--connectors a,b``); names from connectors/registry.py."""
    recipes: dict[str, str] = field(default_factory=lambda: dict(TINY_RECIPES))
    """Train recipe of each connector (a path, or a name under the package's configs/): its connector section,
    optimiser, precision and frame cap. The defaults are the tiny recipes; give your own for a real model
    (``recipes.longvu=my_longvu.yaml``)."""
    max_steps: int = 1200
    """Optimiser steps of every connector (the same for all)."""
    seed: int = 0
    """Training seed of every connector (data order, initialisation)."""
    batch_size: int = 8
    """Samples per micro-batch of every connector (``data.batch_size``)."""
    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` train overrides applied to every recipe (e.g. ``llm_dtype=bfloat16``); the shared keys
    (max_steps, seed, data.batch_size) are set above instead."""
    max_new_tokens: int = 8
    """Tokens generated per answer (greedy decoding)."""
    generate_batch_size: int = 8
    """Questions per generation batch."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge for the judge columns; used only when judge.url is set (``--judge-url``)."""

    def check(self) -> list[str]:
        problems = [f"{name} is required" for name in ("store", "train", "test_q", "test_a", "model", "out")
                    if not getattr(self, name)]
        if not self.connectors:
            problems.append("connectors must name at least one connector")
        if len(set(self.connectors)) != len(self.connectors):
            problems.append(f"connectors lists a name twice: {self.connectors}")
        problems += [f"recipes has no entry for connector {name!r} (set recipes.{name}=RECIPE.yaml)"
                     for name in self.connectors if name not in self.recipes]
        for key in ("max_steps", "batch_size", "max_new_tokens", "generate_batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        shared = [o for o in self.train_overrides if o.split("=", 1)[0].strip() in SHARED_KEYS]
        if shared:
            problems.append(f"train_overrides sets {', '.join(shared)}: the shared keys are compare's own "
                            "(max_steps, seed, batch_size)")
        return problems
