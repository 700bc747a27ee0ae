"""Unit properties of the tap grammar, tap shapes and the pure tap tensor ops (no model involved)."""

from __future__ import annotations

import pytest
import torch

from dualfocus.encoders.taps import (GRAMMAR, Cuts, Geometry, Tap, check_taps, parse_tap, pool_runs, resize_grid,
                                     take, tap_shape, tokens_to_map)

# A ViT-g/14-like geometry at 224 px (39 blocks, 1408 wide, CLS + 16x16 patches) and a ConvNeXt one
VIT = Geometry(model="eva model /m/vit", depth=39, width=1408, prefix_tokens=1, grid=(16, 16))
CONV = Geometry(model="convnext model /m/conv", depth=4, width=3072, prefix_tokens=0, grid=(18, 18),
                has_post_ln=False, has_tokens=False)


@pytest.mark.parametrize("text, tap", [
    ("post_ln", Tap("post_ln")),
    ("hidden[19]", Tap("hidden", 19)),
    ("hidden[-1]", Tap("hidden", -1)),
    ("hidden[0]", Tap("hidden", 0)),
    ("patches", Tap("patches", -2)),
    ("patches[3]", Tap("patches", 3)),
    ("pool4", Tap("pool4", -2)),
    ("pool4[-3]", Tap("pool4", -3)),
    ("grid", Tap("grid")),
    ("grid@24x12", Tap("grid", size=(24, 12))),
    (" grid@24x24 ", Tap("grid", size=(24, 24))),
])
def test_parse_tap_reads_every_form_and_prints_it_back(text, tap):
    assert parse_tap(text) == tap
    assert parse_tap(str(tap)) == tap  # the canonical text parses to the same tap


@pytest.mark.parametrize("text", ["", "hidden", "hidden[]", "hidden[1.5]", "post_ln[2]", "grid[1]", "grid@24",
                                  "grid@0x4", "pool4@2x2", "pool2", "Post_LN", "hidden[1]x", None, 3])
def test_malformed_taps_are_refused_naming_the_text_and_the_grammar(text):
    with pytest.raises(ValueError) as err:
        parse_tap(text)
    assert repr(text) in str(err.value)
    if text != "grid@0x4":
        assert GRAMMAR in str(err.value)


def test_tap_shapes_follow_the_geometry():
    # the paper's numbers: 257 tokens of 1408, 64 pooled tokens, the QA-ViT cut at block 19
    assert tap_shape("post_ln", VIT) == (257, 1408)
    assert tap_shape(f"hidden[{VIT.depth // 2}]", VIT) == (257, 1408)
    assert tap_shape("patches", VIT) == (256, 1408)
    assert tap_shape("pool4", VIT) == (64, 1408)
    assert tap_shape("pool4[5]", VIT) == (64, 1408)
    assert tap_shape("grid", VIT) == (256, 1408)
    assert tap_shape("grid@24x24", VIT) == (576, 1408)
    assert tap_shape("grid", CONV) == (324, 3072)
    assert tap_shape(Tap("grid", size=(3, 5)), CONV) == (15, 3072)


@pytest.mark.parametrize("k", [-41, 40, 100])
def test_hidden_beyond_the_depth_is_refused_naming_tap_model_and_depth(k):
    with pytest.raises(ValueError) as err:
        tap_shape(f"hidden[{k}]", VIT)
    message = str(err.value)
    assert f"hidden[{k}]" in message and "eva model /m/vit" in message and "depth 39" in message
    assert "[-40, 39]" in message


@pytest.mark.parametrize("k", [-40, -1, 0, 39])
def test_hidden_within_the_depth_is_accepted(k):
    assert tap_shape(f"hidden[{k}]", VIT) == (257, 1408)


def test_convnext_gives_only_grid_taps():
    for text in ("post_ln", "hidden[1]", "patches", "pool4"):
        with pytest.raises(ValueError, match="convnext model /m/conv"):
            tap_shape(text, CONV)


def test_pool4_needs_a_patch_count_divisible_by_four():
    odd = Geometry(model="clip model /m/b32", depth=12, width=768, prefix_tokens=1, grid=(7, 7))
    with pytest.raises(ValueError, match="49 patches"):
        tap_shape("pool4", odd)
    assert tap_shape("patches", odd) == (49, 768)


