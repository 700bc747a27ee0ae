"""Offline scoring: answer normalisation, exact vs contains, joining the two files, input errors."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli
from rich.console import Console

from dualfocus.evaluate.judge import JudgeConfig
from dualfocus.evaluate.metrics import contains_match, exact_match, normalize_answer, offline_metrics
from dualfocus.evaluate.score import ScoreConfig, format_report, load_answers, run_score
from dualfocus.pipeline.config import ConfigError, load_config
from dualfocus.pipeline.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("raw, expected", [
    ("The  Cat!", "cat"),
    ("a man is running.", "man is running"),
    ("An apple, THE pear", "apple pear"),
    ("theater anna", "theater anna"),          # articles only as whole words
    ("T-shirt", "t shirt"),                    # punctuation becomes a space
    ("“Quoted” answer…", "quoted answer"),     # unicode punctuation too
    ("  \tspaced\n out  ", "spaced out"),
    ("the", ""),
    (3, "3"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_versus_contains():
    assert exact_match("The dog.", "dog") and contains_match("The dog.", "dog")
    assert not exact_match("a black dog", "dog") and contains_match("a black dog", "dog")
    assert contains_match("a big black dog runs", "black dog")
    assert not contains_match("a black dog", "dog black")   # order matters
    assert not contains_match("a hotdog", "dog")             # whole tokens only
    assert not contains_match("dog", "black dog")
    assert contains_match("the", "an") and not contains_match("cat", "the")  # empty gold


def test_offline_metrics_per_type_and_untyped():
    items = [
        {"pred": "dog", "answer": "dog", "type": "what"},          # exact + contains
        {"pred": "a black dog", "answer": "dog", "type": "what"},  # contains only
        {"pred": "cat", "answer": "dog", "type": "what"},          # neither
        {"pred": "man", "answer": "woman", "type": 1},             # neither; int type becomes "1"
        {"pred": "woman", "answer": "Woman"},                      # exact, untyped
    ]
    m = offline_metrics(items)
    assert m["overall"] == {"n": 5, "exact_match": 2 / 5, "contains": 3 / 5}
    assert m["per_type"] == {
        "1": {"n": 1, "exact_match": 0.0, "contains": 0.0},
        "untyped": {"n": 1, "exact_match": 1.0, "contains": 1.0},
        "what": {"n": 3, "exact_match": 1 / 3, "contains": 2 / 3},
    }
    assert offline_metrics(items, per_type=False)["per_type"] == {}
    assert offline_metrics([{"pred": "a", "answer": "a"}])["per_type"] == {}  # no types at all
    assert offline_metrics([])["overall"] == {"n": 0, "exact_match": None, "contains": None}


@pytest.fixture
def qa_files(tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"question_id": "0", "video_id": "v0", "question": "what is shown?", "pred": "A dog.", "extra": 1},
        {"question_id": "1", "video_id": "v0", "question": "who runs?", "pred": "the tall man"},
        {"question_id": "2", "video_id": "v1", "question": "what color?", "pred": "red"},
        {"question_id": 3, "video_id": "v1", "question": "who sings?", "pred": "a girl"},
        {"question_id": "99", "video_id": "v9", "question": "orphan?", "pred": "x"},
    ])
    answers = tmp_path / "test_a.json"
    answers.write_text(json.dumps([   # int ids, as in the distributed files
        {"answer": "dog", "type": "what", "question_id": 0},
        {"answer": "man", "type": "who", "question_id": 1},
        {"answer": "blue", "type": "what", "question_id": 2},
        {"answer": "girl", "type": "who", "question_id": "3"},
        {"answer": "never predicted", "type": "who", "question_id": 42},
    ], indent=1))
    return preds, answers


def test_run_score_joins_ids_and_breaks_down_by_type(qa_files, tmp_path):
    preds, answers = qa_files
    out = tmp_path / "out" / "report.json"
    report = run_score(preds, answers, out, ScoreConfig(), progress=False)

    assert json.loads(out.read_text()) == report
    assert report["counts"] == {"predictions": 5, "answers": 5, "matched": 4,
                                "only_in_predictions": 1, "only_in_answers": 1}
    assert report["unmatched"] == {"only_in_predictions": ["99"], "only_in_answers": ["42"]}
    # exact: q0 ("A dog." vs dog), q3 ("a girl" vs girl); contains adds q1 ("the tall man" vs man)
    assert report["overall"] == {"n": 4, "exact_match": 0.5, "contains": 0.75, "judge": None}
    assert report["per_type"] == {
        "what": {"n": 2, "exact_match": 0.5, "contains": 0.5, "judge": None},
        "who": {"n": 2, "exact_match": 0.5, "contains": 1.0, "judge": None},
    }
    assert report["judge"] is None
    assert report["config"]["judge"]["url"] is None

    console = Console(record=True, width=120)
    console.print(format_report(report))
    text = " ".join(console.export_text().split())
    assert "overall" in text and "who" in text and "75.0" in text and "judge" not in text
    assert "1 prediction(s) without an answer" in text


def test_answers_as_jsonl_and_per_type_off(qa_files, tmp_path):
    preds, _ = qa_files
    answers = write_jsonl(tmp_path / "answers.jsonl", [{"question_id": 0, "answer": "dog"},
                                                       {"question_id": 2, "answer": "red", "type": "what"}])
    report = run_score(preds, answers, tmp_path / "r.json", ScoreConfig(per_type=False), progress=False)
    assert report["overall"]["n"] == 2 and report["overall"]["exact_match"] == 1.0
    assert report["per_type"] == {}


def test_no_overlap_names_both_files(qa_files, tmp_path):
    preds, _ = qa_files
    answers = write_jsonl(tmp_path / "other.jsonl", [{"question_id": "a", "answer": "x"}])
    with pytest.raises(UserError, match="no question_id is shared") as e:
        run_score(preds, answers, tmp_path / "r.json", ScoreConfig(), progress=False)
    assert str(preds) in str(e.value) and str(answers) in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_malformed_jsonl_names_file_and_line(qa_files, tmp_path):
    _, answers = qa_files
    preds = tmp_path / "bad.jsonl"
    preds.write_text('{"question_id": 0, "pred": "dog"}\n\n{"question_id": 1, "pred": "cat",}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl: malformed JSON at line 3, column \d+"):
        run_score(preds, answers, tmp_path / "r.json", ScoreConfig(), progress=False)


def test_malformed_json_list_names_file_and_position(tmp_path):
    answers = tmp_path / "test_a.json"
    answers.write_text('[\n  {"answer": "dog", "question_id": 0},\n  {"answer": "cat" "question_id": 1}\n]')
    with pytest.raises(UserError, match=r"test_a\.json: malformed JSON at line 3, column 20"):
        load_answers(answers)


@pytest.mark.parametrize("content, message", [
    ('[{"answer": "dog"}]', r"record 1 lacks 'question_id'"),
    ('{"question_id": 1}\n', r"line 1 lacks 'answer'"),
    ('\n{"question_id": 1, "answer": "a"}\n\n{"question_id": 2}\n', r"line 4 lacks 'answer'"),
    ('[1, 2]', r"record 1 is not a JSON object"),
    ('', r"answers\.json is empty"),
    ('{"question_id": 1, "answer": "a"}\n{"question_id": "1", "answer": "b"}\n',
     r"question_id '1' appears twice \(line 1 and line 2\)"),
])
def test_bad_answer_records(tmp_path, content, message):
    path = tmp_path / "answers.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_answers(path)


def test_score_config_loads_and_validates():
    cfg = load_config(ScoreConfig, overrides=["judge.url=http://127.0.0.1:9/v1", "per_type=false"])
    assert cfg.judge.url == "http://127.0.0.1:9/v1" and cfg.per_type is False
    with pytest.raises(ConfigError) as e:
        load_config(ScoreConfig, overrides=["judge.concurrency=0", "judge.backoff_s=-1", "judge.url=localhost"])
    msg = str(e.value)
    assert "judge.concurrency must be >= 1, got 0" in msg
    assert "judge.backoff_s must be >= 0, got -1" in msg
    assert "judge.url must start with http://" in msg
    assert JudgeConfig().check() == []


def test_run_score_rejects_invalid_config(qa_files, tmp_path):
    preds, answers = qa_files
    with pytest.raises(ConfigError, match="judge.max_retries must be >= 0"):
        run_score(preds, answers, tmp_path / "r.json", ScoreConfig(judge=JudgeConfig(max_retries=-1)),
                  progress=False)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["malformed_preds", "not_utf8_answers", "report_is_a_directory",
                                  "judge_refuses", "judge_cache_is_a_directory"])
def test_score_cli_errors_are_one_line_with_exit_2(qa_files, tmp_path, case):
    preds, answers = qa_files
    out = tmp_path / "report.json"
    extra: list[str] = []
    expected = {
        "malformed_preds": r"bad\.jsonl: malformed JSON at line 2, column \d+",
        "not_utf8_answers": r"latin1\.json is not UTF-8 text \(byte \d+\)",
        "report_is_a_directory": r"cannot write the report .*report\.json",
        "judge_refuses": r"judge at http://127\.0\.0\.1:\d+/v1 refused connections after 0 retries",
        "judge_cache_is_a_directory": r"judge\.cache .*cache\.jsonl cannot be read",
    }[case]
    if case == "malformed_preds":
        preds = tmp_path / "bad.jsonl"
        preds.write_text('{"question_id": 0, "pred": "dog"}\n{"question_id": 1, "pred": "cat",}\n')
    elif case == "not_utf8_answers":
        answers = tmp_path / "latin1.json"
        answers.write_bytes('[{"question_id": 0, "answer": "caf\u00e9"}]'.encode("latin-1"))
    elif case == "report_is_a_directory":
        out.mkdir()
    else:
        extra = ["--judge-url", f"http://127.0.0.1:{_closed_port()}/v1", "judge.max_retries=0"]
        if case == "judge_cache_is_a_directory":
            (tmp_path / "cache.jsonl").mkdir()
            extra.append(f"judge.cache={tmp_path / 'cache.jsonl'}")
    proc = run_cli("score", preds, answers, "--out", out, "--no-progress", *extra, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().endswith(errors[0]), proc.stderr  # one line, at the end
    assert re.search(expected, errors[0]), errors[0]
    assert not out.is_file() and not (tmp_path / "report.json.tmp").exists()
