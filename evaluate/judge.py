"""LLM-judge scoring against any OpenAI-compatible ``POST {url}/chat/completions`` endpoint.

Each (question, correct answer, predicted answer) goes to the judge, which replies with a dict literal
such as ``{"pred": "yes", "score": 4}``: whether the prediction is correct, and how well it matches
on an integer 0-5 scale. Accuracy is yes / (yes + no) and score is the mean over judged items.

Failures never turn into zeros. A request that fails (HTTP 5xx/429/408, refused connection, timeout,
dropped connection) or a reply that is not a valid verdict is retried with capped exponential
backoff; an item still failing after ``max_retries`` is reported "unjudged" with the reason and left
out of accuracy and score. Two conditions stop the whole run, after keeping what was judged: the
endpoint refusing connections on every attempt of an item (nothing is listening), and HTTP
401/403/404 (wrong key, URL or model) which no retry can fix.

Verdicts are appended to a JSONL cache as they arrive, keyed by a hash of (model, question, answer,
prediction); a rerun only asks for items not in it. Unjudged items are not cached.
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import logging
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib import error as urlerror
from urllib import request as urlrequest

from dualfocus.pipeline.errors import UserError

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
"""Upper bound on one wait between retries, whatever ``backoff_s`` and the attempt number."""

PROMPT_VERSION = 1
"""Part of the cache key: bump it when the prompt changes so old verdicts are not reused."""

_RETRYABLE_STATUS = frozenset({408, 429})
_FATAL_STATUS = frozenset({401, 403, 404})


@dataclass
class JudgeConfig:
    url: str | None = None
    """Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 (requests go to
    {url}/chat/completions). Unset: no judge, only the offline metrics."""
    model: str = "gpt-3.5-turbo"
    """Model name sent to the judge endpoint; also part of the cache key."""
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key, sent as 'Authorization: Bearer'. If the
    variable is unset or empty no header is sent (local servers need none). The key is never stored."""
    concurrency: int = 4
    """Number of judge requests in flight at once."""
    max_retries: int = 4
    """Retries per item after the first attempt, for failed requests and invalid verdicts."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubles with each further retry, capped at 30 s."""
    timeout_s: float = 60
    """Timeout of one HTTP request, in seconds."""
    temperature: float = 0.0
    """Sampling temperature sent to the judge."""
    cache: str | None = None
    """JSONL file of cached verdicts. Unset: beside the report (<report>.judge_cache.jsonl)."""

    def check(self) -> list[str]:
        problems = []
        if self.url is not None and not re.match(r"^https?://[^/\s]+", self.url):
            problems.append(f"url must start with http:// or https:// and name a host, got {self.url!r}")
        if not self.model.strip():
            problems.append("model must not be empty")
        if self.concurrency < 1:
            problems.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            problems.append(f"max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0:
            problems.append(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.timeout_s <= 0:
            problems.append(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.temperature <= 2:
            problems.append(f"temperature must be in [0, 2], got {self.temperature}")
        if self.cache is not None and not self.cache.strip():
            problems.append("cache must be a file path or null, got an empty string")
        return problems


@dataclass(frozen=True)
class JudgeItem:
    """One prediction to judge. ``question_id`` is a string (ids are compared as strings)."""

    question_id: str
    question: str
    answer: str
    pred: str


@dataclass(frozen=True)
class Verdict:
    pred: str
    """"yes" or "no"."""
    score: int
    """0-5."""


@dataclass
class JudgeResult:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    """question_id -> verdict, for judged items (from the endpoint or the cache)."""
    unjudged: dict[str, str] = field(default_factory=dict)
    """question_id -> why no verdict could be had."""
    n_requests: int = 0
    """HTTP requests made in this run, retries included."""
    n_cached: int = 0
    """Items whose verdict came from the cache."""

    def summary(self, ids: Iterable[str] | None = None) -> dict:
        """Accuracy and score over ``ids`` (all items when None); unjudged items are only counted.

        Returns ``{"n_judged", "n_unjudged", "n_yes", "n_no", "accuracy", "score"}``; accuracy and
        score are None when nothing was judged.
        """
        if ids is None:
            ids = [*self.verdicts, *self.unjudged]
        verdicts = [self.verdicts[i] for i in ids if i in self.verdicts]
        n_unjudged = sum(1 for i in ids if i in self.unjudged)
        n_yes = sum(v.pred == "yes" for v in verdicts)
        n = len(verdicts)
        return {
            "n_judged": n,
            "n_unjudged": n_unjudged,
            "n_yes": n_yes,
            "n_no": n - n_yes,
            "accuracy": n_yes / n if n else None,
            "score": sum(v.score for v in verdicts) / n if n else None,
        }


class JudgeError(UserError):
    """The run was stopped; ``result`` holds what was judged before (also kept in the cache).

    A UserError: the fix is the user's (URL, model name, API key, a server to start), so the CLI prints
    the one-line message and exits with status 2.
    """

    def __init__(self, message: str, result: JudgeResult):
        super().__init__(message)
        self.result = result


class JudgeUnreachableError(JudgeError):
    """Nothing answered at the judge URL."""


# ----------------------------------------------------------------------------------------------
# prompt and verdict parsing

_SYSTEM_PROMPT = (
    "You grade short answers to questions about videos. You are given a question, the reference "
    "answer and a model's answer. Judge meaning, not wording: a synonym or paraphrase of the "
    "reference counts as correct, a different or contradicting answer does not. Extra detail is fine "
    "as long as it does not contradict the reference."
)

_USER_TEMPLATE = (
    "Question: {question}\n"
    "Correct answer: {answer}\n"
    "Predicted answer: {pred}\n\n"
    "Is the predicted answer correct? Also rate how well it matches the correct answer with an integer "
    "from 0 (no match) to 5 (perfect match).\n"
    "Reply with nothing but a dictionary literal of the form {{\"pred\": \"yes\", \"score\": 4}}, where "
    "pred is \"yes\" or \"no\" and score is an integer from 0 to 5. Do not add any explanation."
)


def build_messages(question: str, answer: str, pred: str) -> list[dict[str, str]]:
    """Chat messages asking the judge for a ``{"pred": yes|no, "score": 0-5}`` verdict."""
    return [
        {"role": "system", "content": _SYSTEM_PROMPT},
        {"role": "user", "content": _USER_TEMPLATE.format(question=question, answer=answer, pred=pred)},
    ]


_DICT_RE = re.compile(r"\{.*?\}", re.DOTALL)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def parse_verdict(text: str) -> Verdict:
    """Read the first ``{...}`` in the judge's reply as JSON, else as a Python literal.

    Raises ValueError saying what is wrong (no dict, unparsable, pred not yes/no, score not an
    integer in 0-5).
    """
    match = _DICT_RE.search(text or "")
    if match is None:
        raise ValueError(f"no {{...}} in reply {_short(text)}")
    literal = match.group(0)
    try:
        data = json.loads(literal)
    except json.JSONDecodeError:
        try:
            data = ast.literal_eval(literal)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"unparsable verdict {_short(literal)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"verdict is not a dict: {_short(literal)}")
    pred = data.get("pred")
    if not isinstance(pred, str) or pred.strip().lower() not in ("yes", "no"):
        raise ValueError(f"verdict 'pred' must be 'yes' or 'no', got {pred!r}")
    score = data.get("score")
    if isinstance(score, str) and re.fullmatch(r"\s*\d+\s*", score):
        score = int(score)
    elif isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
        raise ValueError(f"verdict 'score' must be an integer in 0-5, got {data.get('score')!r}")
    return Verdict(pred=pred.strip().lower(), score=score)


def cache_key(model: str, question: str, answer: str, pred: str) -> str:
    """Stable hash identifying one judgement (model, question, answer, prediction, prompt version)."""
    material = json.dumps([PROMPT_VERSION, model, question, answer, pred], ensure_ascii=False)
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# HTTP


class _AttemptFailed(Exception):
    """One attempt failed. kind: refused | timeout | network | http | bad_response | verdict."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in _RETRYABLE_STATUS or self.status >= 500


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _chat(endpoint: str, payload: dict, api_key: str | None, timeout_s: float) -> str:
    """POST one chat request and return the assistant's text; raises _AttemptFailed."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urlrequest.Request(endpoint, data=json.dumps(payload).encode("utf-8"), headers=headers,
                             method="POST")
    try:
        with urlrequest.urlopen(req, timeout=timeout_s) as resp:
            body = resp.read()
    except urlerror.HTTPError as e:
        detail = _short(e.read().decode("utf-8", "replace")) if e.fp is not None else "''"
        retry_after = None
        try:
            retry_after = float(e.headers.get("Retry-After", "")) if e.headers else None
        except ValueError:
            pass
        raise _AttemptFailed("http", f"HTTP {e.code} {detail}", e.code, retry_after) from None
    except urlerror.URLError as e:
        raise _classify_network(e.reason) from None
    except (OSError, http.client.HTTPException) as e:
        raise _classify_network(e) from None
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _AttemptFailed("bad_response", f"not a chat completion: {_short(body.decode('utf-8', 'replace'))}") \
            from None
    if not isinstance(content, str):
        raise _AttemptFailed("bad_response", f"message content is {type(content).__name__}, not text")
    return content


def _classify_network(reason: object) -> _AttemptFailed:
    if isinstance(reason, ConnectionRefusedError):
        return _AttemptFailed("refused", "connection refused")
    if isinstance(reason, TimeoutError):
        return _AttemptFailed("timeout", "request timed out")
    return _AttemptFailed("network", f"{type(reason).__name__}: {reason}")


# ----------------------------------------------------------------------------------------------
# cache


class _VerdictCache:
    """Append-only JSONL of verdicts; later lines win. Thread-safe appends, flushed line by line."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        self._file = None
        if path is None or not path.exists():
            return
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"judge.cache {path} cannot be read as a UTF-8 JSONL file "
                            f"({getattr(e, 'strerror', None) or e})") from None
        bad = 0
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                self.entries[row["key"]] = Verdict(pred=row["pred"], score=int(row["score"]))
            except (ValueError, KeyError, TypeError):
                bad += 1  # e.g. a line cut short when a previous run was killed
        if bad:
            log.warning("judge cache %s: ignored %d unreadable line(s)", path, bad)

    def add(self, key: str, question_id: str, verdict: Verdict, reply: str, model: str) -> None:
        if self.path is None:
            return
        line = json.dumps({"key": key, "model": model, "question_id": question_id, "pred": verdict.pred,
                           "score": verdict.score, "reply": reply}, ensure_ascii=False)
        with self._lock:
            if self._file is None:
                self._file = self._open()
            self._file.write(line + "\n")
            self._file.flush()

    def open(self) -> None:
        """Open the file for appending now, so an unwritable cache fails before any request is made."""
        if self.path is not None:
            with self._lock:
                if self._file is None:
                    self._file = self._open()

    def _open(self):
        """The cache opened for appending, on a line of its own (a killed run may have cut the last line)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            needs_newline = self.path.exists() and self.path.stat().st_size > 0 and \
                not self.path.read_bytes().endswith(b"\n")
            file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"judge.cache {self.path} cannot be written ({e.strerror or e})") from None
        if needs_newline:
            file.write("\n")
        return file

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ----------------------------------------------------------------------------------------------
# driver


class _JudgeRun:
    """State shared by the worker threads of one ``run_judge`` call."""

    def __init__(self, cfg: JudgeConfig, cache: _VerdictCache):
        self.cfg = cfg
        self.cache = cache
        self.endpoint = _endpoint(cfg.url)
        self.api_key = (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None
        self.stop = threading.Event()
        self.fatal: str | None = None
        self.unreachable = False
        self.n_requests = 0
        self._lock = threading.Lock()

    def _abort(self, message: str, unreachable: bool) -> None:
        with self._lock:
            if self.fatal is None:
                self.fatal, self.unreachable = message, unreachable
        self.stop.set()

    def _delay(self, retry: int, failure: _AttemptFailed) -> float:
        delay = min(self.cfg.backoff_s * 2 ** (retry - 1), MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
        if failure.retry_after is not None:
            delay = max(delay, min(failure.retry_after, MAX_BACKOFF_S))
        return delay

    def judge(self, key: str, item: JudgeItem) -> tuple[Verdict | None, str | None]:
        """Verdict for one item, or (None, reason). Never raises for endpoint trouble."""
        payload = {"model": self.cfg.model, "temperature": self.cfg.temperature,
                   "messages": build_messages(item.question, item.answer, item.pred)}
        attempts = 1 + self.cfg.max_retries
        failure: _AttemptFailed | None = None
        all_refused = True
        for attempt in range(attempts):
            if attempt and self.stop.wait(self._delay(attempt, failure)):
                return None, f"run stopped after {attempt} attempt(s); last error: {failure}"
            if self.stop.is_set():
                return None, "not attempted: run stopped"
            with self._lock:
                self.n_requests += 1
            try:
                reply = _chat(self.endpoint, payload, self.api_key, self.cfg.timeout_s)
                verdict = parse_verdict(reply)
            except _AttemptFailed as e:
                failure = e
                all_refused &= e.kind == "refused"
                if not e.retryable:
                    if e.status in _FATAL_STATUS:
                        self._abort(f"judge at {self.cfg.url} rejected the request with {e} "
                                    "(check the URL, model name and API key)", unreachable=False)
                    return None, str(e)
                continue
            except ValueError as e:
                failure = _AttemptFailed("verdict", f"invalid verdict: {e}")
                all_refused = False
                continue
            self.cache.add(key, item.question_id, verdict, reply, self.cfg.model)
            return verdict, None
        if all_refused:
            self._abort(f"judge at {self.cfg.url} refused connections after {self.cfg.max_retries} retries",
                        unreachable=True)
        return None, f"{failure} (gave up after {attempts} attempt(s))"


def run_judge(items: Sequence[JudgeItem], cfg: JudgeConfig, cache_path: str | Path | None = None,
              progress: bool = False) -> JudgeResult:
    """Judge every item (cached verdicts are reused) and return verdicts and unjudged reasons.

    ``cache_path`` overrides ``cfg.cache``; with neither set nothing is cached. Items with identical
    (question, answer, prediction) share one request.

    Raises JudgeUnreachableError when nothing listens at ``cfg.url`` and JudgeError on HTTP
    401/403/404; both are raised after the workers stop, with the partial result attached and
    every verdict obtained already written to the cache.
    """
    if cfg.url is None:
        raise ValueError("judge.url is not set")
    problems = cfg.check()
    if problems:
        raise ValueError("invalid judge config: " + "; ".join(problems))
    path = cache_path if cache_path is not None else cfg.cache
    cache = _VerdictCache(Path(path) if path is not None else None)
    result = JudgeResult()

    by_key: dict[str, list[JudgeItem]] = {}
    for item in items:
        by_key.setdefault(cache_key(cfg.model, item.question, item.answer, item.pred), []).append(item)
    todo: dict[str, JudgeItem] = {}
    for key, group in by_key.items():
        if key in cache.entries:
            for item in group:
                result.verdicts[item.question_id] = cache.entries[key]
            result.n_cached += len(group)
        else:
            todo[key] = group[0]

    run = _JudgeRun(cfg, cache)
    try:
        if todo:
            cache.open()
        with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="judge") as pool, \
                _progress_bar(progress, len(todo)) as advance:
            futures = {pool.submit(run.judge, key, item): key for key, item in todo.items()}
            try:
                for future in as_completed(futures):
                    verdict, reason = future.result()
                    for item in by_key[futures[future]]:
                        if verdict is not None:
                            result.verdicts[item.question_id] = verdict
                        else:
                            result.unjudged[item.question_id] = reason
                    advance()
            except BaseException:
                run.stop.set()  # e.g. Ctrl-C: workers return now instead of finishing their retries
                raise
    finally:
        cache.close()
    result.n_requests = run.n_requests
    if run.fatal is not None:
        kept = f"; {len(result.verdicts)} verdict(s) kept" + (f" in {cache.path}" if cache.path else "")
        error = JudgeUnreachableError if run.unreachable else JudgeError
        raise error(run.fatal + kept, result)
    return result


@contextmanager
def _progress_bar(enabled: bool, total: int):
    """Yield an ``advance()`` callable, driving a rich progress bar on stderr when enabled."""
    if not enabled or total == 0:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("judging", total=total)
        yield lambda: bar.advance(task)