def test_check_taps_reports_every_problem_at_once_with_the_tap_name():
    problems = check_taps({"semantic": "post_ln", "qavit": "hidden[99]", "bad": "pool5", "9x": "grid"}, VIT)
    assert len(problems) == 3
    assert any(p.startswith("taps.qavit:") and "hidden[99]" in p for p in problems)
    assert any(p.startswith("taps.bad:") and "'pool5'" in p for p in problems)
    assert any("'9x'" in p for p in problems)
    assert check_taps({"semantic": "post_ln", "spatiotemporal": "pool4"}, VIT) == []
    assert check_taps({}, VIT)  # nothing asked is a problem too


def test_pool_runs_averages_runs_of_four_consecutive_tokens():
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)  # [n=2, p=8, d=3]
    pooled = pool_runs(x)
    assert pooled.shape == (2, 2, 3)
    assert torch.equal(pooled[1, 0], x[1, 0:4].mean(dim=0))
    assert torch.equal(pooled[0, 1], x[0, 4:8].mean(dim=0))
    with pytest.raises(ValueError, match="6 is not divisible"):
        pool_runs(x[:, :6])


def test_grid_tokens_are_row_major():
    tokens = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(2, 6, 4)  # [n, h*w, d] with h=2, w=3
    feature_map = tokens_to_map(tokens, (2, 3))  # [n, d, h, w]
    assert torch.equal(feature_map[1, :, 1, 2], tokens[1, 1 * 3 + 2])


def test_resizing_a_constant_grid_keeps_it_constant():
    tokens = torch.full((2, 6 * 4, 5), 3.25)  # a 6x4 grid, every token 3.25
    for size in ((24, 24), (2, 3), (6, 9)):
        resized = resize_grid(tokens, (6, 4), size)
        assert resized.shape == (2, size[0] * size[1], 5)
        assert torch.allclose(resized, torch.full_like(resized, 3.25))


def test_resizing_to_the_native_size_is_the_identity():
    tokens = torch.randn(3, 5 * 7, 4)
    assert torch.equal(resize_grid(tokens, (5, 7), (5, 7)), tokens)


def test_resizing_interpolates_between_neighbours():
    ramp = torch.tensor([0.0, 2.0, 4.0, 6.0]).repeat(4).reshape(1, 16, 1)  # a 4x4 grid rising along w
    upsampled = resize_grid(ramp, (4, 4), (4, 8)).reshape(4, 8)  # [h, w]
    assert torch.all(upsampled[:, 1:] >= upsampled[:, :-1])  # still rising, and between the ends
    assert upsampled.min() == 0.0 and upsampled.max() == 6.0
    assert torch.equal(upsampled[0], upsampled[3])  # rows stay equal


def test_take_cuts_each_tap_from_one_forward():
    n, depth, d = 2, 3, 4
    geometry = Geometry(model="toy", depth=depth, width=d, prefix_tokens=1, grid=(2, 4))
    hidden = tuple(torch.randn(n, 1 + 8, d) for _ in range(depth + 1))  # [n, T, d] per hidden state
    cuts = Cuts(hidden=hidden, post_ln=torch.randn(n, 9, d), grid=torch.randn(n, 8, d))
    assert take(parse_tap("post_ln"), cuts, geometry) is cuts.post_ln
    assert take(parse_tap("hidden[-1]"), cuts, geometry) is hidden[3]
    assert torch.equal(take(parse_tap("patches"), cuts, geometry), hidden[2][:, 1:])
    assert torch.equal(take(parse_tap("pool4[1]"), cuts, geometry), hidden[1][:, 1:].reshape(n, 2, 4, d).mean(2))
    assert take(parse_tap("grid"), cuts, geometry) is cuts.grid
    assert take(parse_tap("grid@4x4"), cuts, geometry).shape == (n, 16, d)
    for text in ("post_ln", "hidden[1]", "patches", "pool4", "grid", "grid@4x4"):  # shapes as promised
        assert tuple(take(parse_tap(text), cuts, geometry).shape[1:]) == tap_shape(text, geometry)
