"""Video-Panda (connectors/videopanda.py, connectors/stab.py) at the tiny scale (112 px, P 14, C 64, 4 heads):
frame choice, canvas layout, flip, tokens per frame, zero inits, padding, what trains, parameter counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dualfocus.connectors.interface import Batch
from dualfocus.connectors.stab import STAB, valid_crops
from dualfocus.connectors.videopanda import (VideoPanda, VideoPandaConfig, choose_frames, fitted_size, frame_canvas,
                                             parameter_counts, videopanda_modules)
from dualfocus.pipeline.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(image_size=112, width=64, heads=4, patch=14, chunk=4, n_frames=8)


def make_batch(clips: list[tuple[int, tuple[int, int]]], side: int = 112, seed: int = 0,
               labels: bool = False) -> Batch:
    """A hand-made batch: per clip (real frames, (box height, box width)), random uint8-valued frames at the
    top-left of ``side x side``, zero-padded past each clip's frames as collate does."""
    b, T = len(clips), max(t for t, _ in clips)
    frames, boxes = torch.zeros(b, T, side, side, 3), torch.zeros(b, T, 2)
    frame_mask = torch.zeros(b, T, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for i, (t, (h, w)) in enumerate(clips):
        frames[i, :t, :h, :w] = torch.randint(0, 256, (t, h, w, 3), generator=gen).float()
        boxes[i, :t] = torch.tensor([h, w], dtype=torch.float32)
        frame_mask[i, :t] = True
    ids = torch.ones(b, 1, dtype=torch.long)
    return Batch(streams={"frames": frames, "box": boxes}, frame_mask=frame_mask, qformer_ids=ids, qformer_mask=ids,
                 question_ids=ids, question_mask=ids, prefix_ids=[[1, 5]] * b, text_ids=[[6, 7, 8]] * b,
                 text_labels=[[-100, 7, 8]] * b if labels else None)


def tiny_connector(seed: int = 0, **overrides) -> VideoPanda:
    cfg = VideoPandaConfig(**{**TINY, "dropout": 0.0, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        stab, projector = videopanda_modules(cfg, 64)
    return VideoPanda(stab, projector, cfg)


def test_config_check_names_every_problem():
    assert VideoPandaConfig().check() == [] and VideoPandaConfig(**TINY).check() == []
    problems = VideoPandaConfig(image_size=100, width=66, heads=4, n_frames=6, chunk=4, dropout=1.0, flip="eval",
                                attention_scale="dh").check()
    text = " | ".join(problems)
    assert len(problems) == 6
    for needle in ("width (66) must be divisible by heads (4)", "image_size (100)", "n_frames (6)", "dropout",
                   "flip", "attention_scale"):
        assert needle in text
    assert VideoPanda.model_problems(VideoPandaConfig(heads=3), "unused")[0].startswith("connector.width")


def test_frame_choice_for_3_8_and_20_frames():
    assert choose_frames(3, 8) == [0, 0, 1, 1, 1, 1, 2, 2]          # nearest to linspace(0, 2, 8)
    assert choose_frames(8, 8) == list(range(8))
    assert choose_frames(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]     # floor(linspace(0, 19, 8)), the reference
    for n in range(8, 200):
        assert choose_frames(n, 8) == np.linspace(0, n - 1, 8, dtype=int).tolist()
    for n in range(1, 8):
        assert choose_frames(n, 8) == np.floor(np.linspace(0, n - 1, 8) + 0.5).astype(int).tolist()
    with pytest.raises(ValueError):
        choose_frames(0, 8)


def test_planned_frames_are_what_a_sample_reads_and_what_the_context_check_counts():
    from dualfocus.connectors.limits import sequence_length
    from dualfocus.data.samples import Tokenised, frames_to_read

    cfg = VideoPandaConfig(**TINY)
    samples = [Tokenised(video_id=str(n), n_frames=n, qformer_ids=[], prefix_ids=[1, 2], text_ids=[3],
                         text_labels=[3]) for n in (3, 8, 20)]
    plans = VideoPanda.plan_frames(cfg, "unused", None, samples)
    assert plans == [choose_frames(n, 8) for n in (3, 8, 20)]
    for s, plan in zip(samples, plans):
        planned = Tokenised(**{**s.__dict__, "frames": tuple(plan)})
        assert frames_to_read(planned, 8).tolist() == plan                           # repeats included
        assert sequence_length(planned, 8, 21) == (8, 2 + 8 * 21 + 1)


def test_the_chosen_real_frames_reach_the_canvas():
    """3 real frames of constant colour 10, 20, 30 (not a prefix of the padded clip): slots get 0,0,1,1,1,1,2,2."""
    batch = make_batch([(5, (112, 112))])
    batch.frame_mask[0] = torch.tensor([False, True, False, True, True])
    for k, colour in zip((1, 3, 4), (10.0, 20.0, 30.0)):
        batch.streams["frames"][0, k] = colour
    pixels = tiny_connector().eval().pixels(batch)                                  # [1, 8, 4, 112, 112]
    red = pixels[0, :, 0, 50, 50] * OPENAI_CLIP_STD[0] + OPENAI_CLIP_MEAN[0]
    assert torch.allclose(red * 255, torch.tensor([10, 10, 20, 20, 20, 20, 30, 30.0]), atol=1e-3)


def test_canvas_and_mask_layout_for_a_16_9_box():
    assert fitted_size(252, 448, 448, 14) == (252, 448, 84, 0)       # paper: 9 of 16 cells of 28 px, 3 above
    assert fitted_size(448, 252, 448, 14) == (448, 252, 0, 84)
    assert fitted_size(448, 448, 448, 14) == (448, 448, 0, 0)
    assert fitted_size(63, 112, 112, 14) == (84, 112, 0, 0)
    content = torch.randint(0, 256, (2, 3, 126, 224)).float()        # 16:9 at 224 px: 5 of 8 cells, 1 above
    canvas = frame_canvas(content, 224, 14)
    assert canvas.shape == (2, 4, 224, 224)
    mask = canvas[:, 3]
    assert (mask[:, 28:168] == 1).all() and (mask[:, :28] == 0).all() and (mask[:, 168:] == 0).all()
    assert (canvas[:, :3, :28] == 0).all() and (canvas[:, :3, 168:] == 0).all()      # the mean colour, normalised
    resized = torch.nn.functional.interpolate(content, size=(140, 224), mode="bilinear", antialias=True)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert torch.allclose(canvas[:, :3, 28:168], (resized / 255 - mean) / std, atol=1e-5)


def test_flip_mirrors_inside_the_valid_region_in_training_only():
    """Portrait 112 x 70 at 112 px: 3 of 4 cells wide at the left (cols 0..84), so mirroring the whole canvas
    would move the content off its mask; the flip mirrors the content inside the region."""
    batch = make_batch([(8, (112, 70))] * 6)
    connector = tiny_connector(flip="train")
    plain = connector.pixels(batch, flips=[False] * 6)
    flipped = connector.pixels(batch, flips=[True] * 6)
    assert torch.equal(flipped[:, :, 3], plain[:, :, 3]) and (plain[:, :, 3, :, :84] == 1).all()
    assert torch.equal(flipped[:, :, :3, :, :84], plain[:, :, :3, :, :84].flip(-1))
    assert (flipped[:, :, :3, :, 84:] == 0).all()

    def flips_drawn(model) -> list[bool]:
        torch.manual_seed(0)
        pixels = model.pixels(batch)
        return [not torch.equal(pixels[i], plain[i]) for i in range(6)]

    assert set(flips_drawn(connector.train())) == {True, False}
    assert not any(flips_drawn(connector.eval()))
    assert not any(flips_drawn(tiny_connector().train()))                          # the default: "none"


def test_tokens_per_frame_for_a_square_and_a_16_9_clip():
    connector = tiny_connector().eval()
    batch = make_batch([(5, (112, 112)), (12, (63, 112)), (3, (112, 40))])
    with torch.no_grad():
        visual = connector.visual_tokens(batch, None)
    assert visual.embeds.shape == (3, 8 * 21, 64)
    assert visual.mask.sum(1).tolist() == [8 * (1 + 4 * 5), 8 * (1 + 3 * 5), 8 * (1 + 4 * 3)]
    assert VideoPanda.tokens_per_frame(VideoPandaConfig(**TINY), "unused") == 21
    assert VideoPanda.tokens_per_frame(VideoPandaConfig(), "unused") == 273


def test_frame_layout_cls_then_rows_ending_in_the_split_token():
    stab = tiny_connector().stab.eval()
    pixels = tiny_connector().pixels(make_batch([(8, (63, 112))]), flips=[False]).reshape(2, 4, 4, 112, 112)
    with torch.no_grad():
        frames = stab(pixels)
    assert len(frames) == 8 and all(f.shape == (1 + 3 * 5, 64) for f in frames)
    rows = frames[0][1:].view(3, 5, 64)
    assert torch.equal(rows[:, -1], stab.split.expand(3, 64))
    assert not torch.isclose(rows[:, :-1], stab.split).all(-1).any()
    assert valid_crops(torch.zeros(1, 32, 32, dtype=torch.bool)) == [(0, 0, 16, 16)]     # reference: [:16, :16]
    assert valid_crops(torch.zeros(1, 8, 8, dtype=torch.bool)) == [(0, 0, 4, 4)]


def test_zero_inits_make_lste_an_identity_and_keep_the_video_token_at_zero():
    stab = tiny_connector().stab.train()
    x = torch.randn(2, 64, 4, 8, 8)
    assert torch.equal(stab.lste(x), torch.zeros_like(x))                             # x1 = x0 + 0
    tokens, valid = torch.randn(2, 4 * 64, 64), torch.rand(2, 4 * 64) > 0.3
    assert torch.equal(stab.gstra(tokens, valid), torch.zeros(2, 64))               # the video token stays 0
    assert torch.equal(stab.gstra.token, torch.zeros(64)) and torch.equal(stab.dpe.bias, torch.zeros(64))
    assert torch.equal(torch.sigmoid(stab.balance), torch.full((64,), 0.5))          # CLS fusion weight 0.5


def test_fused_cls_at_init_and_a_single_frame_skips_the_temporal_modules():
    stab = tiny_connector().stab.eval()
    pixels = tiny_connector().pixels(make_batch([(4, (112, 112))]), flips=[False])  # [1, 8, 4, 112, 112]
    with torch.no_grad():
        clip = stab(pixels[:, :4])                                                   # one chunk of 4
        single = stab(pixels[:, :1])                                                 # T = 1: an image
        x0 = stab.patch_embed(pixels[:, 0, :3])
        cls_frame = stab.fsra(stab.lsd(x0))
    assert torch.allclose(single[0][0], cls_frame[0], atol=1e-5)                     # no fusion, no LSTE/GSTRA
    assert torch.allclose(single[0][1:5], stab.lsd(x0)[0, :4], atol=1e-5)
    with torch.no_grad():                                                            # video: Proj(0.5·0 + 0.5·cls)
        x = stab.patch_embed(pixels[0, :4, :3])
        v = x.unflatten(0, (1, 4)).transpose(1, 2)
        v = v + stab.dpe(v)
        frame0 = (v.transpose(1, 2).flatten(0, 1) + x)[:1]
        want = stab.fuse(0.5 * stab.fsra(stab.lsd(frame0)))
    assert torch.allclose(clip[0][0], want[0], atol=1e-5)


def test_gstra_mask_hides_padded_patches_from_the_video_token():
    torch.manual_seed(0)
    masked, unmasked = (STAB(64, 4, 14, mask_padding=flag).gstra.eval() for flag in (True, False))
    unmasked.load_state_dict(masked.state_dict())
    for module in (masked, unmasked):
        torch.nn.init.normal_(module.attn.out_proj.weight)
    tokens, valid = torch.randn(2, 64, 64), torch.rand(2, 64) > 0.5
    noisy = torch.where(valid[..., None], tokens, torch.randn(2, 64, 64))
    with torch.no_grad():
        assert torch.allclose(masked(tokens, valid), masked(noisy, valid), atol=1e-6)
        assert not torch.allclose(unmasked(tokens, None), unmasked(noisy, None), atol=1e-3)
        assert torch.isfinite(masked(tokens, torch.zeros_like(valid))).all()       # no valid key: all keys
    for flag in (True, False):                        # what the STAB hands GSTRA: the 16:9 layout, time-major
        connector = tiny_connector(mask_padding=flag).eval()
        seen = []
        connector.stab.gstra.forward = lambda tokens, valid: seen.append(valid) or tokens[:, 0]
        with torch.no_grad():
            connector.visual_tokens(make_batch([(8, (56, 112))]), None)
        if not flag:
            assert seen == [None]
            continue
        grid = torch.zeros(4, 8, 8, dtype=torch.bool)
        grid[:, 2:6] = True                                                           # rows 28..84 of 112 px
        assert len(seen) == 1 and torch.equal(seen[0], grid.reshape(1, -1).expand(2, -1))   # 2 chunks of 4


def test_attention_scale_choice():
    assert STAB(64, 4, 14).lsd.scale == 64 ** -0.5 == STAB(64, 4, 14).fsra.scale      # the reference: C^-0.5
    assert STAB(64, 4, 14, attention_scale="head").fsra.scale == 16 ** -0.5
    with pytest.raises(ValueError, match="attention_scale"):
        STAB(64, 4, 14, attention_scale="dh")


def test_padding_never_changes_a_sample():
    """In eval mode a clip's tokens are the same alone and batched with a longer, wider or taller clip."""
    connector = tiny_connector(mask_padding=True).eval()
    with torch.no_grad():
        torch.nn.init.normal_(connector.stab.gstra.attn.out_proj.weight)             # let the video token matter
        torch.nn.init.normal_(connector.stab.lste.layers[-1].weight, std=0.02)
        single = make_batch([(3, (63, 112))], seed=1)
        alone = connector.visual_tokens(single, None)
        batch = make_batch([(12, (112, 112)), (3, (63, 112)), (20, (112, 50))], seed=2)
        batch.streams["frames"][1, :3] = single.streams["frames"][0]                  # the same clip in slot 1
        mixed = connector.visual_tokens(batch, None)
    assert int(mixed.mask[1].sum()) == int(alone.mask.sum()) == 8 * 16 < mixed.mask.shape[1]
    assert torch.allclose(mixed.embeds[1][mixed.mask[1]], alone.embeds[0][alone.mask[0]], atol=1e-5)


def test_gradients_reach_the_whole_stab_and_the_projector_only(tiny_model):
    from dualfocus.connectors.video_llm import VideoLLM
    from dualfocus.pipeline.models import load_llm

    cfg = VideoPandaConfig(**TINY)
    connector = VideoPanda.build(cfg, str(tiny_model), seed=0)
    stab = connector.stab
    with torch.no_grad():   # move the zero inits so that every weight upstream of them gets a gradient too (a
        for p in (stab.lste.layers[-1].weight, stab.gstra.attn.out_proj.weight, stab.gstra.mlp[-1].weight,
                  stab.gstra.token):                        # zero video token leaves LayerNorm's weight idle)
            torch.nn.init.normal_(p, std=0.02)
    model = VideoLLM(connector, load_llm(tiny_model)).train()
    loss = model(make_batch([(5, (112, 112)), (11, (63, 112))], labels=True))
    loss.backward()
    named = dict(connector.named_parameters())
    assert named and all(p.requires_grad for p in named.values())
    assert [n for n, p in named.items() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
    assert {n.split(".")[0] for n in named} == {"stab", "projector"}


def test_build_is_seeded_and_the_static_builders_match_the_pixels_group(tiny_model):
    from dualfocus.extract.groups import pixels_plan

    cfg = VideoPandaConfig(**TINY)
    a, b, c = (VideoPanda.build(cfg, str(tiny_model), seed=s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.stab.patch_embed.weight, c.stab.patch_embed.weight)
    assert a.projector[-1].out_features == 64 and a.streams() == ("frames", "box")
    plan = pixels_plan(_extract_cfg(112))
    assert VideoPanda.expected_taps(cfg, "unused") == plan.taps
    assert VideoPanda.expected_streams(cfg, "unused") == plan.shapes
    assert VideoPanda.extract_args(cfg, "unused", ["frames"]) == "--pixels 112"
    assert VideoPanda.extract_args(VideoPandaConfig(frames_stream="pix.frames"), "", []) == "--pixels 448 pixels.group=pix"
    state = a.trainable_state_dict()
    assert any(k.endswith("running_mean") for k in state)                            # BatchNorm statistics save too
    c.load_trainable_state_dict(state)
    batch = make_batch([(6, (63, 112))])
    with torch.no_grad():
        assert torch.equal(a.eval().visual_tokens(batch, None).embeds, c.eval().visual_tokens(batch, None).embeds)


def _extract_cfg(side: int):
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.pipeline.config import load_config

    return load_config(ExtractConfig, values={"corpus": "c", "out": "o", "pixels": {"long_side": side}})


def test_parameter_counts_at_paper_and_tiny_size():
    paper = parameter_counts(VideoPandaConfig(), 4096)                             # CONNECTORS.md 3.6
    millions = {k: round(v / 1e6, 2) for k, v in paper.items()}
    assert millions == {"patch_embedding": 0.60, "lste": 1.40, "dpe": 0.03, "gstra": 12.60, "fusion": 1.05,
                        "lsd": 4.20, "fsra": 4.20, "embeddings": 0.0, "tower": 24.09, "projector": 20.98,
                        "total": 45.07}
    assert paper["embeddings"] == 3 * 1024
    parts = [k for k in paper if k not in ("tower", "projector", "total")]
    assert sum(paper[k] for k in parts) == paper["tower"]
    tiny = parameter_counts(VideoPandaConfig(**TINY), 64)
    built = tiny_connector()
    assert tiny["total"] == sum(p.numel() for p in built.parameters())
    assert tiny["tower"] == sum(p.numel() for p in built.stab.parameters())


def test_default_precision_cli_train_then_generate_and_ask(streams_store, toy_corpus, tiny_model, tmp_path):
    """The tiny recipe at the shipped default precision (bf16): train on the store's pixels group (no video is
    decoded in training), then generate and ask (which decodes the video into the same 112 px frames) agree."""
    import json
    import shutil

    from conftest import generate_then_ask, run_cli

    store = tmp_path / "store"
    shutil.copytree(streams_store, store)
    run = tmp_path / "run"
    run_cli("train", store, toy_corpus / "train.json", "--model", tiny_model, "--out", run, "--config",
            "configs/train_videopanda_tiny.yaml", "llm_dtype=bfloat16", "deepspeed=configs/ds_zero2_bf16.json",
            "max_steps=2", "save_every=2", "data.batch_size=2", "data.num_workers=0", "--no-progress",
            env={"OMP_NUM_THREADS": "1"})
    meta = json.loads((run / "final" / "dualfocus.json").read_text())
    assert (meta["connector"], meta["llm_dtype"], meta["streams"]) == ("videopanda", "bfloat16", ["frames", "box"])
    generate_then_ask(store, run / "final", toy_corpus, tmp_path)
