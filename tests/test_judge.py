"""LLM-judge protocol against real local HTTP servers speaking the chat-completions API."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from dualfocus.evaluate.judge import (JudgeConfig, JudgeError, JudgeItem, JudgeUnreachableError, Verdict,
                                      build_messages, parse_verdict, run_judge)
from dualfocus.evaluate.score import ScoreConfig, format_report, run_score

# ----------------------------------------------------------------------------------------------
# a fake judge server


def reply(content):
    return ("reply", content)


def status(code):
    return ("status", code)


DROP = ("drop",)  # close the connection without answering


class FakeJudge:
    """ThreadingHTTPServer on 127.0.0.1:<free port>. ``behave(fields, attempt)`` decides each answer from
    the prompt's fields (question / answer / pred) and how many times this question was asked before."""

    def __init__(self, behave):
        self.behave = behave
        self.requests: list[dict] = []       # one per request: path, headers, payload, fields
        self.attempts: Counter = Counter()   # question -> requests seen
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                fields = {key: re.search(rf"^{label}: (.*)$", user, re.M).group(1)
                          for key, label in [("question", "Question"), ("answer", "Correct answer"),
                                             ("pred", "Predicted answer")]}
                with judge.lock:
                    attempt = judge.attempts[fields["question"]]
                    judge.attempts[fields["question"]] += 1
                    judge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                           "payload": body, "fields": fields})
                action = judge.behave(fields, attempt)
                if action[0] == "drop":
                    self.close_connection = True
                    return
                if action[0] == "hold":  # answer only once the test releases it (or after 60 s)
                    action[1].wait(60)
                    action = action[2]
                if action[0] == "status":
                    self._send(action[1], {"error": {"message": "fake failure"}})
                else:
                    self._send(200, {"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": action[1]},
                         "finish_reason": "stop"}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

        class Server(ThreadingHTTPServer):
            block_on_close = False

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def judge_server():
    servers = []

    def start(behave):
        servers.append(FakeJudge(behave))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def fair(fields, attempt):
    """yes when the correct answer string appears in the prediction; score 5 if identical, 4 if only
    contained, 1 otherwise. Replies in varied but valid formats."""
    answer, pred = fields["answer"].lower(), fields["pred"].lower()
    if answer == pred:
        return reply('{"pred": "yes", "score": 5}')
    if answer in pred:
        return reply("Sure. {'pred': 'yes', 'score': 4}")
    return reply("{'pred': 'no', 'score': 1}\nThe prediction names something else.")


ITEMS = [
    JudgeItem("0", "what animal is shown?", "dog", "dog"),             # yes 5
    JudgeItem("1", "what animal runs?", "dog", "a black dog"),         # yes 4
    JudgeItem("2", "what animal sleeps?", "cat", "a dog"),             # no 1
    JudgeItem("3", "who is talking?", "man", "a boy"),                 # no 1
    JudgeItem("4", "what does she hold?", "cup", "a red cup"),         # yes 4
]
# accuracy 3/5, score (5 + 4 + 1 + 1 + 4) / 5
FAIR_ACCURACY, FAIR_SCORE = 0.6, 3.0


def cfg_for(url, **kw):
    kw.setdefault("backoff_s", 0.001)
    kw.setdefault("max_retries", 2)
    kw.setdefault("timeout_s", 5)
    return JudgeConfig(url=url, api_key_env="DF_TEST_JUDGE_KEY", **kw)


def cache_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# verdict parsing


@pytest.mark.parametrize("text, expected", [
    ('{"pred": "yes", "score": 4}', Verdict("yes", 4)),
    ("{'pred': 'no', 'score': 0}", Verdict("no", 0)),
    ("Here you go: {'pred': 'YES', 'score': 5.0} hope it helps {'pred': 'no'}", Verdict("yes", 5)),
    ('{"score": "3", "pred": " No "}', Verdict("no", 3)),
    ("{\n 'pred': 'yes',\n 'score': 2\n}", Verdict("yes", 2)),
])
def test_parse_verdict_accepts(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text, message", [
    ("yes, score 4", r"no \{\.\.\.\}"),
    ("", r"no \{\.\.\.\}"),
    ("{pred: yes, score: 4}", "unparsable"),
    ("{'pred': 'maybe', 'score': 3}", "'pred' must be 'yes' or 'no'"),
    ("{'pred': 'yes', 'score': 9}", "'score' must be an integer in 0-5"),
    ("{'pred': 'yes', 'score': 2.5}", "'score' must be an integer"),
    ("{'pred': 'yes', 'score': True}", "'score' must be an integer"),
    ("{'pred': 'yes'}", "'score' must be an integer"),
    ("{1, 2}", "not a dict"),
])
def test_parse_verdict_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_verdict(text)


