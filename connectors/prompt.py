"""The DualFocus prompt, tokenised around the ``<video>`` placeholder, with its training labels.

    The assistant gives helpful, detailed, and brief answers to the user's questions based on the video.

    USER: <video>
     Based on the video, answer the question: {question}
    ASSISTANT: {answer}</s>

The text before and after ``<video>`` is tokenised separately (the FFP's ``t·q`` output embeddings go
between them), so no special token has to exist in the LLM's vocabulary. Training and inference use
the very same pieces; inference simply stops after ``ASSISTANT:``.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = "The assistant gives helpful, detailed, and brief answers to the user's questions based on the video."
PLACEHOLDER = "<video>"
TEMPLATE = SYSTEM + "\n\nUSER: " + PLACEHOLDER + "\n Based on the video, answer the question: {question}\nASSISTANT:"
IGNORE_INDEX = -100


@dataclass
class PromptPieces:
    """Token ids of one sample: ``prefix`` (BOS + text before <video>), ``suffix`` (question up to
    ``ASSISTANT:``) and ``answer`` (answer tokens + EOS; empty at inference). An answer cut at
    ``max_answer_tokens`` has no EOS: labelling one there would teach the model to stop mid-answer."""

    prefix: list[int]
    suffix: list[int]
    answer: list[int]

    def labels_after_video(self) -> list[int]:
        """Labels of ``suffix + answer``: -100 on the prompt, the token ids on the answer and EOS."""
        return [IGNORE_INDEX] * len(self.suffix) + list(self.answer)


class PromptBuilder:
    """Turns (question, answer) into ``PromptPieces`` with a given LLM tokenizer."""

    def __init__(self, tokenizer, max_answer_tokens: int = 256):
        self.tok = tokenizer
        self.max_answer_tokens = max_answer_tokens
        before, after = TEMPLATE.split(PLACEHOLDER)
        self.prefix_ids = self._encode(before)
        if tokenizer.bos_token_id is not None and (not self.prefix_ids or self.prefix_ids[0] != tokenizer.bos_token_id):
            self.prefix_ids = [tokenizer.bos_token_id] + self.prefix_ids
        self._after = after
        if tokenizer.eos_token_id is None:
            raise ValueError("the LLM tokenizer has no EOS token; the answer could never end")

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def question_ids(self, question: str, max_tokens: int) -> list[int]:
        """The question on its own (no special tokens), cut at ``max_tokens``: what a connector that embeds the
        question with the LLM's table reads (QA-ViT, LongVU's frame selection)."""
        return self._encode(question.strip())[:max_tokens]

    def __call__(self, question: str, answer: str | None = None) -> PromptPieces:
        suffix_text = self._after.format(question=question.strip())
        suffix = self._encode(suffix_text)
        if answer is None:
            return PromptPieces(self.prefix_ids, suffix, [])
        # Tokenise prompt and answer together so the answer's first token is what the LLM would see,
        # then cut where the prompt's own tokens end.
        full = self._encode(suffix_text + " " + answer.strip())
        if full[: len(suffix)] == suffix:
            answer_ids = full[len(suffix):]
        else:  # a merge across the boundary: fall back to the answer tokenised on its own
            answer_ids = self._encode(" " + answer.strip())
        if len(answer_ids) > self.max_answer_tokens:
            return PromptPieces(self.prefix_ids, suffix, answer_ids[: self.max_answer_tokens])  # cut: no EOS
        return PromptPieces(self.prefix_ids, suffix, answer_ids + [self.tok.eos_token_id])
