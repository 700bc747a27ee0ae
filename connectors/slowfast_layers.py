"""Slow-Fast hybrid decoder layers: text rows of chosen layers of a frozen LLM also attend to the slow tokens.

Legend: ``b`` batch, ``n`` query rows of one attention call, ``S`` spliced sequence length, ``m`` slow tokens,
``d`` LLM width, ``H`` query heads, ``H_kv`` key/value heads, ``dh`` head width.

Nothing of the decoder is copied or wrapped. ``attach`` switches the LLM to the attention function registered
here under ``ATTENTION_NAME`` (transformers' ``AttentionInterface``). That function runs the stock ``"sdpa"``
attention; in a hybrid layer, while a ``slow_context`` is open, it then adds the gated cross term to the text
rows of the attention output, before the layer's own ``o_proj``::

    ŝ = input_layernorm(s);  [K_s; V_s] = ŝ W_kv + b_kv      # no RoPE on K_s; repeated to the H query heads
    C = softmax(Q K_sᵀ · scaling, slow padding masked) V_s     # Q: the layer's own post-RoPE queries; non-causal
    A_T ← A_T + tanh(A_T w_g + b_g) · tanh(α) · C              # T: text rows; α starts at 0, so the LLM is unchanged

Outside a ``slow_context`` (and in the other layers) the function is exactly the stock sdpa attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dualfocus.connectors.interface import LLMInputs

ATTENTION_NAME = "slowfast_sdpa"
_HOOK = "slowfast_cross_term"  # plain attribute set on a hybrid layer's attention module by ``attach``


def default_layers(n_layers: int) -> list[int]:
    """The hybrid layers {0, L/4, L/2, 3L/4} (integer division), e.g. 28 -> [0, 7, 14, 21].

    The released Slow-Fast code uses ``range(0, 28, 8)`` = [0, 8, 16, 24] for its 28-layer LLM; this returns the
    quarter points instead."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    return sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4})


def text_rows(text_mask: torch.Tensor, n_query: int, n_keys: int) -> torch.Tensor:
    """Which query rows of one attention call cross-attend: ``[b, n]`` bool.

    text_mask ``[b, S]``: True at the spliced sequence's text rows (real, not visual). The ``n`` query rows are
    the last ``n`` of the ``n_keys`` positions seen so far (no cache: all of them; cached decoding: the new ones).
    Rows inside the spliced sequence follow ``text_mask``; rows after it are generated tokens and are all text.
    (The released code gives generated tokens no cross-attention at inference; here they get it, as in training.)
    """
    start = n_keys - n_query
    if start < 0:
        raise ValueError(f"{n_query} query rows but only {n_keys} key positions")
    known = text_mask[:, start:start + n_query]
    new = text_mask.new_ones(text_mask.shape[0], n_query - known.shape[1])
    return torch.cat([known, new], dim=1)


