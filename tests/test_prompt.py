"""The training prompt and its labels: only the answer tokens and the closing EOS are learned."""

from __future__ import annotations

import pytest

from dualfocus.data.samples import tokenise
from dualfocus.connectors.prompt import IGNORE_INDEX, PLACEHOLDER, SYSTEM, TEMPLATE, PromptBuilder

QUESTION = "Which direction does the shape move?"


@pytest.fixture(scope="module")
def llm_tok(tiny_model):
    from dualfocus.pipeline.models import load_llm_tokenizer

    return load_llm_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def qformer_tok(tiny_model):
    from dualfocus.pipeline.models import load_qformer_tokenizer

    return load_qformer_tokenizer(tiny_model)


def labelled(labels: list[int]) -> list[int]:
    return [x for x in labels if x != IGNORE_INDEX]


def test_template_is_the_papers_prompt():
    assert TEMPLATE.format(question="Q?") == (
        "The assistant gives helpful, detailed, and brief answers to the user's questions based on the video."
        "\n\nUSER: <video>\n Based on the video, answer the question: Q?\nASSISTANT:")
    assert TEMPLATE.startswith(SYSTEM) and TEMPLATE.count(PLACEHOLDER) == 1


def test_pieces_decode_back_to_the_prompt(llm_tok):
    pieces = PromptBuilder(llm_tok)(QUESTION, "left")
    assert pieces.prefix[0] == llm_tok.bos_token_id
    assert llm_tok.bos_token_id not in pieces.prefix[1:] + pieces.suffix + pieces.answer
    text = (llm_tok.decode(pieces.prefix[1:]) + PLACEHOLDER + llm_tok.decode(pieces.suffix)
            + llm_tok.decode(pieces.answer))
    assert text == TEMPLATE.format(question=QUESTION) + " left</s>"


@pytest.mark.parametrize("answer", ["red", "left", "The blue circle moves toward the right of the frame."])
def test_only_the_answer_and_eos_carry_labels(llm_tok, answer):
    pieces = PromptBuilder(llm_tok)(QUESTION, answer)
    labels = pieces.labels_after_video()
    assert len(labels) == len(pieces.suffix) + len(pieces.answer)
    # the question part is all -100, then every answer token (and the EOS) labels itself
    assert labels[: len(pieces.suffix)] == [IGNORE_INDEX] * len(pieces.suffix)
    assert labels[len(pieces.suffix):] == pieces.answer
    assert pieces.answer[-1] == llm_tok.eos_token_id and pieces.answer.count(llm_tok.eos_token_id) == 1
    assert llm_tok.decode(labelled(labels)).strip() == answer + "</s>"


def test_inference_prompt_has_no_answer_and_no_labels(llm_tok):
    builder = PromptBuilder(llm_tok)
    train, infer = builder(QUESTION, "up"), builder(QUESTION)
    assert infer.answer == [] and labelled(infer.labels_after_video()) == []
    # the model sees the very same prompt at inference as in training
    assert (infer.prefix, infer.suffix) == (train.prefix, train.suffix)


def test_question_whitespace_is_stripped(llm_tok):
    builder = PromptBuilder(llm_tok)
    assert builder("  " + QUESTION + "\n", " up ") == builder(QUESTION, "up")


def test_a_cut_answer_gets_no_eos_label(llm_tok):
    """An EOS after a cut answer would teach the model to stop mid-sentence; an answer that fits keeps it."""
    answer = "the red square moves left and the blue circle moves right and the green star moves up"
    full = PromptBuilder(llm_tok)(QUESTION, answer)
    n = len(full.answer) - 1  # answer tokens without the EOS
    assert n > 4 and full.answer[-1] == llm_tok.eos_token_id
    cut = PromptBuilder(llm_tok, max_answer_tokens=3)(QUESTION, answer)
    assert cut.answer == full.answer[:3] and llm_tok.eos_token_id not in cut.labels_after_video()
    assert labelled(cut.labels_after_video()) == full.answer[:3]
    # exactly at the limit nothing is cut, so the EOS stays
    assert PromptBuilder(llm_tok, max_answer_tokens=n)(QUESTION, answer).answer == full.answer


def test_question_length_for_the_qformer_is_the_configured_one(llm_tok, qformer_tok):
    from dualfocus.pipeline.qa import QAItem

    item = QAItem("vid_a", "What color is the shape that moves from the left to the right of the frame?", "red")
    full, short = (tokenise([item], {"vid_a": 2}, PromptBuilder(llm_tok), qformer_tok, with_answers=True,
                            max_question_tokens=n)[0].qformer_ids for n in (64, 5))
    assert len(full) > 5 and len(short) == 5
    assert short[:4] == full[:4] and short[-1] == full[-1] == qformer_tok.sep_token_id  # cut, still closed by SEP


def test_tokenise_builds_text_ids_and_labels_per_sample(llm_tok, qformer_tok):
    from dualfocus.pipeline.qa import QAItem

    items = [QAItem("vid_a", "What color is the shape?", "green", "q1"), QAItem("vid_b", QUESTION, "down", "q2")]
    samples = tokenise(items, {"vid_a": 3, "vid_b": 7}, PromptBuilder(llm_tok), qformer_tok, with_answers=True)
    for item, s in zip(items, samples):
        pieces = PromptBuilder(llm_tok)(item.question, item.answer)
        assert s.prefix_ids == pieces.prefix
        assert s.text_ids == pieces.suffix + pieces.answer
        assert len(s.text_labels) == len(s.text_ids)
        assert llm_tok.decode(labelled(s.text_labels)).strip() == item.answer + "</s>"
        # the Q-Former sees the question only (its own tokenizer, with its CLS/SEP)
        assert s.qformer_ids == qformer_tok(item.question)["input_ids"]
        assert qformer_tok.decode(s.qformer_ids, skip_special_tokens=True) == item.question.lower()
    assert [s.n_frames for s in samples] == [3, 7]
    unlabelled = tokenise(items, {"vid_a": 3, "vid_b": 7}, PromptBuilder(llm_tok), qformer_tok, with_answers=False)
    assert all(labelled(s.text_labels) == [] for s in unlabelled)
