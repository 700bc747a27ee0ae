"""Taps: named cuts of a frozen encoder's forward, their shapes, and the tensor ops that take them.

A tap is a short string. Its grammar (``k`` an integer, negative counting from the end; ``H``, ``W`` > 0):

=============== ================================================================== =============
tap             what it is                                                          per frame
=============== ================================================================== =============
``post_ln``     the output after the final layer norm, every token                  ``[T, d]``
``hidden[k]``   ``hidden_states[k]``: 0 the embeddings, k the output of block k      ``[T, d]``
``patches``     ``hidden[-2]`` without the prefix tokens (CLS, registers)            ``[p, d]``
``patches[k]``  ``hidden[k]`` without the prefix tokens                              ``[p, d]``
``pool4``       ``patches`` averaged over runs of 4 consecutive tokens               ``[p/4, d]``
``pool4[k]``    ``patches[k]`` averaged over runs of 4 consecutive tokens            ``[p/4, d]``
``grid``        the last layer's patch grid, row-major                               ``[h*w, d]``
``grid@HxW``    ``grid`` resized bilinearly to H x W                                 ``[H*W, d]``
=============== ================================================================== =============

Legend: ``n`` frames, ``T`` tokens (prefix tokens + patches), ``p`` = ``h*w`` patches, ``d`` width.

Everything here is pure: parsing and shapes need no model (the store must know every array's shape before
any work), and the tensor functions take tensors only. torch is imported inside the functions that need it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POOL_FACTOR = 4
DEFAULT_PATCH_LAYER = -2  # ``patches``/``pool4`` without an index: the second-to-last hidden state

GRAMMAR = ("post_ln, hidden[k], patches, patches[k], pool4, pool4[k], grid, grid@HxW "
           "(k an integer, negative counts from the end; H and W positive integers)")

_TAP = re.compile(r"(?P<kind>post_ln|hidden|patches|pool4|grid)"
                  r"(?:\[(?P<layer>[+-]?\d+)\])?"
                  r"(?:@(?P<h>\d+)x(?P<w>\d+))?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Tap:
    """One parsed tap. ``layer`` is the index into ``hidden_states`` (hidden/patches/pool4 only);
    ``size`` the target ``(H, W)`` of ``grid@HxW``."""

    kind: str
    layer: int | None = None
    size: tuple[int, int] | None = None

    def __str__(self) -> str:
        if self.kind == "hidden" or (self.kind in ("patches", "pool4") and self.layer != DEFAULT_PATCH_LAYER):
            return f"{self.kind}[{self.layer}]"
        if self.size is not None:
            return f"grid@{self.size[0]}x{self.size[1]}"
        return self.kind


@dataclass(frozen=True)
class Geometry:
    """What the taps of one encoder look like, read from its config alone (no weights, no forward)."""

    model: str
    """How messages name the encoder, e.g. ``"siglip model /models/siglip"``."""
    depth: int
    """Transformer blocks (``hidden_states`` has ``depth + 1`` entries), or ConvNeXt stages."""
    width: int
    """Token width ``d`` (ConvNeXt: channels of the last stage)."""
    prefix_tokens: int
    """Tokens before the patches: 1 for a CLS token, plus registers; 0 for SigLIP."""
    grid: tuple[int, int]
    """Patch grid ``(h, w)`` of the last layer at the encoder's input size."""
    has_post_ln: bool = True
    """Whether ``post_ln`` exists (not for ConvNeXt)."""
    has_tokens: bool = True
    """Whether ``hidden``/``patches``/``pool4`` exist: a token sequence of one width at every depth.
    False for ConvNeXt, whose stages differ in width and resolution."""

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]


def parse_tap(text: str) -> Tap:
    """``"pool4[-3]"`` -> ``Tap("pool4", -3)``; a ``ValueError`` naming the text and the grammar otherwise."""
    match = _TAP.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"malformed tap {text!r}; a tap is one of: {GRAMMAR}")
    kind, layer, h, w = match["kind"], match["layer"], match["h"], match["w"]
    indexed = kind in ("hidden", "patches", "pool4")
    if (layer is not None and not indexed) or (kind == "hidden" and layer is None) \
            or (h is not None and kind != "grid"):
        raise ValueError(f"malformed tap {text!r}; a tap is one of: {GRAMMAR}")
    if h is not None and (int(h) < 1 or int(w) < 1):
        raise ValueError(f"malformed tap {text!r}: grid@HxW needs H and W >= 1")
    if indexed:
        return Tap(kind, DEFAULT_PATCH_LAYER if layer is None else int(layer))
    return Tap(kind, size=None if h is None else (int(h), int(w)))


