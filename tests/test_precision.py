"""Inference at the training precision, on the device asked for: a connector trained with the shipped
default recipe (bf16 LLM, configs/ds_zero2_bf16.json) answers through the real ``generate`` and ``ask``;
every inference dtype runs connector, LLM and features in one dtype; device settings resolve one way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import lmms_answer, run_cli

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bf16_export(tmp_path_factory, tiny_model, toy_corpus, toy_store) -> Path:
    """RUN_DIR/final of 2 steps of the default recipe (no --config: llm_dtype bfloat16, DeepSpeed bf16)."""
    run = tmp_path_factory.mktemp("bf16") / "run"
    run_cli("train", toy_store, toy_corpus / "train.json", "--model", tiny_model, "--out", run, "--no-progress",
            "max_steps=2", "save_every=2", "data.batch_size=2", "data.num_workers=0", cwd=REPO,
            env={"OMP_NUM_THREADS": "1"})
    return run / "final"


def _questions(toy_corpus: Path, tmp_path: Path, n: int) -> tuple[Path, list[dict]]:
    questions = json.loads((toy_corpus / "test_q.json").read_text())[:n]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    return path, questions


def test_bf16_default_recipe_export_answers_through_generate_and_ask(tmp_path, toy_store, toy_corpus, bf16_export):
    meta = json.loads((bf16_export / "dualfocus.json").read_text())
    assert meta["llm_dtype"] == "bfloat16"   # the shipped default, the precision that used to crash generate/ask
    qpath, questions = _questions(toy_corpus, tmp_path, 2)
    preds = tmp_path / "preds.jsonl"
    proc = run_cli("generate", toy_store, qpath, "--checkpoint", bf16_export, "--out", preds, "--greedy",
                   "--device", "auto", "sampling.max_new_tokens=4", "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert "answered now 2" in proc.stdout
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [str(q["question_id"]) for q in questions]
    assert all(isinstance(r["pred"], str) and r["pred"] for r in rows)

    first = questions[0]
    video = toy_corpus / "videos" / f"{first['video_name']}.mp4"
    proc = run_cli("ask", video, first["question"], "--checkpoint", bf16_export, "--greedy", "--device", "auto",
                   "sampling.max_new_tokens=4", env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.strip() == rows[0]["pred"].strip()
    # the lmms-eval model on the same bf16 export and video (evaluate/lmms_model.py), as lmms-eval calls it
    assert lmms_answer(bf16_export, video, first["question"], max_new_tokens=4) == rows[0]["pred"].strip()


def _store_batch(toy_store: Path, toy_corpus: Path, tiny_model: Path, n: int = 2):
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset

    prepared = prepare_samples(str(toy_store), str(toy_corpus / "test_q.json"), str(tiny_model), with_answers=False)
    dataset = FeatureQADataset(str(toy_store), prepared.samples[:n], 4)
    return collate([dataset[i] for i in range(n)], prepared.qformer_pad_id)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_connector_llm_and_features_run_in_one_dtype(dtype, toy_store, toy_corpus, tiny_model, bf16_export):
    from dualfocus.evaluate.predictor import Predictor, SamplingConfig

    predictor = Predictor(bf16_export, str(tiny_model), dtype=dtype, device="cpu")
    want = getattr(torch, dtype)
    assert predictor.dtype == want and predictor.device == torch.device("cpu")
    model = predictor.model
    for name, part in [("semantic", model.connector.semantic), ("time_embedding", model.connector.time_embedding),
                       ("ffp", model.connector.ffp), ("llm", model.llm)]:
        dtypes = {p.dtype for p in part.parameters() if p.is_floating_point()}
        assert dtypes == {want}, f"{name} parameters are {dtypes}"
    batch = _store_batch(toy_store, toy_corpus, tiny_model)
    seen = {}

    def record(module, args, out):  # returns None, so the output is left as it is
        seen["ffp"] = out.dtype

    predictor.model.connector.ffp.register_forward_hook(record)
    answers = predictor.answer(batch, SamplingConfig(greedy=True, max_new_tokens=3))
    assert seen["ffp"] == want
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_fp16_inference_of_a_bf16_export_through_generate(tmp_path, toy_store, toy_corpus, bf16_export):
    """DeepSpeed cannot train fp16 on a CPU, so the fp16 case runs a real (bf16) export at llm_dtype=float16."""
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.evaluate.predictor import SamplingConfig

    qpath, _ = _questions(toy_corpus, tmp_path, 2)
    out = tmp_path / "fp16.jsonl"
    cfg = GenerateConfig(store=str(toy_store), questions=str(qpath), checkpoint=str(bf16_export), out=str(out),
                         llm_dtype="float16", device="cpu", sampling=SamplingConfig(greedy=True, max_new_tokens=3))
    summary = run_generate(cfg, progress=False)
    assert summary.written == 2
    assert all(isinstance(json.loads(line)["pred"], str) for line in out.read_text().splitlines())


def test_device_that_cannot_be_had_fails_before_any_output(tmp_path, toy_store, toy_corpus, bf16_export, monkeypatch):
    from dualfocus.evaluate.generate import GenerateConfig, run_generate
    from dualfocus.pipeline.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    qpath, _ = _questions(toy_corpus, tmp_path, 2)
    out = tmp_path / "preds.jsonl"
    out.write_text('{"question_id": "kept", "pred": "x"}\n')
    cfg = GenerateConfig(store=str(toy_store), questions=str(qpath), checkpoint=str(bf16_export), out=str(out),
                         device="cuda:0")
    with pytest.raises(UserError, match=r"^device is 'cuda:0', but torch .* sees no CUDA GPU") as err:
        run_generate(cfg, progress=False)
    assert "\n" not in str(err.value)
    assert out.read_text() == '{"question_id": "kept", "pred": "x"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl", "q.json"]


def test_export_with_an_unknown_dtype_is_one_line_naming_the_file(tmp_path, tiny_model, bf16_export):
    import shutil

    from dualfocus.evaluate.ask import AskConfig, run_ask
    from dualfocus.pipeline.errors import UserError

    export = tmp_path / "final"
    shutil.copytree(bf16_export, export)
    meta = json.loads((export / "dualfocus.json").read_text())
    meta["llm_dtype"] = "int8"
    (export / "dualfocus.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as err:
        run_ask("unused.mp4", "What?", AskConfig(checkpoint=str(export), model=str(tiny_model)))
    assert str(err.value) == (f"{export / 'dualfocus.json'}: llm_dtype must be one of float32, bfloat16, float16, "
                              "got 'int8'")


def test_device_settings_resolve_one_way(monkeypatch):
    """The GPU branches of the one resolver, exercised on a CPU-only machine by pretending a GPU is there."""
    from dualfocus.extract.encoder import planned_compute_dtype
    from dualfocus.pipeline.devices import resolve_compute_dtype, resolve_device
    from dualfocus.pipeline.errors import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_compute_dtype("auto", on_gpu=False) == "float32"
    assert planned_compute_dtype("auto", "auto") == "float32"
    assert planned_compute_dtype("auto", "auto", gpus_per_actor=1) == "bfloat16"  # actors get a GPU
    assert planned_compute_dtype("cpu", "float16", gpus_per_actor=1) == "float16"
    with pytest.raises(UserError, match="^encoder.device is 'cuda', but torch"):
        resolve_device("cuda", key="encoder.device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert planned_compute_dtype("auto", "auto") == "bfloat16"
    with pytest.raises(UserError, match=r"^device is 'cuda:1', but torch sees 1 CUDA GPU\(s\)$"):
        resolve_device("cuda:1")


GENERATE = ("dualfocus.evaluate.generate", "GenerateConfig", {"store": "s", "questions": "q", "checkpoint": "c", "out": "o"})
ASK = ("dualfocus.evaluate.ask", "AskConfig", {"checkpoint": "c"})
EXTRACT = ("dualfocus.extract.config", "ExtractConfig", {"corpus": "c", "model": "m", "out": "o"})


@pytest.mark.parametrize(("where", "key", "value", "message"), [
    (GENERATE, "device", "gpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (ASK, "device", "cuda:x", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
    (EXTRACT, "encoder.device", "gpu", "encoder.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    (GENERATE, "llm_dtype", "int8", "llm_dtype must be one of 'float32', 'bfloat16', 'float16' or null, got 'int8'"),
    (ASK, "llm_dtype", "fp16", "llm_dtype must be one of 'float32', 'bfloat16', 'float16' or null, got 'fp16'"),
])
def test_bad_device_or_dtype_setting_is_refused_naming_the_key(where, key, value, message):
    import importlib

    from dualfocus.pipeline.config import ConfigError, load_config

    module, name, base = where
    with pytest.raises(ConfigError) as err:
        load_config(getattr(importlib.import_module(module), name), values={**base, key: value})
    assert str(err.value) == message
