"""Reading practice for the tiny LLM (``init-tiny --reading-steps``): the practice prompts say what they claim,
the practice teaches, and the CLI writes a model that records it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import run_cli


def _kind_words(kind: str, words: list[str]) -> list[str]:
    from dualfocus.pipeline.tiny_reading import _vocabulary

    return [w for w in words if w in _vocabulary()[kind]]


def test_every_practice_answer_is_the_asked_kinds_word_at_the_asked_place():
    from dualfocus.pipeline.tiny_reading import ANSWER_RULES, _questions, make_reading_sample

    qtype_of = {q: t for t, qs in _questions().items() for q in qs}
    rng, seen = np.random.default_rng(5), set()
    for _ in range(600):
        s = make_reading_sample(rng)
        qtype = qtype_of[s.question]
        kind, which = ANSWER_RULES[qtype]
        mentions = _kind_words(kind, s.words)
        seen.add((kind, which))
        assert 1 <= len(s.words) <= 48 * 8
        if which == "any":
            assert set(mentions) == {s.answer}
        else:  # two values, one switch: the first or the last mention answers, and the other value is there too
            assert len(set(mentions)) == 2
            assert s.answer == (mentions[0] if which == "first" else mentions[-1])
    assert seen == set(ANSWER_RULES.values())


def test_practice_prompts_are_a_pure_function_of_the_seed():
    from dualfocus.pipeline.tiny_reading import make_reading_sample

    a = [make_reading_sample(np.random.default_rng(3)) for _ in range(3)]
    b = [make_reading_sample(np.random.default_rng(3)) for _ in range(3)]
    assert a == b


def test_practice_teaches_the_tiny_llm_to_answer_from_the_passage(tiny_model: Path):
    """A random tiny LLM answers almost none of them; 150 steps of practice most of the any-mention kind."""
    from dualfocus.pipeline.models import load_llm, load_llm_tokenizer
    from dualfocus.pipeline.tiny_reading import make_reading_sample, practise_reading, reading_accuracy

    tok, llm = load_llm_tokenizer(tiny_model), load_llm(tiny_model)
    rng = np.random.default_rng(11)
    fresh = [make_reading_sample(rng) for _ in range(128)]
    before = reading_accuracy(llm, tok, fresh)
    after = practise_reading(llm, tok, steps=150, seed=0)
    assert before < 0.2 and after > before + 0.3, (before, after)


def test_cli_writes_a_practised_model_and_refuses_practice_for_a_tower(tmp_path: Path):
    out = run_cli("init-tiny", tmp_path / "m", "--reading-steps", "3").stdout
    assert "LLM reading practice: 3 steps" in out
    record = json.loads((tmp_path / "m" / "reading.json").read_text())
    assert record["steps"] == 3 and 0.0 <= record["accuracy_on_256_fresh_prompts"] <= 1.0
    bad = run_cli("init-tiny", tmp_path / "s", "--family", "siglip", "--reading-steps", "3", check=False)
    assert bad.returncode == 2 and "has no LLM" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "s").exists()


def test_negative_practice_is_refused(tmp_path: Path):
    bad = run_cli("init-tiny", tmp_path / "m", "--reading-steps", "-1", check=False)
    assert bad.returncode == 2 and "--reading-steps" in bad.stderr
