"""Checks that read only small files (the model's config.json, the tokenised samples) and so run before
the LLM is loaded: a mistake costs a second, not a multi-gigabyte load followed by a crash mid-run.

Legend: ``q`` query tokens per frame (the model's ``num_query_tokens``), ``t`` frames after the
``data.max_frames`` cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualfocus.pipeline.errors import UserError
from dualfocus.pipeline.sampling import uniform_indices


@dataclass(frozen=True)
class ModelLimits:
    """What the model's config.json says about widths and sequence lengths."""

    llm_width: int
    """``text_config.hidden_size`` (d_l)."""
    llm_positions: int
    """``text_config.max_position_embeddings``: the longest sequence the LLM is built for."""
    qformer_positions: int
    """``qformer_config.max_position_embeddings``: the longest question the Q-Former can embed."""
    query_tokens: int
    """``num_query_tokens`` (q): video tokens per frame."""

    @classmethod
    def of(cls, model_dir: str) -> "ModelLimits":
        from dualfocus.pipeline.models import load_config

        cfg = load_config(model_dir)
        return cls(llm_width=cfg.text_config.hidden_size, llm_positions=cfg.text_config.max_position_embeddings,
                   qformer_positions=cfg.qformer_config.max_position_embeddings, query_tokens=cfg.num_query_tokens)


def question_problems(limits: ModelLimits, max_question_tokens: int) -> list[str]:
    """What in the data config cannot fit this model's Q-Former (empty when all fits)."""
    if max_question_tokens > limits.qformer_positions:
        return [f"data.max_question_tokens ({max_question_tokens}) exceeds the Q-Former's "
                f"{limits.qformer_positions} positions (qformer_config.max_position_embeddings)"]
    return []


def sequence_length(sample, max_frames: int | None, query_tokens: int) -> tuple[int, int]:
    """(frames after the cap, LLM sequence length) of one tokenised sample: prefix + t·q + question/answer."""
    planned = getattr(sample, "frames", None)
    frames = len(uniform_indices(sample.n_frames if planned is None else len(planned), max_frames))
    return frames, len(sample.prefix_ids) + frames * query_tokens + len(sample.text_ids)


def check_context_length(samples: list, max_frames: int | None, limits: ModelLimits, new_tokens: int = 0,
                         frames_key: str = "data.max_frames", tokens_per_frame: int | None = None) -> None:
    """Refuse samples whose prompt + video tokens (+ ``new_tokens`` to generate) exceed the LLM's context.

    The message names the longest sample, the numbers, how many samples are too long and the largest
    ``frames_key`` that fits them all (or, when even one frame does not fit, that the text is too long).
    """
    per_frame = limits.query_tokens if tokens_per_frame is None else tokens_per_frame
    too_long = []  # (length, frames, text tokens, sample)
    for s in samples:
        frames, length = sequence_length(s, max_frames, per_frame)
        if length + new_tokens > limits.llm_positions:
            too_long.append((length + new_tokens, frames, length - frames * per_frame + new_tokens, s))
    if not too_long:
        return
    length, frames, text, worst = max(too_long, key=lambda x: x[0])
    fitting = min((limits.llm_positions - t) // max(per_frame, 1) for _, _, t, _ in too_long)
    generated = f" (incl. {new_tokens} to generate)" if new_tokens else ""
    advice = (f"set {frames_key} to at most {fitting}" if fitting >= 1 else
              f"even one frame does not fit next to {text} text tokens; shorten the answers or questions")
    question = worst.question if len(worst.question) <= 60 else worst.question[:57] + "..."
    name = f"question {worst.question_id}" if worst.question_id else f"question {question!r}"
    cap = "null" if max_frames is None else max_frames
    raise UserError(
        f"{len(too_long)} of {len(samples)} samples exceed the LLM's context of {limits.llm_positions} tokens "
        f"(text_config.max_position_embeddings): {name} on video {worst.video_id} needs {frames} frames "
        f"({frames_key}={cap}) x {per_frame} visual tokens + {text} text tokens{generated} "
        f"= {length}; {advice}")
