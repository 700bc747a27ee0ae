"""Video-Panda as a connector: the encoder-free STAB (``stab.py``) trained on the store's pixels group, then a
projector to the LLM width (CONNECTORS.md section 3; jh-yi/Video-Panda, CVPR 2025, its stage 1: LLM frozen,
tower and projector trained).

Legend: ``b`` batch, ``T`` padded stored frames, ``L`` the stored long side (= ``image_size``), ``S`` =
``image_size``, ``P`` patch, ``n`` chosen frames per clip (``n_frames``), ``c`` frames per chunk, ``C`` the STAB
width, ``d`` the LLM width, ``h``/``w`` a frame's token grid after LSD, ``N`` visual tokens per sample (padded).

Per sample, at train time with torch ops (no video decoding): the frames stream ``[T, L, L, 3]`` (uint8 values,
the valid region at the top-left) and the box stream ``[T, 2]`` (its height, width) ->

1. **Frames** (``choose_frames``): of the real frames (``frame_mask``), ``n`` at ``floor(linspace(0, t-1, n))``
   when there are more (the reference's pick); when fewer, frames are repeated, each slot taking the frame
   nearest to ``linspace(0, t-1, n)``. The reference re-decodes at a higher rate to get ``n`` distinct frames
   (a 1 fps store cannot) and pads with all-zero frames when still short; here no blank frame is ever added.
   ``plan_frames`` makes this choice once before training, so a batch holds only the chosen ``n`` frames (repeats
   included) and the context check counts ``n`` frames; ``visual_tokens`` applies the same rule to whatever
   frames arrive (the identity on ``n`` planned ones; a ``data.max_frames`` cap below ``n`` thins them first).
2. **Canvas** (``frame_canvas``): the box is cropped, resized (bilinear, antialiased; up or down) so the long
   side is ``S`` and the short side ``ceil(S/2 · short/long / P) · 2P`` (exact integer arithmetic), pasted on an ``S x S``
   canvas of the CLIP mean colour, offset along the short side by ``(S/2P - short/2P) // 2 · 2P`` (so every
   2x2 patch window is wholly real or wholly padding), normalised with CLIP mean/std; the 4th channel is the
   validity mask. The canvas is built in normalised space, so the padding is exactly 0 (the reference fills
   with the mean rounded to uint8, (122, 116, 104), i.e. about -0.002 after normalising).
3. **Flip** (``flip``): ``"none"`` (default) never flips: a mirror changes the answer to left/right
   questions (the toy corpus asks where the shape goes). ``"train"`` mirrors a clip's frames horizontally with
   probability 0.5 in training only, one draw per clip from torch's global generator; the frame is mirrored
   inside its valid region, so the mask and the layout stay consistent with it. The reference flips at
   evaluation too and never flips the mask (its padding can then sit on the other side of the mask);
   neither is reproduced.
4. **STAB** on chunks of ``chunk`` frames ``[b·n/c, c, 4, S, S]`` -> per frame ``[1 + h·(w+1), C]``, then the
   projector (Linear C -> d, GELU, Linear d -> d). Each sample's ``n`` frames, in order, are its visual
   tokens: ``visual_tokens`` returns ``[b, N, d]`` zero-padded with the mask ``[b, N]``.

Frame tokens: 1 + h·(w+1) with h, w the valid patch grid halved: 1 + 16·17 = 273 at 448 px square, 154 at
16:9; 21 and 16 at the tiny 112 px.

Precision: streams reach the connector in its dtype; in bf16 a box side above 256 may round to an even
number, which moves the crop by one pixel row or column at most (clamped to the stored frame).

Distillation (the reference's LanguageBind teacher and cosine loss, CONNECTORS.md 3.5) is not implemented:
it needs cached teacher features and the LLM's hidden states at the visual positions, and the connector
interface exposes neither (``VideoLLM`` returns only the LM loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dualfocus.connectors.interface import Batch, Connector, VisualTokens
from dualfocus.connectors.registry import ConnectorConfig
from dualfocus.connectors.stab import STAB
from dualfocus.pipeline.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@dataclass
class VideoPandaConfig(ConnectorConfig):
    """Video-Panda: the STAB tower on the store's pixels, and a 2-layer projector to the LLM width."""

    name: str = "videopanda"
    """Which connector trains: one of the registry's names (connectors/registry.py)."""
    frames_stream: str = "frames"
    """Store stream of the pixels group's frames, uint8 ``[L, L, 3]`` with L = image_size (``extract --pixels L``)."""
    box_stream: str = "box"
    """Store stream of the pixels group's valid boxes, int32 ``(height, width)`` per frame."""
    image_size: int = 448
    """Canvas side in pixels (paper: 448); also the stored long side. A multiple of 2·patch."""
    width: int = 1024
    """STAB width C (paper: 1024)."""
    heads: int = 8
    """Attention heads of GSTRA, LSD and FSRA (paper: 8); must divide width."""
    patch: int = 14
    """Patch size P in pixels (paper: 14)."""
    chunk: int = 4
    """Frames per chunk: LSTE and GSTRA mix time within a chunk only (paper: 4). 1 = no temporal modules."""
    n_frames: int = 8
    """Frames per clip (paper: 8); a multiple of chunk."""
    dropout: float = 0.5
    """Dropout in GSTRA's MLP and on the fused CLS (paper: 0.5)."""
    flip: str = "none"
    """Horizontal flip: "none" (a mirror swaps left and right in the answers) or "train" (p = 0.5 per clip, in
    training only, mirrored inside the valid region; the reference flips always)."""
    mask_padding: bool = True
    """Mask padded patches out of GSTRA's keys (the reference attends to them: false)."""
    attention_scale: str = "width"
    """LSD/FSRA attention scale: "width" = C^-0.5 (the reference) or "head" = (C/heads)^-0.5."""

    def check(self) -> list[str]:
        problems = []
        for key in ("patch", "heads", "chunk", "n_frames"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.width < 2:
            problems.append(f"width must be >= 2, got {self.width}")
        elif self.heads >= 1 and self.width % self.heads:
            problems.append(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.patch >= 1 and (self.image_size < 2 * self.patch or self.image_size % (2 * self.patch)):
            problems.append(f"image_size ({self.image_size}) must be a positive multiple of 2·patch ({2 * self.patch})")
        if self.chunk >= 1 and self.n_frames >= 1 and self.n_frames % self.chunk:
            problems.append(f"n_frames ({self.n_frames}) must be a multiple of chunk ({self.chunk})")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be within [0, 1), got {self.dropout}")
        if self.flip not in ("train", "none"):
            problems.append(f"flip must be train or none, got {self.flip!r}")
        if self.attention_scale not in ("width", "head"):
            problems.append(f"attention_scale must be width or head, got {self.attention_scale!r}")
        return problems


# ---------------------------------------------------------------------------------------------- input
def choose_frames(n_valid: int, n_frames: int) -> list[int]:
    """Indices of the ``n_frames`` frames a clip of ``n_valid`` real frames gives: ``floor(linspace(0, t-1, n))``
    when ``t >= n`` (the reference), else the nearest frame to each of those positions (halves up)."""
    if n_valid < 1:
        raise ValueError("a clip needs at least one frame")
    if n_frames == 1:
        return [0]
    span, steps = n_valid - 1, n_frames - 1
    if n_valid >= n_frames:
        return [k * span // steps for k in range(n_frames)]
    return [(2 * k * span + steps) // (2 * steps) for k in range(n_frames)]


def fitted_size(height: int, width: int, image_size: int, patch: int) -> tuple[int, int, int, int]:
    """(new height, new width, top, left) of a ``height x width`` box on the ``image_size`` canvas: the long side
    at ``image_size``, the short side ``ceil(image_size/2 · short/long / patch) · 2·patch``, offset along the short
    side by whole 2·patch cells (the reference's centring; a square box fills the canvas)."""
    unit = 2 * patch
    cells = image_size // unit
    long, short = max(height, width), min(height, width)
    short_cells = min(cells, max(1, -(-(short * image_size) // (long * unit))))
    offset = (cells - short_cells) // 2 * unit
    if width > height:
        return short_cells * unit, image_size, offset, 0
    return image_size, short_cells * unit, 0, offset


_MEAN = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def frame_canvas(content: torch.Tensor, image_size: int, patch: int, flip: bool = False) -> torch.Tensor:
    """content ``[t, 3, h, w]`` (0..255, one box size) -> ``[t, 4, S, S]`` float32: normalised RGB on a canvas of
    the CLIP mean colour (0 after normalising), channel 3 = 1 on the real pixels. ``flip`` mirrors the frames
    inside their region."""
    t, _, h, w = content.shape
    nh, nw, top, left = fitted_size(h, w, image_size, patch)
    x = content.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        x = x.flip(-1)
    x = (x / 255 - _MEAN.to(x.device)) / _STD.to(x.device)
    canvas = x.new_zeros(t, 4, image_size, image_size)
    canvas[:, :3, top:top + nh, left:left + nw] = x
    canvas[:, 3, top:top + nh, left:left + nw] = 1
    return canvas


def prepare_pixels(frames: torch.Tensor, boxes: torch.Tensor, frame_mask: torch.Tensor, image_size: int,
                   patch: int, n_frames: int, flips: list[bool]) -> torch.Tensor:
    """frames ``[b, T, L, L, 3]`` (uint8 values), boxes ``[b, T, 2]``, frame_mask ``[b, T]``, flips per sample ->
    ``[b, n, 4, S, S]`` float32 (``choose_frames`` then ``frame_canvas``; frames sharing a box resize together)."""
    b, L = frames.shape[0], frames.shape[2]
    out = frames.new_zeros(b, n_frames, 4, image_size, image_size, dtype=torch.float32)
    for i in range(b):
        real = frame_mask[i].nonzero()[:, 0].tolist()
        picks = [real[j] for j in choose_frames(len(real), n_frames)]
        sizes = boxes[i, picks].float().round().long().clamp(1, L).tolist()
        by_box: dict[tuple[int, int], list[int]] = {}
        for slot, (h, w) in enumerate(sizes):
            by_box.setdefault((h, w), []).append(slot)
        for (h, w), slots in by_box.items():
            content = frames[i, [picks[s] for s in slots], :h, :w].permute(0, 3, 1, 2)   # [m, 3, h, w]
            out[i, slots] = frame_canvas(content, image_size, patch, flips[i])
    return out


# ---------------------------------------------------------------------------------------------- connector
class VideoPanda(Connector):
    """visual_tokens: ``streams[frames] [b, T, L, L, 3]``, ``streams[box] [b, T, 2]`` -> ``[b, N, d]`` with mask
    ``[b, N]``: each sample's ``n_frames`` frames of ``1 + h·(w+1)`` tokens each, in order.

    Trainable: the whole STAB and the projector (and the STAB's BatchNorm running statistics, saved with them).
    """

    name = "videopanda"
    config_class = VideoPandaConfig

    def __init__(self, stab: STAB, projector: nn.Module, cfg: VideoPandaConfig):
        super().__init__()
        self.stab = stab
        self.projector = projector
        self.cfg = cfg

    def streams(self) -> tuple[str, ...]:
        return (self.cfg.frames_stream, self.cfg.box_stream)

    def pixels(self, batch: Batch, flips: list[bool] | None = None) -> torch.Tensor:
        """The STAB's input ``[b, n, 4, S, S]`` float32; ``flips`` None = drawn as ``cfg.flip`` says."""
        cfg = self.cfg
        b = len(batch)
        if flips is None:
            flips = ((torch.rand(b) < 0.5).tolist() if self.training and cfg.flip == "train" else [False] * b)
        return prepare_pixels(batch.streams[cfg.frames_stream], batch.streams[cfg.box_stream], batch.frame_mask,
                              cfg.image_size, cfg.patch, cfg.n_frames, flips)

    def visual_tokens(self, batch: Batch, llm: nn.Module | None = None) -> VisualTokens:
        cfg = self.cfg
        pixels = self.pixels(batch).to(self.stab.patch_embed.weight.dtype)                # [b, n, 4, S, S]
        b, n = pixels.shape[:2]
        frames = self.stab(pixels.reshape(b * n // cfg.chunk, cfg.chunk, *pixels.shape[2:]))  # b·n x [f_i, C]
        tokens = self.projector(torch.cat(frames))                                      # [Σ f_i, d]
        lengths = [x.shape[0] for x in frames]
        per_sample = [sum(lengths[i * n:(i + 1) * n]) for i in range(b)]
        N = max(per_sample)
        embeds = tokens.new_zeros(b, N, tokens.shape[-1])
        mask = torch.zeros(b, N, dtype=torch.bool, device=tokens.device)
        for i, rows in enumerate(tokens.split(per_sample)):
            embeds[i, : rows.shape[0]] = rows
            mask[i, : rows.shape[0]] = True
        return VisualTokens(embeds, mask)

    # ------------------------------------------------------------------ building
    @staticmethod
    def expected_streams(cfg: VideoPandaConfig, model_dir: str) -> dict[str, tuple[int, ...]]:
        """The pixels group at long side ``image_size``: frames ``(S, S, 3)`` and box ``(2,)``."""
        return {cfg.frames_stream: (cfg.image_size, cfg.image_size, 3), cfg.box_stream: (2,)}

    @staticmethod
    def expected_taps(cfg: VideoPandaConfig, model_dir: str) -> dict[str, str]:
        """The pixels group's two taps (``extract/groups.py::pixels_plan``)."""
        return {cfg.frames_stream: "pixels", cfg.box_stream: "box"}

    @staticmethod
    def extract_args(cfg: VideoPandaConfig, model_dir: str, missing: list[str]) -> str:
        """``--pixels image_size`` (plus the group name when the streams name one other than ``pixels``)."""
        group = cfg.frames_stream.rpartition(".")[0]
        return f"--pixels {cfg.image_size}" + (f" pixels.group={group}" if group and group != "pixels" else "")

    @staticmethod
    def tokens_per_frame(cfg: VideoPandaConfig, model_dir: str) -> int:
        """The most a frame gives (a square one): 1 + h·(w+1) with h = w = image_size / patch / 2."""
        side = cfg.image_size // cfg.patch // 2
        return 1 + side * (side + 1)

    @staticmethod
    def plan_frames(cfg: VideoPandaConfig, model_dir: str, read, samples: list) -> list[list[int] | None]:
        """The ``n_frames`` stored frames each sample reads (``choose_frames``, repeats included; nothing is read
        from the store): a batch then holds only those, and the context check counts ``n_frames`` frames."""
        return [choose_frames(s.n_frames, cfg.n_frames) if s.n_frames >= 1 else None for s in samples]

    @staticmethod
    def model_problems(cfg: VideoPandaConfig, model_dir: str) -> list[str]:
        """The config's own problems (a config built in code has not been checked by the loader)."""
        return [f"connector.{p}" for p in cfg.check()]

    @classmethod
    def build(cls, cfg: VideoPandaConfig, model_dir: str, seed: int = 0) -> "VideoPanda":
        """The STAB and projector drawn from ``seed``, the projector to the model's ``text_config.hidden_size``."""
        from dualfocus.pipeline.models import load_config

        width = load_config(model_dir).text_config.hidden_size
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            stab, projector = videopanda_modules(cfg, width)
        return cls(stab, projector, cfg)


def videopanda_modules(cfg: VideoPandaConfig, llm_width: int) -> tuple[STAB, nn.Module]:
    """(STAB, projector) at ``cfg`` for an LLM of width ``llm_width``, from torch's current generator."""
    stab = STAB(cfg.width, cfg.heads, cfg.patch, dropout=cfg.dropout, attention_scale=cfg.attention_scale,
                mask_padding=cfg.mask_padding)
    projector = nn.Sequential(nn.Linear(cfg.width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
    return stab, projector


def parameter_counts(cfg: VideoPandaConfig, llm_width: int) -> dict[str, int]:
    """Trainable parameters by part (the rows of CONNECTORS.md 3.6), built on the meta device (nothing is
    allocated): patch_embedding, lste, dpe, gstra, fusion (Proj and balance), lsd, fsra, embeddings (the video,
    frame and split tokens), tower, projector, total. Paper size: 24.09M + 20.98M = 45.07M."""
    with torch.device("meta"):
        stab, projector = videopanda_modules(cfg, llm_width)

    def count(*parts) -> int:
        return sum(p.numel() for part in parts
                   for p in (part.parameters() if isinstance(part, nn.Module) else [part]))

    g, f = stab.gstra, stab.fsra
    counts = {
        "patch_embedding": count(stab.patch_embed), "lste": count(stab.lste), "dpe": count(stab.dpe),
        "gstra": count(g) - g.token.numel(), "fusion": count(stab.fuse, stab.balance), "lsd": count(stab.lsd),
        "fsra": count(f) - f.token.numel(), "embeddings": count(g.token, f.token, stab.split),
    }
    counts["tower"] = count(stab)
    counts["projector"] = count(projector)
    counts["total"] = counts["tower"] + counts["projector"]
    return counts
