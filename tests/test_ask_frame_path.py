"""One frame path for extract and ask: ``ask`` decodes and encodes with extract's own stages and the settings
of the store's fingerprint, rounds through ``store/dtypes.py`` as the writer does; a bf16 store never passes
through fp16; the fingerprint names the encoder's compute dtype and the decode backend, so a store is never
continued in another precision, and a store from before those keys is refused with one line, losing nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import store_fingerprint
from dualfocus.pipeline.errors import UserError


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def _extract_cfg(corpus: Path, model: Path, out: Path, **values):
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.pipeline.config import load_config

    return load_config(ExtractConfig, values={"corpus": str(corpus), "model": str(model), "out": str(out), **values})


def test_fingerprint_names_compute_dtype_and_decode_backend(toy_store, toy_corpus, tiny_model, tmp_path):
    from dualfocus.extract.run import encoder_fingerprint

    stored = store_fingerprint(toy_store)
    assert stored["compute_dtype"] == "float32" and stored["decode_backend"] == "decord"   # CPU, defaults
    other = encoder_fingerprint(_extract_cfg(toy_corpus / "videos", tiny_model, tmp_path / "s", **{
        "encoder.compute_dtype": "bfloat16", "decode.backend": "pyav"}))
    assert other["compute_dtype"] == "bfloat16" and other["decode_backend"] == "pyav"
    assert {k: v for k, v in other.items() if k not in ("compute_dtype", "decode_backend")} == \
        {k: v for k, v in stored.items() if k not in ("compute_dtype", "decode_backend", "fps", "max_frames")}


def test_store_begun_in_fp32_is_not_continued_in_bf16(toy_store, toy_corpus, tiny_model, tmp_path):
    from dualfocus.extract.run import run_extract
    from dualfocus.store import StoreMismatchError

    store = tmp_path / "store"
    shutil.copytree(toy_store, store)
    before = _files(store)
    with pytest.raises(StoreMismatchError) as err:
        run_extract(_extract_cfg(toy_corpus / "videos", tiny_model, store, **{"encoder.compute_dtype": "bfloat16"}),
                    progress=False)
    assert "fingerprint.compute_dtype: store has 'float32', requested 'bfloat16'" in str(err.value)
    assert "\n" not in str(err.value)
    assert _files(store) == before


def test_store_from_before_the_new_keys_is_refused_naming_them_and_still_reads(toy_store, toy_corpus, tiny_model,
                                                                               tmp_path):
    from dualfocus.evaluate.ask import frame_settings
    from dualfocus.extract.run import run_extract
    from dualfocus.store import FeatureStore, StoreMismatchError

    store = tmp_path / "store"
    shutil.copytree(toy_store, store)
    group_json = store / "groups" / "eva" / "group.json"
    info = json.loads(group_json.read_text())
    for key in ("compute_dtype", "decode_backend"):
        del info["fingerprint"][key]
    group_json.write_text(json.dumps(info))
    before = _files(store)
    with pytest.raises(StoreMismatchError) as err:
        run_extract(_extract_cfg(toy_corpus / "videos", tiny_model, store), progress=False)
    message = str(err.value)
    assert "fingerprint.compute_dtype: store has '<missing>', requested 'float32'" in message
    assert "fingerprint.decode_backend: store has '<missing>', requested 'decord'" in message
    assert "\n" not in message and _files(store) == before
    opened = FeatureStore.open(store)
    assert len(opened[opened.video_ids()[0]].timestamps) > 0
    # ask on a checkpoint trained on such a store: the keys fall back to that time's defaults
    settings = frame_settings({**info["fingerprint"], **opened.sampling}, tmp_path / "final")
    assert settings.decode_backend == "decord" and settings.compute_dtype == "auto"


@pytest.mark.parametrize(("change", "message"), [
    ({"fps": "<drop>"}, "store_fingerprint lacks fps; is it a dualfocus export?"),
    ({"decode_backend": "ffmpeg"}, "store_fingerprint.decode_backend must be one of decord, pyav, got 'ffmpeg'"),
    ({"dtype": "int4"}, "store_fingerprint.dtype must be one of float16, bfloat16, float32, int8, got 'int4'"),
])
def test_bad_fingerprint_in_an_export_is_one_line_naming_the_file_and_key(toy_store, tmp_path, change, message):
    from dualfocus.evaluate.ask import frame_settings

    fingerprint = store_fingerprint(toy_store)
    fingerprint = {k: v for k, v in {**fingerprint, **change}.items() if v != "<drop>"}
    with pytest.raises(UserError) as err:
        frame_settings(fingerprint, tmp_path / "final")
    assert str(err.value) == f"{tmp_path / 'final' / 'dualfocus.json'}: {message}"


DEFAULT_TAPS = {"semantic": "post_ln", "spatiotemporal": "pool4"}  # DualFocus's streams and their cuts


def test_ask_features_are_the_stored_features(toy_store, toy_corpus, tiny_model, monkeypatch):
    """Same frames (fps, cap, backend from the fingerprint), same encoder, same rounding as the store."""
    import dualfocus.extract.stages as stages
    from dualfocus.evaluate.ask import frame_settings, video_features
    from dualfocus.store import FeatureStore

    built: dict[str, dict] = {}

    def spy(name):
        cls = getattr(stages, name)

        def make(*args, **kwargs):  # records the settings each stage is built with
            built[name] = kwargs
            return cls(*args, **kwargs)
        return make

    for name in ("DecodeStage", "EncodeStage"):
        monkeypatch.setattr(stages, name, spy(name))
    store = FeatureStore.open(toy_store)
    video_id = store.video_ids()[0]
    fingerprint = store_fingerprint(toy_store)
    features = video_features(str(toy_corpus / "videos" / f"{video_id}.mp4"), str(tiny_model),
                              frame_settings(fingerprint, "final"), "cpu", 60.0, DEFAULT_TAPS)
    semantic, motion = features["semantic"], features["spatiotemporal"]
    assert built["DecodeStage"]["backend"] == fingerprint["decode_backend"]
    assert built["DecodeStage"]["fps"] == fingerprint["fps"] and built["DecodeStage"]["size"] == fingerprint["image_size"]
    assert built["EncodeStage"]["compute_dtype"] == fingerprint["compute_dtype"]
    assert built["EncodeStage"]["groups"][0]["dtype"] == fingerprint["dtype"] == "float16"
    stored = store[video_id]
    assert semantic.dtype == stored["semantic"].dtype == np.float16
    assert semantic.shape == stored["semantic"].shape and motion.shape == stored["spatiotemporal"].shape
    # Encoder batches differ (extract batches frames of several videos): allow one fp16 step, no more.
    np.testing.assert_allclose(semantic, stored["semantic"], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(motion, stored["spatiotemporal"], rtol=2e-3, atol=2e-3)


def test_ask_on_a_missing_video_is_one_line_naming_it(toy_store, tiny_model, tmp_path):
    from dualfocus.evaluate.ask import frame_settings, video_features

    settings = frame_settings(store_fingerprint(toy_store), "final")
    with pytest.raises(UserError) as err:
        video_features(str(tmp_path / "gone.mp4"), str(tiny_model), settings, "cpu", 60.0, DEFAULT_TAPS)
    assert str(err.value) == f"cannot read video {tmp_path / 'gone.mp4'}: file not found"


class BigEncoder:
    """Fake encoder whose features hold values past float16's largest finite number (65,504)."""

    def __call__(self, frames):
        n = len(frames)
        return {"semantic": np.full((n, 3, 2), 1.0e5, np.float32), "spatiotemporal": np.full((n, 1, 2), -7.0e4, np.float32)}


