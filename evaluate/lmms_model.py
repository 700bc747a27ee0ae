"""``--model dualfocus`` for lmms-eval: any connector export answering an lmms-eval task's video questions.

    python -m lmms_eval --model dualfocus --model_args checkpoint=runs/x/final[,store=STORE][,...] \\
        --tasks mvbench --batch_size 8 --device cuda

Registered through ``evaluate/lmms_plugin.py`` (entry point ``lmms_eval.models``); lmms-eval imports this module
only when the model is selected. Every connector's export works: the export names its connector, base model and
streams (``connectors/export.py``), and ``VideoQA`` rebuilds it.

Conversation format: the task's prompt (question, options and the task's own instruction, e.g. "Answer with the
option's letter") goes where DualFocus's prompt puts the question (``connectors/prompt.py``), because that is the
only format the connector was trained behind; the frozen LLM sees nothing else around it.

Frames: ``doc_to_visual(doc)`` must give one video path; it is decoded and encoded by extract's own stages (one
frame path with ``extract`` and ``ask``), or, with ``store=``, read from the store when the store holds the file's
stem, as ``generate`` reads it.

``model_args``: ``checkpoint`` (required), ``store``, ``model`` (base model dir; default: the export's),
``llm_dtype``, ``max_frames``, ``decode_timeout_s``; lmms-eval passes ``--batch_size`` and ``--device``.
Errors a user can fix (export or base model not found, unknown key, a video missing) end the run with one line
(``SystemExit``) before any answer is generated; lmms-eval would otherwise print a traceback and exit 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmms_eval.api.model import lmms

KNOWN_ARGS = ("checkpoint", "store", "model", "llm_dtype", "max_frames", "decode_timeout_s")


def _fail(message: str) -> SystemExit:
    return SystemExit(f"dualfocus (lmms-eval): {message}")


class DualFocusLMM(lmms):
    """A simple (``is_simple``) lmms-eval model over ``VideoQA``: ``generate_until`` and ``loglikelihood``
    (the multiple-choice path); multi-round generation is refused."""

    is_simple = True

    def __init__(self, checkpoint: str = "", store: str | None = None, model: str | None = None,
                 llm_dtype: str | None = None, max_frames: int | None = None, decode_timeout_s: float = 60.0,
                 batch_size: int | str = 1, device: str | None = None, max_batch_size=None, **unknown) -> None:
        super().__init__()
        from dualfocus.evaluate.video_qa import VideoQA
        from dualfocus.pipeline.errors import UserError

        if unknown:
            raise _fail(f"unknown model_args {', '.join(sorted(unknown))} (known: {', '.join(KNOWN_ARGS)}; "
                        f"--batch_size and --device are lmms-eval's own flags)")
        if not checkpoint:
            raise _fail("model_args needs checkpoint=RUN_DIR/final (an export written by `dualfocus train`)")
        if not (Path(checkpoint) / "dualfocus.json").is_file():
            raise _fail(f"no dualfocus export at {checkpoint} (expected {Path(checkpoint) / 'dualfocus.json'})")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise _fail(f"--batch_size must be a whole number, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise _fail(f"--batch_size must be >= 1, got {batch_size!r}")
        try:
            self.qa = VideoQA(str(checkpoint), model=model, store=store, llm_dtype=llm_dtype, device=device or "auto",
                              decode_timeout_s=float(decode_timeout_s),
                              max_frames=None if max_frames is None else int(max_frames),
                              model_option="model=DIR in --model_args")
        except UserError as e:
            raise _fail(str(e)) from None
        self._checked: set[tuple[str, str]] = set()

    # -- requests -> (video, text) --------------------------------------------------------------------------------

    def _video(self, doc_to_visual, doc, task: str) -> str:
        visuals = doc_to_visual(doc)
        if not isinstance(visuals, (list, tuple)) or len(visuals) != 1 or not isinstance(visuals[0], (str, os.PathLike)):
            raise _fail(f"task {task}: doc_to_visual must give one video path per document, got {visuals!r:.200}")
        return str(visuals[0])

    def _check_videos(self, requests, visual_at: int) -> None:
        """Every video of each (task, split) the requests come from exists: checked over the whole split, so
        every rank of a multi-process run stops on the same missing file instead of one waiting for the rest."""
        for req in requests:
            task, split = req.args[-2:]
            if (task, split) in self._checked:
                continue
            docs = self.task_dict[task][split]
            doc_to_visual = req.args[visual_at]
            missing = [v for v in (self._video(doc_to_visual, d, task) for d in docs)
                       if self.qa.source(v) != "store" and not Path(v).is_file()]
            if missing:
                raise _fail(f"task {task} ({split}): {len(missing)} of {len(docs)} videos not found, "
                            f"first {missing[0]} (give store=... holding them, or fix the task's video paths)")
            self._checked.add((task, split))

    # -- lmms-eval's interface ------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Answers per request (``args``: context, gen_kwargs, doc_to_visual, doc_id, task, split), in order,
        batched by ``--batch_size`` among consecutive requests with the same generation settings; cut at the
        first of the task's ``until`` strings."""
        from tqdm import tqdm

        self._check_videos(requests, visual_at=2)
        out: list[str] = []
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="dualfocus answering")
        start = 0
        while start < len(requests):
            sampling, until = self._sampling(requests[start].args[1])
            end = start + 1
            while (end < len(requests) and end - start < self.batch_size_per_gpu
                   and self._sampling(requests[end].args[1]) == (sampling, until)):
                end += 1
            pairs = []
            for req in requests[start:end]:
                context, _, doc_to_visual, doc_id, task, split = req.args
                pairs.append((self._video(doc_to_visual, self.task_dict[task][split][doc_id], task), context))
            for (_, context), answer in zip(pairs, self.qa.answer(pairs, sampling, batch_size=end - start)):
                answer = _cut(answer, until)
                out.append(answer)
                self.cache_hook.add_partial("generate_until", (context, requests[start].args[1]), answer)
            progress.update(end - start)
            start = end
        progress.close()
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(-log p(continuation | video, context), greedy?) per request (``args``: context, continuation or
        doc_to_target, doc_to_visual, doc_id, task, split): the multiple-choice path, one request per option.

        The first number is the continuation's negative log-likelihood (summed over its tokens), not the
        log-likelihood the name says: lmms-eval's ``multiple_choice`` scoring picks the option with the
        smallest value (``np.argmin`` in ``api/task.py``; its built-in models return a loss), so a true
        log-likelihood would pick the least likely option."""
        self._check_videos(requests, visual_at=2)
        triples = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            triples.append((self._video(doc_to_visual, doc, task), context, str(continuation)))
        return [(-logp, greedy) for logp, greedy in self.qa.continuation_logprobs(triples)]

    def generate_until_multi_round(self, requests) -> list[str]:
        raise _fail("multi-round generation is not supported: DualFocus exports answer one question per video")

    def _sampling(self, gen_kwargs: dict):
        """Our ``SamplingConfig`` from a task's generation arguments, and its ``until`` strings."""
        from dualfocus.evaluate.predictor import SamplingConfig

        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0)
        greedy = not kwargs.get("do_sample", False) or temperature <= 0
        sampling = SamplingConfig(greedy=greedy, temperature=temperature if temperature > 0 else 1.0,
                                  top_p=float(kwargs.get("top_p") or SamplingConfig.top_p),
                                  max_new_tokens=int(kwargs.get("max_new_tokens") or 128))
        return sampling, tuple(until)


def _cut(text: str, until: tuple[str, ...]) -> str:
    """``text`` up to the first occurrence of any of ``until``."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
