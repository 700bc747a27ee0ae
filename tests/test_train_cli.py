"""End to end through the real ``dualfocus train`` command: training on a store made by ``extract``,
what the run directory holds, resume, and every bad input refused as one line with exit status 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, store_fingerprint

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "train_tiny.yaml")
SMALL = ["save_every=3", "log_every=1", "data.batch_size=4", "data.max_frames=4", "optim.warmup_steps=2"]


def train(store, annotations, model, out, *extra, check=True):
    # one OpenMP thread: the tiny model's ops are too small to split, and on a busy CPU threads stall each other
    return run_cli("train", store, annotations, "--model", model, "--out", out, "--config", TINY, "--no-progress",
                   *extra, check=check, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def cli_run(toy_store, toy_corpus, tiny_model, tmp_path_factory):
    """6 steps, then --resume to 8, on the toy corpus plus two questions about a video the store lacks."""
    root = tmp_path_factory.mktemp("cli_train")
    records = json.loads((toy_corpus / "train.json").read_text())
    records += [{"video_id": "toy_99999", "q": "What shape is it?", "a": "star"},
                {"video_id": "v_toy_99999.mp4", "q": "What color is it?", "a": "pink"}]
    annotations = root / "qa.json"
    annotations.write_text(json.dumps(records))
    run = root / "run"
    first = train(toy_store, annotations, tiny_model, run, "--max-steps", "6", *SMALL)
    second = train(toy_store, annotations, tiny_model, run, "--max-steps", "8", "--resume", *SMALL)
    return {"run": run, "annotations": annotations, "first": first.stdout, "second": second.stdout,
            "n": len(records)}


def test_train_prints_its_summary(cli_run):
    run, first, second = cli_run["run"], cli_run["first"], cli_run["second"]
    n = cli_run["n"]
    assert f"annotations: {n} | usable {n - 2} | video not in store 2 | video failed at extract 0" in first
    assert re.search(r"^steps: 6 \| loss \d+\.\d{4} -> \d+\.\d{4}$", first, re.M)
    assert re.search(r"^steps: 8 \(resumed at step 6\) \| loss \d+\.\d{4} -> \d+\.\d{4}$", second, re.M)
    assert re.search(r"^samples: 24 in [\d.]+ s = [\d.]+ samples/s \| data wait [\d.]+% of step time$", first, re.M)
    assert f"export: {run / 'final'}" in first and f"loss curve: {run / 'loss.png'}" in second


def test_run_directory_holds_config_metrics_plot_and_export(cli_run, toy_store, tiny_model):
    run = cli_run["run"]
    saved = yaml.safe_load((run / "train_config.yaml").read_text())
    assert saved["max_steps"] == 8 and saved["data"]["batch_size"] == 4 and saved["store"] == str(toy_store)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))
    assert [m["lr"] for m in lines] == pytest.approx([5e-4] + [1e-3] * 7)  # warmup 2 steps at lr 1e-3
    assert all(0 <= m["data_wait_fraction"] <= 1 and m["samples_per_s"] > 0 for m in lines)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((run / "final" / "dualfocus.json").read_text())
    assert meta["step"] == 8 and meta["base_model"] == str(Path(tiny_model).resolve())
    assert meta["store_fingerprint"] == store_fingerprint(toy_store)
    assert meta["max_frames"] == 4 and meta["connector"] == "dualfocus" and meta["connector_config"]["ffp_blocks"] == 2
    assert meta["streams"] == ["semantic", "spatiotemporal"] and meta["format_version"] == 2
    # what inference must reproduce: the Q-Former question length, and the precisions the run used
    assert (meta["max_question_tokens"], meta["llm_dtype"], meta["connector_dtype"]) == (64, "float32", "float32")


@pytest.fixture(scope="module")
def model_and_samples(tiny_model, toy_store, cli_run):
    from dualfocus.connectors.export import read_export
    from dualfocus.connectors.registry import build_video_llm
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset

    meta, _ = read_export(cli_run["run"] / "final")
    model = build_video_llm(meta.connector_config_object(), str(tiny_model)).eval()  # as the run built it
    prepared = prepare_samples(str(toy_store), str(cli_run["annotations"]), str(tiny_model), with_answers=True)
    dataset = FeatureQADataset(str(toy_store), prepared.samples, max_frames=4)
    batch = collate([dataset[i] for i in range(len(dataset))], prepared.qformer_pad_id)
    return model, batch


def tensor_elements(obj) -> int:
    """Total elements of every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(tensor_elements(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_elements(v) for v in obj)
    return 0


def test_checkpoints_and_export_hold_every_trainable_weight_and_no_llm(cli_run, model_and_samples):
    from safetensors.torch import load_file

    run, model = cli_run["run"], model_and_samples[0]
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}   # named inside VideoLLM
    assert trainable and all(k.startswith("connector.") for k in trainable)
    exported = load_file(str(run / "final" / "connector.safetensors"))      # named inside the connector
    assert {"connector." + k for k in exported} == trainable
    tags = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert tags == ["step0000006", "step0000008"]  # save_every=3 plus the end, two kept
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for tag in tags:
        folder = run / "checkpoints" / tag
        assert {f.name for f in folder.iterdir()} == {"client_state.pt", "rng_rank0.pt", "mp_rank_00_model_states.pt",
                                                       "zero_pp_rank_0_mp_rank_00_optim_states.pt"}
        states = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
        assert set(states["module"]) == trainable
        assert {name for group in states["param_shapes"] for name in group} == trainable
        assert not states["buffer_names"] and not states["frozen_param_shapes"]
        assert tensor_elements(states) == n_trainable  # not one frozen LLM tensor in the file
        optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
        assert {name for group in optim["optimizer_state_dict"]["param_slice_mappings"] for name in group} == trainable
        # fp32 master weights + Adam's two moments (+ step counters), nothing else
        assert 3 * n_trainable <= tensor_elements(optim) <= 3 * n_trainable + 8
    last = torch.load(run / "checkpoints" / "step0000008" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.equal(last["module"]["connector." + k].float(), v) for k, v in exported.items())


