"""The Spatial Vision Aggregator (Cambrian-1's SVA, as LongVU uses it): two cached encoder grids fused into a
small grid of learned queries (CONNECTORS.md section 2.3).

Legend: ``n`` frames, ``g`` side of the cached grid (``p = g²`` patches), ``q`` side of the query grid (``c = q²``
cells), ``r = g / q`` side of each cell's window (``r²`` patches per tower), ``w`` SVA width, ``d_i`` width of
encoder tower ``i``, ``H`` heads, ``m = n·c`` query cells of a batch of frames.

Per frame: each tower's grid goes through its own MLP to the common width ``w`` (Linear -> GELU -> Linear ->
LayerNorm). One learned query vector is copied to every cell of the ``q×q`` grid; in each of ``depth`` layers a
cell reads, by cross-attention, its ``r×r`` window in EVERY tower (keys of all towers concatenated: ``2·r²`` keys
for two towers), with the mean token of the first tower (SigLIP) as a global context. Square frames are assumed,
so every window is full and no attention mask is needed (the reference's masks are all True then).

One layer, as the reference (``longvu/vision_sampler.py::VisionCrossAttentionLayer``)::

    x = W_in [query ; W_ctx ctx]                 # no bias
    a = o_proj(attention(Linear(LN(x)), K_i = Linear_i(LN_i(L_i + pos_i)), V_i likewise))   # per-tower LN+Linear
    out = MLP(LN(x + a)) + query                 # MLP: Linear -> GELU -> Linear, no bias

Initialisation follows the reference: the query ``randn·w^-0.5``, each tower's window position embedding
``randn`` (std 1, only when windows hold more than one patch), PyTorch's defaults elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def tower_projector(d_in: int, width: int) -> nn.Sequential:
    """One encoder's features to the SVA width: ``[..., d_in]`` -> ``[..., w]`` (Linear -> GELU -> Linear -> LN)."""
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.LayerNorm(width))


def cell_windows(x: torch.Tensor, query_side: int) -> torch.Tensor:
    """``[n, g·g, w]`` (row-major grid) -> ``[n·q·q, r·r, w]``: for each query cell (row-major), its ``r×r``
    window of patches in (row, column) order."""
    n, p, w = x.shape
    g = int(round(p ** 0.5))
    r = g // query_side
    x = x.reshape(n, query_side, r, query_side, r, w)                                  # [n, q, r, q, r, w]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(n * query_side * query_side, r * r, w)


class MultiTowerAttention(nn.Module):
    """Each query cell attends to its windows in all towers at once.

    forward: queries ``[m, 1, w]``, windows: one ``[m, r², w]`` per tower -> ``[m, 1, w]``.
    """

    def __init__(self, width: int, heads: int, towers: int = 2):
        super().__init__()
        if width % heads:
            raise ValueError(f"SVA width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q_proj = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.k_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
                                    for _ in range(towers))
        self.v_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
                                    for _ in range(towers))
        self.o_proj = nn.Linear(width, width, bias=False)

    def forward(self, queries: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        m, _, w = queries.shape
        dh = w // self.heads
        q = self.q_proj(queries).reshape(m, 1, self.heads, dh).transpose(1, 2)        # [m, H, 1, dh]
        k = torch.cat([proj(x) for proj, x in zip(self.k_proj, windows)], dim=1)      # [m, towers·r², w]
        v = torch.cat([proj(x) for proj, x in zip(self.v_proj, windows)], dim=1)
        k = k.reshape(m, -1, self.heads, dh).transpose(1, 2)                           # [m, H, towers·r², dh]
        v = v.reshape(m, -1, self.heads, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)                                  # [m, H, 1, dh]
        return self.o_proj(out.transpose(1, 2).reshape(m, 1, w))


class AggregatorLayer(nn.Module):
    """One SVA layer (the block in the module docstring).

    forward: queries ``[m, 1, w]``, context ``[m, 1, w]``, windows (one ``[m, r², w]`` per tower) -> ``[m, 1, w]``.
    """

    def __init__(self, width: int, heads: int, window_patches: int, towers: int = 2):
        super().__init__()
        self.proj_context = nn.Linear(width, width, bias=False)
        self.proj_in = nn.Linear(2 * width, width, bias=False)
        self.cross_attn = MultiTowerAttention(width, heads, towers)
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, width, bias=False), nn.GELU(), nn.Linear(width, width, bias=False))
        # the reference adds window positions only when a window holds more than one patch
        self.pos_embed = (nn.ParameterList(nn.Parameter(torch.randn(window_patches, width)) for _ in range(towers))
                          if window_patches > 1 else None)

    def forward(self, queries: torch.Tensor, context: torch.Tensor, windows: list[torch.Tensor]) -> torch.Tensor:
        residual = queries
        x = self.proj_in(torch.cat([queries, self.proj_context(context)], dim=-1))    # [m, 1, w]
        if self.pos_embed is not None:
            windows = [win + pos.to(win.dtype) for win, pos in zip(windows, self.pos_embed)]
        x = self.norm(x + self.cross_attn(x, windows))
        return self.mlp(x) + residual


class SpatialVisionAggregator(nn.Module):
    """Tower MLPs, the learned query grid and ``depth`` aggregator layers.

    forward(*towers): one grid ``[n, g·g, d_i]`` per tower, in the order of ``tower_widths`` (the first gives the
    global context: SigLIP in LongVU) -> ``[n, q·q, w]``, the query grid row-major.
    """

    def __init__(self, tower_widths: list[int], width: int, grid: int, query_side: int, heads: int, depth: int):
        super().__init__()
        if grid % query_side:
            raise ValueError(f"the grid side ({grid}) must be a multiple of the query side ({query_side})")
        self.grid = grid
        self.query_side = query_side
        self.towers = nn.ModuleList(tower_projector(d, width) for d in tower_widths)
        self.query = nn.Parameter(torch.randn(width) * width ** -0.5)
        window_patches = (grid // query_side) ** 2
        self.layers = nn.ModuleList(AggregatorLayer(width, heads, window_patches, len(tower_widths))
                                    for _ in range(depth))

    def forward(self, *towers: torch.Tensor) -> torch.Tensor:
        if len(towers) != len(self.towers):
            raise ValueError(f"the SVA was built for {len(self.towers)} towers, got {len(towers)}")
        mapped = [mlp(x) for mlp, x in zip(self.towers, towers)]                       # each [n, g·g, w]
        n, p, w = mapped[0].shape
        if p != self.grid * self.grid:
            raise ValueError(f"the SVA expects a {self.grid}x{self.grid} grid ({self.grid ** 2} patches), got {p}")
        cells = self.query_side * self.query_side
        context = mapped[0].mean(1, keepdim=True)                                      # [n, 1, w]
        context = context.unsqueeze(1).expand(n, cells, 1, w).reshape(n * cells, 1, w)  # [m, 1, w]
        windows = [cell_windows(x, self.query_side) for x in mapped]                   # each [m, r², w]
        queries = self.query.to(mapped[0].dtype).expand(n * cells, 1, w)              # [m, 1, w]
        for layer in self.layers:
            queries = layer(queries, context, windows)
        return queries.reshape(n, cells, w)
