"""Unit tests of the Focus Feature Projector and the relative-time embedding."""

from __future__ import annotations

import pytest
import torch

from dualfocus.connectors.ffp import FocusFeatureProjector, FusionBlock, MaskedAttention
from dualfocus.connectors.time_embedding import RelativeTimeEmbedding, relative_time_index

D_SEM, D_MOTION, D_LLM, HEADS = 12, 20, 16, 4


def make_ffp(gates: tuple[float, ...] | None = None, seed: int = 0, dtype=torch.float32) -> FocusFeatureProjector:
    torch.manual_seed(seed)
    ffp = FocusFeatureProjector(D_SEM, D_MOTION, D_LLM, n_blocks=2, n_heads=HEADS).to(dtype).eval()
    if gates is not None:
        with torch.no_grad():
            for block, g in zip(ffp.blocks, gates, strict=True):
                block.gate.fill_(g)
    return ffp


# ---------------------------------------------------------------- a plain reference of the design
def reference_attention(attn: MaskedAttention, query, key_value, allowed_keys: list[list[int]]):
    """Single sample, one query row at a time, over an explicit list of allowed key indices."""
    q, k, v = attn.q_proj(query), attn.k_proj(key_value), attn.v_proj(key_value)
    d_head = q.shape[-1] // attn.n_heads
    rows = []
    for i, keys in enumerate(allowed_keys):
        if not keys:  # attending to nothing contributes nothing
            rows.append(q.new_zeros(q.shape[-1]))
            continue
        heads = []
        for h in range(attn.n_heads):
            cols = slice(h * d_head, (h + 1) * d_head)
            scores = q[i, cols] @ k[keys, cols].T / d_head**0.5
            heads.append(torch.softmax(scores, dim=-1) @ v[keys, cols])
        rows.append(attn.out_proj(torch.cat(heads)))
    return torch.stack(rows) if rows else q.new_zeros(0, q.shape[-1])


def reference_block(block: FusionBlock, s, m):
    """DESIGN.md section 1, steps 1-4, for one unpadded sample: s [S, d], m [M, d]."""
    n_s, n_m = len(s), len(m)
    every_motion = [list(range(n_m))] * n_m
    m = block.motion_norm(m + reference_attention(block.motion_attn, m, m, every_motion))
    x = torch.cat([s, m])
    # semantic rows see every token; motion rows see only the semantic tokens
    rows = [list(range(n_s + n_m))] * n_s + [list(range(n_s))] * n_m
    x = block.joint_attn_norm(x + reference_attention(block.joint_attn, x, x, rows))
    x = block.joint_ffn_norm(x + block.joint_ffn(x))
    s_c, m_next = x[:n_s], x[n_s:]
    c = block.cross_attn_norm(s_c + reference_attention(block.cross_attn, s_c, m_next, [list(range(n_m))] * n_s))
    c = block.cross_ffn_norm(c + block.cross_ffn(c))
    return s + block.gate * c, m_next


def reference_ffp(ffp: FocusFeatureProjector, semantic, motion):
    s, m = ffp.mlp_s(semantic), ffp.mlp_t(motion)
    for block in ffp.blocks:
        s, m = reference_block(block, s, m)
    return s


# ---------------------------------------------------------------- tests
def test_gate_zero_is_mlp_s_and_nonzero_gate_is_not():
    ffp = make_ffp()
    semantic, motion = torch.randn(2, 6, D_SEM), torch.randn(2, 9, D_MOTION)
    with torch.no_grad():
        assert torch.equal(ffp(semantic, motion), ffp.mlp_s(semantic))
        for block in ffp.blocks:
            block.gate.fill_(0.5)
        out = ffp(semantic, motion)
    assert (out - ffp.mlp_s(semantic)).abs().max() > 1e-2