def _one_row_batch(n: int) -> dict:
    holder = np.empty(1, dtype=object)
    holder[0] = np.zeros((n, 4, 4, 3), np.uint8)
    return {"video_id": np.array(["v"]), "frames": holder, "error": np.array([""], dtype=object)}


def test_bf16_store_never_passes_through_fp16(tmp_path):
    from dualfocus.extract.stages import EncoderGroup, encode_chunks
    from dualfocus.store import FeatureStore, GroupWriter
    from dualfocus.store.dtypes import round_trip, transfer_dtype

    def group(storage_dtype):
        return [EncoderGroup("eva", BigEncoder(), {"semantic": (3, 2), "spatiotemporal": (1, 2)},
                             transfer_dtype(storage_dtype))]

    out = encode_chunks(_one_row_batch(2), group("bfloat16"), batch_frames=8)
    semantic, motion = out["eva/semantic"][0], out["eva/spatiotemporal"][0]
    assert semantic.dtype == np.float32
    with GroupWriter(tmp_path, "eva", dtype="bfloat16", fingerprint={}, taps={"semantic": (3, 2), "spatiotemporal": (1, 2)},
                     sampling={"fps": 1.0, "max_frames": None}) as writer:
        writer.begin_video("v", "v.mp4", {"n_frames": 2, "duration_s": 2.0, "native_fps": 1.0})
        writer.add_frames({"semantic": semantic, "spatiotemporal": motion}, np.arange(2, dtype=np.float32))
        writer.end_video()
    stored = FeatureStore.open(tmp_path)["v"]
    assert np.isfinite(stored["semantic"]).all() and np.isfinite(stored["spatiotemporal"]).all()
    np.testing.assert_allclose(stored["semantic"], 1.0e5, rtol=2 ** -8)
    np.testing.assert_allclose(stored["spatiotemporal"], -7.0e4, rtol=2 ** -8)
    # ask's rounding is the writer's + the reader's, bit for bit
    np.testing.assert_array_equal(round_trip(semantic, "bfloat16"), stored["semantic"])
    np.testing.assert_array_equal(round_trip(motion, "bfloat16"), stored["spatiotemporal"])

    fp16 = encode_chunks(_one_row_batch(1), group("float16"), batch_frames=8)
    assert fp16["eva/semantic"][0].dtype == np.float16   # a float16 store travels as float16 (its own rounding)


def test_frame_encoder_runs_in_the_dtype_asked_for(tiny_model):
    """The GPU's default precision (bf16) through the same encoder code on the CPU."""
    import torch

    from dualfocus.extract.encoder import FrameEncoder

    frames = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    bf16 = FrameEncoder(tiny_model, device="cpu", compute_dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    sem16, mot16 = bf16(frames)
    sem32, mot32 = FrameEncoder(tiny_model, device="cpu")(frames)
    assert sem16.dtype == np.float32 and np.isfinite(sem16).all()
    assert not np.array_equal(sem16, sem32)                              # it really ran in bf16
    np.testing.assert_allclose(sem16, sem32, atol=0.1 * float(np.abs(sem32).max()))
