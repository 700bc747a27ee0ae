"""QA-ViT (DualFocus): the top blocks of a frozen vision transformer, made question-aware.

The feature store caches the hidden state entering block ``start`` (``hidden_states[start]`` of the
Hugging Face vision model, by default ``start = depth // 2``). At train time the frozen blocks
``start .. depth-1`` run again from that state, each with three small trainable adapters:

* a question projection ``LayerNorm(d_l) -> Linear(d_l, d_v) -> GELU -> Linear(d_v, d_v)`` that maps the
  question's LLM token embeddings into the vision width;
* in attention, the projected question tokens are prepended to ``layer_norm1(x)`` (they are not normed
  themselves) and go through the block's frozen qkv projection. Only the visual tokens get output rows;
  they attend over question + visual keys. The frozen output projection follows, added residually with
  no gate;
* a gated parallel MLP: ``x = x + mlp(norm2(x)) + tanh(gate) * parallel_mlp(norm2(x))``. ``gate`` starts
  at 0 and ``parallel_mlp`` starts as a copy of the block's own pretrained MLP.

The frozen ``post_layernorm`` follows the last block.

One deliberate difference from the reference: there, the question padding mask is accepted but ignored,
so padded question tokens act as keys. Here, positions with ``question_mask == 0`` are excluded as keys.
So an all-padding question gives the same output as no question at all.

Shape legend:
    N    frames (every frame is one ViT image; the caller repeats the question for each frame)
    P    vision tokens per frame (p patches + 1 CLS)
    L    question tokens
    d_v  vision width
    d_l  LLM width (the width of the question's token embeddings)

Mask convention: ``question_mask`` is nonzero/True for real tokens and 0/False for padding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _qkv_bias(attn: nn.Module) -> torch.Tensor | None:
    """The [3 d_v] bias of the fused qkv projection, or None when the model has no q/v bias.

    transformers 5 stores it as ``qkv.bias = cat(q_bias, 0, v_bias)``. Older releases and the EVA code keep
    separate ``q_bias`` / ``v_bias`` parameters with no key bias; both layouts are read here.
    """
    if attn.qkv.bias is not None:
        return attn.qkv.bias
    q_bias, v_bias = getattr(attn, "q_bias", None), getattr(attn, "v_bias", None)
    if q_bias is None and v_bias is None:
        return None
    zeros = attn.qkv.weight.new_zeros(attn.qkv.weight.shape[1])
    return torch.cat([zeros if q_bias is None else q_bias, zeros, zeros if v_bias is None else v_bias])


class QuestionProjection(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, from the LLM width to the vision width.

    Linear weights are trunc_normal(std 0.02) with zero biases; the LayerNorm starts at weight 1 and bias 0.

    forward(question [N, L, d_l]) -> [N, L, d_v]
    """

    def __init__(self, d_l: int, d_v: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_l)
        self.fc1 = nn.Linear(d_l, d_v)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_v, d_v)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    def forward(self, question: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(question))))