class SlowCrossAttention(nn.Module):
    """The new parameters of one hybrid layer: ``kv_proj``, ``gate_proj`` and the warm-up gate ``alpha``.

    layer: the LLM's decoder layer (its ``self_attn.k_proj`` / ``v_proj`` initialise ``kv_proj``; its
    ``input_layernorm`` normalises the slow tokens, shared and frozen, held in a plain list so it is neither a
    submodule of this module nor saved with it). ``kv_proj`` output is read with the intended layout
    ``(KV, H_kv, dh)``: its first ``H_kv·dh`` rows start as ``k_proj``, the rest as ``v_proj`` (the released code
    initialises that way but reads ``(H_kv, KV, dh)`` in its forward, a quirk not reproduced). Its bias starts as
    the k/v biases, or zeros. ``gate_proj`` has PyTorch's default init; ``alpha`` starts at 0.
    kv_proj keeps k_proj's dtype, gate_proj and alpha take the default dtype; the forward casts to the queries'.
    """

    def __init__(self, layer: nn.Module, config):
        super().__init__()
        attn = layer.self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        k, v = attn.k_proj, attn.v_proj
        weight = k.weight.detach()
        self.kv_proj = nn.Linear(weight.shape[1], 2 * self.kv_heads * self.head_dim, bias=True,
                                 device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.kv_proj.weight.copy_(torch.cat([k.weight, v.weight]))
            biases = [p.bias if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in (k, v)]
            self.kv_proj.bias.copy_(torch.cat(biases))
        self.gate_proj = nn.Linear(self.heads * self.head_dim, 1, device=weight.device)
        self.alpha = nn.Parameter(torch.zeros(1, device=weight.device))
        self._norm = [layer.input_layernorm]

    def slow_keys_values(self, slow: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """slow ``[b, m, d]`` -> K_s, V_s ``[b, H, m, dh]`` each (normalised, projected, repeated to H heads)."""
        b, m, _ = slow.shape
        normed = self._norm[0](slow.to(dtype))
        kv = F.linear(normed, self.kv_proj.weight.to(dtype), self.kv_proj.bias.to(dtype))
        kv = kv.view(b, m, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [2, b, H_kv, m, dh]
        groups = self.heads // self.kv_heads
        return kv[0].repeat_interleave(groups, dim=1), kv[1].repeat_interleave(groups, dim=1)

    def forward(self, query: torch.Tensor, attn_out: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                slow_mask: torch.Tensor, rows: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """The attention output with the gated cross term added on the chosen rows.

        query ``[b, H, n, dh]`` (post-RoPE), attn_out ``[b, n, H, dh]`` (self-attention, before o_proj),
        keys / values ``[b, H, m, dh]``, slow_mask ``[b, m]`` bool (True = real slow token), rows ``[b, n]`` bool.
        Returns ``[b, n, H, dh]``; rows not chosen, and every row of a sample without slow tokens, are unchanged.
        """
        b, n = attn_out.shape[:2]
        dtype = query.dtype
        has_slow = slow_mask.any(dim=1)                                       # [b]
        # A sample without slow tokens sees them all so its softmax stays finite; its rows are discarded below.
        allowed = (slow_mask | ~has_slow[:, None])[:, None, None, :]          # [b, 1, 1, m]
        cross = F.scaled_dot_product_attention(query, keys.to(dtype), values.to(dtype), attn_mask=allowed,
                                               scale=scaling).transpose(1, 2)  # [b, n, H, dh]
        flat = attn_out.reshape(b, n, -1)                                     # [b, n, H·dh]
        gate = torch.tanh(F.linear(flat, self.gate_proj.weight.to(dtype), self.gate_proj.bias.to(dtype)))
        gate = gate * torch.tanh(self.alpha.to(dtype))                        # [b, n, 1]
        added = attn_out + (gate * cross.reshape(b, n, -1)).view_as(attn_out)
        use = (rows.to(attn_out.device) & has_slow[:, None])[:, :, None, None]  # [b, n, 1, 1]
        return torch.where(use, added, attn_out)


@dataclass
class _SlowState:
    """What one ``slow_context`` makes visible: slow ``[b, m, d]``, slow_mask ``[b, m]``, text_mask ``[b, S]``,
    and the per-layer slow K/V computed once per call when no gradient is recorded (generate's decode steps)."""

    slow: torch.Tensor
    slow_mask: torch.Tensor
    text_mask: torch.Tensor
    keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _repeat_batch(t: torch.Tensor, b: int) -> torch.Tensor:
    """``t [b0, ...]`` repeated per sample to batch ``b`` (generate's num_return_sequences / beams expand so)."""
    if t.shape[0] == b:
        return t
    if b % t.shape[0]:
        raise ValueError(f"the LLM call has batch {b}, the slow context {t.shape[0]}")
    return t.repeat_interleave(b // t.shape[0], dim=0)


def _register_attention() -> None:
    """Register ``ATTENTION_NAME`` with transformers: the stock sdpa mask, and sdpa attention plus the cross term
    of the hybrid layers (the hook ``attach`` left on their attention modules). Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    sdpa = AttentionInterface()["sdpa"]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        out, weights = sdpa(module, query, key, value, attention_mask, **kwargs)
        hook = getattr(module, _HOOK, None)
        if hook is not None:
            out = hook(module, query, key.shape[2], out, kwargs.get("scaling"))
        return out, weights

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, AttentionMaskInterface()["sdpa"])


def _decoder_layers(llm: nn.Module) -> nn.ModuleList:
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else getattr(llm, "model", llm)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(llm).__name__} (expected .get_decoder().layers)")
    return layers


class SlowFastLayers(nn.Module):
    """The cross-attention of the hybrid layers ``layers`` of ``llm`` (indices into its decoder layers).

    ``cross``: ModuleDict ``str(layer index)`` -> ``SlowCrossAttention``. Use::

        slowfast = SlowFastLayers(llm, default_layers(n_layers))
        slowfast.attach(llm)                      # once; the LLM then runs the attention registered here
        with slowfast.slow_context(slow, slow_mask, inputs):
            llm(inputs_embeds=..., attention_mask=...)   # or a whole llm.generate(...)

    The slow K/V are recomputed in every call that records gradients and computed once per context otherwise.
    Only a dynamic KV cache (the default) or none is supported: the query rows are placed from the key count.
    """

    def __init__(self, llm: nn.Module, layers: list[int]):
        super().__init__()
        decoder_layers = _decoder_layers(llm)
        depth = len(decoder_layers)
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < depth]
        repeated = sorted({i for i in layers if list(layers).count(i) > 1})
        if bad or repeated or not layers:
            raise ValueError(f"slow-fast layers {list(layers)} must be distinct indices in 0..{depth - 1} "
                             f"(the LLM has {depth} decoder layers); bad: {bad}, repeated: {repeated}")
        config = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
        self.cross = nn.ModuleDict({str(i): SlowCrossAttention(decoder_layers[i], config) for i in sorted(layers)})
        self._state: _SlowState | None = None
        self._attached = False

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self.cross]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The warm-up gates ``alpha``, one per hybrid layer."""
        return [c.alpha for c in self.cross.values()]

    def attach(self, llm: nn.Module) -> None:
        """Register the attention function, point the hybrid layers' attention modules at this module (a plain
        attribute, not a submodule), and switch ``llm`` to ``ATTENTION_NAME`` with ``set_attn_implementation``."""
        _register_attention()
        decoder_layers = _decoder_layers(llm)
        for i in self.layers:
            setattr(decoder_layers[i].self_attn, _HOOK, self._cross_term)
        llm.set_attn_implementation(ATTENTION_NAME)
        if llm.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"{type(llm).__name__} cannot switch its attention implementation to {ATTENTION_NAME}")
        self._attached = True

    @contextlib.contextmanager
    def slow_context(self, slow: torch.Tensor, slow_mask: torch.Tensor, inputs: LLMInputs) -> Iterator[None]:
        """Make the slow tokens (slow ``[b, m, d]``, slow_mask ``[b, m]`` bool) and the spliced sequence ``inputs``
        (its ``attention_mask`` and ``visual_mask`` ``[b, S]`` choose the text rows) visible to the hybrid layers
        for the LLM calls inside the block; cleared on exit, also on an exception."""
        if not self._attached:
            raise RuntimeError("SlowFastLayers.attach(llm) must be called before slow_context")
        b, S = inputs.attention_mask.shape
        if slow.ndim != 3 or slow.shape[0] != b or tuple(slow_mask.shape) != tuple(slow.shape[:2]):
            raise ValueError(f"slow must be [b={b}, m, d] and slow_mask [b, m]; got {tuple(slow.shape)} and "
                             f"{tuple(slow_mask.shape)}")
        text = inputs.attention_mask.bool()
        if inputs.visual_mask is not None:
            text = text & ~inputs.visual_mask.bool()
        previous, self._state = self._state, _SlowState(slow, slow_mask.bool(), text)
        try:
            yield
        finally:
            self._state = previous

    def _cross_term(self, module: nn.Module, query: torch.Tensor, n_keys: int, attn_out: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
        """The hook the attention function calls in a hybrid layer: attn_out ``[b, n, H, dh]`` plus the cross term
        (unchanged outside a context or when there are no slow tokens)."""
        state = self._state
        if state is None or state.slow.shape[1] == 0:
            return attn_out
        cross = self.cross[str(module.layer_idx)]
        b, n = query.shape[0], query.shape[2]
        keys_values = state.keys_values.get(module.layer_idx)
        if keys_values is None:
            keys_values = cross.slow_keys_values(_repeat_batch(state.slow, b), query.dtype)
            if not torch.is_grad_enabled():
                state.keys_values[module.layer_idx] = keys_values
        rows = text_rows(_repeat_batch(state.text_mask, b), n, n_keys)
        slow_mask = _repeat_batch(state.slow_mask, b).to(query.device)
        return cross(query, attn_out, *keys_values, slow_mask, rows, scaling)
