"""The config loader: override order, validation messages, and every shipped YAML against its dataclass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dualfocus.evaluate.generate import GenerateConfig
from dualfocus.evaluate.score import ScoreConfig
from dualfocus.extract.config import ExtractConfig
from dualfocus.pipeline.config import ConfigError, describe_keys, field_docs, load_config
from dualfocus.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Which dataclass each shipped YAML configures (a new YAML must be added here: see the last test).
SHIPPED = {
    "extract.yaml": ExtractConfig,
    "extract_gpu_cluster.yaml": ExtractConfig,
    "extract_streams.yaml": ExtractConfig,
    "train_tiny.yaml": TrainConfig,
    "train_qavit_tiny.yaml": TrainConfig,
    "train_slowfast_tiny.yaml": TrainConfig,
    "train_longvu_tiny.yaml": TrainConfig,
    "train_videopanda_tiny.yaml": TrainConfig,
    "train_paper.yaml": TrainConfig,
    "generate.yaml": GenerateConfig,
    "score.yaml": ScoreConfig,
}
REQUIRED = {ExtractConfig: {"corpus": "c", "model": "m", "out": "o"},
            TrainConfig: {"store": "s", "annotations": "a", "model": "m", "out": "o"},
            GenerateConfig: {"store": "s", "questions": "q", "checkpoint": "k", "out": "o"},
            ScoreConfig: {}}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_yaml_loads(name):
    cls = SHIPPED[name]
    cfg = load_config(cls, CONFIGS / name, values=REQUIRED[cls])
    assert isinstance(cfg, cls)


def test_every_yaml_in_configs_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_shipped_deepspeed_jsons_leave_the_optimiser_to_the_train_config(name):
    ds = json.loads((CONFIGS / name).read_text())
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"]["stage"] == 2


def test_paper_recipe_values():
    cfg = load_config(TrainConfig, CONFIGS / "train_paper.yaml", values=REQUIRED[TrainConfig])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-5, [0.95, 0.999], 0.005)
    assert (cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.epochs, cfg.data.batch_size) == (1000, 1.0, 3.0, 1)
    assert (cfg.connector.ffp_blocks, cfg.connector.ffp_heads) == (2, 8)


def test_override_order_defaults_yaml_values_overrides(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("decode:\n  fps: 2.0\n  chunk_frames: 4\nstore:\n  format: webdataset\n")
    cfg = load_config(ExtractConfig, yaml_file, overrides=["decode.fps=3", "limit=5"],
                      values={**REQUIRED[ExtractConfig], "decode.chunk_frames": 8, "decode.fps": 2.5})
    assert cfg.decode.fps == 3.0           # override beats flag beats YAML
    assert cfg.decode.chunk_frames == 8    # flag beats YAML
    assert cfg.store.format == "webdataset"  # YAML beats default
    assert cfg.encoder.batch_frames == 32  # default kept
    assert cfg.limit == 5


def test_every_problem_is_reported_with_its_key():
    with pytest.raises(ConfigError) as e:
        load_config(ExtractConfig, overrides=["decode.fsp=2", "decode.fps=-1", "store.format=hdf5",
                                              "encoder.batch_frames=lots"])
    msg = str(e.value)
    assert "unknown config key 'decode.fsp'" in msg and "did you mean decode.fps" in msg
    assert "store.format must be one of 'zarr', 'webdataset', got 'hdf5'" in msg
    assert "encoder.batch_frames must be an integer, got 'lots'" in msg
    # value checks run once the types are right
    with pytest.raises(ConfigError) as e:
        load_config(ExtractConfig, overrides=["decode.fps=-1", "ray.decode_workers=0"])
    msg = str(e.value)
    assert "decode.fps must be > 0, got -1.0" in msg and "ray.decode_workers must be >= 1, got 0" in msg
    assert "corpus is required" in msg


def test_scientific_notation_without_a_dot_is_a_float():
    cfg = load_config(TrainConfig, overrides=["optim.lr=2e-3"], values=REQUIRED[TrainConfig])
    assert cfg.optim.lr == pytest.approx(2e-3)


def test_max_failures_is_a_count_or_a_fraction():
    count = load_config(ExtractConfig, overrides=["max_failures=3"], values=REQUIRED[ExtractConfig])
    frac = load_config(ExtractConfig, overrides=["max_failures=0.25"], values=REQUIRED[ExtractConfig])
    assert count.failures_exceeded(4, 100) and not count.failures_exceeded(3, 100)
    assert frac.failures_exceeded(3, 10) and not frac.failures_exceeded(2, 10)
    with pytest.raises(ConfigError, match="max_failures as a fraction must be within 0..1, got 1.5"):
        load_config(ExtractConfig, overrides=["max_failures=1.5"], values=REQUIRED[ExtractConfig])


def test_missing_and_malformed_yaml_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(ExtractConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("decode: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(ExtractConfig, bad)


def test_field_docs_are_read_from_the_class_body():
    docs = field_docs(ExtractConfig)
    assert docs["overwrite"].startswith("Replace the stream groups this run writes")
    keys = {k for k, _, _ in describe_keys(ExtractConfig)}
    assert {"decode.fps", "store.format", "ray.gpus_per_actor", "max_failures"} <= keys
    assert all(doc for _, _, doc in describe_keys(TrainConfig)), "every train config field needs a doc line"


def test_stage_help_lists_its_keys_and_the_cli_imports_no_torch_until_asked():
    """`dualfocus train --help` ends with every train key; importing the CLI (what `--help`, `score`, `inspect`
    pay before their own work) leaves torch unimported: the keys are gathered only when help is shown."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from dualfocus.cli import app

    probe = "import sys, dualfocus.cli; print(sorted(m for m in ('torch', 'zarr', 'ray') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    shown = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "Config keys" in shown.output
    assert {"data.batch_size", "optim.gate_lr_scale", "connector.name"} <= set(shown.output.split())
