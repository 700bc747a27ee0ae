"""Slow-Fast MLLM as a connector: a few fast tokens in the LLM's sequence, all slow tokens through
cross-attention inside chosen decoder layers (CONNECTORS.md section 1; arXiv 2504.01328, its first stage:
LLM frozen, projector and cross-attention trained).

Legend: ``b`` batch, ``T`` padded frames, ``t`` a clip's frames, ``h``/``w`` the cached patch grid, ``p`` tokens
per frame after the 2x2 pooling, ``d_v`` vision width, ``d`` LLM width, ``t_f`` fast frames, ``m`` slow tokens.

Per clip: the cached grid ``[t, h·w, d_v]`` -> projector (Linear -> GELU -> Linear to ``d``, on every patch) ->
2x2 average pooling on the grid (not for a single frame) -> ``[t, p, d]``. Slow tokens: all ``t·p`` of them,
read by the hybrid layers (``slowfast_layers.py``). Fast tokens: ``fast_frames`` of them pooled over time,
``[t_f·p, d]`` frame-major, spliced at ``<video>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dualfocus.connectors.interface import Batch, Connector, VisualTokens, pad_rows
from dualfocus.connectors.registry import ConnectorConfig


@dataclass
class SlowFastConfig(ConnectorConfig):
    """Slow-Fast: projector + fast tokens in the sequence + slow-token cross-attention in hybrid layers."""

    name: str = "slowfast"
    """Which connector trains: one of the registry's names (connectors/registry.py)."""
    grid_stream: str = "grid"
    """Store stream of the un-pooled patch grid of the vision tower's last layer, ``[h·w, d_v]`` (tap ``grid``, or
    ``grid@SxS`` with ``grid_size``)."""
    grid_size: int | None = None
    """Side of the stored grid when it was resized at extract (tap ``grid@SxS``); null = the tower's own grid."""
    frame_pool: int = 2
    """Average pooling of each frame's projected grid (paper: 2, i.e. 2x2); 1 = none. Single frames are not pooled."""
    temporal_stride: int = 4
    """Fast tokens: frames averaged per fast frame (paper: 4)."""
    sampling_stride: int = 1
    """Fast tokens: take every k-th frame first (paper: 1)."""
    min_fast_frames: int = 16
    """Fast frames at least (adaptive pooling to min(t, this) when t / temporal_stride is fewer; paper: 16)."""
    hybrid_layers: list[int] | None = None
    """Decoder layers given slow-token cross-attention; null = {0, L/4, L/2, 3L/4}."""

    def check(self) -> list[str]:
        problems = []
        for key in ("frame_pool", "temporal_stride", "sampling_stride", "min_fast_frames"):
            if getattr(self, key) < 1:
                problems.append(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.grid_size is not None and self.grid_size < 1:
            problems.append(f"grid_size must be >= 1 or null, got {self.grid_size}")
        if self.hybrid_layers is not None and (not self.hybrid_layers or min(self.hybrid_layers) < 0):
            problems.append(f"hybrid_layers must be a non-empty list of layer indices >= 0 or null, got {self.hybrid_layers}")
        return problems


def pool_frames(x: torch.Tensor, side: tuple[int, int], pool: int) -> torch.Tensor:
    """``[t, h·w, d]`` -> ``[t, (h/pool)·(w/pool), d]``: average pooling on each frame's grid, row-major (floored);
    a single frame (an image) is returned as it is."""
    t, _, d = x.shape
    if pool == 1 or t == 1:
        return x
    h, w = side
    grid = x.reshape(t, h, w, d).permute(0, 3, 1, 2)                                  # [t, d, h, w]
    return F.avg_pool2d(grid, pool).flatten(2).transpose(1, 2)                         # [t, p, d]


def fast_frames(x: torch.Tensor, temporal_stride: int, sampling_stride: int = 1, min_frames: int = 16) -> torch.Tensor:
    """``[t, p, d]`` -> ``[t_f, p, d]``: the fast frames of one clip.

    First, with ``sampling_stride`` > 1 and at least ``min_frames`` frames, ``max(t // stride, min_frames)`` frames at
    ``floor(i·t/n)``. Then, when that leaves ``t' // temporal_stride >= min_frames``, averages of consecutive runs of
    ``temporal_stride`` frames (a partial last run dropped, as ``avg_pool3d`` floors); otherwise adaptive average
    pooling over time to ``min(t', min_frames)`` frames.
    """
    t = x.shape[0]
    if sampling_stride > 1 and t >= min_frames:
        n = max(t // sampling_stride, min_frames)
        x = x[[min(i * t // n, t - 1) for i in range(n)]]
    t = x.shape[0]
    if t // temporal_stride >= min_frames:
        keep = (t // temporal_stride) * temporal_stride
        return x[:keep].reshape(t // temporal_stride, temporal_stride, *x.shape[1:]).mean(1)
    target = min(t, min_frames)
    flat = x.permute(1, 2, 0).reshape(1, -1, t)                                        # [1, p·d, t]
    return F.adaptive_avg_pool1d(flat, target).reshape(*x.shape[1:], target).permute(2, 0, 1)


class SlowFast(Connector):
    """visual_tokens: ``streams[grid] [b, T, h·w, d_v]`` -> fast tokens ``[b, t_f·p, d]`` in the sequence, and
    ``layer_inputs = (slow [b, m, d], slow_mask [b, m])`` for the hybrid layers added by ``attach``."""

    name = "slowfast"
    config_class = SlowFastConfig

    def __init__(self, projector: nn.Module, cfg: SlowFastConfig, grid: tuple[int, int], seed: int = 0):
        super().__init__()
        self.projector = projector
        self.cfg = cfg
        self.grid = grid
        self.seed = seed
        self.hybrid: nn.Module | None = None  # made by attach(llm): its weights start from the LLM's own

    def streams(self) -> tuple[str, ...]:
        return (self.cfg.grid_stream,)

    def frame_tokens(self, grid: torch.Tensor, frame_mask: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, its projected and pooled frames ``[t_i, p, d]``."""
        frame_mask = frame_mask.bool()
        projected = self.projector(grid[frame_mask])                                  # [N, h·w, d]
        counts = frame_mask.sum(1).tolist()
        return [pool_frames(x, self.grid, self.cfg.frame_pool) for x in projected.split(counts)]

    def visual_tokens(self, batch: Batch, llm: nn.Module) -> VisualTokens:
        per_sample = self.frame_tokens(batch.streams[self.cfg.grid_stream], batch.frame_mask)
        cfg = self.cfg
        fast = [fast_frames(x, cfg.temporal_stride, cfg.sampling_stride, cfg.min_fast_frames).flatten(0, 1)
                for x in per_sample]
        slow = [x.flatten(0, 1) for x in per_sample]
        like = per_sample[0]
        embeds, mask = pad_rows(fast, like.shape[-1], like)
        slow_tokens, slow_mask = pad_rows(slow, like.shape[-1], like)
        return VisualTokens(embeds, mask, layer_inputs=(slow_tokens, slow_mask))

    # ------------------------------------------------------------------ inside the LLM
    def attach(self, llm: nn.Module) -> None:
        from dualfocus.connectors.slowfast_layers import SlowFastLayers, default_layers

        layers = self.cfg.hybrid_layers or default_layers(llm.config.num_hidden_layers)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 1)
            self.hybrid = SlowFastLayers(llm, list(layers))
        self.hybrid.attach(llm)

    def decoder_inputs(self, layer_inputs, inputs):
        slow, slow_mask = layer_inputs
        return self.hybrid.slow_context(slow, slow_mask, inputs)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The warm-up gates alpha of the hybrid layers (``optim.gate_lr_scale`` applies to them)."""
        return self.hybrid.gate_parameters() if self.hybrid is not None else []

    # ------------------------------------------------------------------ building
    @staticmethod
    def _geometry(cfg: SlowFastConfig, model_dir: str) -> tuple[tuple[int, int], int, int]:
        """((h, w) of the stored grid, d_v, d) from the model's config."""
        from dualfocus.pipeline.models import load_config

        config = load_config(model_dir)
        vc = config.vision_config
        side = cfg.grid_size or vc.image_size // vc.patch_size
        return (side, side), vc.hidden_size, config.text_config.hidden_size

    @staticmethod
    def expected_streams(cfg: SlowFastConfig, model_dir: str) -> dict[str, tuple[int, ...]]:
        (h, w), d_v, _ = SlowFast._geometry(cfg, model_dir)
        return {cfg.grid_stream: (h * w, d_v)}

    @staticmethod
    def expected_taps(cfg: SlowFastConfig, model_dir: str) -> dict[str, str]:
        return {cfg.grid_stream: "grid" if cfg.grid_size is None else f"grid@{cfg.grid_size}x{cfg.grid_size}"}

    @staticmethod
    def extract_args(cfg: SlowFastConfig, model_dir: str, missing: list[str]) -> str:
        group, _, tap = cfg.grid_stream.rpartition(".")
        group = group or "slowfast"
        return (f"--encoder {group}={model_dir} "
                f"\"encoders.{group}.taps.{tap}={SlowFast.expected_taps(cfg, model_dir)[cfg.grid_stream]}\"")

    @staticmethod
    def tokens_per_frame(cfg: SlowFastConfig, model_dir: str) -> int:
        """Fast tokens per frame at most: the pooled grid (a clip of up to ``min_fast_frames`` frames keeps all)."""
        (h, w), _, _ = SlowFast._geometry(cfg, model_dir)
        return (h // cfg.frame_pool) * (w // cfg.frame_pool)

    @staticmethod
    def model_problems(cfg: SlowFastConfig, model_dir: str) -> list[str]:
        from dualfocus.pipeline.models import load_config

        depth = load_config(model_dir).text_config.num_hidden_layers
        bad = [i for i in cfg.hybrid_layers or [] if i >= depth]
        if bad:
            return [f"connector.hybrid_layers {bad} out of range: the LLM at {model_dir} has {depth} layers"]
        return []

    @classmethod
    def build(cls, cfg: SlowFastConfig, model_dir: str, seed: int = 0) -> "SlowFast":
        """The projector drawn from ``seed`` (PyTorch's default init, as the reference); the hybrid layers'
        modules are made when the connector is attached to the LLM, from its k/v weights."""
        grid, d_v, d = cls._geometry(cfg, model_dir)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            projector = nn.Sequential(nn.Linear(d_v, d), nn.GELU(), nn.Linear(d, d))
        return cls(projector, cfg, grid, seed)
