"""lmms-eval's own CLI on a local toy task with ``--model dualfocus``: the same answers, item by item, as our
``generate --greedy`` + ``score``; from the store and from the raw videos; one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.long(minutes=2)

TASK = "dualfocus_toy_qa"
TASK_UTILS = '''
from dualfocus.evaluate.metrics import exact_match


def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": {"question_id": doc["question_id"], "pred": results[0],
                            "score": float(exact_match(results[0], doc["answer"]))}}


def mean_score(items):
    return sum(item["score"] for item in items) / len(items)
'''


def write_task(folder: Path, corpus: Path, questions: list[dict], video_dir: Path | None = None) -> Path:
    """A local lmms-eval task over ``questions`` of the toy corpus: YAML + utils.py + a JSON dataset."""
    answers = {a["question_id"]: a for a in json.loads((corpus / "test_a.json").read_text())}
    video_dir = video_dir or corpus / "videos"
    docs = [{"question_id": q["question_id"], "video": str(video_dir / f"{q['video_name']}.mp4"),
             "question": q["question"], "answer": answers[q["question_id"]]["answer"]} for q in questions]
    task = folder / TASK
    task.mkdir(parents=True, exist_ok=True)
    (task / "data.json").write_text(json.dumps(docs))
    (task / "utils.py").write_text(TASK_UTILS)
    (task / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task / 'data.json'}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: !function utils.mean_score
    higher_is_better: true
metadata:
  version: 0.0
""")
    return folder


def lmms_eval(tasks: Path, out: Path, model_args: str, *extra: str) -> subprocess.CompletedProcess:
    """``python -m lmms_eval --model dualfocus`` on the local task, offline, one torch thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home"), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "dualfocus", "--model_args", model_args,
                           "--tasks", TASK, "--include_path", str(tasks), "--batch_size", "1", "--device", "cpu",
                           "--output_path", str(out / "results"), "--log_samples", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def lmms_answers(out: Path) -> tuple[dict[str, str], float]:
    """question_id -> answer from lmms-eval's logged samples, and the task's aggregated exact match."""
    samples = sorted((out / "results").rglob(f"*_samples_{TASK}.jsonl"))
    results = sorted((out / "results").rglob("*_results.json"))
    assert samples and results, f"lmms-eval wrote no samples/results under {out / 'results'}"
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    # each row: doc_id, target, filtered_resps (the answer after the task's filters), the metric's own record
    answers = {row["exact_match"]["question_id"]: _text(row["filtered_resps"]) for row in rows}
    accuracy = json.loads(results[-1].read_text())["results"][TASK]["exact_match,none"]
    return answers, accuracy


def _text(resps) -> str:
    return resps[0] if isinstance(resps, list) else resps


@pytest.fixture(scope="module")
def ours(tmp_path_factory, toy_store, toy_corpus, trained) -> tuple[dict[str, str], float, list[dict]]:
    """Our own greedy answers and exact match on the toy corpus' held-out questions."""
    work = tmp_path_factory.mktemp("ours")
    questions = json.loads((toy_corpus / "test_q.json").read_text())
    run_cli("generate", toy_store, toy_corpus / "test_q.json", "--checkpoint", trained, "--out", work / "preds.jsonl",
            "--greedy", "sampling.max_new_tokens=8", "batch_size=1", "--no-progress", env={"OMP_NUM_THREADS": "1"})
    run_cli("score", work / "preds.jsonl", toy_corpus / "test_a.json", "--out", work / "score.json")
    preds = {row["question_id"]: row["pred"] for row in map(json.loads, (work / "preds.jsonl").read_text().splitlines())}
    return preds, json.loads((work / "score.json").read_text())["overall"]["exact_match"], questions


