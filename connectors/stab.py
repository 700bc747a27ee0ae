"""The Spatio-Temporal Alignment Block (STAB) of Video-Panda (jh-yi/Video-Panda, CVPR 2025; CONNECTORS.md
section 3.3): an encoder-free tower that turns padded pixel frames straight into per-frame token lists.

Legend: ``B`` chunks (clips of ``T`` consecutive chosen frames), ``n`` frames (``B·T``, or a group of them),
``L`` the canvas side in pixels, ``P`` the patch size, ``G = L/P`` the patch grid side, ``C`` the width, ``k``
heads, ``dh = C/k``, ``H``/``W`` a frame's cropped patch grid (even), ``h = H/2``, ``w = W/2`` after LSD.

One chunk ``[B, T, 4, L, L]`` (normalised RGB + the validity mask as a 4th channel) goes through:

    patch embedding   Conv2d(3 -> C, P x P, stride P, no bias) -> x0 [B·T, C, G, G]; a patch is valid where
                      the avg-pooled mask is > 0 (the input layout makes it exactly 0 or 1)
    LSTE              x1 = x0 + LocalTemporalMixer(x0); x2 = x1 + DPE(x1), on [B, C, T, G, G]      (T > 1 only)
    GSTRA             cls_video [B, C]: a learned video token cross-attends the chunk's T·G·G tokens (T > 1 only)
    dense connection  x = x2 + x0
    per frame         crop to the valid patches' bounding box [C, H, W] -> LSD [h·w, C] -> FSRA cls_frame [C]
                      -> a split token after each row, [h·(w+1), C] row-major
                      -> CLS fusion Proj((1-s)·cls_video + s·cls_frame), s = sigmoid(balance)     (T > 1 only)
    out               [1 + h·(w+1), C] per frame: the CLS, then the rows

A chunk of one frame (T = 1) skips LSTE, GSTRA and the fusion, as the reference does for images. The projector
to the LLM width is not part of this module (``videopanda.py`` applies it to every frame's tokens).

Choices where the reference leaves room (CONNECTORS.md 3.7):
- GSTRA keys: with ``mask_padding`` (the default) padded patches are masked out of the video token's
  attention; the reference attends to them too (``mask_padding=False``). The LSTE/DPE convolutions and the
  LSTE BatchNorm still see padded patches, as in the reference (BatchNorm uses batch statistics in training,
  running statistics in eval).
- LSD/FSRA attention scale: ``attention_scale="width"`` is the reference's C^-0.5; ``"head"`` is the usual
  dh^-0.5. GSTRA always uses dh^-0.5 (the reference's too).
- A frame without any valid patch (never made by ``videopanda.py``, which repeats real frames instead of
  appending blank ones) is cropped to the top-left quarter of the grid, the reference's ``[:16, :16]`` at
  G = 32 scaled to G (rounded down to even, at least 2).
- ``lmhra2`` of the reference is dead code and is not built.

Zero initialisations (as the reference): the last conv of the LSTE mixer (so LSTE starts as the identity),
the DPE bias, GSTRA's attention output projection and MLP output (so the video token starts at zero and stays
there), the video token itself; ``balance`` = 0 (fusion weight 0.5).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x): the GELU approximation of CLIP, used by the reference's GSTRA MLP."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Each head's single query attends its own small key set: q ``[..., k, dh]``, k/v ``[..., m, k, dh]`` ->
    ``[..., k, dh]`` (softmax over the m keys)."""
    weights = (torch.einsum("...hd,...mhd->...hm", q, k) * scale).softmax(-1)
    return torch.einsum("...hm,...mhd->...hd", weights, v)