def test_matches_plain_reference_of_the_design():
    ffp = make_ffp(gates=(0.7, -1.3), dtype=torch.float64)
    semantic, motion = torch.randn(1, 5, D_SEM, dtype=torch.float64), torch.randn(1, 7, D_MOTION, dtype=torch.float64)
    with torch.no_grad():
        got = ffp(semantic, motion)[0]
        want = reference_ffp(ffp, semantic[0], motion[0])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_joint_step_equals_one_attention_under_the_joint_mask():
    """The joint step runs as two attention calls; it must equal one attention over [s ; m] under the
    explicit (S+M) x (S+M) mask of the design, padding included."""
    torch.manual_seed(2)
    block = FusionBlock(D_LLM, HEADS).eval()
    s, m = torch.randn(2, 4, D_LLM), torch.randn(2, 5, D_LLM)
    s_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    m_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    keys = torch.cat([s_mask, m_mask], dim=1)  # [b, S+M]
    semantic_rows = keys[:, None, :].expand(-1, 4, -1)  # every valid token
    motion_rows = torch.cat([s_mask, torch.zeros_like(m_mask)], dim=1)[:, None, :].expand(-1, 5, -1)  # semantic only
    allowed = torch.cat([semantic_rows, motion_rows], dim=1)  # [b, S+M, S+M]
    with torch.no_grad():
        s_c, m_next = block.joint(s, m, s_mask, m_mask)
        x = torch.cat([s, m], dim=1)
        x = block.joint_attn_norm(x + block.joint_attn(x, x, allowed))
        want = block.joint_ffn_norm(x + block.joint_ffn(x))
    torch.testing.assert_close(torch.cat([s_c, m_next], dim=1), want, rtol=0, atol=1e-6)


def test_joint_step_motion_rows_ignore_other_motion_tokens():
    torch.manual_seed(1)
    block = FusionBlock(D_LLM, HEADS).eval()
    s, m = torch.randn(1, 4, D_LLM), torch.randn(1, 6, D_LLM)
    s_mask, m_mask = torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    perturbed = m.clone()
    perturbed[0, 2] += 3.0 * torch.randn(D_LLM)
    with torch.no_grad():
        s_c, m_next = block.joint(s, m, s_mask, m_mask)
        s_c2, m_next2 = block.joint(s, perturbed, s_mask, m_mask)
    others = [0, 1, 3, 4, 5]
    torch.testing.assert_close(m_next2[0, others], m_next[0, others], rtol=0, atol=1e-6)
    assert (m_next2[0, 2] - m_next[0, 2]).abs().max() > 1e-2  # its own residual path
    assert (s_c2 - s_c).abs().max() > 1e-3  # semantic rows do look at motion


def test_padding_never_changes_a_sample():
    ffp = make_ffp(gates=(0.8, -0.6))
    lengths = [(6, 4), (3, 8), (5, 2)]
    samples = [(torch.randn(n_s, D_SEM), torch.randn(n_m, D_MOTION)) for n_s, n_m in lengths]
    with torch.no_grad():
        alone = [ffp(s[None], m[None])[0] for s, m in samples]
    for extra_s, extra_m in [(0, 0), (3, 5)]:
        width_s = max(n for n, _ in lengths) + extra_s
        width_m = max(n for _, n in lengths) + extra_m
        semantic = torch.full((3, width_s, D_SEM), float("nan"))  # padding content must never leak
        motion = torch.full((3, width_m, D_MOTION), float("nan"))
        s_mask = torch.zeros(3, width_s, dtype=torch.bool)
        m_mask = torch.zeros(3, width_m, dtype=torch.bool)
        for i, (s, m) in enumerate(samples):
            semantic[i, : len(s)], motion[i, : len(m)] = s, m
            s_mask[i, : len(s)], m_mask[i, : len(m)] = True, True
        with torch.no_grad():
            out = ffp(semantic, motion, s_mask, m_mask)
        assert torch.isfinite(out).all()
        for i, (s, _) in enumerate(samples):
            torch.testing.assert_close(out[i, : len(s)], alone[i], rtol=0, atol=1e-5)
            assert torch.equal(out[i, len(s) :], torch.zeros_like(out[i, len(s) :]))


