"""LongVU as a connector (connectors/longvu.py, connectors/sva.py): DINO frame reduction, the budget, question-guided
high-res frames, spatial token compression, what trains, padding, and the static builders. CPU, tiny sizes."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.interface import Batch
from dualfocus.connectors.longvu import (LongVU, LongVUConfig, compress_tokens, longvu_modules, reduction_applies,
                                         resolution_plan, select_frames, top_frames, visual_budget)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(grid=8, query_side=4, lowres_side=2, width=64, heads=4, siglip_width=64, dino_width=64)
"""The tiny recipe: 8x8 grids of ``init-tiny --family siglip|dinov2`` towers (width 64), 4x4 queries, 2x2 low-res."""
P_HI, P_LO = 4 * 5, 2 * 3  # tokens per high-/low-res frame at the tiny sizes, newlines included


def tiny_connector(seed: int = 0, llm_width: int = 64, max_positions: int = 2048, **overrides) -> LongVU:
    cfg = LongVUConfig(**{**TINY, **overrides})
    assert cfg.check() == []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sva, projector, newline = longvu_modules(cfg, llm_width)
    return LongVU(sva, projector, newline, cfg, max_positions).eval()


# ---------------------------------------------------------------------- temporal reduction
def clip_features(pattern: str, p: int = 4, d: int = 16, seed: int = 0) -> torch.Tensor:
    """``[t, p, d]`` DINO-like features: 'm' a moving frame (new content over a shared background), 's' a static
    frame (the same content each time, plus a little noise)."""
    g = torch.Generator().manual_seed(seed)
    background = torch.randn(p, d, generator=g)
    still = torch.randn(p, d, generator=g)
    frames = [background + (still + 0.01 * torch.randn(p, d, generator=g) if c == "s"
                            else torch.randn(p, d, generator=g)) for c in pattern]
    return torch.stack(frames)


def test_a_long_static_stretch_is_dropped_and_the_moving_frames_kept():
    dino = clip_features("m" * 16 + "s" * 32 + "m" * 16)  # windows: moving | static | static | moving
    kept = select_frames(dino, window=16, threshold=0.83, cap=400)
    assert kept == list(range(16)) + [16 + 8, 32 + 8] + list(range(48, 64))  # a static window keeps its middle frame


def test_a_static_clip_keeps_each_windows_middle_frame_and_the_last_window_may_be_shorter():
    assert select_frames(clip_features("s" * 20)) == [8, 16 + 2]
    assert select_frames(clip_features("s" * 5)) == [2]
    # a zero frame (e.g. padding written by mistake) is kept, not turned into NaN
    assert select_frames(torch.zeros(3, 4, 16)) == [0, 1, 2]


def test_more_than_400_survivors_are_subsampled_uniformly_to_400():
    dino = clip_features("m" * 1000, p=2, d=8)
    assert select_frames(dino, cap=10_000) == list(range(1000))
    kept = select_frames(dino)
    assert kept == [int(i * 2.5) for i in range(400)]
    assert select_frames(dino, cap=7) == [int(i * 1000 / 7) for i in range(7)]


def test_the_reduction_runs_only_on_clips_too_long_for_low_res_and_plan_frames_combines_both():
    assert not reduction_applies(125, 8100) and reduction_applies(126, 8100)  # paper: B // 64 = 126
    assert reduction_applies(1, 10) and reduction_applies(1, -5)  # max(1, ...)
    cfg = LongVUConfig(**TINY)  # lowres 2 -> 4 tokens: reduction from B // 4 frames on
    static = clip_features("s" * 64)
    assert LongVU.plan_clip(cfg, static, budget=260) == list(range(64))  # 64 < 65
    assert LongVU.plan_clip(cfg, static, budget=256) == [8, 24, 40, 56]
    assert LongVU.plan_clip(LongVUConfig(**TINY, dino_window=32), static, budget=256) == [16, 48]


# ---------------------------------------------------------------------- budget logic
def test_the_budget_is_never_exceeded_for_clips_of_1_to_1000_frames():
    conn = tiny_connector()
    g = torch.Generator().manual_seed(1)
    question = torch.randn(5, 64, generator=g)
    lengths = list(range(1, 70)) + list(range(70, 1001, 31)) + [399, 400, 401, 999, 1000]
    with torch.no_grad():
        for n in lengths:
            sampled = torch.randn(n, 16, 64, generator=g)
            budgets = [256] if n % 3 else [0, 1, 5, 19, 20, 64, 100, 256, 1024, 30_000]
            for budget in budgets:
                tokens = conn.assemble(sampled, budget, question)
                assert tokens.shape[1] == 64 and tokens.shape[0] <= budget, (n, budget, tokens.shape)
                plan = resolution_plan(n, budget, 4, 2)
                if plan == "high" and n * P_HI <= budget:
                    assert tokens.shape[0] == n * P_HI
                if plan == "mix" and budget > n * P_LO:
                    k = min(n, (budget - n * P_LO) // (P_HI - P_LO))
                    assert tokens.shape[0] == n * P_LO + k * (P_HI - P_LO)
        # static clips go through compression (repeated tokens dropped) and stay within the budget too
        for n in (9, 64, 300, 1000):
            tokens = conn.assemble(torch.randn(1, 16, 64, generator=g).expand(n, 16, 64), 256, question)
            assert 0 < tokens.shape[0] <= 256


def test_the_budget_follows_the_text_length_as_the_reference_computes_it():
    assert visual_budget(8192, 92) == 8084
    assert visual_budget(100, 90) == 0  # never negative
    conn = tiny_connector(max_positions=300)
    batch = make_batch([sample(3, text_len=10, seed=0), sample(2, text_len=40, seed=1)])
    assert conn.budgets(batch) == [300 - (4 + 10) - 16, 300 - (4 + 40) - 16]


def test_the_high_res_frames_follow_the_question():
    conn = tiny_connector()
    g = torch.Generator().manual_seed(2)
    sampled = torch.randn(10, 16, 64, generator=g)
    budget = 100  # mix: 10 frames low-res (60 tokens) + k = (100 - 60) // 14 = 2 high-res
    assert resolution_plan(10, budget, 4, 2) == "mix"
    with torch.no_grad():
        low = conn.low_res(sampled)
        u = torch.randn(1, 64, generator=g)
        up, down = top_frames(low, u, 2), top_frames(low, -u, 2)
        scores = (low @ u[0]).mean(1)
        assert up == sorted(scores.topk(2).indices.tolist()) and down == sorted((-scores).topk(2).indices.tolist())
        assert not set(up) & set(down)
        high = conn.high_res(sampled)
        for question, chosen in ((u, up), (-u, down)):
            tokens = conn.assemble(sampled, budget, question)
            expected = torch.cat([high[i] if i in chosen else low[i] for i in range(10)])
            torch.testing.assert_close(tokens, expected)


# ---------------------------------------------------------------------- spatial token compression
def test_compression_keeps_anchor_frames_whole_and_drops_repeated_tokens():
    g = torch.Generator().manual_seed(3)
    anchor, other = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    frames = anchor.repeat(10, 1, 1)                                      # [10, 6, 8]
    frames[1:8, 2] = torch.randn(7, 8, generator=g)                       # window 1: positions 2 and 4 change
    frames[1:8, 4] = torch.randn(7, 8, generator=g)
    frames[8] = other                                                     # window 2: a new anchor, then a repeat
    frames[9] = other
    survivors = torch.stack([frames[1:8, 2], frames[1:8, 4]], 1).reshape(14, 8)  # (frame, position) order
    expected = torch.cat([anchor, survivors, other])                      # 26 tokens
    torch.testing.assert_close(compress_tokens(frames, budget=1000), expected)
    # over budget: ceil((26 - 20) / 2) = 3 tokens off the tail of each window
    torch.testing.assert_close(compress_tokens(frames, budget=20), torch.cat([anchor, survivors[:-3], other[:3]]))
    assert compress_tokens(frames, budget=0).shape == (0, 8)


def test_compression_drops_the_newlines_of_non_anchor_frames():
    conn = tiny_connector()
    with torch.no_grad():
        tokens = conn.high_res(torch.randn(12, 16, 64))                  # two windows: 8 + 4 frames
        out = compress_tokens(tokens, budget=10_000)
    assert int((out == conn.newline).all(-1).sum()) == 2 * 4  # the two anchors' 4 rows each
    torch.testing.assert_close(out[:P_HI], tokens[0])


# ---------------------------------------------------------------------- through the frozen LLM
def sample(n_frames: int, text_len: int = 8, seed: int = 0, question_len: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(3, 500, (question_len,), generator=g).tolist()
    answer = torch.randint(3, 500, (text_len - question_len,), generator=g).tolist()
    return {"siglip": torch.randn(n_frames, 64, 64, generator=g), "dino": torch.randn(n_frames, 64, 64, generator=g),
            "question": question, "prefix": [1, 5, 6, 7], "text": question + answer,
            "labels": [-100] * question_len + answer}


QUESTION_PAD = 2
"""Question padding id of these batches: ``</s>``, whose embedding is not zero (the tiny LLM's pad id 0 embeds to
zeros, which would only rescale the scores and so could hide a missing mask)."""


def make_batch(samples: list[dict]) -> Batch:
    b, T = len(samples), max(s["siglip"].shape[0] for s in samples)
    L = max(len(s["question"]) for s in samples)
    streams = {"siglip.grid": torch.zeros(b, T, 64, 64), "dino.grid": torch.zeros(b, T, 64, 64)}
    frame_mask = torch.zeros(b, T, dtype=torch.bool)
    question_ids = torch.full((b, L), QUESTION_PAD, dtype=torch.long)
    question_mask = torch.zeros(b, L, dtype=torch.long)
    for i, s in enumerate(samples):
        n, q = s["siglip"].shape[0], len(s["question"])
        streams["siglip.grid"][i, :n], streams["dino.grid"][i, :n] = s["siglip"], s["dino"]
        frame_mask[i, :n] = True
        question_ids[i, :q], question_mask[i, :q] = torch.tensor(s["question"]), 1
    return Batch(streams=streams, frame_mask=frame_mask, qformer_ids=torch.zeros(b, 1, dtype=torch.long),
                 qformer_mask=torch.ones(b, 1, dtype=torch.long), question_ids=question_ids,
                 question_mask=question_mask,
                 prefix_ids=[s["prefix"] for s in samples], text_ids=[s["text"] for s in samples],
                 text_labels=[s["labels"] for s in samples])


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
    from dualfocus.pipeline.models import load_llm

    return load_llm(tiny_model).requires_grad_(False)


def test_gradients_reach_only_the_sva_projector_and_newline(tiny_model, tiny_llm):
    from dualfocus.connectors.video_llm import VideoLLM

    cfg = LongVUConfig(**TINY)
    model = VideoLLM(LongVU.build(cfg, str(tiny_model), seed=0), tiny_llm)
    model.train()
    model.zero_grad(set_to_none=True)
    model(make_batch([sample(3, seed=0), sample(5, seed=1)])).backward()
    named = dict(model.named_parameters())
    trainable = {k for k, p in named.items() if p.requires_grad}
    assert trainable and all(k.startswith(("connector.sva.", "connector.projector.", "connector.newline"))
                             for k in trainable)
    assert {"connector.newline", "connector.sva.query"} <= trainable
    assert all(named[k].grad is not None and named[k].grad.abs().sum() > 0 for k in trainable), \
        [k for k in trainable if named[k].grad is None or not named[k].grad.abs().sum() > 0]
    assert all(p.grad is None for p in tiny_llm.parameters())
    state = model.connector.trainable_state_dict()
    assert {f"connector.{k}" for k in state} == trainable
    assert sum(p.numel() for p in model.connector.parameters()) == 164_352  # the tiny recipe's connector


@pytest.mark.parametrize("max_positions", [2048, 90])  # all high-res | 6 frames mixed, 12 compressed at low res
def test_padding_never_changes_a_sample(tiny_model, tiny_llm, max_positions):
    """In the pair the short clip's question is padded (the long one has 8 question tokens) with an id whose
    embedding is not zero: scoring must mask it out, and here it would change the high-res frame."""
    conn = LongVU.build(LongVUConfig(**TINY, max_positions=max_positions), str(tiny_model), seed=0).eval()
    short, long = sample(6, seed=4), sample(12, seed=5, question_len=8)
    with torch.no_grad():
        alone = conn.visual_tokens(make_batch([short]), tiny_llm)
        ref = alone.embeds[0][alone.mask[0]]
        for pair, row in (([short, long], 0), ([long, short], 1)):
            mixed = conn.visual_tokens(make_batch(pair), tiny_llm)
            torch.testing.assert_close(mixed.embeds[row][mixed.mask[row]], ref, atol=1e-5, rtol=1e-5)
            assert int(mixed.mask[1 - row].sum()) <= conn.budgets(make_batch([long]))[0]
        if max_positions == 90:  # budget 90 - 12 - 16 = 62: 6 x 6 low-res tokens + 1 high-res upgrade
            assert ref.shape[0] == 6 * P_LO + (P_HI - P_LO)
            low = conn.low_res(conn.sva(short["siglip"], short["dino"]))
            embed = tiny_llm.get_input_embeddings()
            padded = embed(torch.tensor(short["question"] + [QUESTION_PAD] * 5))
            assert top_frames(low, padded[:3], 1) != top_frames(low, padded, 1)


def test_the_connector_picks_high_res_frames_by_the_questions_words(tiny_model, tiny_llm):
    conn = LongVU.build(LongVUConfig(**TINY, max_positions=90), str(tiny_model), seed=0).eval()
    clip = sample(6, seed=6, question_len=1)  # budget 90 - 12 - 16 = 62: 36 low + 1 high-res upgrade
    embed = tiny_llm.get_input_embeddings().weight
    with torch.no_grad():
        low = conn.low_res(conn.sva(clip["siglip"], clip["dino"]))
        picks = {}
        for token in range(3, 60):
            picks.setdefault(tuple(top_frames(low, embed[token:token + 1], 1)), token)
        assert len(picks) >= 2
        high = conn.high_res(conn.sva(clip["siglip"], clip["dino"]))
        outputs = []
        for frames, token in list(picks.items())[:2]:
            out = conn.visual_tokens(make_batch([{**clip, "question": [token]}]), tiny_llm)
            expected = torch.cat([high[i] if i in frames else low[i] for i in range(6)])  # 5 x 6 + 20 = 50 <= 62
            torch.testing.assert_close(out.embeds[0][out.mask[0]], expected, atol=1e-5, rtol=1e-5)
            outputs.append(out.embeds[0])
        assert not torch.equal(*outputs)


# ---------------------------------------------------------------------- config and builders
def test_config_checks_report_every_problem():
    assert LongVUConfig().check() == [] and LongVUConfig(**TINY).check() == []
    problems = LongVUConfig(grid=10, query_side=4, lowres_side=4, heads=5, stc_threshold=1.5, frame_cap=0,
                            max_positions=16).check()
    assert problems == ["frame_cap must be >= 1, got 0", "grid (10) must be a multiple of query_side (4)",
                        "lowres_side (4) must be smaller than query_side (4)",
                        "width (1024) must be divisible by heads (5)",
                        "stc_threshold is a cosine similarity: it must be within [-1, 1], got 1.5",
                        "max_positions must be > 16 or null, got 16"]


def test_static_builders(tiny_model):
    cfg = LongVUConfig(**TINY)
    model = str(tiny_model)
    assert LongVU.expected_streams(cfg, model) == {"siglip.grid": (64, 64), "dino.grid": (64, 64)}
    assert LongVU.expected_streams(LongVUConfig(), model) == {"siglip.grid": (576, 1152), "dino.grid": (576, 1536)}
    assert LongVU.expected_taps(cfg, model) == {"siglip.grid": "grid@8x8", "dino.grid": "grid@8x8"}
    assert LongVU.extract_args(cfg, model, ["siglip.grid", "dino.grid"]) == (
        '--encoder siglip=SIGLIP_DIR --encoder dino=DINO_DIR '
        '"encoders.siglip.taps.grid=grid@8x8" "encoders.dino.taps.grid=grid@8x8"')
    assert LongVU.extract_args(cfg, model, ["dino.grid"]) == (
        '--encoder dino=DINO_DIR "encoders.dino.taps.grid=grid@8x8"')
    assert LongVU.tokens_per_frame(cfg, model) == 0 == LongVU.tokens_per_frame(LongVUConfig(), model)  # budgeted
    assert LongVU.model_problems(cfg, model) == []
    assert LongVU.model_problems(LongVUConfig(**TINY, max_positions=4096), model) == [
        f"connector.max_positions (4096) exceeds the LLM's 2048 positions (text_config.max_position_embeddings "
        f"of {model})"]
    a, b, c = (LongVU.build(cfg, model, seed=s) for s in (0, 0, 1))
    assert a.max_positions == 2048 and LongVU.build(LongVUConfig(**TINY, max_positions=512), model).max_positions == 512
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.state_dict()["sva.query"], c.state_dict()["sva.query"])
    assert a.streams() == ("siglip.grid", "dino.grid")


def test_the_paper_size_connector_has_about_56m_parameters():
    with torch.device("meta"):
        sva, projector, newline = longvu_modules(LongVUConfig(), 3584)  # Qwen2-7B's width, as in the paper
    total = sum(p.numel() for m in (sva, projector) for p in m.parameters()) + newline.numel()
    assert abs(total - 56.0e6) < 0.1e6


def test_default_precision_cli_train_then_generate_and_ask(streams_store, toy_corpus, tiny_model, tmp_path):
    """The tiny recipe at the shipped default precision (bf16 LLM, the bf16 DeepSpeed JSON): train on the store's
    SigLIP and DINOv2 groups, then generate and ask (which encodes the video with both recorded towers) agree."""
    import json
    import shutil

    from conftest import generate_then_ask, run_cli

    store = tmp_path / "store"
    shutil.copytree(streams_store, store)
    run = tmp_path / "run"
    run_cli("train", store, toy_corpus / "train.json", "--model", tiny_model, "--out", run, "--config",
            "configs/train_longvu_tiny.yaml", "llm_dtype=bfloat16", "deepspeed=configs/ds_zero2_bf16.json",
            "max_steps=2", "save_every=2", "data.batch_size=2", "data.num_workers=0", "--no-progress",
            env={"OMP_NUM_THREADS": "1"})
    # and resumes (a LongVU run's saved config was once compared with DualFocus's defaults and refused)
    out = run_cli("train", store, toy_corpus / "train.json", "--model", tiny_model, "--out", run, "--config",
                  "configs/train_longvu_tiny.yaml", "llm_dtype=bfloat16", "deepspeed=configs/ds_zero2_bf16.json",
                  "max_steps=3", "save_every=2", "data.batch_size=2", "data.num_workers=0", "--no-progress", "--resume",
                  env={"OMP_NUM_THREADS": "1"}).stdout
    assert "steps: 3 (resumed at step 2)" in out, out
    meta = json.loads((run / "final" / "dualfocus.json").read_text())
    assert (meta["connector"], meta["llm_dtype"], meta["streams"]) == ("longvu", "bfloat16",
                                                                       ["siglip.grid", "dino.grid"])
    generate_then_ask(store, run / "final", toy_corpus, tmp_path)
