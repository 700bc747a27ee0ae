"""``VideoQA``: a trained export loaded once, answering questions about video files.

A video's features come from a feature store when one is given and holds the video (store id = the file's
stem), else from the file itself through extract's decode and encode stages (``ask.video_features`` and
``ask.video_pixels``: the settings the export's store fingerprint records, rounded to the store's dtype). Either
way the connector sees what ``generate`` reads, so under greedy decoding all three give the same answer.

Shared by ``dualfocus ask`` (one video, one question) and the lmms-eval model (``evaluate/lmms_model.py``),
which sends many questions about many videos through one loaded model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np


class VideoQA:
    """Export + base model + (optional) store, checked and loaded once.

    ``answer([(video, question), ...], sampling, batch_size)`` -> answers in order;
    ``continuation_logprobs([(video, context, continuation), ...])`` -> ``(sum log p, greedy?)`` per item.
    Every check that can fail without the LLM (export vs base model, store fingerprint, device, dtype, streams)
    runs in the constructor, before any weight is loaded.
    """

    def __init__(self, checkpoint: str, model: str | None = None, store: str | None = None,
                 llm_dtype: str | None = None, device: str = "auto", decode_timeout_s: float = 60.0,
                 max_frames: int | None = None, model_option: str = "--model"):
        from dualfocus.connectors.export import connector_system, read_export
        from dualfocus.connectors.prompt import PromptBuilder
        from dualfocus.connectors.registry import frame_planner
        from dualfocus.data.samples import check_store_streams, count_frames
        from dualfocus.evaluate.ask import encoder_dir, frame_settings, group_of, stream_groups
        from dualfocus.evaluate.predictor import check_export_matches, inference_dtype
        from dualfocus.pipeline.devices import resolve_device
        from dualfocus.pipeline.errors import UserError
        from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer

        self.checkpoint, self.llm_dtype, self.device, self.decode_timeout_s = checkpoint, llm_dtype, device, decode_timeout_s
        self.meta, _ = read_export(checkpoint)
        meta = self.meta
        self.store = None
        stored_fingerprint = None
        if store is not None:
            from dualfocus.store import FeatureStore

            self.store = FeatureStore.open(store)
            check_store_streams(self.store, meta.streams, store, model or meta.base_model)
            stored_fingerprint = self.store.fingerprint(meta.streams)
        self.model_dir = check_export_matches(meta, model, stored_fingerprint, checkpoint, model_option)
        self.groups = stream_groups(meta.store_fingerprint, meta.streams)
        if None in self.groups and len(self.groups) > 1:
            raise UserError(f"{Path(checkpoint) / 'dualfocus.json'}: cannot tell which group of store_fingerprint "
                            f"holds {', '.join(self.groups[None])}")
        self.fingerprints = {group: group_of(meta.store_fingerprint, group) for group in self.groups}
        self.settings = {group: frame_settings(meta.store_fingerprint, checkpoint, group) for group in self.groups
                         if self.fingerprints[group].get("kind") != "pixels"}
        self.encoders = {group: encoder_dir(self.fingerprints[group], self.model_dir, meta.base_model_hash, checkpoint)
                         for group in self.settings}
        resolve_device(device)                      # settings that cannot run fail before any video is decoded
        inference_dtype(meta, llm_dtype, checkpoint)
        self.system, self.connector_cfg = connector_system(meta, checkpoint)
        self.taps = self.system.expected_taps(self.connector_cfg, self.model_dir)  # the cut of its encoder per stream
        self.planner = frame_planner(self.system, self.connector_cfg, self.model_dir)
        from dualfocus.connectors.limits import ModelLimits

        self.max_frames = max_frames if max_frames is not None else meta.max_frames
        self.frames_key = "max_frames" if max_frames is not None else "the checkpoint's max_frames"
        self.limits = ModelLimits.of(self.model_dir)
        self.tokens_per_frame = self.system.tokens_per_frame(self.connector_cfg, self.model_dir)
        self.q_tok = load_qformer_tokenizer(self.model_dir)
        self.llm_tok = load_llm_tokenizer(self.model_dir)
        self.prompt = PromptBuilder(self.llm_tok)
        self.stored = count_frames(self.store, meta.streams) if self.store is not None else {}
        self._predictor = None
        self._last: tuple[str, dict] | None = None   # (video, features): consecutive questions about one video

    @property
    def predictor(self):
        """The loaded connector + LLM (``Predictor``), built on first use."""
        if self._predictor is None:
            from dualfocus.evaluate.predictor import Predictor

            self._predictor = Predictor(self.checkpoint, self.model_dir, dtype=self.llm_dtype, device=self.device)
        return self._predictor

    def source(self, video: str) -> str:
        """``"store"`` when the store holds ``video`` (by file stem), else ``"video"`` (decoded and encoded)."""
        return "store" if Path(video).stem in self.stored else "video"

    def features(self, video: str) -> dict[str, np.ndarray]:
        """``{stream: [t, ...]}`` of every frame of ``video``, from the store or from the file (module docstring)."""
        from dualfocus.evaluate.ask import video_features, video_pixels

        if self.source(video) == "store":
            read = self.store.read(Path(video).stem, streams=self.meta.streams)
            return {stream: np.asarray(read[stream]) for stream in self.meta.streams}
        out = {}
        for group, streams in self.groups.items():
            wanted = {stream: self.taps[stream] for stream in streams}
            if group in self.settings:
                out.update(video_features(video, self.encoders[group], self.settings[group], self.device,
                                          self.decode_timeout_s, wanted))
            else:
                out.update(video_pixels(video, self.fingerprints[group], self.decode_timeout_s, wanted))
        return out

    def features_once(self, video: str) -> dict[str, np.ndarray]:
        """``features(video)``, kept for the next call while the same video is asked about again."""
        if self._last is None or self._last[0] != video:
            self._last = (video, self.features(video))
        return self._last[1]

    def item(self, video: str, question: str, features: dict[str, np.ndarray], answer: str | None = None) -> dict:
        """One dataset item for ``data.batch.collate``: the question tokenised with the DualFocus prompt (and
        ``answer`` after it, when given), the frames planned and read as ``generate`` reads them."""
        import torch

        from dualfocus.connectors.limits import check_context_length
        from dualfocus.data.samples import float32_writable, frames_to_read, tokenise
        from dualfocus.pipeline.qa import QAItem

        frames = min(len(f) for f in features.values())
        qa = QAItem(video_id=video, question=question, answer=answer or "", question_id=video)
        (sample,) = tokenise([qa], {video: frames}, self.prompt, self.q_tok, with_answers=answer is not None,
                             max_question_tokens=self.meta.max_question_tokens)
        if self.planner is not None:
            (plan,) = self.planner(lambda _, wanted: {s: features[s] for s in wanted}, [sample])
            sample = replace(sample, frames=None if plan is None else tuple(int(f) for f in plan))
        keep = frames_to_read(sample, self.max_frames)
        check_context_length([sample], self.max_frames, self.limits, frames_key=self.frames_key,
                             tokens_per_frame=self.tokens_per_frame)
        return {**{stream: torch.from_numpy(float32_writable(f[keep])) for stream, f in features.items()},
                "sample": sample, "index": 0}

    def collate(self, items: list[dict]):
        from dualfocus.data.batch import collate

        return collate(items, self.q_tok.pad_token_id or 0, self.llm_tok.pad_token_id or 0)

    def answer(self, pairs: list[tuple[str, str]], sampling, batch_size: int = 1) -> list[str]:
        """Answers to ``(video, question)`` pairs, in order, ``batch_size`` per generation call; a video's
        features are computed once for consecutive questions about it."""
        answers: list[str] = []
        for start in range(0, len(pairs), batch_size):
            items = [self.item(video, question, self.features_once(video))
                     for video, question in pairs[start:start + batch_size]]
            answers += self.predictor.answer(self.collate(items), sampling)
        return answers

    def continuation_logprobs(self, triples: list[tuple[str, str, str]]) -> list[tuple[float, bool]]:
        """``(log p(continuation | video, context), whether greedy decoding would produce it)`` per
        ``(video, context, continuation)``: the context is the question of the DualFocus prompt and the
        continuation the assistant's answer, scored without the EOS that ends a training answer."""
        out = []
        for video, context, continuation in triples:
            item = self.item(video, context, self.features_once(video), answer=continuation)
            sample = item["sample"]
            if sample.text_ids and sample.text_ids[-1] == self.llm_tok.eos_token_id:
                sample = replace(sample, text_ids=sample.text_ids[:-1], text_labels=sample.text_labels[:-1])
            out += self.predictor.continuation_logprobs(self.collate([{**item, "sample": sample}]))
        return out