def test_lmms_eval_cli_gives_our_answers_from_the_store(tmp_path, toy_store, toy_corpus, trained, ours):
    preds, accuracy, questions = ours
    tasks = write_task(tmp_path / "tasks", toy_corpus, questions)
    proc = lmms_eval(tasks, tmp_path, f"checkpoint={trained},store={toy_store}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answers, lmms_accuracy = lmms_answers(tmp_path)
    assert answers == preds                          # every question, the same text
    assert len(set(preds.values())) > 1, preds       # and answers that differ, so agreement means something
    assert lmms_accuracy == pytest.approx(accuracy)
    assert TASK in proc.stdout                       # lmms-eval's results table was printed


def test_lmms_eval_from_raw_videos_matches_the_store(tmp_path, toy_corpus, trained, ours):
    """Without a store the adapter decodes and encodes the videos like extract: the same answers."""
    preds, _, questions = ours
    some = questions[:3]
    tasks = write_task(tmp_path / "tasks", toy_corpus, some)
    proc = lmms_eval(tasks, tmp_path, f"checkpoint={trained}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    answers, _ = lmms_answers(tmp_path)
    assert answers == {q["question_id"]: preds[q["question_id"]] for q in some}


def _edited_export(trained: Path, folder: Path, **changes) -> Path:
    """A copy of ``trained`` whose dualfocus.json has ``changes``."""
    import shutil

    export = folder / "export"
    shutil.copytree(trained, export)
    record = json.loads((export / "dualfocus.json").read_text())
    (export / "dualfocus.json").write_text(json.dumps({**record, **changes}))
    return export


@pytest.mark.parametrize("case", ["no export", "no base model", "unknown connector", "unknown key", "missing video"])
def test_bad_input_ends_lmms_eval_with_one_line(tmp_path, toy_corpus, trained, case):
    questions = json.loads((toy_corpus / "test_q.json").read_text())[:2]
    model_args = f"checkpoint={trained}"
    video_dir = None
    if case == "no export":
        model_args, expected = f"checkpoint={tmp_path / 'nowhere'}", "no dualfocus export at"
    elif case == "no base model":
        export = _edited_export(trained, tmp_path, base_model=str(tmp_path / "gone"))
        model_args, expected = f"checkpoint={export}", f"not found at {tmp_path / 'gone'}; pass model=DIR in --model_args"
    elif case == "unknown connector":
        export = _edited_export(trained, tmp_path, connector="nosuch")
        model_args, expected = f"checkpoint={export}", "nosuch"
    elif case == "unknown key":
        model_args, expected = f"checkpoint={trained},temprature=0.5", "unknown model_args temprature"
    else:
        video_dir, expected = tmp_path / "moved", "2 of 2 videos not found"
    tasks = write_task(tmp_path / "tasks", toy_corpus, questions, video_dir=video_dir)
    proc = lmms_eval(tasks, tmp_path, model_args)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dualfocus (lmms-eval): ") and expected in last, proc.stderr[-2000:]
    assert not list((tmp_path / "results").rglob("*_samples_*.jsonl"))


def test_continuation_logprobs_are_the_training_loss_and_flag_greedy(toy_store, toy_corpus, trained):
    """``loglikelihood``'s numbers: with the EOS label kept, the sum equals -(training loss x labelled tokens);
    the model's own greedy answer is flagged greedy and scores above another word."""
    from dualfocus.evaluate.video_qa import VideoQA

    qa = VideoQA(str(trained), store=str(toy_store), device="cpu")
    q = json.loads((toy_corpus / "test_q.json").read_text())[0]
    video = str(toy_corpus / "videos" / f"{q['video_name']}.mp4")
    item = qa.item(video, q["question"], qa.features(video), answer="red square")
    batch = qa.collate([item]).to("cpu", qa.predictor.dtype)
    labelled = sum(1 for t in item["sample"].text_labels if t != -100)
    loss = float(qa.predictor.model(batch))
    ((total, _),) = qa.predictor.continuation_logprobs(batch)
    assert total == pytest.approx(-loss * labelled, rel=1e-4)

    # The model's own greedy tokens, scored as ids (a decoded word re-tokenised may split differently).
    from dataclasses import replace

    asked = qa.item(video, q["question"], qa.features(video))
    prompt = asked["sample"]
    tok = qa.predictor.tokenizer
    (new,) = qa.predictor.model.generate(qa.collate([asked]).to("cpu", qa.predictor.dtype), max_new_tokens=2,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert new                                       # at least one token before any EOS

    def scored(ids: list[int]):
        sample = replace(prompt, text_ids=prompt.text_ids + ids, text_labels=[-100] * len(prompt.text_ids) + ids)
        return qa.predictor.continuation_logprobs(qa.collate([{**asked, "sample": sample}]))[0]

    other = (new[-1] + 1) % len(tok)
    (mine, mine_greedy), (theirs, theirs_greedy) = scored(new), scored(new[:-1] + [other])
    assert mine_greedy and not theirs_greedy
    assert mine > theirs                             # same prefix, the argmax last token scores highest


def test_loglikelihood_requests_give_each_options_negative_logprob(toy_store, toy_corpus, trained):
    """The model's ``loglikelihood`` on lmms-eval ``Instance``s as a ``multiple_choice`` task builds them (one per
    option, continuation " option"): our log-probabilities negated, so lmms-eval's argmin picks the likeliest.
    (lmms-eval 0.7.3's own CLI cannot score multiple_choice tasks: it turns every loglikelihood result into a
    string, ``api/instance.py:unwrap_generation_output``, and its scorer then fails to unpack it.)"""
    import numpy as np
    from lmms_eval.api.instance import Instance

    from dualfocus.evaluate.lmms_model import DualFocusLMM

    q = json.loads((toy_corpus / "test_q.json").read_text())[0]
    video = str(toy_corpus / "videos" / f"{q['video_name']}.mp4")
    lm = DualFocusLMM(checkpoint=str(trained), store=str(toy_store), batch_size="1", device="cpu")
    lm.task_dict = {TASK: {"test": [{"video": video, "question": q["question"]}]}}
    options = ("red", "green", "blue", "yellow")
    requests = [Instance(request_type="loglikelihood", idx=i, metadata={"task": TASK, "doc_id": 0, "repeats": 1},
                         arguments=(q["question"], " " + option, lambda doc: [doc["video"]], 0, TASK, "test"))
                for i, option in enumerate(options)]
    scores = lm.loglikelihood(requests)
    ours = lm.qa.continuation_logprobs([(video, q["question"], option) for option in options])
    assert [s for s, _ in scores] == pytest.approx([-o for o, _ in ours], rel=1e-6)
    assert options[int(np.argmin([s for s, _ in scores]))] == options[int(np.argmax([o for o, _ in ours]))]
    assert all(s > 0 for s, _ in scores)