class QuestionAwareBlock(nn.Module):
    """One frozen ViT block (an HF ``InstructBlipEncoderLayer``) with the QA-ViT adapters.

    The block is shared, not copied: its weights stay those of the vision model it came from and are set
    to ``requires_grad=False`` here. The block must have ``layer_norm1``, ``self_attn`` (with ``qkv``,
    ``projection``, ``num_heads``, ``scale``), ``layer_norm2`` and ``mlp``. The frozen path never uses
    dropout. Trainable: ``question_proj``, ``parallel_mlp`` and ``gate`` (see
    ``named_trainable_parameters``).

    forward(x [N, P, d_v], question [N, L, d_l] | None, question_mask [N, L] | None) -> [N, P, d_v]
    With ``question=None`` there are no question keys: the frozen block plus the gated branch.
    """

    def __init__(self, block: nn.Module, d_l: int):
        super().__init__()
        self.block = _freeze(block)
        weight = block.self_attn.qkv.weight
        d_v = weight.shape[1]
        # Adapters live on the block's device. The question projection and gate are created in the default
        # dtype; parallel_mlp keeps the dtype of the MLP it copies. forward casts at their boundaries.
        self.question_proj = QuestionProjection(d_l, d_v).to(weight.device)
        self.parallel_mlp = copy.deepcopy(block.mlp).requires_grad_(True)
        self.gate = nn.Parameter(torch.zeros(1, device=weight.device))

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter parameters, named as in this module's ``state_dict``."""
        yield from self.question_proj.named_parameters(prefix="question_proj")
        yield from self.parallel_mlp.named_parameters(prefix="parallel_mlp")
        yield "gate", self.gate

    def _attention(self, x_normed: torch.Tensor, question: torch.Tensor | None,
                   question_mask: torch.Tensor | None) -> torch.Tensor:
        """Visual rows of the frozen attention over [question ; visual] keys. Returns [N, P, d_v]."""
        attn = self.block.self_attn
        n, p, d = x_normed.shape
        weight, bias = attn.qkv.weight, _qkv_bias(attn)
        # The fused weight is [q; k; v] stacked on the output axis, each d_v rows split into heads.
        q = F.linear(x_normed, weight[:d], None if bias is None else bias[:d])
        keys_in = x_normed if question is None else torch.cat([question, x_normed], dim=1)  # [N, L+P, d_v]
        k, v = F.linear(keys_in, weight[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, t.shape[1], attn.num_heads, -1).transpose(1, 2)  # [N, h, S, d_v/h]

        allowed = None
        if question is not None and question_mask is not None:
            visual = question_mask.new_ones(n, p, dtype=torch.bool)
            allowed = torch.cat([question_mask.bool(), visual], dim=1)[:, None, None, :]  # [N, 1, 1, L+P]
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=allowed, scale=attn.scale)
        return attn.projection(out.transpose(1, 2).reshape(n, p, d))

    def forward(self, x: torch.Tensor, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        blk = self.block
        if question is not None:
            question = self.question_proj(question.to(self.question_proj.fc1.weight.dtype)).to(x.dtype)
        x = x + self._attention(blk.layer_norm1(x), question, question_mask)
        h = blk.layer_norm2(x)
        parallel = self.parallel_mlp(h.to(next(self.parallel_mlp.parameters()).dtype)).to(x.dtype)
        return x + blk.mlp(h) + torch.tanh(self.gate).to(x.dtype) * parallel


class QuestionAwareTop(nn.Module):
    """Blocks ``start .. depth-1`` of an HF InstructBLIP vision model as QuestionAwareBlocks, then its
    frozen ``post_layernorm``.

    Only the top blocks and the final norm are held (shared with ``vision_model``, frozen), not the
    embeddings or the bottom blocks. The input is ``vision_model(..., output_hidden_states=True)
    .hidden_states[start]``, the state entering block ``start``.

    forward(hidden [N, P, d_v], question [N, L, d_l] | None, question_mask [N, L] | None) -> [N, P, d_v]
    """

    def __init__(self, vision_model: nn.Module, start: int, d_l: int):
        super().__init__()
        layers = vision_model.encoder.layers
        depth = len(layers)
        if isinstance(start, bool) or not isinstance(start, int) or not 0 < start < depth:
            raise ValueError(f"QA-ViT start must be an int with 0 < start < depth={depth}, got {start!r}")
        if isinstance(d_l, bool) or not isinstance(d_l, int) or d_l < 1:
            raise ValueError(f"QA-ViT d_l (LLM width) must be a positive int, got {d_l!r}")
        self.start, self.depth, self.d_l = start, depth, d_l
        self.d_v = vision_model.post_layernorm.normalized_shape[0]
        self.blocks = nn.ModuleList(QuestionAwareBlock(layers[i], d_l) for i in range(start, depth))
        self.post_layernorm = _freeze(vision_model.post_layernorm)

    @staticmethod
    def default_start(depth: int) -> int:
        """The first question-aware block in DualFocus's 'late' setting: ``depth // 2``."""
        return depth // 2

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Adapter parameters only, named as in ``self.state_dict()`` (load with ``strict=False``)."""
        for i, block in enumerate(self.blocks):
            for name, param in block.named_trainable_parameters():
                yield f"blocks.{i}.{name}", param

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The question projections, parallel MLPs and gates of every block, for the optimizer."""
        return [param for _, param in self.named_trainable_parameters()]

    def _check(self, hidden: torch.Tensor, question: torch.Tensor | None,
               question_mask: torch.Tensor | None) -> None:
        problems = []
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_v:
            problems.append(f"hidden must be [N, P, {self.d_v}], got {list(hidden.shape)}")
        if question is not None and (question.dim() != 3 or question.shape[0] != hidden.shape[0]
                                     or question.shape[-1] != self.d_l):
            problems.append(f"question must be [N={hidden.shape[0]}, L, {self.d_l}], got {list(question.shape)}")
        if question_mask is not None:
            if question is None:
                problems.append("question_mask was given without a question")
            elif tuple(question_mask.shape) != tuple(question.shape[:2]):
                problems.append(f"question_mask must be {list(question.shape[:2])}, got {list(question_mask.shape)}")
        if problems:
            raise ValueError("QuestionAwareTop inputs: " + "; ".join(problems))

    def forward(self, hidden: torch.Tensor, question: torch.Tensor | None = None,
                question_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(hidden, question, question_mask)
        for block in self.blocks:
            hidden = block(hidden, question, question_mask)
        return self.post_layernorm(hidden)