class LocalTemporalMixer(nn.Module):
    """LSTE's local mixer: BatchNorm3d -> 1x1x1 conv to int(C/1.5) -> depth-wise temporal conv (3,1,1) -> 1x1x1
    conv back to C, the last conv zero-initialised (the branch is 0 at init). ``[B, C, T, G, G]`` -> same."""

    def __init__(self, width: int, reduction: float = 1.5, kernel: int = 3):
        super().__init__()
        inner = int(width // reduction)
        self.layers = nn.Sequential(
            nn.BatchNorm3d(width),
            nn.Conv3d(width, inner, kernel_size=1),
            nn.Conv3d(inner, inner, kernel_size=(kernel, 1, 1), padding=(kernel // 2, 0, 0), groups=inner),
            nn.Conv3d(inner, width, kernel_size=1),
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The BatchNorm runs in fp32 whatever the compute dtype: bf16/fp16 training (DeepSpeed) casts parameters but
        # not the running-statistics buffers, and batch_norm cannot mix the two.
        norm = self.layers[0]
        if norm.training and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
        normed = F.batch_norm(x.float(), norm.running_mean, norm.running_var, norm.weight.float(), norm.bias.float(),
                              norm.training, norm.momentum, norm.eps)
        return self.layers[1:](normed.to(x.dtype))


class VideoTokenAggregator(nn.Module):
    """GSTRA: a learned video token (zeros) reads the whole chunk.

    ``token += out_proj(MHA(q=LN(token), k=v=LN(x)))``, then ``token += MLP(LN(token))`` with MLP = Linear(C, 4C)
    -> QuickGELU -> Dropout -> Linear(4C, C); the attention output projection and the MLP output are
    zero-initialised, so the result is the (zero) token at init. tokens ``[B, N, C]``, valid ``[B, N]`` bool or
    None (attend to all) -> ``[B, C]``. A chunk with no valid key attends to all of its keys.
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 4):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(width))
        self.norm_query = nn.LayerNorm(width)
        self.norm_keys = nn.LayerNorm(width)
        self.norm_mlp = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), QuickGELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * width, width))
        for layer in (self.attn.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        B, _, C = tokens.shape
        query = self.token.to(tokens.dtype).expand(B, 1, C)                              # [B, 1, C]
        keys = self.norm_keys(tokens)
        ignore = None
        if valid is not None:
            ignore = ~(valid | ~valid.any(1, keepdim=True))                               # [B, N] True = skip
        read, _ = self.attn(self.norm_query(query), keys, keys, key_padding_mask=ignore, need_weights=False)
        out = query + read
        out = out + self.mlp(self.norm_mlp(out))
        return out[:, 0]


class WindowDownsample(nn.Module):
    """LSD: 2x2 downsampling by learned attention. The window's mean (avg-pool) is the query, its 4 patches
    the keys/values (LayerNorm + Linear without bias for q and kv), k heads; ``out = mean + proj(read)``.
    ``[n, C, H, W]`` (H, W even) -> ``[n, h·w, C]`` row-major."""

    def __init__(self, width: int, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.q = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width, bias=False))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, C, H, W = x.shape
        h, w, k = H // 2, W // 2, self.heads
        mean = F.avg_pool2d(x, 2).flatten(2).transpose(1, 2)                             # [n, h·w, C]
        windows = x.reshape(n, C, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(n, h * w, 4, C)
        q = self.q(mean).view(n, h * w, k, C // k)
        kv = self.kv(windows).view(n, h * w, 4, 2, k, C // k)
        read = attend(q, kv[..., 0, :, :], kv[..., 1, :, :], self.scale)                  # [n, h·w, k, dh]
        return mean + self.proj(read.reshape(n, h * w, C))


class FrameAggregator(nn.Module):
    """FSRA: a learned frame token (randn) reads all of a frame's downsampled tokens (k heads, LayerNorm +
    Linear without bias for q and kv); ``cls_frame = token + proj(read)``. ``[n, m, C]`` -> ``[n, C]``."""

    def __init__(self, width: int, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.token = nn.Parameter(torch.randn(width))
        self.q = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width, bias=False))
        self.kv = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width, bias=False))
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, m, C = tokens.shape
        k = self.heads
        token = self.token.to(tokens.dtype)
        q = self.q(token).view(1, k, C // k).expand(n, k, C // k)
        kv = self.kv(tokens).view(n, m, 2, k, C // k)
        read = attend(q, kv[:, :, 0], kv[:, :, 1], self.scale)                           # [n, k, dh]
        return token + self.proj(read.reshape(n, C))


class STAB(nn.Module):
    """The whole tower: ``forward(pixels [B, T, 4, L, L]) -> list of B·T tensors [1 + h·(w+1), C]`` in frame
    order (chunk-major), each frame's CLS then its rows with a split token at each row's end."""

    def __init__(self, width: int, heads: int, patch: int, dropout: float = 0.0,
                 attention_scale: str = "width", mask_padding: bool = True):
        super().__init__()
        if attention_scale not in ("width", "head"):
            raise ValueError(f"attention_scale must be 'width' or 'head', got {attention_scale!r}")
        scale = (width if attention_scale == "width" else width // heads) ** -0.5
        self.patch, self.mask_padding = patch, mask_padding
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.lste = LocalTemporalMixer(width)
        self.dpe = nn.Conv3d(width, width, kernel_size=3, padding=1, groups=width)
        nn.init.zeros_(self.dpe.bias)
        self.gstra = VideoTokenAggregator(width, heads, dropout)
        self.lsd = WindowDownsample(width, heads, scale)
        self.fsra = FrameAggregator(width, heads, scale)
        self.split = nn.Parameter(torch.randn(width))
        self.balance = nn.Parameter(torch.zeros(width))
        self.fuse = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, width))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        B, T = pixels.shape[:2]
        flat = pixels.flatten(0, 1)                                                       # [B·T, 4, L, L]
        x0 = self.patch_embed(flat[:, :3])                                                # [B·T, C, G, G]
        valid = F.avg_pool2d(flat[:, 3:].float(), self.patch)[:, 0] > 0                  # [B·T, G, G]
        cls_video = None
        x = x0
        if T > 1:
            v = x0.unflatten(0, (B, T)).transpose(1, 2)                                   # [B, C, T, G, G]
            v = v + self.lste(v)
            v = v + self.dpe(v)
            tokens = v.flatten(2).transpose(1, 2)                                         # [B, T·G·G, C]
            cls_video = self.gstra(tokens, valid.reshape(B, -1) if self.mask_padding else None)   # [B, C]
            x = v.transpose(1, 2).flatten(0, 1) + x0                                      # [B·T, C, G, G]
        return self.frame_tokens(x, valid, cls_video, T)

    def frame_tokens(self, x: torch.Tensor, valid: torch.Tensor, cls_video: torch.Tensor | None,
                     T: int) -> list[torch.Tensor]:
        """x ``[n, C, G, G]``, valid ``[n, G, G]``, cls_video ``[n/T, C]`` or None -> per frame
        ``[1 + h·(w+1), C]``. Frames whose crops have the same shape go through LSD and FSRA together."""
        n, C = x.shape[:2]
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for i, (top, left, H, W) in enumerate(valid_crops(valid)):
            groups.setdefault((H, W), []).append((i, top, left))
        out: list[torch.Tensor | None] = [None] * n
        weight = torch.sigmoid(self.balance).to(x.dtype)
        for (H, W), members in groups.items():
            crops = torch.stack([x[i, :, top:top + H, left:left + W] for i, top, left in members])  # [m, C, H, W]
            m, h, w = len(members), H // 2, W // 2
            tokens = self.lsd(crops)                                                      # [m, h·w, C]
            cls = self.fsra(tokens)                                                       # [m, C]
            split = self.split.to(x.dtype).expand(m, h, 1, C)
            rows = torch.cat([tokens.view(m, h, w, C), split], 2).flatten(1, 2)          # [m, h·(w+1), C]
            if cls_video is not None:
                chunk = torch.tensor([i // T for i, _, _ in members], device=x.device)
                cls = self.fuse((1 - weight) * cls_video[chunk] + weight * cls)
            frames = torch.cat([cls[:, None], rows], 1)                                   # [m, 1 + h·(w+1), C]
            for j, (i, _, _) in enumerate(members):
                out[i] = frames[j]
        return out


def valid_crops(valid: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Per frame ``(top, left, H, W)`` of the valid patches' bounding box on the grid, H and W trimmed to even
    (``videopanda.py``'s layout always gives even extents). valid ``[n, G, G]`` bool. A frame without valid
    patches gets the top-left ``S x S`` with S = G/2 rounded down to even, at least 2."""
    G = valid.shape[-1]
    fallback = max(2, (G // 2) // 2 * 2)
    rows, cols = valid.any(2).cpu(), valid.any(1).cpu()                                   # [n, G] each
    crops = []
    for r, c in zip(rows, cols):
        if not r.any():
            crops.append((0, 0, fallback, fallback))
            continue
        r_idx, c_idx = r.nonzero()[:, 0], c.nonzero()[:, 0]
        top, left = int(r_idx[0]), int(c_idx[0])
        H, W = int(r_idx[-1]) + 1 - top, int(c_idx[-1]) + 1 - left
        H, W = max(2, H // 2 * 2), max(2, W // 2 * 2)
        crops.append((min(top, G - H), min(left, G - W), H, W))
    return crops