def test_padded_batch_backward_is_finite_and_handles_a_sample_without_motion():
    ffp = make_ffp(gates=(0.5, 0.5))
    semantic, motion = torch.randn(2, 5, D_SEM), torch.randn(2, 4, D_MOTION)
    s_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m_mask = torch.tensor([[0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)  # sample 0: no motion at all
    out = ffp(semantic, motion, s_mask, m_mask)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in ffp.parameters())
    # With no motion to attend to, sample 0 is what the design gives for an empty motion stream.
    with torch.no_grad():
        want = reference_ffp(ffp, semantic[0, :3], motion[0, :0])
    torch.testing.assert_close(out[0, :3].detach(), want, rtol=0, atol=1e-5)


def test_attention_row_without_allowed_keys_is_zero():
    torch.manual_seed(3)
    attn = MaskedAttention(D_LLM, HEADS).eval()
    query, key_value = torch.randn(1, 3, D_LLM), torch.randn(1, 4, D_LLM)
    allowed = torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]]], dtype=torch.bool)
    with torch.no_grad():
        out = attn(query, key_value, allowed)[0]
        want = reference_attention(attn, query[0], key_value[0], [[0, 1, 3], [], [2]])
    assert torch.equal(out[1], torch.zeros(D_LLM))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_gradients_reach_every_parameter():
    semantic, motion = torch.randn(2, 5, D_SEM), torch.randn(2, 7, D_MOTION)
    weights = torch.randn(2, 5, D_LLM)

    # At init (gates 0): the gates and mlp_s learn; nothing behind a gate gets a gradient yet.
    ffp = make_ffp()
    (ffp(semantic, motion) * weights).sum().backward()
    for name, p in ffp.named_parameters():
        behind_gate = name.startswith("mlp_t.") or (name.startswith("blocks.") and not name.endswith(".gate"))
        if behind_gate:
            assert torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad.abs().max() > 0, name

    # With open gates every parameter gets a gradient.
    ffp = make_ffp(gates=(0.3, -0.4))
    (ffp(semantic, motion) * weights).sum().backward()
    for name, p in ffp.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_constructor_rejects_bad_widths():
    with pytest.raises(ValueError, match="divisible"):
        FocusFeatureProjector(8, 8, 10, n_heads=4)


# ---------------------------------------------------------------- relative-time embedding
@pytest.mark.parametrize(
    ("n", "want"),
    [(1, [0]), (2, [0, 999]), (3, [0, 500, 999]), (5, [0, 250, 500, 749, 999]), (0, [])],
)
def test_relative_time_index_values(n, want):
    got = relative_time_index(n)
    assert got.dtype == torch.long
    assert got.tolist() == want


def test_relative_time_index_is_monotone_and_spans_the_table():
    for n in (7, 64, 999, 1000, 1500):
        idx = relative_time_index(n)
        assert idx[0] == 0 and idx[-1] == 999
        assert (idx[1:] >= idx[:-1]).all()


def test_time_embedding_adds_per_clip_index_and_leaves_padding_alone():
    torch.manual_seed(0)
    emb = RelativeTimeEmbedding(dim=8)
    motion = torch.randn(3, 5, 2, 8)
    frame_mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]],
        dtype=torch.bool,
    )
    with torch.no_grad():
        out = emb(motion, frame_mask)
    table = emb.embedding.weight.detach()
    for i, n in enumerate(frame_mask.sum(1).tolist()):
        want = motion[i, :n] + table[relative_time_index(n)][:, None, :]
        torch.testing.assert_close(out[i, :n], want, rtol=0, atol=0)
        assert torch.equal(out[i, n:], motion[i, n:])  # masked frames untouched
    assert torch.equal(emb.indices(frame_mask)[1], torch.tensor([0, 999, 0, 0, 0]))


def test_time_embedding_init_is_small():
    std = RelativeTimeEmbedding(dim=64).embedding.weight.std().item()
    assert 0.015 < std < 0.025


def test_gate_init_is_zero_by_default_and_configurable():
    from dualfocus.connectors.dualfocus import DualFocusConfig

    assert DualFocusConfig().gate_init == 0.0  # the paper's recipe
    default = FocusFeatureProjector(8, 6, 16, n_blocks=2, n_heads=2)
    opened = FocusFeatureProjector(8, 6, 16, n_blocks=2, n_heads=2, gate_init=1.0)
    assert all(b.gate.item() == 0.0 for b in default.blocks)
    assert all(b.gate.item() == 1.0 for b in opened.blocks)
    s, m = torch.randn(1, 4, 8), torch.randn(1, 6, 6)
    opened.load_state_dict(default.state_dict() | {f"blocks.{i}.gate": torch.ones(1) for i in range(2)})
    assert not torch.allclose(opened(s, m), opened.mlp_s(s))
