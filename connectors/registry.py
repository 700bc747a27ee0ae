"""Connectors by name: ``dualfocus train --connector NAME`` and an export's ``connector`` field resolve here.

Each entry points at a ``Connector`` subclass (imported only when asked for) that has:
    config_class                      its dataclass config (a ``ConnectorConfig`` with the same ``name``)
    expected_streams(cfg, model_dir)  {stream: per-frame shape} it reads, from small files only
    expected_taps(cfg, model_dir)     {stream: tap} naming the cut each stream must be (checked on the store)
    tokens_per_frame(cfg, model_dir)  visual tokens per frame in the LLM sequence (the context check)
    model_problems(cfg, model_dir)    what in ``cfg`` cannot fit the model (before the LLM loads)
    extract_args(cfg, model_dir, missing)   ``dualfocus extract`` arguments that add the missing streams
    plan_frames(cfg, model_dir, read, samples)   optional: which stored frames each sample reads (computed once,
                                      before training; ``read(video_id, streams)`` -> that video's arrays)
    build(cfg, model_dir, seed)       the connector, new modules initialised from ``seed``
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dualfocus.connectors.video_llm import VideoLLM

CONNECTORS: dict[str, str] = {
    "dualfocus": "dualfocus.connectors.dualfocus:DualFocus",
    "dualfocus-qavit": "dualfocus.connectors.dualfocus:DualFocusQAViT",
    "slowfast": "dualfocus.connectors.slowfast:SlowFast",
    "longvu": "dualfocus.connectors.longvu:LongVU",
    "videopanda": "dualfocus.connectors.videopanda:VideoPanda",
}
"""name -> ``module:Class``. Add a system by adding its line (or ``register`` from outside the package)."""

DEFAULT_CONNECTOR = "dualfocus"


def register(name: str, target: str) -> None:
    """Make ``module:Class`` available as connector ``name`` (a plug-in outside this package)."""
    CONNECTORS[name] = target


def names() -> list[str]:
    return list(CONNECTORS)


def connector_class(name: str):
    """The ``Connector`` subclass registered as ``name``; a ``ValueError`` naming the known ones otherwise."""
    if name not in CONNECTORS:
        raise ValueError(f"unknown connector {name!r}; known: {', '.join(CONNECTORS)}")
    module, _, attr = CONNECTORS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class ConnectorConfig:
    """The ``connector`` section of a train config. Its ``name`` picks the system, and with it the dataclass
    the rest of the section is read into (``dualfocus.pipeline.config`` asks ``select_variant``)."""

    name: str = DEFAULT_CONNECTOR
    """Which connector trains: one of the registry's names (connectors/registry.py)."""

    @classmethod
    def select_variant(cls, data: dict) -> type:
        """The config dataclass of the connector ``data["name"]`` names (the default when absent)."""
        try:
            name = data.get("name", DEFAULT_CONNECTOR) if isinstance(data, dict) else DEFAULT_CONNECTOR
            return connector_class(str(name)).config_class
        except ValueError as e:
            raise ValueError(f"name: {e}") from None


def frame_planner(system, cfg: ConnectorConfig, model_dir: str):
    """``plan_frames(read, samples)`` of a connector class that chooses stored frames itself (``plan_frames``
    static, e.g. LongVU's redundancy drop), bound to its config and model; None for the others."""
    import functools

    plan = getattr(system, "plan_frames", None)
    return None if plan is None else functools.partial(plan, cfg, model_dir)


def build_video_llm(cfg: ConnectorConfig, model_dir: str, llm_dtype: str = "float32", seed: int = 0,
                    llm_device: str = "cpu") -> "VideoLLM":
    """The connector ``cfg`` describes in front of the model directory's frozen LLM.

    Config problems against the model are raised (one ``UserError``) before the LLM loads. The LLM's tensors
    are read straight onto ``llm_device``; the connector is built on the CPU and moved by the caller.
    """
    from dualfocus.connectors.video_llm import VideoLLM
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import load_llm

    cls = connector_class(cfg.name)
    problems = cls.model_problems(cfg, model_dir)
    if problems:
        raise UserError("; ".join(problems))
    connector = cls.build(cfg, model_dir, seed)
    llm = load_llm(model_dir, dtype=llm_dtype, device=str(llm_device))
    return VideoLLM(connector, llm)
