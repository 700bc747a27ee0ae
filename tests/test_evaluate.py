"""generate / ask / score through the real CLI on a connector trained for a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_generate_writes_one_line_per_question_and_resumes(tmp_path, toy_store, toy_corpus, trained):
    preds = tmp_path / "preds.jsonl"
    questions = json.loads((toy_corpus / "test_q.json").read_text())
    proc = run_cli("generate", toy_store, toy_corpus / "test_q.json", "--checkpoint", trained, "--out", preds,
                   "--greedy", "sampling.max_new_tokens=4")
    rows = _read_jsonl(preds)
    assert sorted(r["question_id"] for r in rows) == sorted(str(q["question_id"]) for q in questions)
    assert all(set(r) >= {"question_id", "video_id", "question", "pred"} for r in rows)
    assert f"answered now {len(questions)}" in proc.stdout
    assert (tmp_path / "preds.config.yaml").is_file()

    # Drop the last two answers: a rerun answers exactly those and keeps the others.
    kept = rows[:-2]
    preds.write_text("".join(json.dumps(r) + "\n" for r in kept))
    proc = run_cli("generate", toy_store, toy_corpus / "test_q.json", "--checkpoint", trained, "--out", preds,
                   "--greedy", "sampling.max_new_tokens=4")
    assert "answered now 2" in proc.stdout and f"already in {preds} {len(kept)}" in proc.stdout
    again = _read_jsonl(preds)
    assert len(again) == len(rows)
    assert {r["question_id"]: r["pred"] for r in again} == {r["question_id"]: r["pred"] for r in rows}


def test_generate_refuses_to_add_answers_from_another_checkpoint_or_settings(tmp_path, toy_store, toy_corpus,
                                                                              trained):
    """A predictions file is one model's answers: continuing it with a retrained (or resumed-and-re-exported)
    checkpoint, or with other sampling, would silently keep the old answers and score them as the new model's."""
    from safetensors.torch import load_file, save_file

    preds = tmp_path / "preds.jsonl"
    args = ("generate", toy_store, toy_corpus / "test_q.json", "--out", preds, "sampling.max_new_tokens=4")
    run_cli(*args, "--checkpoint", trained, "--greedy")
    rows = _read_jsonl(preds)
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))  # as if interrupted

    retrained = tmp_path / "retrained"
    shutil.copytree(trained, retrained)
    weights = load_file(retrained / "connector.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, retrained / "connector.safetensors")
    for extra, named in [(("--checkpoint", retrained, "--greedy"), "another checkpoint"),
                         (("--checkpoint", trained), "sampling.greedy (True -> False)")]:
        proc = run_cli(*args, *extra, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"{preds} holds answers made with" in proc.stderr and named in proc.stderr, proc.stderr
        assert len(_read_jsonl(preds)) == len(rows) - 1                  # nothing added, nothing lost
    proc = run_cli(*args, "--checkpoint", trained, "--greedy")         # the same model and settings continue
    assert "answered now 1" in proc.stdout and len(_read_jsonl(preds)) == len(rows)


def test_generate_reports_questions_without_video(tmp_path, toy_store, toy_corpus, trained):
    questions = json.loads((toy_corpus / "test_q.json").read_text())
    questions.append({"video_name": "no_such_video.mp4", "question": "What color is it?", "question_id": "ghost"})
    qpath = tmp_path / "test_q.json"
    qpath.write_text(json.dumps(questions))
    preds = tmp_path / "preds.jsonl"
    proc = run_cli("generate", toy_store, qpath, "--checkpoint", trained, "--out", preds, "--greedy",
                   "sampling.max_new_tokens=2")
    assert "without a usable video 1" in proc.stdout
    assert "ghost" in proc.stdout
    missing = json.loads((tmp_path / "preds.missing.json").read_text())
    assert missing == [{"question_id": "ghost", "video": "no_such_video.mp4", "reason": "video not in store"}]
    assert "ghost" not in {r["question_id"] for r in _read_jsonl(preds)}


def test_ask_equals_generate_with_greedy_decoding(tmp_path, toy_store, toy_corpus, trained):
    questions = json.loads((toy_corpus / "test_q.json").read_text())[:2]
    qpath = tmp_path / "q.json"
    qpath.write_text(json.dumps(questions))
    preds = tmp_path / "preds.jsonl"
    run_cli("generate", toy_store, qpath, "--checkpoint", trained, "--out", preds, "--greedy",
            "sampling.max_new_tokens=6")
    by_id = {r["question_id"]: r["pred"] for r in _read_jsonl(preds)}
    for q in questions:
        video = toy_corpus / "videos" / f"{q['video_name']}.mp4"
        proc = run_cli("ask", video, q["question"], "--checkpoint", trained, "--greedy", "sampling.max_new_tokens=6")
        assert proc.stdout.strip() == by_id[str(q["question_id"])].strip()


def test_ask_unreadable_video_is_one_line_error(tmp_path, trained):
    bad = tmp_path / "bad.mp4"
    bad.write_text("this is not a video\n")
    proc = run_cli("ask", bad, "What color is it?", "--checkpoint", trained, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot read video")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_checkpoint_from_other_base_model_is_refused(tmp_path, toy_store, toy_corpus, trained):
    from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

    other = write_tiny_model(tmp_path / "other", TinyModelConfig(llm_layers=3))
    proc = run_cli("generate", toy_store, toy_corpus / "test_q.json", "--checkpoint", trained, "--model", other,
                   "--out", tmp_path / "p.jsonl", check=False)
    assert proc.returncode == 2
    assert "was trained on base model" in proc.stderr and str(other) in proc.stderr


def test_checkpoint_from_other_store_fingerprint_is_refused(tmp_path, toy_store, toy_corpus, trained):
    store = tmp_path / "store"
    shutil.copytree(toy_store, store)
    info = json.loads((store / "store.json").read_text())
    info["sampling"]["fps"] = 2.0
    (store / "store.json").write_text(json.dumps(info))
    proc = run_cli("generate", store, toy_corpus / "test_q.json", "--checkpoint", trained, "--out",
                   tmp_path / "p.jsonl", check=False)
    assert proc.returncode == 2
    assert "another encoder fingerprint" in proc.stderr and "fps: trained 1.0 vs store 2.0" in proc.stderr


def test_score_cli_prints_table_and_writes_report(tmp_path, toy_corpus):
    answers = json.loads((toy_corpus / "test_a.json").read_text())
    preds = tmp_path / "preds.jsonl"
    # Correct for the first half, wrong for the rest: the printed accuracy must follow.
    rows = [{"question_id": a["question_id"], "video_id": "v", "question": "q",
             "pred": a["answer"] if i < len(answers) // 2 else "purple"} for i, a in enumerate(answers)]
    preds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("score", preds, toy_corpus / "test_a.json")
    report = json.loads((tmp_path / "preds.score.json").read_text())
    expected = (len(answers) // 2) / len(answers)
    assert report["overall"]["contains"] == pytest.approx(expected)
    assert f"{100 * expected:.1f}" in proc.stdout