def test_training_lowered_the_loss_on_the_training_set(cli_run, model_and_samples):
    from safetensors.torch import load_file

    model, batch = model_and_samples
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        before = model(batch).item()
        initial = {k: v.clone() for k, v in model.trainable_state_dict().items()}
        model.load_trainable_state_dict(load_file(str(cli_run["run"] / "final" / "connector.safetensors")))
        after = model(batch).item()
        model.load_trainable_state_dict(initial)
    torch.set_num_threads(threads)
    assert after < before - 0.5, (before, after)


# ---------------------------------------------------------------- refused inputs
def assert_refused(proc, *fragments: str) -> str:
    """Exit status 2 and a single line on stderr holding every fragment."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_store_from_another_vision_tower_is_refused(toy_store, toy_corpus, tmp_path):
    from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

    narrow = write_tiny_model(tmp_path / "narrow", TinyModelConfig(vision_width=32))
    proc = train(toy_store, toy_corpus / "train.json", narrow, tmp_path / "run", check=False)
    assert_refused(proc, "semantic [257, 64] / spatiotemporal [64, 64]", f"{narrow} expects [257, 32] / [64, 32]")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("text, fragments", [
    ("", ["qa.json is empty"]),
    ('[{"video_id": "toy_00000", "q": "What?", "a": "red"}\n {"video_id": "toy_00001"}]',
     ["qa.json: malformed JSON at line 2, column 2"]),
    ('[{"video_id": "missing_1", "q": "What?", "a": "red"}, {"video_id": "missing_2", "q": "What?", "a": "up"}]',
     ["none of the 2 entries of", "missing_1, missing_2", "video not in store 2"]),
])
def test_bad_annotation_files_are_refused(toy_store, tiny_model, tmp_path, text, fragments):
    annotations = tmp_path / "qa.json"
    annotations.write_text(text)
    proc = train(toy_store, annotations, tiny_model, tmp_path / "run", check=False)
    line = assert_refused(proc, *fragments)
    assert str(annotations) in line


def test_unknown_config_key_is_refused(toy_store, toy_corpus, tiny_model, tmp_path):
    proc = train(toy_store, toy_corpus / "train.json", tiny_model, tmp_path / "run", "optim.learning_rate=1",
                 check=False)
    assert_refused(proc, "optim.learning_rate")


def test_training_again_into_a_used_run_dir_is_refused(cli_run, toy_store, tiny_model):
    proc = train(toy_store, cli_run["annotations"], tiny_model, cli_run["run"], *SMALL, check=False)
    assert_refused(proc, "already holds a training run", "--resume")


def test_resume_with_another_config_is_refused_naming_the_keys(cli_run, toy_store, tiny_model):
    proc = train(toy_store, cli_run["annotations"], tiny_model, cli_run["run"], "--resume", *SMALL,
                 "optim.lr=0.01", "data.max_frames=2", check=False)
    assert_refused(proc, "different config", "optim.lr (0.001 -> 0.01)", "data.max_frames (4 -> 2)")