def tap_problem(tap: Tap, geometry: Geometry) -> str | None:
    """Why ``geometry``'s encoder cannot give ``tap``, or None when it can."""
    g = geometry
    if tap.kind == "post_ln" and not g.has_post_ln:
        return f"tap {str(tap)!r}: {g.model} has no final layer norm over its tokens (its taps: grid, grid@HxW)"
    if tap.layer is not None:
        if not g.has_tokens:
            return f"tap {str(tap)!r}: {g.model} has no token sequence per layer (its taps: grid, grid@HxW)"
        if not -(g.depth + 1) <= tap.layer <= g.depth:
            return (f"tap {str(tap)!r}: layer {tap.layer} is out of range for {g.model} of depth {g.depth} "
                    f"(k must be in [{-(g.depth + 1)}, {g.depth}])")
    if tap.kind == "pool4" and g.patches % POOL_FACTOR:
        return (f"tap {str(tap)!r}: {g.model} has {g.patches} patches ({g.grid[0]}x{g.grid[1]}), "
                f"not divisible by {POOL_FACTOR}")
    return None


def tap_shape(tap: Tap | str, geometry: Geometry) -> tuple[int, int]:
    """``(tokens, width)`` of one frame of ``tap``; a ``ValueError`` when the encoder cannot give it."""
    tap = parse_tap(tap) if isinstance(tap, str) else tap
    problem = tap_problem(tap, geometry)
    if problem:
        raise ValueError(problem)
    g = geometry
    tokens = {
        "post_ln": g.prefix_tokens + g.patches,
        "hidden": g.prefix_tokens + g.patches,
        "patches": g.patches,
        "pool4": g.patches // POOL_FACTOR,
        "grid": g.patches if tap.size is None else tap.size[0] * tap.size[1],
    }[tap.kind]
    return tokens, g.width


def check_taps(taps: Mapping[str, str], geometry: Geometry) -> list[str]:
    """Every problem with a ``{name: tap text}`` request, each naming the tap's name (empty when fine)."""
    if not isinstance(taps, Mapping) or not taps:
        return [f"taps must be a non-empty mapping of name -> tap, got {taps!r}"]
    problems = []
    for name, text in taps.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(f"taps: name {name!r} must be a letter or _ followed by letters, digits or _")
            continue
        try:
            problem = tap_problem(parse_tap(text), geometry)
        except ValueError as e:
            problem = str(e)
        if problem:
            problems.append(f"taps.{name}: {problem}")
    return problems


# --- tensor ops: [n, ...] batches in, [n, tokens, width] out -------------------------------------------------


def drop_prefix(hidden: Any, prefix_tokens: int):
    """``[n, T, d]`` -> ``[n, T - prefix, d]`` (the patches only)."""
    return hidden[:, prefix_tokens:]


def pool_runs(tokens: Any, factor: int = POOL_FACTOR):
    """Average ``[n, p, d]`` over runs of ``factor`` consecutive tokens -> ``[n, p/factor, d]``."""
    n, p, d = tokens.shape
    if p % factor:
        raise ValueError(f"token count {p} is not divisible by the pooling factor {factor}")
    return tokens.reshape(n, p // factor, factor, d).mean(dim=2)  # [n, p/f, f, d] -> [n, p/f, d]


def map_to_tokens(feature_map: Any):
    """A feature map ``[n, d, h, w]`` -> row-major tokens ``[n, h*w, d]``."""
    return feature_map.flatten(2).transpose(1, 2)


def tokens_to_map(tokens: Any, grid: tuple[int, int]):
    """Row-major tokens ``[n, h*w, d]`` -> a feature map ``[n, d, h, w]``."""
    n, p, d = tokens.shape
    h, w = grid
    if p != h * w:
        raise ValueError(f"{p} tokens do not form a {h}x{w} grid")
    return tokens.transpose(1, 2).reshape(n, d, h, w)


def resize_grid(tokens: Any, grid: tuple[int, int], size: tuple[int, int]):
    """Row-major grid tokens ``[n, h*w, d]`` resized bilinearly (``align_corners=False``) to ``[n, H*W, d]``.

    Computed in float32 whatever the input dtype. At the native size it is the identity.
    """
    import torch.nn.functional as F

    feature_map = tokens_to_map(tokens.float(), grid)  # [n, d, h, w]
    resized = F.interpolate(feature_map, size=tuple(size), mode="bilinear", align_corners=False)  # [n, d, H, W]
    return map_to_tokens(resized)


@dataclass(frozen=True)
class Cuts:
    """What one forward exposes, from which every tap is taken.

    ``hidden``: ``hidden_states`` (``depth + 1`` tensors ``[n, T, d]``), None where the model has no token
    sequence per layer; ``post_ln``: ``[n, T, d]`` or None when not computed; ``grid``: ``[n, h*w, d]``.
    """

    hidden: tuple | None
    post_ln: Any
    grid: Any


def take(tap: Tap, cuts: Cuts, geometry: Geometry):
    """The tensor ``[n, tokens, width]`` of ``tap`` (already checked against ``geometry``)."""
    if tap.kind == "post_ln":
        return cuts.post_ln
    if tap.kind == "grid":
        return cuts.grid if tap.size is None else resize_grid(cuts.grid, geometry.grid, tap.size)
    hidden = cuts.hidden[tap.layer]  # [n, T, d]
    if tap.kind == "hidden":
        return hidden
    patches = drop_prefix(hidden, geometry.prefix_tokens)  # [n, p, d]
    return patches if tap.kind == "patches" else pool_runs(patches)
