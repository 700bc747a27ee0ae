"""Turn (store, QA file, model) into tokenised samples, checking everything before any compute.

Shared by training (questions with answers) and generation (questions only).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dualfocus.data.samples import JoinReport, Tokenised


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
                    expected: dict[str, tuple[int, ...]] | None = None, max_answer_tokens: int = 256,
                    max_question_tokens: int = 64, taps: dict[str, str] | None = None,
                    extract_args=None, plan_frames=None) -> Prepared:
    """Open the store, check it has the ``expected`` streams (``{stream: per-frame shape}``, what the connector
    reads: ``expected_streams`` of its class; None = the default DualFocus streams) at those shapes, read and
    join the QA file, tokenise every sample (all before any model weights load). ``taps``: ``{stream: tap}``
    the connector needs a stream to hold (its ``expected_taps``), checked against the store's record;
    ``extract_args(missing)``: what the message about missing streams tells the user to extract.
    ``plan_frames(read, samples) -> [frames or None per sample]``: the connector's choice of stored frames (read
    once here, before any training: ``read(video_id, streams)`` gives a video's whole streams).

    The context-length check needs the frame cap and, at inference, the tokens to generate; callers run
    ``connectors.limits.check_context_length`` on ``Prepared.samples`` with those.
    """
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import load_llm_tokenizer, load_qformer_tokenizer
    from dualfocus.pipeline.qa import read_eval_questions, read_training_qa
    from dualfocus.store import FeatureStore
    from dualfocus.connectors.prompt import PromptBuilder
    from dualfocus.data.samples import (check_store_shapes, check_store_streams, check_store_taps, count_frames,
                                        join_with_store, tokenise)
    from dualfocus.pipeline.models import load_config

    if expected is None:
        from dualfocus.connectors.dualfocus import DualFocus, DualFocusConfig

        expected = DualFocus.expected_streams(DualFocusConfig(), model_dir)
    streams = tuple(expected)
    store = FeatureStore.open(store_path)
    check_store_streams(store, streams, store_path, model_dir, extract_args)
    check_store_shapes(store, expected, model_dir)
    if taps:
        check_store_taps(store, taps, load_config(model_dir).vision_config.num_hidden_layers, store_path)
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
    if plan_frames is not None:
        plans = plan_frames(lambda video, wanted: store.read(video, streams=wanted), samples)
        samples = [s if plan is None else replace(s, frames=tuple(int(f) for f in plan))
                   for s, plan in zip(samples, plans)]
    store_info = {"fingerprint": store.fingerprint(streams), "streams": list(streams)}
    return Prepared(samples=samples, report=report, store_info=store_info,
                    qformer_pad_id=q_tok.pad_token_id or 0, eos_token_id=llm_tok.eos_token_id,
                    pad_token_id=llm_tok.pad_token_id, tokenizer=llm_tok)
