"""``DualFocus``: cached vision features -> semantic stream + spatio-temporal stream -> FFP -> frozen LLM.

Legend: ``b`` batch, ``T`` padded frames, ``P`` vision tokens per frame (p+1), ``M`` pooled motion
tokens per frame (p/4), ``q`` queries, ``L`` question tokens, ``d_v``/``d_q``/``d_l`` vision, Q-Former
and LLM widths.

Trainable: the Q-Former, its query tokens, the relative-time embedding and the FFP. The LLM is frozen
(``requires_grad=False``, always in eval mode, so its dropout never fires) and never saved in
checkpoints. Padding is handled per sample: each sample contributes exactly its own ``n_i·q`` video
tokens to the LLM, so padded frames never reach it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dualfocus.train.prompt import IGNORE_INDEX

TRAINABLE_PREFIXES = ("semantic.", "time_embedding.", "ffp.")


@dataclass
class LLMInputs:
    """What the LLM receives: ``inputs_embeds [b, S, d_l]``, ``attention_mask [b, S]``, ``labels [b, S]``."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None


class DualFocus(nn.Module):
    """The DualFocus connector around a frozen LLM; built by ``build_dualfocus`` from a model directory."""

    def __init__(self, semantic: nn.Module, time_embedding: nn.Module, ffp: nn.Module, llm: nn.Module):
        super().__init__()
        self.semantic = semantic
        self.time_embedding = time_embedding
        self.ffp = ffp
        self.llm = llm
        self.llm.requires_grad_(False)
        self.llm.eval()

    def train(self, mode: bool = True) -> "DualFocus":
        """Train mode for the connector only: the frozen LLM stays in eval mode, so an LLM built with
        dropout never applies it (``engine.train()`` and ``model.train()`` both come through here)."""
        super().train(mode)
        self.llm.eval()
        return self

    # ------------------------------------------------------------------ connector
    def video_tokens(self, semantic: torch.Tensor, spatiotemporal: torch.Tensor, frame_mask: torch.Tensor,
                     qformer_ids: torch.Tensor, qformer_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused video tokens.

        semantic ``[b, T, P, d_v]``, spatiotemporal ``[b, T, M, d_v]``, frame_mask ``[b, T]`` bool,
        qformer_ids/qformer_mask ``[b, L]`` -> (tokens ``[b, T·q, d_l]``, token_mask ``[b, T·q]``).
        """
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

    # ------------------------------------------------------------------ LLM inputs
    def llm_inputs(self, tokens: torch.Tensor, token_mask: torch.Tensor, prefix_ids: list[list[int]],
                   text_ids: list[list[int]], text_labels: list[list[int]] | None, pad_left: bool = False) -> LLMInputs:
        """Splice each sample's video tokens between its prefix and its question(+answer) embeddings."""
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        device = tokens.device
        rows, labels = [], []
        for i in range(tokens.shape[0]):
            video = tokens[i][token_mask[i]].to(dtype)                                  # [n_i·q, d_l]
            pre = embed(torch.tensor(prefix_ids[i], device=device))
            txt = embed(torch.tensor(text_ids[i], device=device))
            rows.append(torch.cat([pre, video, txt]))
            if text_labels is not None:
                labels.append([IGNORE_INDEX] * (len(prefix_ids[i]) + len(video)) + list(text_labels[i]))
        S = max(r.shape[0] for r in rows)
        d = rows[0].shape[-1]
        emb = tokens.new_zeros(len(rows), S, d, dtype=dtype)
        mask = torch.zeros(len(rows), S, dtype=torch.long, device=device)
        lab = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            n = r.shape[0]
            sl = slice(S - n, S) if pad_left else slice(0, n)
            emb[i, sl] = r
            mask[i, sl] = 1
            if text_labels is not None:
                lab[i, sl] = torch.tensor(labels[i], device=device)
        return LLMInputs(emb, mask, lab if text_labels is not None else None)

    def forward(self, batch: dict) -> torch.Tensor:
        """Causal-LM loss (mean over answer + EOS tokens) for a collated batch (see ``train/data.py``)."""
        tokens, token_mask = self.video_tokens(batch["semantic"], batch["spatiotemporal"], batch["frame_mask"],
                                               batch["qformer_ids"], batch["qformer_mask"])
        inputs = self.llm_inputs(tokens, token_mask, batch["prefix_ids"], batch["text_ids"], batch["text_labels"])
        logits = self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = inputs.labels[:, 1:]
        return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 300, do_sample: bool = False, temperature: float = 0.9,
                 top_p: float = 0.6, eos_token_id: int | None = None, pad_token_id: int | None = None) -> list[list[int]]:
        """New token ids per sample (prompt excluded), left-padded batched generation."""
        tokens, token_mask = self.video_tokens(batch["semantic"], batch["spatiotemporal"], batch["frame_mask"],
                                               batch["qformer_ids"], batch["qformer_mask"])
        inputs = self.llm_inputs(tokens, token_mask, batch["prefix_ids"], batch["text_ids"], None, pad_left=True)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **kwargs)
        result = []
        for row in out.tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id)]
            result.append(row)
        return result

    # ------------------------------------------------------------------ trainable state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the connector's weights (what checkpoints and the export hold)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        unexpected = [k for k in state if not k.startswith(TRAINABLE_PREFIXES)]
        missing = [k for k in self.trainable_state_dict() if k not in state]
        if unexpected or missing:
            raise ValueError(f"connector weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.load_state_dict(state, strict=False)


def build_dualfocus(model_dir: str, connector_cfg=None, llm_dtype: str = "float32", seed: int = 0,
                    llm_device: str = "cpu") -> DualFocus:
    """Assemble DualFocus from a local InstructBLIP-layout directory (Q-Former initialised from it).

    The LLM's tensors are read straight onto ``llm_device`` (no host copy of a 7B LLM when it is a GPU);
    the small connector is built on the CPU and moved by the caller.
    """
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import load_config, load_llm, load_qformer
    from dualfocus.train.checks import ModelLimits, connector_problems
    from dualfocus.train.config import ConnectorConfig
    from dualfocus.train.ffp import FocusFeatureProjector
    from dualfocus.train.semantic import SemanticStream
    from dualfocus.train.time_embedding import RelativeTimeEmbedding

    cc = connector_cfg or ConnectorConfig()
    cfg = load_config(model_dir)
    problems = connector_problems(ModelLimits.of(model_dir), cc.ffp_heads)  # before the (large) LLM loads
    if problems:
        raise UserError("; ".join(problems))
    qformer, query_tokens = load_qformer(model_dir)
    llm = load_llm(model_dir, dtype=llm_dtype, device=str(llm_device))
    d_v, d_q, d_l = cfg.vision_config.hidden_size, cfg.qformer_config.hidden_size, cfg.text_config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        time_embedding = RelativeTimeEmbedding(d_v, n_positions=cc.time_positions)
        ffp = FocusFeatureProjector(d_q, d_v, d_l, n_blocks=cc.ffp_blocks, n_heads=cc.ffp_heads, dropout=cc.ffp_dropout,
                                    gate_init=cc.gate_init, gate_kind=cc.gate_kind)
    return DualFocus(SemanticStream(qformer, query_tokens), time_embedding, ffp, llm)