def test_prompt_carries_the_three_fields():
    messages = build_messages("what is it?", "dog", "a cat")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "what is it?" in user and "dog" in user and "a cat" in user and '"pred"' in user


# ----------------------------------------------------------------------------------------------
# servers


def test_well_behaved_judge(judge_server, tmp_path):
    server = judge_server(fair)
    result = run_judge(ITEMS, cfg_for(server.url, model="judge-model", temperature=0.0))
    assert result.verdicts == {"0": Verdict("yes", 5), "1": Verdict("yes", 4), "2": Verdict("no", 1),
                               "3": Verdict("no", 1), "4": Verdict("yes", 4)}
    summary = result.summary()
    assert summary == {"n_judged": 5, "n_unjudged": 0, "n_yes": 3, "n_no": 2,
                       "accuracy": FAIR_ACCURACY, "score": pytest.approx(FAIR_SCORE)}
    assert result.summary(["0", "2"]) == {"n_judged": 2, "n_unjudged": 0, "n_yes": 1, "n_no": 1,
                                          "accuracy": 0.5, "score": 3.0}
    assert result.n_requests == len(server.requests) == 5
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["payload"]["model"] == "judge-model" and first["payload"]["temperature"] == 0.0


def test_intermittent_failures_are_retried(judge_server):
    def flaky(fields, attempt):
        if attempt == 0:
            return status(500)
        if attempt == 1:
            return status(429) if fields["question"] != "who is talking?" else DROP
        return fair(fields, attempt)

    server = judge_server(flaky)
    result = run_judge(ITEMS, cfg_for(server.url, max_retries=2, concurrency=3))
    assert result.unjudged == {}
    assert result.summary()["accuracy"] == FAIR_ACCURACY
    assert result.summary()["score"] == pytest.approx(FAIR_SCORE)
    assert result.n_requests == len(server.requests) == 3 * len(ITEMS)


def test_timeouts_are_retried(judge_server):
    # Each question's first request is held unanswered until the run is over, so only a client that gives
    # up on it (timeout) and asks again can finish: no wall-clock race, whatever the machine's load.
    release = threading.Event()

    def held_first(fields, attempt):
        return ("hold", release, fair(fields, attempt)) if attempt == 0 else fair(fields, attempt)

    server = judge_server(held_first)
    try:
        result = run_judge(ITEMS[:2], cfg_for(server.url, timeout_s=2))
    finally:
        release.set()
    assert set(result.verdicts) == {"0", "1"} and result.unjudged == {}
    assert result.summary()["accuracy"] == 1.0
    assert len(server.requests) == 4


