"""Reading practice for the tiny LLM (``init-tiny --reading-steps N``): text only, never a video or a feature.

A real LLM (Vicuna in the paper) arrives knowing that a colour question takes a colour word and how to find one
in the text before it; a connector only has to put what it sees into a form the LLM reads. A random tiny LLM
knows neither. A connector that reads the question (DualFocus's Q-Former) can make up for that within a few
hundred steps; one whose tokens ignore the question (LongVU, Video-Panda) has to teach the frozen random LLM both
things through its frozen weights, and stays below chance in the embedded comparison (README, "Compare
connectors"). So the tiny LLM can be given a little of what a real one has: it is trained on prompts of the very
shape training uses, with a *passage of words* where the visual tokens go::

    USER: the red circle moving a red circle blue ...
     Based on the video, answer the question: What colour is the shape at the end?
    ASSISTANT: blue</s>

A passage is a sequence of moments, each a few words: filler words and words of the kinds the toy questions ask
about (colour, shape, direction, number). A kind's value is either one value throughout or switches once. A
question about the start or what comes first is answered by the kind's first value, one about the end by its
last, any other by its one value. The questions are the toy corpora's own phrasings (v1 and v2). What it learns
is to answer with the word of the asked kind from the text before the question; it never sees how a video looks,
so what a video shows still has to come from the connector.
"""

from __future__ import annotations

from dataclasses import dataclass

# question type -> (kind of word that answers it, which mention: any / first / last)
ANSWER_RULES: dict[str, tuple[str, str]] = {
    "color": ("colour", "any"), "shape": ("shape", "any"), "direction": ("direction", "any"),
    "colour_start": ("colour", "first"), "colour_end": ("colour", "last"), "order": ("shape", "first"),
    "count": ("number", "any"), "long_direction": ("direction", "any"),
}
_FILLER = ("the", "a", "is", "it", "video", "frame", "scene", "object", "shape", "moving", "there", "here", "this",
           "and", "in", "on", "of", "with", "background")
_MOMENTS = (1, 48)
"""Range of moments per passage; with up to 8 words each a passage spans about 1-380 tokens, the range of
visual token counts the connectors give the tiny LLM."""


@dataclass
class ReadingSample:
    """One practice prompt: the passage's words, the question and its answer."""

    words: list[str]
    question: str
    answer: str


def _vocabulary() -> dict[str, tuple[str, ...]]:
    from dualfocus.pipeline.toy import COLORS, DIRECTIONS, SHAPES
    from dualfocus.pipeline.toy_v2 import NUMBERS

    return {"colour": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS, "number": NUMBERS}


def _questions() -> dict[str, tuple[str, ...]]:
    from dualfocus.pipeline.toy import QUESTIONS
    from dualfocus.pipeline.toy_v2 import QUESTIONS_V2

    return {**QUESTIONS, **QUESTIONS_V2}


def make_reading_sample(rng) -> ReadingSample:
    """One random practice prompt (a pure function of ``rng``, a ``numpy.random.Generator``)."""
    vocab, questions = _vocabulary(), _questions()
    qtype = sorted(ANSWER_RULES)[int(rng.integers(len(ANSWER_RULES)))]
    asked, which = ANSWER_RULES[qtype]
    n = int(rng.integers(_MOMENTS[0] + (which != "any"), _MOMENTS[1] + 1))
    # Each kind: absent, one value, or two values switching at a moment; the asked kind is present, and
    # switches exactly when the question is about its first or last value.
    schedules: dict[str, list[str]] = {}
    for kind, values in vocab.items():
        switches = (which != "any") if kind == asked else (n > 1 and rng.random() < 0.3)
        if kind != asked and rng.random() < 0.3:
            continue
        first, second = rng.choice(len(values), size=2, replace=False)
        cut = int(rng.integers(1, n)) if switches else n
        schedules[kind] = [values[first]] * cut + [values[second]] * (n - cut)
    answer_at = {"any": 0, "first": 0, "last": n - 1}[which]
    answer = schedules[asked][answer_at]
    words: list[str] = []
    for t in range(n):
        moment = [w for kind, values in schedules.items()
                  if (kind == asked and t in (0, n - 1, answer_at)) or rng.random() < 0.5
                  for w in [values[t]]]
        moment += [_FILLER[int(i)] for i in rng.integers(len(_FILLER), size=int(rng.integers(0, 5)))]
        words += [moment[int(i)] for i in rng.permutation(len(moment))]
    question = questions[qtype][int(rng.integers(len(questions[qtype])))]
    return ReadingSample(words, question, answer)


