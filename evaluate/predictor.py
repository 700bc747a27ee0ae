"""``Predictor``: a trained connector export + its base model, answering batches of tokenised questions.

Shared by ``generate`` (features from the store) and ``ask`` (features computed on the spot), so both
build exactly the same model, prompt and decoding settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SamplingConfig:
    """Decoding settings (paper: sampling with temperature 0.9, top_p 0.6, up to 300 new tokens)."""

    greedy: bool = False
    """Greedy decoding (deterministic) instead of sampling."""
    temperature: float = 0.9
    """Sampling temperature."""
    top_p: float = 0.6
    """Nucleus sampling mass."""
    max_new_tokens: int = 300
    """Longest answer generated."""
    seed: int = 0
    """Seed for sampling (the same seed and batch give the same answers)."""

    def check(self) -> list[str]:
        problems = []
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be within (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return problems


def check_export_matches(meta, model_dir: str | None, store_fingerprint: dict | None, export_path,
                         model_option: str = "--model") -> str:
    """The base model directory to use; refuses a different base model or store fingerprint, naming both.

    ``meta`` is the export's ``ExportMeta`` (``connectors/export.py``); ``model_option`` is how the caller's user
    gives another base model directory (named when the recorded one is gone)."""
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import config_hash

    model_dir = model_dir or meta.base_model
    if not Path(model_dir).exists():
        raise UserError(f"base model of {export_path} not found at {model_dir}; pass {model_option}")
    have = config_hash(model_dir)
    if have != meta.base_model_hash:
        raise UserError(f"checkpoint {export_path} was trained on base model {meta.base_model} "
                        f"(config {meta.base_model_hash}), but {model_dir} has config {have}")
    trained = meta.store_fingerprint
    if store_fingerprint is not None and store_fingerprint != trained:
        keys = sorted(k for k in set(store_fingerprint) | set(trained) if store_fingerprint.get(k) != trained.get(k))
        detail = ", ".join(f"{k}: trained {trained.get(k)!r} vs store {store_fingerprint.get(k)!r}" for k in keys)
        raise UserError(f"checkpoint {export_path} was trained on features with another encoder fingerprint ({detail})")
    return model_dir


def inference_dtype(meta, override: str | None, export_path) -> str:
    """The one dtype connector, LLM and features run in: ``override``, else the export's ``llm_dtype``.

    DeepSpeed bf16/fp16 training casts the connector to the LLM's dtype too, so that is the dtype the
    connector was trained in; a connector trained in fp32 beside a bf16 LLM loses only rounding here.
    """
    from dualfocus.pipeline.devices import COMPUTE_DTYPES
    from dualfocus.pipeline.errors import UserError

    if override is not None:
        name, where = override, "llm_dtype"
    else:
        name, where = meta.llm_dtype, f"{Path(export_path) / 'dualfocus.json'}: llm_dtype"
    if name not in COMPUTE_DTYPES:
        raise UserError(f"{where} must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return name


class Predictor:
    """Loads base model + connector once (from the export alone: ``connectors.export.rebuild``);
    ``answer(batch)`` returns decoded strings.

    Connector, LLM and features run in one dtype (``inference_dtype``) on one device (``device``: ``auto``
    = CUDA when torch sees a GPU). A CPU-only machine runs the same code with ``torch.device("cpu")``.
    """

    def __init__(self, export_path: str | Path, model_dir: str, dtype: str | None = None, device: str = "auto"):
        from dualfocus.connectors.export import read_export, rebuild
        from dualfocus.pipeline.devices import resolve_device
        from dualfocus.pipeline.models import load_llm_tokenizer

        self.meta, state = read_export(export_path)
        self.device = resolve_device(device)
        name = inference_dtype(self.meta, dtype, export_path)
        self.dtype = getattr(torch, name)
        self.model = rebuild(self.meta, state, model_dir, name, self.device, str(Path(export_path) / "dualfocus.json"))
        self.tokenizer = load_llm_tokenizer(model_dir)

    def answer(self, batch, sampling: SamplingConfig) -> list[str]:
        """Answers for a collated ``Batch`` (``data.batch.collate``), in batch order."""
        return [text for text, _ in self.answers(batch, sampling)]

    @torch.no_grad()
    def answers(self, batch, sampling: SamplingConfig) -> list[tuple[str, int]]:
        """(answer, visual tokens the LLM read) per sample of a collated ``Batch``, in batch order."""
        batch = batch.to(self.device, self.dtype)
        torch.manual_seed(sampling.seed)
        ids, counts = self.model.generate(batch, max_new_tokens=sampling.max_new_tokens,
                                          do_sample=not sampling.greedy, temperature=sampling.temperature,
                                          top_p=sampling.top_p, eos_token_id=self.tokenizer.eos_token_id,
                                          pad_token_id=self.tokenizer.pad_token_id, visual_counts=True)
        return [(self.tokenizer.decode(row, skip_special_tokens=True).strip(), n) for row, n in zip(ids, counts)]

    @torch.no_grad()
    def continuation_logprobs(self, batch) -> list[tuple[float, bool]]:
        """(log-probability of each sample's labelled answer tokens, whether greedy decoding gives them)."""
        return self.model.continuation_logprobs(batch.to(self.device, self.dtype))
