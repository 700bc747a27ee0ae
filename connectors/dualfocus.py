"""DualFocus: cached vision features -> semantic stream + spatio-temporal stream -> FFP -> ``<video>`` tokens.

Legend: ``b`` batch, ``T`` padded frames, ``N`` real frames in the batch, ``P`` vision tokens per frame (p+1),
``M`` pooled motion tokens per frame (p/4), ``q`` queries, ``L`` question tokens, ``d_v``/``d_q``/``d_l``
vision, Q-Former and LLM widths.

Modules: ``semantic.py`` (the instruction-aware Q-Former), ``time_embedding.py``, ``ffp.py``; QA-ViT mode adds
``qavit.py`` (the question-aware top half of the ViT). Trainable: the Q-Former and its queries, the time
embedding, the FFP (and in QA-ViT mode the ViT adapters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualfocus.connectors.interface import Batch, Connector, VisualTokens
from dualfocus.connectors.registry import ConnectorConfig


DUALFOCUS_STREAMS = ("semantic", "spatiotemporal")
"""The streams DualFocus reads by default: the post-LN vision output and the pooled second-to-last state
(the two taps of `extract`'s default group)."""


@dataclass
class DualFocusConfig(ConnectorConfig):
    """DualFocus: Q-Former semantic stream + pooled spatio-temporal stream, fused by the FFP."""

    name: str = "dualfocus"
    """Which connector trains: one of the registry's names (connectors/registry.py)."""
    semantic_stream: str = "semantic"
    """Store stream the Q-Former reads: the vision tower's post-LN output [p+1, d_v] (extract's default group)."""
    spatiotemporal_stream: str = "spatiotemporal"
    """Store stream of the motion tokens: the second-to-last hidden state, patches pooled 4:1 [p/4, d_v]."""
    ffp_blocks: int = 2
    """Fusion blocks in the FFP (paper: 2)."""
    ffp_heads: int = 8
    """Attention heads in the FFP (paper: 8); must divide the LLM width."""
    ffp_dropout: float = 0.0
    """Dropout inside the FFP."""
    qformer_dropout: float | None = None
    """Dropout of the Q-Former (its attention probabilities and hidden states); null = the base model's own
    (InstructBLIP: 0.1 each). Attention dropout also keeps PyTorch off its fused attention kernels."""
    time_positions: int = 1000
    """Relative-time embedding table size (positions scaled to 0..time_positions-1)."""
    gate_init: float = 0.0
    """Initial value of each FFP fusion gate (paper: 0, so the connector starts as mlp_s(semantic))."""
    gate_kind: str = "linear"
    """How a gate scales its block's fused branch: "linear" (paper: s + g·c) or "tanh" (s + tanh(g)·c,
    bounded as in Flamingo-style gated cross-attention)."""

    def check(self) -> list[str]:
        problems = []
        if self.ffp_blocks < 1:
            problems.append(f"ffp_blocks must be >= 1, got {self.ffp_blocks}")
        if self.ffp_heads < 1:
            problems.append(f"ffp_heads must be >= 1, got {self.ffp_heads}")
        if not 0 <= self.ffp_dropout < 1:
            problems.append(f"ffp_dropout must be within [0, 1), got {self.ffp_dropout}")
        if self.qformer_dropout is not None and not 0 <= self.qformer_dropout < 1:
            problems.append(f"qformer_dropout must be within [0, 1) or null, got {self.qformer_dropout}")
        if self.time_positions < 2:
            problems.append(f"time_positions must be >= 2, got {self.time_positions}")
        if self.gate_kind not in ("linear", "tanh"):
            problems.append(f"gate_kind must be linear or tanh, got {self.gate_kind!r}")
        return problems


class DualFocus(Connector):
    """The DualFocus connector; ``build`` makes it from an InstructBLIP-layout model directory.

    visual_tokens: ``streams[semantic] [b, T, P, d_v]``, ``streams[spatiotemporal] [b, T, M, d_v]`` ->
    ``[b, T·q, d_l]`` with mask ``[b, T·q]`` (q tokens per real frame).
    """

    name = "dualfocus"
    config_class = DualFocusConfig

    def __init__(self, semantic: torch.nn.Module, time_embedding: torch.nn.Module, ffp: torch.nn.Module,
                 streams: tuple[str, str] = DUALFOCUS_STREAMS):
        super().__init__()
        self.semantic = semantic
        self.time_embedding = time_embedding
        self.ffp = ffp
        self._streams = tuple(streams)

    def streams(self) -> tuple[str, ...]:
        return self._streams

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        return [block.gate for block in self.ffp.blocks]

    def visual_tokens(self, batch: Batch, llm: torch.nn.Module) -> VisualTokens:
        semantic, spatiotemporal = (batch.streams[s] for s in self._streams)
        embeds, mask = self.fuse(self.semantic_frames(semantic, batch, llm), spatiotemporal, batch.frame_mask,
                                 batch.qformer_ids, batch.qformer_mask)
        return VisualTokens(embeds, mask)

    def semantic_frames(self, semantic: torch.Tensor, batch: Batch, llm: torch.nn.Module) -> torch.Tensor:
        """What the Q-Former reads, ``[b, T, P, d_v]``: the cached vision output as it is (QA-ViT mode changes it)."""
        return semantic

    def fuse(self, semantic: torch.Tensor, spatiotemporal: torch.Tensor, frame_mask: torch.Tensor,
             qformer_ids: torch.Tensor, qformer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """semantic ``[b, T, P, d_v]``, spatiotemporal ``[b, T, M, d_v]``, frame_mask ``[b, T]``,
        qformer_ids/qformer_mask ``[b, L]`` -> (tokens ``[b, T·q, d_l]``, token_mask ``[b, T·q]``)."""
        b, T = frame_mask.shape
        frame_mask = frame_mask.bool()
        sample_of_frame = torch.arange(b, device=frame_mask.device).unsqueeze(1).expand(b, T)[frame_mask]  # [N]
        frames = semantic[frame_mask]                                                   # [N, P, d_v]
        q_out = self.semantic(frames, qformer_ids[sample_of_frame], qformer_mask[sample_of_frame])  # [N, q, d_q]
        q = q_out.shape[1]
        sem = q_out.new_zeros(b, T, q, q_out.shape[-1])
        sem[frame_mask] = q_out
        sem = sem.reshape(b, T * q, -1)                                                 # [b, T·q, d_q]
        sem_mask = frame_mask.unsqueeze(-1).expand(b, T, q).reshape(b, T * q)
        motion = self.time_embedding(spatiotemporal, frame_mask)                        # [b, T, M, d_v]
        M = motion.shape[2]
        motion = motion.reshape(b, T * M, -1)                                           # [b, T·M, d_v]
        motion_mask = frame_mask.unsqueeze(-1).expand(b, T, M).reshape(b, T * M)
        tokens = self.ffp(sem, motion, sem_mask, motion_mask)                           # [b, T·q, d_l]
        return tokens, sem_mask

    # ------------------------------------------------------------------ building
    @staticmethod
    def expected_streams(cfg: DualFocusConfig, model_dir: str) -> dict[str, tuple[int, ...]]:
        """Per-frame shapes the model's vision tower gives the two streams: ``[p+1, d_v]`` and ``[p/4, d_v]``."""
        from dualfocus.encoders.taps import POOL_FACTOR
        from dualfocus.pipeline.models import load_config

        vc = load_config(model_dir).vision_config
        p = (vc.image_size // vc.patch_size) ** 2
        return {cfg.semantic_stream: (p + 1, vc.hidden_size), cfg.spatiotemporal_stream: (p // POOL_FACTOR, vc.hidden_size)}

    @staticmethod
    def expected_taps(cfg: DualFocusConfig, model_dir: str) -> dict[str, str]:
        """Which cut each stream must be: the post-LN output and the pooled second-to-last state."""
        return {cfg.semantic_stream: "post_ln", cfg.spatiotemporal_stream: "pool4"}

    @staticmethod
    def extract_args(cfg: DualFocusConfig, model_dir: str, missing: list[str]) -> str:
        """``dualfocus extract`` arguments adding the ``missing`` streams: the default group of the model."""
        return f"--model {model_dir}"

    @staticmethod
    def tokens_per_frame(cfg: DualFocusConfig, model_dir: str) -> int:
        """q: the model's query tokens (``num_query_tokens``)."""
        from dualfocus.pipeline.models import load_config

        return int(load_config(model_dir).num_query_tokens)

    @staticmethod
    def model_problems(cfg: DualFocusConfig, model_dir: str) -> list[str]:
        from dualfocus.connectors.limits import ModelLimits

        limits = ModelLimits.of(model_dir)
        if cfg.ffp_heads < 1 or limits.llm_width % cfg.ffp_heads:
            return [f"connector.ffp_heads ({cfg.ffp_heads}) must divide the LLM width "
                    f"({limits.llm_width}, text_config.hidden_size)"]
        return []

    @classmethod
    def build(cls, cfg: DualFocusConfig, model_dir: str, seed: int = 0) -> "DualFocus":
        """The Q-Former (and its queries) from the model directory; time embedding and FFP drawn from ``seed``."""
        semantic, time_embedding, ffp = _dualfocus_modules(cfg, model_dir, seed)
        return cls(semantic, time_embedding, ffp, (cfg.semantic_stream, cfg.spatiotemporal_stream))


@dataclass
class DualFocusQAViTConfig(DualFocusConfig):
    """DualFocus in QA-ViT mode: the top half of the ViT runs at train time, made question-aware."""

    name: str = "dualfocus-qavit"
    """Which connector trains: one of the registry's names (connectors/registry.py)."""
    cut_stream: str = "cut"
    """Store stream holding the hidden state entering the first question-aware block, ``[p+1, d_v]``: a tap
    ``hidden[K]`` with K = ``start_block`` (add it with ``extract --encoder qavit=MODEL
    encoders.qavit.taps.cut='hidden[K]'``). It replaces ``semantic_stream``, which this mode does not read."""
    start_block: int | None = None
    """First question-aware ViT block; null = depth // 2 (the paper's 'late' setting: blocks 19-38 of EVA-g)."""
    question_tokens: int = 32
    """Question tokens (LLM tokenizer, embedded by the frozen LLM's table) the ViT adapters read (paper: 32)."""

    def check(self) -> list[str]:
        problems = super().check()
        if self.start_block is not None and self.start_block < 1:
            problems.append(f"start_block must be >= 1 or null, got {self.start_block}")
        if self.question_tokens < 1:
            problems.append(f"question_tokens must be >= 1, got {self.question_tokens}")
        return problems


class DualFocusQAViT(DualFocus):
    """DualFocus with the question-aware top half of the ViT (``qavit.py``) in front of the Q-Former.

    Reads the cut stream ``[b, T, P, d_v]`` (the state entering block ``start``) instead of the post-LN output,
    and the same spatio-temporal stream as the default mode. Per frame, the frozen blocks ``start..depth-1``
    and the ViT's final LayerNorm run again with the question's embeddings, then the Q-Former and FFP run as in
    the default mode. Choices (CONNECTORS.md section 4):

    - question tokens: the question alone in the LLM's tokenizer, cut at ``question_tokens``, embedded by the
      frozen LLM's input table (no gradient), repeated for each frame;
    - padding: masked out of the ViT attention (the reference accepts the mask and ignores it);
    - the spatio-temporal stream stays the cached, question-independent second-to-last hidden state of the
      plain tower: the question-aware blocks feed the Q-Former only, as in the reference.

    Trainable: the ViT adapters (question projections, parallel MLPs, their gates), Q-Former, time embedding,
    FFP. The frozen top blocks come from the base model and are not saved.
    """

    name = "dualfocus-qavit"
    config_class = DualFocusQAViTConfig

    def __init__(self, semantic: torch.nn.Module, time_embedding: torch.nn.Module, ffp: torch.nn.Module,
                 qavit: torch.nn.Module, streams: tuple[str, str], question_tokens: int = 32):
        super().__init__(semantic, time_embedding, ffp, streams)
        self.qavit = qavit
        self.question_tokens = question_tokens

    def semantic_frames(self, cut: torch.Tensor, batch: Batch, llm: torch.nn.Module) -> torch.Tensor:
        """cut ``[b, T, P, d_v]`` -> question-aware post-LN vision output ``[b, T, P, d_v]`` (zeros at padding)."""
        frame_mask = batch.frame_mask.bool()
        b, T = frame_mask.shape
        sample_of_frame = torch.arange(b, device=frame_mask.device).unsqueeze(1).expand(b, T)[frame_mask]  # [N]
        ids = batch.question_ids[:, : self.question_tokens]                              # [b, L]
        mask = batch.question_mask[:, : self.question_tokens]
        with torch.no_grad():
            words = llm.get_input_embeddings()(ids)                                      # [b, L, d_l]
        out = torch.zeros_like(cut)
        out[frame_mask] = self.qavit(cut[frame_mask], words[sample_of_frame], mask[sample_of_frame]).to(cut.dtype)
        return out

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        return super().gate_parameters() + [block.gate for block in self.qavit.blocks]

    @staticmethod
    def _start(cfg: DualFocusQAViTConfig, model_dir: str) -> int:
        from dualfocus.pipeline.models import load_config

        depth = load_config(model_dir).vision_config.num_hidden_layers
        return cfg.start_block if cfg.start_block is not None else depth // 2

    @staticmethod
    def expected_streams(cfg: DualFocusQAViTConfig, model_dir: str) -> dict[str, tuple[int, ...]]:
        """The cut ``[p+1, d_v]`` and the spatio-temporal stream ``[p/4, d_v]``."""
        shapes = DualFocus.expected_streams(cfg, model_dir)
        return {cfg.cut_stream: shapes[cfg.semantic_stream], cfg.spatiotemporal_stream: shapes[cfg.spatiotemporal_stream]}

    @staticmethod
    def expected_taps(cfg: DualFocusQAViTConfig, model_dir: str) -> dict[str, str]:
        """The cut must be ``hidden[start]``: the state entering the first question-aware block."""
        return {cfg.cut_stream: f"hidden[{DualFocusQAViT._start(cfg, model_dir)}]", cfg.spatiotemporal_stream: "pool4"}

    @staticmethod
    def extract_args(cfg: DualFocusQAViTConfig, model_dir: str, missing: list[str]) -> str:
        """The cut as a group of its own (``qavit``, tap ``hidden[start]``), plus the default group if needed."""
        args = [f"--model {model_dir}"] if set(missing) - {cfg.cut_stream} else []
        if cfg.cut_stream in missing:
            group, _, tap = cfg.cut_stream.rpartition(".")
            start = DualFocusQAViT._start(cfg, model_dir)
            args.append(f"--encoder {group or 'qavit'}={model_dir} \"encoders.{group or 'qavit'}.taps.{tap}=hidden[{start}]\"")
        return " ".join(args)

    @staticmethod
    def model_problems(cfg: DualFocusQAViTConfig, model_dir: str) -> list[str]:
        from dualfocus.pipeline.models import load_config

        problems = DualFocus.model_problems(cfg, model_dir)
        depth = load_config(model_dir).vision_config.num_hidden_layers
        start = DualFocusQAViT._start(cfg, model_dir)
        if not 0 < start < depth:
            problems.append(f"connector.start_block ({start}) must be within 1..{depth - 1}: the vision tower at "
                            f"{model_dir} has {depth} blocks")
        return problems

    @classmethod
    def build(cls, cfg: DualFocusQAViTConfig, model_dir: str, seed: int = 0) -> "DualFocusQAViT":
        """As DualFocus, plus the frozen top blocks of the model's vision tower with fresh adapters from ``seed``
        (the parallel MLPs start as copies of the blocks' own)."""
        from dualfocus.connectors.qavit import QuestionAwareTop
        from dualfocus.pipeline.models import load_config, load_vision_model

        semantic, time_embedding, ffp = _dualfocus_modules(cfg, model_dir, seed)
        vision = load_vision_model(model_dir)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 1)
            top = QuestionAwareTop(vision, cls._start(cfg, model_dir), load_config(model_dir).text_config.hidden_size)
        return cls(semantic, time_embedding, ffp, top, (cfg.cut_stream, cfg.spatiotemporal_stream), cfg.question_tokens)


def set_dropout(module: torch.nn.Module, p: float) -> None:
    """Every dropout of a transformers module to ``p``: its ``nn.Dropout`` layers and the attention modules'
    ``attention_dropout`` rate (a float their attention function reads at each call)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p


def _dualfocus_modules(cfg: DualFocusConfig, model_dir: str, seed: int):
    from dualfocus.connectors.ffp import FocusFeatureProjector
    from dualfocus.connectors.semantic import SemanticStream
    from dualfocus.connectors.time_embedding import RelativeTimeEmbedding
    from dualfocus.pipeline.models import load_config, load_qformer

    config = load_config(model_dir)
    d_v, d_q, d_l = config.vision_config.hidden_size, config.qformer_config.hidden_size, config.text_config.hidden_size
    qformer, query_tokens = load_qformer(model_dir)
    if cfg.qformer_dropout is not None:
        set_dropout(qformer, cfg.qformer_dropout)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        time_embedding = RelativeTimeEmbedding(d_v, n_positions=cfg.time_positions)
        ffp = FocusFeatureProjector(d_q, d_v, d_l, n_blocks=cfg.ffp_blocks, n_heads=cfg.ffp_heads,
                                    dropout=cfg.ffp_dropout, gate_init=cfg.gate_init, gate_kind=cfg.gate_kind)
    return SemanticStream(qformer, query_tokens), time_embedding, ffp


def build_dualfocus(model_dir: str, cfg: DualFocusConfig | None = None, llm_dtype: str = "float32", seed: int = 0,
                    llm_device: str = "cpu"):
    """``VideoLLM`` with the DualFocus connector (``cfg`` or the paper's defaults) before the model's frozen LLM."""
    from dualfocus.connectors.registry import build_video_llm

    return build_video_llm(cfg or DualFocusConfig(), model_dir, llm_dtype=llm_dtype, seed=seed, llm_device=llm_device)
