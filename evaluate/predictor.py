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


def check_export_matches(meta: dict, model_dir: str | None, store_fingerprint: dict | None, export_path) -> str:
    """The base model directory to use; refuses a different base model or store fingerprint, naming both."""
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import config_hash

    model_dir = model_dir or meta["base_model"]
    if not Path(model_dir).exists():
        raise UserError(f"base model of {export_path} not found at {model_dir}; pass --model")
    have = config_hash(model_dir)
    if have != meta["base_model_hash"]:
        raise UserError(f"checkpoint {export_path} was trained on base model {meta['base_model']} "
                        f"(config {meta['base_model_hash']}), but {model_dir} has config {have}")
    if store_fingerprint is not None and store_fingerprint != meta["store_fingerprint"]:
        keys = sorted(k for k in set(store_fingerprint) | set(meta["store_fingerprint"])
                      if store_fingerprint.get(k) != meta["store_fingerprint"].get(k))
        detail = ", ".join(f"{k}: trained {meta['store_fingerprint'].get(k)!r} vs store {store_fingerprint.get(k)!r}"
                           for k in keys)
        raise UserError(f"checkpoint {export_path} was trained on features with another encoder fingerprint ({detail})")
    return model_dir


class Predictor:
    """Loads base model + connector once; ``answer(batch)`` returns decoded strings."""

    def __init__(self, export_path: str | Path, model_dir: str, llm_dtype: str | None = None):
        from dualfocus.pipeline.models import load_llm_tokenizer
        from dualfocus.train.checkpoint import read_export
        from dualfocus.train.config import ConnectorConfig
        from dualfocus.train.model import build_dualfocus

        self.meta, state = read_export(export_path)
        self.model = build_dualfocus(model_dir, ConnectorConfig(**self.meta["connector"]),
                                     llm_dtype=llm_dtype or self.meta["llm_dtype"])
        self.model.load_trainable_state_dict(state)
        self.model.eval()
        self.dtype = next(self.model.llm.parameters()).dtype
        self.tokenizer = load_llm_tokenizer(model_dir)

    @torch.no_grad()
    def answer(self, batch: dict, sampling: SamplingConfig) -> list[str]:
        """Answers for a collated batch (``train.data.collate``), in batch order."""
        batch = dict(batch)
        for key in ("semantic", "spatiotemporal"):
            batch[key] = batch[key].to(self.dtype)
        torch.manual_seed(sampling.seed)
        ids = self.model.generate(batch, max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy,
                                  temperature=sampling.temperature, top_p=sampling.top_p,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
