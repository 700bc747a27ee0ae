"""LongVU as a connector: adaptive spatio-temporal compression of two cached encoders (CONNECTORS.md section 2;
Vision-CAIR/LongVU, arXiv 2410.17434; our setting: LLM frozen, the connector trained).

Legend: ``b`` batch, ``T`` padded frames, ``t`` a clip's raw frames, ``n`` a clip's frames in the batch (already
reduced), ``g`` cached grid side (``p = g²``), ``q`` query side, ``l`` low-res side, ``w`` SVA width, ``d`` LLM width,
``L`` question tokens, ``B`` a sample's visual-token budget, ``P_hi = q(q+1)`` / ``P_lo = l(l+1)`` tokens per
high-/low-res frame (newline per row included).

Per clip::

    DINO grid [t, p, d_dino] --select_frames (before training, cached by the data path)--> kept frames (n of them)
    SigLIP + DINO grids [n, p, d_i] --SVA (sva.py)--> [n, q², w]
      high-res: projector -> [n, q², d] + newline per row -> [n, P_hi, d]
      low-res:  bilinear q×q -> l×l BEFORE the projector -> [n, l², d] + newline per row -> [n, P_lo, d]
    budget logic (``assemble``): all high-res | low-res with the top-k frames (by the question) high-res
      | spatial token compression (STC) | truncation to B

Choices where the reference is ambiguous or flawed (section 2.7 quirks):

- DINO windows of 16 frames (the code; the paper says 8), threshold 0.83, cap 400 by the reference's
  ``int(i·len/400)`` subsampling; a frame of all zeros normalises to zeros (the reference would give NaN).
- The budget is ``B = max_positions - text_len - 16`` with ``text_len = len(prefix_ids) + len(text_ids)``: in
  training ``text_ids`` hold the answer, as the reference's ``input_ids`` do, so a sample gets a few fewer visual
  tokens in training than at inference. ``max_positions`` is the LLM's ``max_position_embeddings`` unless set;
  the 16 reserved tokens are all the room left for generation, as in the reference.
- Frames are scored for high resolution against the QUESTION alone (``batch.question_ids``, embedded by the
  frozen LLM's input table, masked by ``question_mask``). The reference scores against every token after
  ``<image>``, answer included, which leaks the label into the selection in training. Ties (e.g. no question
  tokens) go to the earlier frame.
- ``n > B // l²``: every frame high-res, then STC and truncation (the reference's 8×8 fallback there is dead code
  in its released config). A mixed layout fits the budget by construction and is never compressed.
- STC drops the non-anchor frames' newline tokens (cosine 1 with the anchor's), as the reference does.
- Square frames (no ``unpad``), no ``frame_pos`` (off in the reference), no SVA attention masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dualfocus.connectors.interface import Batch, Connector, VisualTokens, pad_rows
from dualfocus.connectors.registry import ConnectorConfig
from dualfocus.connectors.sva import SpatialVisionAggregator

RESERVED_TOKENS = 16
"""Context positions kept free of visual tokens beyond the text (the reference's ``inference_max_length``)."""


@dataclass
class LongVUConfig(ConnectorConfig):
    """LongVU: SigLIP + DINOv2 grids -> SVA -> projector, with DINO frame reduction, question-guided high-res
    frames and spatial token compression under the LLM's context budget. Defaults are the paper's sizes."""

    name: str = "longvu"
    """Which connector trains: one of the registry's names (connectors/registry.py)."""
    siglip_stream: str = "siglip.grid"
    """Store stream of the SigLIP grid ``[grid², siglip_width]`` (tap ``grid@GxG``); its mean is the SVA context."""
    dino_stream: str = "dino.grid"
    """Store stream of the DINOv2 grid ``[grid², dino_width]`` (tap ``grid@GxG``); also drives frame reduction."""
    siglip_width: int = 1152
    """Width of the SigLIP features (so400m: 1152; ``init-tiny --family siglip``: 64)."""
    dino_width: int = 1536
    """Width of the DINOv2 features (giant: 1536; large: 1024; ``init-tiny --family dinov2``: 64)."""
    grid: int = 24
    """Side of the cached grid both streams are resized to at extract (paper: 24)."""
    query_side: int = 12
    """Side of the SVA's query grid: high-res frames have query_side·(query_side+1) tokens (paper: 12)."""
    lowres_side: int = 8
    """Side of a low-res frame's grid, interpolated from the query grid (paper: 8)."""
    width: int = 1024
    """SVA width (paper: 1024)."""
    heads: int = 16
    """Attention heads of the SVA (paper: 16); must divide width."""
    depth: int = 3
    """SVA layers (paper: 3)."""
    dino_window: int = 16
    """Frames per window of the DINO reduction (the reference code: 16; the paper says 8)."""
    dino_threshold: float = 0.83
    """A frame is kept when its mean DINO cosine similarity to its window is below this (paper: 0.83)."""
    frame_cap: int = 400
    """Most frames the DINO reduction keeps (uniform subsampling beyond; paper: 400)."""
    stc_window: int = 8
    """Frames per window of spatial token compression, the first one kept whole (paper: 8)."""
    stc_threshold: float = 0.8
    """STC keeps a token when its cosine similarity to the anchor's token at its position is below this (0.8)."""
    max_positions: int | None = None
    """Context the visual budget is computed from (B = max_positions - text - 16); null = the LLM's
    max_position_embeddings. Lower it to leave room for longer generations."""

    def check(self) -> list[str]:
        problems = []
        for key in ("siglip_width", "dino_width", "grid", "query_side", "lowres_side", "width", "heads", "depth",
                    "dino_window", "frame_cap", "stc_window"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.query_side >= 1 and self.grid % self.query_side:
            problems.append(f"grid ({self.grid}) must be a multiple of query_side ({self.query_side})")
        if self.lowres_side >= self.query_side:
            problems.append(f"lowres_side ({self.lowres_side}) must be smaller than query_side ({self.query_side})")
        if self.heads >= 1 and self.width % self.heads:
            problems.append(f"width ({self.width}) must be divisible by heads ({self.heads})")
        for key in ("dino_threshold", "stc_threshold"):
            if not -1 <= getattr(self, key) <= 1:
                problems.append(f"{key} is a cosine similarity: it must be within [-1, 1], got {getattr(self, key)}")
        if self.max_positions is not None and self.max_positions <= RESERVED_TOKENS:
            problems.append(f"max_positions must be > {RESERVED_TOKENS} or null, got {self.max_positions}")
        return problems


# ---------------------------------------------------------------------- temporal reduction (before training)
def select_frames(dino: torch.Tensor, window: int = 16, threshold: float = 0.83, cap: int = 400) -> list[int]:
    """Indices (sorted) of the frames of ``dino [t, p, d]`` that survive the DINO redundancy drop.

    Non-overlapping windows of ``window`` frames (the last may be shorter); in each, a frame's score is the mean
    cosine similarity of its flattened feature to every frame of the window, itself included; the middle frame
    (index ``len // 2``) scores 0, so it is always kept; frames scoring below ``threshold`` are kept. Beyond
    ``cap`` survivors, ``cap`` of them at ``int(i·len/cap)``. Pure: nothing but ``dino`` is read.
    """
    t = dino.shape[0]
    flat = dino.reshape(t, -1)                                                         # [t, p·d]
    kept: list[int] = []
    for start in range(0, t, window):
        f = F.normalize(flat[start:start + window].float(), dim=1)                    # [j, p·d]
        score = (f @ f.T).mean(1)                                                      # [j]
        score[len(f) // 2] = 0
        kept.extend(start + i for i in torch.nonzero(score < threshold).flatten().tolist())
    if len(kept) > cap:
        step = len(kept) / cap
        kept = [kept[int(step * i)] for i in range(cap)]
    return kept


def reduction_applies(t: int, budget: int, lowres_tokens: int = 64) -> bool:
    """Whether the reference runs the DINO drop on a clip of ``t`` frames: ``t >= max(1, B // lowres_tokens)``
    (``lowres_tokens = lowres_side²``), i.e. only when the clip would not fit at low resolution."""
    return t >= max(1, budget // lowres_tokens)


def visual_budget(max_positions: int, text_len: int) -> int:
    """Visual tokens a sample may have: ``max_positions - text_len - 16``, at least 0."""
    return max(0, max_positions - text_len - RESERVED_TOKENS)


# ---------------------------------------------------------------------- budget logic
def resolution_plan(n: int, budget: int, query_side: int, lowres_side: int) -> str:
    """How ``n`` frames meet the budget (reference thresholds, with q² and l², not the newline-inclusive counts):
    "high" when ``n < max(1, B // q²)``; "mix" (low-res, top-k high-res) up to ``n <= max(1, B // l²)``; beyond,
    "over" (all high-res, then compression)."""
    if n < max(1, budget // query_side ** 2):
        return "high"
    if n > max(1, budget // lowres_side ** 2):
        return "over"
    return "mix"


def top_frames(low: torch.Tensor, question: torch.Tensor | None, k: int) -> list[int]:
    """The ``k`` frames (sorted) whose low-res tokens ``[n, P_lo, d]`` best match the question ``[L, d]``: the dot
    product of each token with each question token, averaged over question tokens, then over the frame's tokens
    (newlines included, as the reference). No question tokens: every score is 0 and the first frames win."""
    with torch.no_grad():
        if question is None or question.shape[0] == 0:
            scores = low.new_zeros(low.shape[0], dtype=torch.float32)
        else:
            scores = (low.float() @ question.float().mean(0)).mean(1)                 # [n]
        order = torch.argsort(-scores, stable=True)[:k]
    return sorted(order.tolist())


def compress_tokens(frames: torch.Tensor, budget: int, window: int = 8, threshold: float = 0.8) -> torch.Tensor:
    """Spatial token compression: ``[n, P, d]`` -> ``[m, d]`` with ``m <= budget``.

    Windows of ``window`` frames; the first of each is kept whole, each later frame keeps the tokens whose cosine
    similarity to the first frame's token at the same position is below ``threshold`` (window order: the anchor,
    then survivors in (frame, position) order). Then, if over budget, ``ceil(excess / windows)`` tokens off the
    tail of every window, and a final cut to ``budget``.
    """
    chunks = []
    for start in range(0, frames.shape[0], window):
        chunk = frames[start:start + window]                                           # [j, P, d]
        if len(chunk) == 1:
            chunks.append(chunk[0])
            continue
        with torch.no_grad():
            sim = F.cosine_similarity(chunk[:1].float(), chunk[1:].float(), dim=-1)    # [j-1, P]
        chunks.append(torch.cat([chunk[0], chunk[1:][sim < threshold]]))
    total = sum(len(c) for c in chunks)
    if total > budget:
        trim = math.ceil((total - budget) / len(chunks))
        chunks = [c[: max(len(c) - trim, 0)] for c in chunks]
    if not chunks:
        return frames.new_zeros(0, frames.shape[-1])
    return torch.cat(chunks)[:budget]


def downsample_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """``[n, s·s, w]`` -> ``[n, side·side, w]``: bilinear resize of each row-major grid (``align_corners=False``)."""
    n, c, w = x.shape
    s = int(round(c ** 0.5))
    grid = x.reshape(n, s, s, w).permute(0, 3, 1, 2).float()                           # [n, w, s, s]
    small = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return small.permute(0, 2, 3, 1).reshape(n, side * side, w).to(x.dtype)


# ---------------------------------------------------------------------- the connector
class LongVU(Connector):
    """visual_tokens: ``streams[siglip] [b, T, p, d_siglip]``, ``streams[dino] [b, T, p, d_dino]`` (the frames the
    batch holds, already reduced) -> per sample at most ``B_i`` tokens ``[b, N, d]`` with mask ``[b, N]``.

    Trainable: the SVA (tower MLPs, query, layers), the projector (Linear -> GELU -> Linear to ``d``) and the
    newline token. The question embeddings come from the frozen LLM without gradient.
    """

    name = "longvu"
    config_class = LongVUConfig

    def __init__(self, sva: SpatialVisionAggregator, projector: nn.Module, newline: nn.Parameter,
                 cfg: LongVUConfig, max_positions: int):
        super().__init__()
        self.sva = sva
        self.projector = projector
        self.newline = newline
        self.cfg = cfg
        self.max_positions = max_positions

    def streams(self) -> tuple[str, ...]:
        return (self.cfg.siglip_stream, self.cfg.dino_stream)

    def with_newlines(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """``[n, side², d]`` -> ``[n, side·(side+1), d]``: the newline token after each row."""
        n, _, d = x.shape
        rows = x.reshape(n, side, side, d)
        newline = self.newline.to(x.dtype).expand(n, side, 1, d)
        return torch.cat([rows, newline], dim=2).reshape(n, side * (side + 1), d)

    def high_res(self, sampled: torch.Tensor) -> torch.Tensor:
        """SVA output ``[n, q², w]`` -> ``[n, P_hi, d]``."""
        return self.with_newlines(self.projector(sampled), self.cfg.query_side)

    def low_res(self, sampled: torch.Tensor) -> torch.Tensor:
        """SVA output ``[n, q², w]`` -> ``[n, P_lo, d]`` (resized before the projector, as the reference)."""
        side = self.cfg.lowres_side
        return self.with_newlines(self.projector(downsample_grid(sampled, side)), side)

    def assemble(self, sampled: torch.Tensor, budget: int, question: torch.Tensor | None) -> torch.Tensor:
        """One clip's tokens under its budget: SVA output ``[n, q², w]``, question embeddings ``[L, d]`` ->
        ``[m, d]`` with ``m <= budget`` (section 2.5-2.6; see ``resolution_plan``)."""
        cfg = self.cfg
        n = sampled.shape[0]
        if budget <= 0 or n == 0:
            return self.projector(sampled[:0, 0])                                      # [0, d]
        tokens = None
        if resolution_plan(n, budget, cfg.query_side, cfg.lowres_side) == "mix":
            low = self.low_res(sampled)                                                # [n, P_lo, d]
            p_lo, p_hi = low.shape[1], cfg.query_side * (cfg.query_side + 1)
            k = min(n, (budget - n * p_lo) // (p_hi - p_lo)) if budget > n * p_lo else 0
            if k >= 1:
                chosen = top_frames(low, question, k)
                high = dict(zip(chosen, self.high_res(sampled[chosen])))             # only the chosen frames
                return torch.cat([high[i] if i in high else low[i] for i in range(n)])
            tokens = low
        if tokens is None:
            tokens = self.high_res(sampled)                                            # [n, P_hi, d]
        if tokens.shape[0] * tokens.shape[1] > budget:
            return compress_tokens(tokens, budget, cfg.stc_window, cfg.stc_threshold)
        return tokens.flatten(0, 1)

    def budgets(self, batch: Batch) -> list[int]:
        """Each sample's visual-token budget from its text length (prefix + question/answer ids)."""
        return [visual_budget(self.max_positions, len(pre) + len(txt))
                for pre, txt in zip(batch.prefix_ids, batch.text_ids)]

    def visual_tokens(self, batch: Batch, llm: nn.Module) -> VisualTokens:
        frame_mask = batch.frame_mask.bool()
        siglip = batch.streams[self.cfg.siglip_stream][frame_mask]                     # [N, p, d_siglip]
        dino = batch.streams[self.cfg.dino_stream][frame_mask]                         # [N, p, d_dino]
        sampled = self.sva(siglip, dino)                                               # [N, q², w]
        with torch.no_grad():
            words = llm.get_input_embeddings()(batch.question_ids)                     # [b, L, d]
        question_mask = batch.question_mask.bool()
        rows = [self.assemble(x, budget, words[i][question_mask[i]])
                for i, (x, budget) in enumerate(zip(sampled.split(frame_mask.sum(1).tolist()), self.budgets(batch)))]
        embeds, mask = pad_rows(rows, self.newline.shape[-1], rows[0])
        return VisualTokens(embeds, mask)

    # ------------------------------------------------------------------ before training
    @staticmethod
    def plan_clip(cfg: LongVUConfig, dino_frames: torch.Tensor, budget: int) -> list[int]:
        """The frames of a clip to keep, from its DINO grid ``[t, p, d_dino]`` and a budget (``visual_budget``):
        ``select_frames`` when ``reduction_applies``, else all. Pure and cheap."""
        t = dino_frames.shape[0]
        if not reduction_applies(t, budget, cfg.lowres_side ** 2):
            return list(range(t))
        return select_frames(dino_frames, cfg.dino_window, cfg.dino_threshold, cfg.frame_cap)

    @staticmethod
    def plan_frames(cfg: LongVUConfig, model_dir: str, read, samples: list) -> list[list[int] | None]:
        """The data path's hook (``data/prepare.py``), run once before training: per video, its DINO grid is read
        once and the redundancy drop computed once (``select_frames`` depends on the features alone); per sample,
        it applies only when the clip is long for that sample's budget (which depends on its text), as the
        reference decides. None = every frame."""
        from dualfocus.pipeline.models import load_config

        positions = cfg.max_positions or load_config(model_dir).text_config.max_position_embeddings
        kept: dict[str, list[int]] = {}
        plans = []
        for s in samples:
            budget = visual_budget(positions, len(s.prefix_ids) + len(s.text_ids))
            if not reduction_applies(s.n_frames, budget, cfg.lowres_side ** 2):
                plans.append(None)
                continue
            if s.video_id not in kept:
                dino = torch.as_tensor(read(s.video_id, [cfg.dino_stream])[cfg.dino_stream], dtype=torch.float32)
                kept[s.video_id] = select_frames(dino, cfg.dino_window, cfg.dino_threshold, cfg.frame_cap)
            plans.append(kept[s.video_id])
        return plans

    # ------------------------------------------------------------------ building
    @staticmethod
    def expected_streams(cfg: LongVUConfig, model_dir: str) -> dict[str, tuple[int, ...]]:
        """Both grids at ``grid²`` patches; the widths are the config's (the encoders are not in the base model)."""
        p = cfg.grid * cfg.grid
        return {cfg.siglip_stream: (p, cfg.siglip_width), cfg.dino_stream: (p, cfg.dino_width)}

    @staticmethod
    def expected_taps(cfg: LongVUConfig, model_dir: str) -> dict[str, str]:
        tap = f"grid@{cfg.grid}x{cfg.grid}"
        return {cfg.siglip_stream: tap, cfg.dino_stream: tap}

    @staticmethod
    def extract_args(cfg: LongVUConfig, model_dir: str, missing: list[str]) -> str:
        """One ``--encoder`` group per missing stream; the encoder directories are the user's to fill in."""
        tap = f"grid@{cfg.grid}x{cfg.grid}"
        groups, taps = [], []
        for stream, default, placeholder in ((cfg.siglip_stream, "siglip", "SIGLIP_DIR"),
                                             (cfg.dino_stream, "dino", "DINO_DIR")):
            if stream in missing:
                group, _, name = stream.rpartition(".")
                groups.append(f"--encoder {group or default}={placeholder}")
                taps.append(f"\"encoders.{group or default}.taps.{name}={tap}\"")
        return " ".join(groups + taps)

    @staticmethod
    def tokens_per_frame(cfg: LongVUConfig, model_dir: str) -> int:
        """0: the budget logic keeps every sample's visual tokens within its context, whatever the frame count
        (the context check then checks the text alone). A frame has at most ``q·(q+1)`` tokens."""
        return 0

    @staticmethod
    def model_problems(cfg: LongVUConfig, model_dir: str) -> list[str]:
        from dualfocus.pipeline.models import load_config

        positions = load_config(model_dir).text_config.max_position_embeddings
        if cfg.max_positions is not None and cfg.max_positions > positions:
            return [f"connector.max_positions ({cfg.max_positions}) exceeds the LLM's {positions} positions "
                    f"(text_config.max_position_embeddings of {model_dir})"]
        return []

    @classmethod
    def build(cls, cfg: LongVUConfig, model_dir: str, seed: int = 0) -> "LongVU":
        """SVA, projector and newline drawn from ``seed`` (the reference's inits); the LLM width and, unless
        ``cfg.max_positions`` is set, the budget's context from the model's ``text_config``."""
        from dualfocus.pipeline.models import load_config

        text = load_config(model_dir).text_config
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            sva, projector, newline = longvu_modules(cfg, text.hidden_size)
        return cls(sva, projector, newline, cfg, cfg.max_positions or text.max_position_embeddings)


def longvu_modules(cfg: LongVUConfig, llm_width: int) -> tuple[SpatialVisionAggregator, nn.Module, nn.Parameter]:
    """(SVA, projector ``w -> d``, newline ``[d]``) of ``cfg`` for an LLM of width ``llm_width``, drawn from the
    current RNG."""
    sva = SpatialVisionAggregator([cfg.siglip_width, cfg.dino_width], cfg.width, cfg.grid, cfg.query_side,
                                  cfg.heads, cfg.depth)
    projector = nn.Sequential(nn.Linear(cfg.width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
    newline = nn.Parameter(torch.randn(llm_width) * llm_width ** -0.5)
    return sva, projector, newline
