"""The trained connector on disk: ``final/connector.safetensors`` (its weights, fp32) and ``final/dualfocus.json``
(``ExportMeta``: which connector, its config, the base model and the features it was trained on).

``generate``, ``ask`` and anything else that serves a model rebuild it from these two files and the base model
directory alone (``rebuild``). Exports written before connectors had names (format 1) read as ``dualfocus``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

EXPORT_WEIGHTS = "connector.safetensors"
EXPORT_META = "dualfocus.json"
FORMAT_VERSION = 2


@dataclass
class ExportMeta:
    """What an export records (``dualfocus.json``)."""

    connector: str
    """Registry name of the connector (``connectors/registry.py``)."""
    connector_config: dict
    """Its config section as trained (``name`` included)."""
    base_model: str
    """Absolute path of the model directory it was trained on (the frozen LLM, tokenizers, Q-Former init)."""
    base_model_hash: str
    """``config_hash`` of that directory's config.json: a different base model is refused."""
    store_fingerprint: dict
    """Fingerprint of the streams it read (encoder, taps, sampling): other features are refused."""
    streams: list[str] = field(default_factory=list)
    """The store streams it reads."""
    llm_dtype: str = "float32"
    """The LLM's dtype in training; inference runs connector and LLM in it unless told otherwise."""
    connector_dtype: str = "float32"
    """The dtype the connector's weights trained in (saved as fp32 either way)."""
    max_frames: int | None = None
    """Frames per video at train time; inference subsamples the same way."""
    max_question_tokens: int = 64
    """Question tokens read; inference cuts questions the same way."""
    step: int = 0
    """Optimiser steps trained."""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict, where: str = "dualfocus.json") -> "ExportMeta":
        """Read format 1 (``connector`` was the DualFocus config dict) or 2; a one-line error on a bad file."""
        from dualfocus.pipeline.errors import UserError

        data = dict(data)
        if isinstance(data.get("connector"), dict):  # format 1: the DualFocus connector, before the registry
            data["connector_config"] = {"name": "dualfocus", **data["connector"]}
            data["connector"] = "dualfocus"
            data.setdefault("streams", ["semantic", "spatiotemporal"])
        known = {f.name for f in fields(cls)}
        missing = [name for name in ("connector", "connector_config", "base_model", "base_model_hash",
                                     "store_fingerprint") if name not in data]
        if missing:
            raise UserError(f"{where} is not a dualfocus export record: missing {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def connector_config_object(self, where: str = "dualfocus.json"):
        """The connector's config dataclass, rebuilt from ``connector_config`` (unknown keys are an error)."""
        from dualfocus.connectors.registry import connector_class
        from dualfocus.pipeline.config import ConfigError, load_config
        from dualfocus.pipeline.errors import UserError

        try:
            cls = connector_class(self.connector).config_class
            return load_config(cls, values={**self.connector_config, "name": self.connector})
        except (ValueError, ConfigError) as e:
            raise UserError(f"{where}: connector_config: {e}") from None


def connector_system(meta: ExportMeta, export_path) -> tuple[type, object]:
    """(the export's connector class, its config rebuilt from the record); errors name ``export_path``'s record."""
    from dualfocus.connectors.registry import connector_class

    cfg = meta.connector_config_object(str(Path(export_path) / EXPORT_META))
    return connector_class(meta.connector), cfg


def write_export(state: dict, meta: ExportMeta, out: Path) -> Path:
    """Write ``out/connector.safetensors`` (``state`` as fp32) and ``out/dualfocus.json``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(out / EXPORT_WEIGHTS))
    (out / EXPORT_META).write_text(meta.to_json())
    return out


def read_export(path: str | Path) -> tuple[ExportMeta, dict]:
    """(meta, state_dict) of an export directory; a clear error when it is not one."""
    from safetensors.torch import load_file

    from dualfocus.pipeline.errors import UserError

    path = Path(path)
    meta_path = path / EXPORT_META
    if not meta_path.is_file() or not (path / EXPORT_WEIGHTS).is_file():
        raise UserError(f"{path} is not a dualfocus export (expected {EXPORT_META} and {EXPORT_WEIGHTS}; "
                        "pass RUN_DIR/final)")
    try:
        data = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    return ExportMeta.from_dict(data, str(meta_path)), load_file(str(path / EXPORT_WEIGHTS))


def rebuild(meta: ExportMeta, state: dict, model_dir: str, llm_dtype: str, device, where: str = "dualfocus.json"):
    """The ``VideoLLM`` an export describes: its connector rebuilt from the record, its weights loaded, the base
    model's frozen LLM read onto ``device`` in ``llm_dtype``; moved to ``device`` and in eval mode."""
    import torch

    from dualfocus.connectors.registry import build_video_llm

    model = build_video_llm(meta.connector_config_object(where), model_dir, llm_dtype=llm_dtype, llm_device=device)
    model.load_trainable_state_dict(state)
    dtype = getattr(torch, llm_dtype)
    for param in model.parameters():  # as DeepSpeed's bf16/fp16 cast does: parameters only, buffers keep theirs
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.to(device).eval()
