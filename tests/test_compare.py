"""``dualfocus compare``: the table's layout, the resume rules, and the real CLI end to end (a connector whose
stream is missing, the extract command it prints, the rerun that skips the finished connector)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from dualfocus.compare.config import CompareConfig
from dualfocus.compare.run import DONE, MISSING, Row, chance_row, mean_visual_tokens
from dualfocus.compare.table import header, question_types, render_markdown
from dualfocus.pipeline.config import describe_differences
from conftest import proc_stat, run_cli

pytestmark = pytest.mark.long(minutes=2)


def _row(name: str, per_type: dict, **kw) -> Row:
    return Row(name, DONE, accuracy=0.5, per_type=per_type, trainable_params=1234, visual_tokens=64.0,
               samples_per_s=10.0, peak_memory_mib=900.0, memory_kind="rss", bytes_per_sample=2048.0, **kw)


def test_table_columns_follow_the_rows_types_and_judge():
    rows = [_row("a", {"color": 1.0, "shape": 0.25}), _row("b", {"shape": 0.5, "count": 0.0}),
            Row("c", MISSING, "the store lacks grid; add with: dualfocus extract CORPUS --out s --pixels 112")]
    assert question_types(rows) == ["color", "shape", "count"]
    head = header(rows)
    assert head[:5] == ["connector", "overall", "colour", "shape", "count"] and "judge acc" not in head
    md = render_markdown(rows).splitlines()
    assert len(md) == 2 + 3 and all(line.count("|") == len(head) + 1 for line in md)
    assert "| a | 0.500 | 1.000 | 0.250 |  | 1,234 | 64.0 | 10.0 | 900 | 2.0 |  |" == md[2]
    assert md[4].startswith("| c |") and md[4].endswith("missing streams: the store lacks grid; add with: "
                                                          "dualfocus extract CORPUS --out s --pixels 112 |")
    judged = [_row("a", {"color": 1.0}, judge_accuracy=0.75, judge_score=3.5)]
    assert header(judged)[3:5] == ["judge acc", "judge score"]
    assert "| 0.750 | 3.50 |" in render_markdown(judged)


def test_differences_name_nested_keys():
    old = {"train": {"max_steps": 3, "optim": {"lr": 0.001}}, "test_q": "q.json"}
    new = {"train": {"max_steps": 4, "optim": {"lr": 0.001}}, "test_q": "q.json", "judge": {"url": None}}
    assert describe_differences(old, new) == ["judge (None -> {'url': None})", "train.max_steps (3 -> 4)"]
    assert describe_differences(new, new) == []


def test_visual_tokens_are_averaged_per_video_first(tmp_path: Path):
    preds = tmp_path / "p.jsonl"
    lines = [{"question_id": "1", "video_id": "a", "pred": "x", "visual_tokens": 10},
             {"question_id": "2", "video_id": "a", "pred": "x", "visual_tokens": 20},
             {"question_id": "3", "video_id": "b", "pred": "x", "visual_tokens": 40}]
    preds.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert mean_visual_tokens(preds) == pytest.approx((15 + 40) / 2)


def test_chance_row_is_a_uniform_guess_per_type(tmp_path: Path):
    answers = [{"question_id": i, "answer": a, "type": t} for i, (a, t) in enumerate(
        [("Red", "color"), ("blue", "color"), ("red.", "color"), ("circle", "shape"), ("one", "count"),
         ("two", "count"), ("three", "count"), ("two", "count")])]
    (tmp_path / "a.json").write_text(json.dumps(answers))
    row = chance_row(str(tmp_path / "a.json"))
    assert row.per_type == pytest.approx({"color": 1 / 2, "shape": 1.0, "count": 1 / 3})
    assert row.accuracy == pytest.approx((3 / 2 + 1 + 4 / 3) / 8)
    md = render_markdown([_row("a", {"color": 1.0}), row]).splitlines()
    assert md[3].startswith("| chance | 0.479 | 0.500 | 1.000 | 0.333 |  |") and "uniform guess" in md[3]


def test_config_refuses_shared_keys_in_overrides_and_unknown_recipes():
    cfg = CompareConfig(store="s", train="t", test_q="q", test_a="a", model="m", out="o",
                        connectors=["dualfocus", "mine"], train_overrides=["max_steps=5", "llm_dtype=bfloat16"])
    problems = " ".join(cfg.check())
    assert "recipes has no entry for connector 'mine'" in problems
    assert "train_overrides sets max_steps=5" in problems and "llm_dtype" not in problems


def test_compare_cli_reports_missing_stream_then_resumes(toy_store: Path, toy_corpus: Path, tiny_model: Path,
                                                         tmp_path: Path):
    """The shipped tiny recipes, a few steps: Slow-Fast's grid is not in an eva-only store, so its row says so
    with the extract command; that command is run as printed, and the rerun trains Slow-Fast alone."""
    store = shutil.copytree(toy_store, tmp_path / "store")
    out = tmp_path / "cmp"
    args = ["compare", store, toy_corpus / "train.json", toy_corpus / "test_q.json", toy_corpus / "test_a.json",
            "--model", tiny_model, "--out", out, "--connectors", "dualfocus,slowfast", "--max-steps", "3",
            "--no-progress"]
    first = run_cli(*args)
    table = json.loads((out / "compare.json").read_text())
    rows = {r["connector"]: r for r in table["rows"]}
    assert list(rows) == ["dualfocus", "slowfast", "chance"]
    done = rows["dualfocus"]
    assert done["status"] == DONE and done["steps"] == 3 and done["settings"]["train"]["data"]["batch_size"] == 8
    assert 0 <= done["accuracy"] <= 1 and set(done["per_type"]) == {"color", "shape", "direction"}
    assert done["trainable_params"] > 0 and done["samples_per_s"] > 0 and done["peak_memory_mib"] > 100
    assert done["visual_tokens"] == pytest.approx(32 * 4, rel=0.5) and done["bytes_per_sample"] > 0
    missing = rows["slowfast"]
    assert missing["status"] == MISSING and "slowfast.grid" in missing["message"]
    assert "slowfast: missing streams" in first.stdout
    for name in ("compare.md", "compare.json", "compare.png", "compare_config.yaml", "dualfocus/result.json"):
        assert (out / name).is_file(), name
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 5 and md[2].startswith("| dualfocus | ") and md[3].startswith("| slowfast | ")
    assert md[4].startswith("| chance | ")

    command = shlex.split(missing["message"].split("add them with: ", 1)[1])
    assert command[:2] == ["dualfocus", "extract"]
    run_cli(*[str(toy_corpus / "videos") if a == "CORPUS" else a for a in command[1:]], "--no-progress")

    trained_at = (out / "dualfocus" / "train.json").stat().st_mtime_ns
    second = run_cli(*args)
    assert "dualfocus: already done" in second.stdout
    assert (out / "dualfocus" / "train.json").stat().st_mtime_ns == trained_at
    rows = {r["connector"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["dualfocus"] == done
    assert rows["slowfast"]["status"] == DONE and rows["slowfast"]["steps"] == 3
    assert rows["slowfast"]["visual_tokens"] == pytest.approx(64)  # 4 fast frames x 16 pooled tokens

    changed = run_cli(*[a if a != "3" else "4" for a in args], check=False)
    assert changed.returncode == 2 and "train.max_steps (3 -> 4)" in changed.stdout + changed.stderr


def _children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        fields = proc_stat(entry.name) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_killing_compare_stops_its_training_child(toy_store: Path, toy_corpus: Path, tiny_model: Path,
                                                  tmp_path: Path):
    """SIGTERM to the compare process alone (a scheduler, `kill PID`) ends the training child it spawned too."""
    import os
    import signal
    import subprocess
    import time

    from conftest import dualfocus_command

    out = tmp_path / "cmp"
    proc = subprocess.Popen([*dualfocus_command(), "compare", str(toy_store), str(toy_corpus / "train.json"),
                             str(toy_corpus / "test_q.json"), str(toy_corpus / "test_a.json"), "--model",
                             str(tiny_model), "--out", str(out), "--connectors", "dualfocus", "--max-steps", "100000",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    trainers: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (out / "dualfocus" / "run" / "train_config.yaml").is_file():  # the child's run has begun
            assert proc.poll() is None and time.monotonic() < deadline, "compare ended or never started training"
            time.sleep(0.5)
        trainers = _children(proc.pid)
        assert trainers, "no training child found"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in trainers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in trainers), "the training child outlived compare"
    finally:
        for pid in [proc.pid, *trainers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
