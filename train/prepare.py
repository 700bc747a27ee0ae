"""Turn (store, QA file, model) into tokenised samples, checking everything before any compute.

Shared by training (questions with answers) and generation (questions only).
"""

from __future__ import annotations

from dataclasses import dataclass

from dualfocus.train.data import DUALFOCUS_STREAMS, JoinReport, Tokenised


@dataclass
class Prepared:
    """Tokenised samples plus what the caller needs to report and to batch them."""

    samples: list[Tokenised]
    report: JoinReport
    store_info: dict
    """``{"fingerprint": ..., "streams": [...]}`` of the streams read (what an export records)."""
    qformer_pad_id: int
    eos_token_id: int
    pad_token_id: int
    tokenizer: object


def prepare_samples(store_path: str, qa_path: str, model_dir: str, with_answers: bool,
                    max_answer_tokens: int = 256, max_question_tokens: int = 64,
                    streams: tuple[str, ...] = DUALFOCUS_STREAMS) -> Prepared:
    """Open the store, check it has the ``streams`` and fits the model, read and join the QA file, tokenise
    every sample (all before any model weights load).

    The context-length check needs the frame cap and, at inference, the tokens to generate; callers run
    ``train.checks.check_context_length`` on ``Prepared.samples`` with those.
    """
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer
    from dualfocus.pipeline.qa import read_eval_questions, read_training_qa
    from dualfocus.store import FeatureStore
    from dualfocus.train.data import (check_store_matches_model, check_store_streams, count_frames, join_with_store,
                                      tokenise)
    from dualfocus.train.prompt import PromptBuilder

    store = FeatureStore.open(store_path)
    check_store_streams(store, streams, store_path, model_dir)
    check_store_matches_model(store, model_dir, streams)
    items = read_training_qa(qa_path) if with_answers else read_eval_questions(qa_path)
    kept, report = join_with_store(items, store, streams)
    if not kept:
        examples = f" (e.g. {', '.join(report.examples)})" if report.examples else ""
        raise UserError(f"none of the {report.total} entries of {qa_path} has a usable video in {store_path}"
                        f"{examples}: {report.line()}")
    llm_tok = load_llm_tokenizer(model_dir)
    q_tok = load_qformer_tokenizer(model_dir)
    prompt = PromptBuilder(llm_tok, max_answer_tokens=max_answer_tokens)
    samples = tokenise(kept, count_frames(store, streams), prompt, q_tok, with_answers=with_answers,
                       max_question_tokens=max_question_tokens)
    store_info = {"fingerprint": store.fingerprint(streams), "streams": list(streams)}
    return Prepared(samples=samples, report=report, store_info=store_info,
                    qformer_pad_id=q_tok.pad_token_id or 0, eos_token_id=llm_tok.eos_token_id,
                    pad_token_id=llm_tok.pad_token_id, tokenizer=llm_tok)
