"""``VideoLLM``: any connector in front of a frozen causal LM; the loss for training and batched generation.

Legend: ``b`` batch, ``N`` visual tokens per sample (padded), ``S`` LLM sequence length, ``d_l`` LLM width.

The LLM is frozen (``requires_grad=False``, always in eval mode, so its dropout never fires) and never
saved; the connector is what trains and what checkpoints hold. Each sample's own visual tokens (its
``VisualTokens.mask`` rows) are spliced between its prompt prefix and its question(+answer), so padded
frames never reach the LLM.
"""

from __future__ import annotations


import torch
from torch import nn

from dualfocus.connectors.interface import Batch, Connector, LLMInputs, VisualTokens
from dualfocus.connectors.prompt import IGNORE_INDEX


class VideoLLM(nn.Module):
    """A connector and the frozen LLM it feeds; ``forward(batch)`` is the causal-LM loss."""

    def __init__(self, connector: Connector, llm: nn.Module):
        super().__init__()
        self.connector = connector
        self.llm = llm
        self.llm.requires_grad_(False)
        self.llm.eval()
        connector.attach(llm)  # after the freeze: modules the connector adds inside the LLM stay trainable

    def train(self, mode: bool = True) -> "VideoLLM":
        """Train mode for the connector only: the frozen LLM stays in eval mode (``engine.train()`` and
        ``model.train()`` both come through here)."""
        super().train(mode)
        self.llm.eval()
        return self

    def llm_inputs(self, visual: VisualTokens, batch: Batch, with_labels: bool, pad_left: bool = False) -> LLMInputs:
        """Splice each sample's visual tokens between its prefix and its question(+answer) embeddings."""
        embed = self.llm.get_input_embeddings()
        dtype = embed.weight.dtype
        tokens, token_mask = visual.embeds, visual.mask
        device = tokens.device
        rows, labels = [], []
        for i in range(tokens.shape[0]):
            video = tokens[i][token_mask[i]].to(dtype)                                  # [n_i, d_l]
            pre = embed(torch.tensor(batch.prefix_ids[i], device=device))
            txt = embed(torch.tensor(batch.text_ids[i], device=device))
            rows.append(torch.cat([pre, video, txt]))
            if with_labels:
                labels.append([IGNORE_INDEX] * (len(batch.prefix_ids[i]) + len(video)) + list(batch.text_labels[i]))
        S = max(r.shape[0] for r in rows)
        emb = tokens.new_zeros(len(rows), S, rows[0].shape[-1], dtype=dtype)
        mask = torch.zeros(len(rows), S, dtype=torch.long, device=device)
        visual_mask = torch.zeros(len(rows), S, dtype=torch.bool, device=device)
        lab = torch.full((len(rows), S), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            n = r.shape[0]
            start = S - n if pad_left else 0
            emb[i, start:start + n] = r
            mask[i, start:start + n] = 1
            first = start + len(batch.prefix_ids[i])
            visual_mask[i, first:first + int(token_mask[i].sum())] = True
            if with_labels:
                lab[i, start:start + n] = torch.tensor(labels[i], device=device)
        return LLMInputs(emb, mask, lab if with_labels else None, visual_mask)

    def _next_token_logits(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[b, S-1, vocab]`` float32 at each position, the label of the token after it ``[b, S-1]``) for a
        collated batch with labels."""
        visual = self.connector.visual_tokens(batch, self.llm)
        inputs = self.llm_inputs(visual, batch, with_labels=True)
        with self.connector.decoder_inputs(visual.layer_inputs, inputs):
            logits = self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        return logits[:, :-1].float(), inputs.labels[:, 1:]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Causal-LM loss (mean over answer + EOS tokens) of a collated batch with labels."""
        shift_logits, shift_labels = self._next_token_logits(batch)
        return nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                           ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def continuation_logprobs(self, batch: Batch) -> list[tuple[float, bool]]:
        """Per sample of a batch with labels: (sum of the labelled tokens' log-probabilities, whether each of
        them is the LLM's most likely token there), i.e. how likely, and whether greedy, the answer is."""
        logits, labels = self._next_token_logits(batch)
        logp = torch.log_softmax(logits, dim=-1)                                   # [b, S-1, vocab]
        scored = labels != IGNORE_INDEX
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)   # [b, S-1]
        greedy = (logp.argmax(-1) == labels) | ~scored
        return [(float(picked[i][scored[i]].sum()), bool(greedy[i].all())) for i in range(labels.shape[0])]

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 300, do_sample: bool = False, temperature: float = 0.9,
                 top_p: float = 0.6, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 visual_counts: bool = False):
        """New token ids per sample (prompt excluded, cut at EOS), left-padded batched generation; with
        ``visual_counts``, ``(ids, counts)`` where ``counts[i]`` is the visual tokens sample ``i`` had in the
        LLM's sequence."""
        visual = self.connector.visual_tokens(batch, self.llm)
        inputs = self.llm_inputs(visual, batch, with_labels=False, pad_left=True)
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        with self.connector.decoder_inputs(visual.layer_inputs, inputs):
            out = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **kwargs)
        result = []
        for row in out.tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id)]
            result.append(row)
        if visual_counts:
            return result, [int(n) for n in inputs.visual_mask.sum(1).tolist()]
        return result

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The connector's weights (what checkpoints and the export hold)."""
        return self.connector.trainable_state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.connector.load_trainable_state_dict(state)