def test_malformed_verdicts_are_unjudged_not_zero(judge_server, tmp_path):
    garbage = ["I think it is right.", "{'pred': 'maybe', 'score': 3}", "{'pred': 'yes', 'score': 9}"]

    def sloppy(fields, attempt):
        if fields["answer"] in ("dog", "cat"):   # items 0, 1, 2 never get a valid verdict
            return reply(garbage[attempt % 3])
        return fair(fields, attempt)

    server = judge_server(sloppy)
    cache = tmp_path / "cache.jsonl"
    cfg = cfg_for(server.url, max_retries=2)
    result = run_judge(ITEMS, cfg, cache_path=cache)
    assert set(result.unjudged) == {"0", "1", "2"}
    for reason in result.unjudged.values():
        assert "invalid verdict" in reason and "gave up after 3 attempt(s)" in reason
    # only items 3 (no, 1) and 4 (yes, 4) count; the unjudged ones are not zeros
    assert result.summary() == {"n_judged": 2, "n_unjudged": 3, "n_yes": 1, "n_no": 1,
                                "accuracy": 0.5, "score": 2.5}
    assert len(server.requests) == 3 * 3 + 2

    # unjudged items are not cached: a rerun asks only for them
    assert sorted(row["question_id"] for row in cache_lines(cache)) == ["3", "4"]
    again = run_judge(ITEMS, cfg, cache_path=cache)
    assert again.n_cached == 2 and again.n_requests == 3 * 3
    assert set(again.unjudged) == {"0", "1", "2"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_fails_clearly_and_keeps_cache(judge_server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    server = judge_server(fair)
    run_judge(ITEMS[:2], cfg_for(server.url), cache_path=cache)   # a first, partial run
    assert len(cache_lines(cache)) == 2

    dead = f"http://127.0.0.1:{free_port()}/v1"
    t0 = time.monotonic()
    with pytest.raises(JudgeUnreachableError, match=rf"judge at {re.escape(dead)} refused connections "
                                                    r"after 2 retries; 2 verdict\(s\) kept in .*cache\.jsonl"):
        try:
            run_judge(ITEMS, cfg_for(dead, max_retries=2, concurrency=2), cache_path=cache)
        except JudgeUnreachableError as e:
            partial = e.result
            raise
    assert time.monotonic() - t0 < 30  # no long backoff (a loose bound: only a hang fails it)
    assert set(partial.verdicts) == {"0", "1"} and partial.n_cached == 2
    assert set(partial.unjudged) == {"2", "3", "4"}
    # the abort does not make every remaining item retry: at most one full round per worker
    assert partial.n_requests <= 2 * 3
    assert len(cache_lines(cache)) == 2


def test_rejected_key_stops_the_run(judge_server):
    server = judge_server(lambda fields, attempt: status(401))
    with pytest.raises(JudgeError, match=r"rejected the request with HTTP 401") as e:
        run_judge(ITEMS, cfg_for(server.url, concurrency=2))
    assert not isinstance(e.value, JudgeUnreachableError)
    assert len(server.requests) <= 2   # not retried, and the other items are not attempted


def test_second_run_is_served_from_cache(judge_server, tmp_path):
    server = judge_server(fair)
    cache = tmp_path / "sub" / "cache.jsonl"
    items = ITEMS + [JudgeItem("5", "what animal is shown?", "dog", "dog")]   # same as item 0
    cfg = cfg_for(server.url)
    first = run_judge(items, cfg, cache_path=cache)
    assert len(server.requests) == 5 and first.verdicts["5"] == Verdict("yes", 5)

    second = run_judge(items, cfg, cache_path=cache)
    assert len(server.requests) == 5 and second.n_requests == 0 and second.n_cached == 6
    assert second.verdicts == first.verdicts

    # a line cut short by a killed run is ignored, and later appends still land on their own line
    with cache.open("a") as f:
        f.write('{"key": "abc", "pr')
    new = JudgeItem("6", "what is poured?", "milk", "milk")
    third = run_judge(items + [new], cfg, cache_path=cache)
    assert third.n_requests == 1 and third.verdicts["6"] == Verdict("yes", 5)
    assert len(run_judge(items + [new], cfg, cache_path=cache).verdicts) == 7
    assert len(server.requests) == 6

    # another judge model does not reuse these verdicts
    other = run_judge(items[:1], cfg_for(server.url, model="other-model"), cache_path=cache)
    assert other.n_cached == 0 and other.n_requests == 1


def test_authorization_header_from_env(judge_server, tmp_path, monkeypatch):
    server = judge_server(fair)
    monkeypatch.delenv("DF_TEST_JUDGE_KEY", raising=False)
    run_judge(ITEMS[:1], cfg_for(server.url))
    assert server.requests[-1]["auth"] is None

    monkeypatch.setenv("DF_TEST_JUDGE_KEY", "sk-not-a-real-key")
    cache = tmp_path / "cache.jsonl"
    run_judge(ITEMS[1:2], cfg_for(server.url), cache_path=cache)
    assert server.requests[-1]["auth"] == "Bearer sk-not-a-real-key"
    assert "sk-not-a-real-key" not in cache.read_text()


# ----------------------------------------------------------------------------------------------
# the score stage with a judge


def test_run_score_with_judge(judge_server, tmp_path):
    def fair_but_one_broken(fields, attempt):
        return reply("no idea") if fields["question"] == "who sings?" else fair(fields, attempt)

    server = judge_server(fair_but_one_broken)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 0, "video_id": "v0", "question": "what is shown?", "pred": "a dog"},
        {"question_id": 1, "video_id": "v0", "question": "what color?", "pred": "red"},
        {"question_id": 2, "video_id": "v1", "question": "who runs?", "pred": "man"},
        {"question_id": 3, "video_id": "v1", "question": "who sings?", "pred": "a girl"},
    ]))
    answers = tmp_path / "test_a.json"
    answers.write_text(json.dumps([{"answer": "dog", "type": "what", "question_id": "0"},
                                   {"answer": "blue", "type": "what", "question_id": "1"},
                                   {"answer": "man", "type": "who", "question_id": "2"},
                                   {"answer": "girl", "type": "who", "question_id": "3"}]))
    out = tmp_path / "reports" / "msvd.json"
    cfg = ScoreConfig(judge=cfg_for(server.url, max_retries=1))
    report = run_score(preds, answers, out, cfg, progress=False)

    assert json.loads(out.read_text()) == report
    # judged: 0 yes/4, 1 no/1, 2 yes/5; item 3 unjudged and excluded
    assert report["overall"]["judge"] == {"n_judged": 3, "n_unjudged": 1, "n_yes": 2, "n_no": 1,
                                          "accuracy": pytest.approx(2 / 3), "score": pytest.approx(10 / 3)}
    assert report["per_type"]["what"]["judge"] == {"n_judged": 2, "n_unjudged": 0, "n_yes": 1, "n_no": 1,
                                                   "accuracy": 0.5, "score": 2.5}
    assert report["per_type"]["who"]["judge"] == {"n_judged": 1, "n_unjudged": 1, "n_yes": 1, "n_no": 0,
                                                  "accuracy": 1.0, "score": 5.0}
    assert report["overall"]["exact_match"] == 0.75 and report["overall"]["contains"] == 0.75
    judge = report["judge"]
    assert judge["url"] == server.url and judge["n_requests"] == 3 + 2 and judge["n_cached"] == 0
    assert [u["question_id"] for u in judge["unjudged"]] == ["3"]
    assert "no {...}" in judge["unjudged"][0]["reason"]
    assert judge["cache"] == str(tmp_path / "reports" / "msvd.judge_cache.jsonl")
    assert len(cache_lines(tmp_path / "reports" / "msvd.judge_cache.jsonl")) == 3

    console = Console(record=True, width=150)
    console.print(format_report(report))
    text = console.export_text()
    assert "judge acc %" in text and "66.7" in text and "3.33" in text

    again = run_score(preds, answers, out, cfg, progress=False)
    assert again["judge"]["n_cached"] == 3 and again["judge"]["n_requests"] == 2   # only the unjudged one


