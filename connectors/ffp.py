"""Focus Feature Projector (FFP): fuses the semantic and spatio-temporal streams into LLM tokens.

Shape legend used below:
    b   batch (videos)
    S   semantic tokens per video (t frames x q queries, flattened, right-padded)
    M   motion tokens per video (t frames x m motion tokens per frame, flattened, right-padded)
    d_sem, d_motion   input widths of the two streams (d_q and d_v in DESIGN.md)
    d   d_llm, the width of the LLM the output tokens are fed to

Mask convention: every boolean mask in this file means True = "valid / allowed". Padding masks
(`semantic_mask`, `motion_mask`) are True for real tokens; attention masks are True where a query row
may attend to a key column, which is also what `F.scaled_dot_product_attention` expects. (Careful:
`nn.MultiheadAttention` reads a boolean mask the other way round, True = blocked; it is not used here.)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import nn


GATE_KINDS = ("linear", "tanh")


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def key_padding_attention_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Allow every query row to see every valid key.

    key_mask: [b, L_k] bool, True = valid key.  Returns [b, 1, L_k] bool, True = allowed (broadcast over rows).
    """
    return key_mask[:, None, :]


class MaskedAttention(nn.Module):
    """Multi-head attention with an explicit "allowed" mask.

    A query row whose mask allows no key at all (e.g. a video with no valid motion tokens) returns
    zeros instead of the NaN a softmax over nothing would give.

    forward(query [b, L_q, d], key_value [b, L_k, d], allowed [b, L_q, L_k] or [b, 1, L_k] bool) -> [b, L_q, d]
    (a [b, 1, L_k] mask applies to every row without building the [b, L_q, L_k] matrix).
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"attention width {dim} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        # No key bias: it adds the same q.b_k to every score of a row, which softmax cancels,
        # so it could never receive a gradient.
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2)  # [b, h, n, d/h]

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        has_key = allowed.any(dim=-1, keepdim=True)  # [b, L_q, 1]
        # Rows with nothing to attend to get every key so the softmax stays finite on every kernel
        # (some SDPA backends and older torch give NaN for an all-False row); zeroed below.
        safe = allowed | ~has_key
        # On CPU the plain softmax(QK^T)V kernel is ~1.6x faster than the fused one for these small head
        # widths with a boolean mask (forward + backward, measured with the tiny model); GPUs keep the default.
        kernel = sdpa_kernel([SDPBackend.MATH]) if query.device.type == "cpu" else contextlib.nullcontext()
        with kernel:
            out = self._attend(query, key_value, safe)
        return self._finish(out, has_key)

    def _attend(self, query: torch.Tensor, key_value: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(key_value)),
            self._heads(self.v_proj(key_value)),
            attn_mask=safe[:, None],  # [b, 1, L_q, L_k], broadcast over heads
            dropout_p=self.dropout if self.training else 0.0,
        )  # [b, h, L_q, d/h]

    def _finish(self, out: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
        b, _, n_q, _ = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, -1))  # [b, L_q, d]
        return out.masked_fill(~has_key, 0.0)


class FusionBlock(nn.Module):
    """One FFP fusion block (DESIGN.md section 1, steps 1-4).

    The scalar gate of step 4 starts at ``gate_init`` (the paper's 0 makes the block start as the identity
    on s). ``gate_kind`` "linear" uses it as is (the paper's); "tanh" uses tanh(gate), the bounded gate of
    Flamingo-style gated cross-attention (same value and slope at 0, never beyond +-1).

    forward(s [b, S, d], m [b, M, d], semantic_mask [b, S], motion_mask [b, M])
        -> (s_out [b, S, d], m_next [b, M, d])
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0, gate_init: float = 0.0,
                 gate_kind: str = "linear"):
        super().__init__()
        if gate_kind not in GATE_KINDS:
            raise ValueError(f"gate_kind must be one of {', '.join(GATE_KINDS)}, got {gate_kind!r}")
        self.gate_kind = gate_kind
        self.motion_attn = MaskedAttention(dim, n_heads, dropout)
        self.motion_norm = nn.LayerNorm(dim)
        self.joint_attn = MaskedAttention(dim, n_heads, dropout)
        self.joint_attn_norm = nn.LayerNorm(dim)
        self.joint_ffn = _mlp(dim, 2 * dim, dim)
        self.joint_ffn_norm = nn.LayerNorm(dim)
        self.cross_attn = MaskedAttention(dim, n_heads, dropout)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.cross_ffn = _mlp(dim, 2 * dim, dim)
        self.cross_ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        # Scalar gate (the paper starts it at 0, so the block starts as the identity on s). Shape [1] rather
        # than []: DeepSpeed's parameter broadcast cannot handle 0-dim tensors.
        self.gate = nn.Parameter(torch.full((1,), float(gate_init)))

    def joint(
        self,
        s: torch.Tensor,
        m: torch.Tensor,
        semantic_mask: torch.Tensor,
        motion_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 2: masked joint attention + FFN over [s ; m]; returns (s_c [b, S, d], m_next [b, M, d]).

        One attention layer over x = [s ; m] in which semantic rows see every valid token and motion rows
        only valid semantic tokens. It runs as two calls of the same layer (semantic rows over [s ; m],
        motion rows over s), the same numbers as one masked (S+M)^2 attention with S*(S+M) + M*S scores
        instead of (S+M)^2, and no [b, S+M, S+M] mask.
        """
        x = torch.cat([s, m], dim=1)  # [b, S+M, d]
        every_key = key_padding_attention_mask(torch.cat([semantic_mask, motion_mask], dim=1))  # [b, 1, S+M]
        semantic_rows = self.joint_attn(s, x, every_key)  # [b, S, d]
        motion_rows = self.joint_attn(m, s, key_padding_attention_mask(semantic_mask))  # [b, M, d]
        x = self.joint_attn_norm(x + self.drop(torch.cat([semantic_rows, motion_rows], dim=1)))
        x = self.joint_ffn_norm(x + self.drop(self.joint_ffn(x)))
        return x.split([s.shape[1], m.shape[1]], dim=1)

    def forward(
        self,
        s: torch.Tensor,
        m: torch.Tensor,
        semantic_mask: torch.Tensor,
        motion_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # 1. motion self-attention
        motion_keys = key_padding_attention_mask(motion_mask)
        m = self.motion_norm(m + self.drop(self.motion_attn(m, m, motion_keys)))
        # 2. joint attention: semantic rows see all, motion rows see semantic only
        s_c, m_next = self.joint(s, m, semantic_mask, motion_mask)
        # 3. semantic queries cross-attend to the updated motion tokens
        cross_keys = key_padding_attention_mask(motion_mask)
        c = self.cross_attn_norm(s_c + self.drop(self.cross_attn(s_c, m_next, cross_keys)))
        c = self.cross_ffn_norm(c + self.drop(self.cross_ffn(c)))
        # 4. gated residual onto the semantic tokens
        return s + self.gate_value() * c, m_next

    def gate_value(self) -> torch.Tensor:
        """The factor applied to the fused branch: the gate itself, or tanh of it. Shape [1]."""
        return torch.tanh(self.gate) if self.gate_kind == "tanh" else self.gate


class FocusFeatureProjector(nn.Module):
    """Maps semantic and motion tokens to the LLM width and fuses motion into the semantic tokens.

    `s = mlp_s(semantic)`, `m = mlp_t(motion)` (each Linear -> GELU -> Linear, hidden 2*d), then
    `n_blocks` FusionBlocks, each:
        1. m' = LN(m + SelfAttn(m))
        2. x = [s ; m'];  x = LN(x + JointAttn(x));  x = LN(x + FFN(x));  s_c, m_next = split(x)
           where semantic rows attend to every valid token and motion rows only to semantic tokens
        3. c = LN(s_c + CrossAttn(query=s_c, kv=m_next));  c = LN(c + FFN(c))
        4. s = s + g * c, with a scalar gate g (or tanh(g), `gate_kind="tanh"`) initialised to `gate_init`
    The output is `s`; only it goes to the LLM. With every gate at 0 (the paper's init) the output equals
    `mlp_s(semantic)` exactly.

    About the joint mask: the public reference implementation builds a boolean mask whose meaning is
    inverted relative to its own comment (so, as written, it blocks what the comment says is allowed).
    This module implements the stated semantics above, not the reference code's effective behaviour.

    Padding: tokens whose mask is False are never attended to; their inputs are zeroed first so
    whatever the padding holds (even NaN) cannot leak, and the output at padded semantic rows is 0.
    A sample's output does not depend on the other samples in the batch or on the amount of padding.

    Args:
        d_sem: width of the semantic stream (Q-Former output, d_q).
        d_motion: width of the spatio-temporal stream (vision width, d_v).
        d_llm: output width (d); must be divisible by n_heads.
        n_blocks: number of fusion blocks.
        n_heads: attention heads in every attention layer.
        dropout: dropout on attention weights and on every residual branch.
        gate_init: initial value of every block's gate (paper: 0).
        gate_kind: "linear" (paper: s + g*c) or "tanh" (s + tanh(g)*c).

    forward(semantic [b, S, d_sem], motion [b, M, d_motion],
            semantic_mask [b, S] bool | None, motion_mask [b, M] bool | None) -> [b, S, d]
    Masks default to all-valid.
    """

    def __init__(
        self,
        d_sem: int,
        d_motion: int,
        d_llm: int,
        n_blocks: int = 2,
        n_heads: int = 8,
        dropout: float = 0.0,
        gate_init: float = 0.0,
        gate_kind: str = "linear",
    ):
        super().__init__()
        for name, value in (("d_sem", d_sem), ("d_motion", d_motion), ("d_llm", d_llm), ("n_heads", n_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        if d_llm % n_heads != 0:
            raise ValueError(f"d_llm={d_llm} must be divisible by n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.mlp_s = _mlp(d_sem, 2 * d_llm, d_llm)
        self.mlp_t = _mlp(d_motion, 2 * d_llm, d_llm)
        self.blocks = nn.ModuleList(FusionBlock(d_llm, n_heads, dropout, gate_init, gate_kind) for _ in range(n_blocks))

    def forward(
        self,
        semantic: torch.Tensor,
        motion: torch.Tensor,
        semantic_mask: torch.Tensor | None = None,
        motion_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if semantic.ndim != 3 or motion.ndim != 3 or semantic.shape[0] != motion.shape[0]:
            raise ValueError(
                "expected semantic [b, S, d_sem] and motion [b, M, d_motion] with the same b, "
                f"got {tuple(semantic.shape)} and {tuple(motion.shape)}"
            )
        if semantic_mask is None:
            semantic_mask = torch.ones(semantic.shape[:2], dtype=torch.bool, device=semantic.device)
        if motion_mask is None:
            motion_mask = torch.ones(motion.shape[:2], dtype=torch.bool, device=motion.device)
        semantic_mask, motion_mask = semantic_mask.bool(), motion_mask.bool()
        if semantic_mask.shape != semantic.shape[:2] or motion_mask.shape != motion.shape[:2]:
            raise ValueError(
                f"masks must be [b, S] and [b, M]: got semantic_mask {tuple(semantic_mask.shape)} for "
                f"semantic {tuple(semantic.shape)}, motion_mask {tuple(motion_mask.shape)} for "
                f"motion {tuple(motion.shape)}"
            )
        semantic_valid = semantic_mask[..., None]  # [b, S, 1]
        s = self.mlp_s(semantic.masked_fill(~semantic_valid, 0.0))  # [b, S, d]
        m = self.mlp_t(motion.masked_fill(~motion_mask[..., None], 0.0))  # [b, M, d]
        for block in self.blocks:
            s, m = block(s, m, semantic_mask, motion_mask)
        return s.masked_fill(~semantic_valid, 0.0)