def _prompt(builder, sample: ReadingSample):
    """The training prompt's pieces for ``sample`` (``PromptBuilder`` output) and its passage's token ids, which
    stand where the visual tokens go: between ``prefix`` and ``suffix``."""
    return builder(sample.question, sample.answer), builder._encode(" " + " ".join(sample.words))


def _batch(samples: list[ReadingSample], builder):
    """Token ids, attention mask, labels and the passage's filler and content positions ([B, L] each) of
    prompts with each passage where the video goes."""
    import torch

    from dualfocus.connectors.prompt import IGNORE_INDEX

    filler_ids = {i for w in _FILLER for i in builder._encode(" " + w)}
    rows = []
    for s in samples:
        pieces, passage = _prompt(builder, s)
        ids = pieces.prefix + passage + pieces.suffix + pieces.answer
        labels = [IGNORE_INDEX] * (len(ids) - len(pieces.answer)) + pieces.answer
        where = [0] * len(pieces.prefix) + [1 + (i in filler_ids) for i in passage]  # 1 content, 2 filler
        rows.append((ids, labels, where))
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), builder.tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    where = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels, row_where) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
        where[i, : len(row_where)] = torch.tensor(row_where)
    return ids, mask, labels, where == 1, where == 2


def _blurred_passages(llm, ids, content, filler, noise: float, generator):
    """Input embeddings [B, L, D] with every passage word blurred: Gaussian noise at ``noise`` times the
    embedding table's std, and half the filler words replaced by random vectors. A connector's tokens are
    not the LLM's word vectors; practice on blurred ones teaches the LLM to read what is near a word and to
    pass over what is near nothing."""
    import torch

    table = llm.get_input_embeddings()
    emb = table(ids)
    scale = float(table.weight.detach().std())
    shape = emb.shape
    jitter = torch.randn(shape, generator=generator) * (noise * scale)
    random = torch.randn(shape, generator=generator) * scale
    drop = filler & (torch.rand(shape[:2], generator=generator) < 0.5)
    emb = torch.where((content | filler)[..., None], emb + jitter, emb)
    return torch.where(drop[..., None], random, emb)


def reading_accuracy(llm, tokenizer, samples: list[ReadingSample]) -> float:
    """Share of ``samples`` whose answer word is the LLM's greedy first answer token (one token per word)."""
    import torch

    from dualfocus.connectors.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer)
    right = 0
    with torch.no_grad():
        for s in samples:
            pieces, passage = _prompt(builder, s)
            ids = pieces.prefix + passage + pieces.suffix
            logits = llm(input_ids=torch.tensor([ids])).logits[0, -1]
            right += int(int(logits.argmax()) == pieces.answer[0])
    return right / len(samples)


def practise_reading(llm, tokenizer, steps: int, seed: int, batch_size: int = 16, lr: float = 5e-3,
                     noise: float = 0.5) -> float:
    """Train ``llm`` (a causal LM, in place) for ``steps`` steps of practice prompts whose passages are blurred
    (``_blurred_passages``); return its accuracy on 256 fresh, clean ones. Deterministic for a given seed on one
    machine (seeded generators for the prompts and the blur)."""
    import numpy as np
    import torch

    from dualfocus.connectors.prompt import PromptBuilder

    builder = PromptBuilder(tokenizer)
    rng = np.random.default_rng(seed)
    blur = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps))
    llm.train()
    for _ in range(steps):
        ids, mask, labels, content, filler = _batch([make_reading_sample(rng) for _ in range(batch_size)], builder)
        embeds = _blurred_passages(llm, ids, content, filler, noise, blur)
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        optim.step()
        sched.step()
    llm.eval()
    return reading_accuracy(llm, tokenizer, [make_reading_sample(rng) for _ in range(256)])