def test_run_score_refused_judge_writes_no_report(tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"question_id": 0, "question": "q?", "pred": "a"}) + "\n")
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "answer": "a"}) + "\n")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(JudgeUnreachableError, match="refused connections after 1 retries"):
        run_score(preds, answers, tmp_path / "r.json", ScoreConfig(judge=cfg_for(dead, max_retries=1)),
                  progress=False)
    assert not (tmp_path / "r.json").exists()


def test_judge_errors_are_user_errors_and_an_unwritable_cache_fails_before_any_request(judge_server, tmp_path):
    from dualfocus.pipeline.errors import USER_ERRORS

    assert issubclass(JudgeError, USER_ERRORS) and issubclass(JudgeUnreachableError, USER_ERRORS)  # one line, exit 2
    server = judge_server(fair)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache's folder should be")
    with pytest.raises(USER_ERRORS, match=r"judge\.cache .*cache\.jsonl cannot be written"):
        run_judge(ITEMS, cfg_for(server.url), cache_path=blocker / "cache.jsonl")
    assert server.requests == []  # nothing asked, so nothing judged is lost
    (tmp_path / "cache.jsonl").write_bytes(b'{"key": "\xff"}\n')
    with pytest.raises(USER_ERRORS, match=r"judge\.cache .*cache\.jsonl cannot be read"):
        run_judge(ITEMS, cfg_for(server.url), cache_path=tmp_path / "cache.jsonl")
