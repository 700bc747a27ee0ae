"""``dualfocus init-tiny``: a randomly initialised InstructBLIP-layout model for tests, CI and the demo.

Same classes and directory layout as a real InstructBLIP-Vicuna checkpoint (see ``pipeline/models.py``),
tiny widths and depths, but honest shapes: the vision tower reads 224 px frames with 14 px patches, so a
frame has 257 tokens and the spatio-temporal stream pools to 64. Tokenizers are trained locally with the
``tokenizers`` library on a built-in text, so nothing is downloaded.

The LLM is initialised with std 0.2 rather than the usual 0.02: a random LM at 0.02 has logits too flat
for trainable input embeddings to steer, so the connector could not learn anything through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dualfocus.pipeline.models import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Text the tiny tokenizers are trained on: the prompt, the toy corpus' words and everyday English.
_TRAINING_TEXT = """
The assistant gives helpful, detailed, and brief answers to the user's questions based on the video.
USER: ASSISTANT: Based on the video, answer the question:
What color is the shape? Which colour is the moving object? What is the color of the object in the video?
What shape is shown? Which shape appears in the video? What kind of shape is moving?
Which direction does the shape move? Where is the object going? In which direction is the shape moving?
red green blue yellow orange purple white black grey gray pink brown
circle square triangle rectangle star ball box
left right up down upward downward leftward rightward top bottom
yes no maybe one two three four five six seven eight nine ten zero
a an the is are was were be been it this that these those there here what which who where when why how
of in on at to from by with for and or but not as into over under across through toward towards
man woman person people child dog cat car street room table video frame scene camera moving moves move
does do did doing done has have had can could will would should may might must shall
running walking playing holding sitting standing talking jumping dancing cooking riding eating
describe tell explain show shows showing appears appear background object objects shape shapes color colors
""".strip()

_SPECIAL_LLM = ["<unk>", "<s>", "</s>"]
_SPECIAL_QFORMER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class TinyModelConfig:
    """Sizes of the tiny model written by ``dualfocus init-tiny``."""

    vision_width: int = 64
    """Width of the vision transformer (EVA ViT-g: 1408)."""
    vision_layers: int = 3
    """Vision transformer blocks (>= 2 so the second-to-last hidden state is a real block output)."""
    image_size: int = 224
    """Input frame size in pixels; with 14 px patches, 224 gives 257 tokens per frame."""
    patch_size: int = 14
    """Patch size of the vision transformer."""
    qformer_width: int = 64
    """Q-Former width (InstructBLIP: 768)."""
    qformer_layers: int = 4
    """Q-Former layers; cross-attention every 2nd layer as in InstructBLIP (12 layers, 6 with cross-attention).
    4 gives two cross-attention layers: with one, the queries read the frame once and cannot refine what they
    read, and the toy's direction question took ~2x the steps to be learned (README, "Toy learning")."""
    num_query_tokens: int = 32
    """Learned queries per frame (the paper's 32 tokens per second)."""
    llm_width: int = 64
    """LLM hidden size (Vicuna-7B: 4096)."""
    llm_layers: int = 2
    """LLM decoder layers."""
    llm_init_std: float = 0.2
    """Init std of the random LLM; 0.02 gives logits too flat to be steered by the connector."""
    vocab_size: int = 1200
    """Target vocabulary size of each locally trained tokenizer (big enough for one token per word)."""
    seed: int = 0
    """Seed for the random weights."""
    reading_steps: int = 0
    """Steps of text-only reading practice for the LLM (``pipeline/tiny_reading.py``): 0 leaves it random, as
    the tests and the demo use it; ``make compare`` gives it 1000 so that connectors whose tokens ignore the
    question have an LLM that, like a real one, answers a colour question with a colour word it reads."""

    def check(self) -> list[str]:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        n_patches = (self.image_size // self.patch_size) ** 2
        if n_patches % 4:
            problems.append(f"the patch count ({n_patches}) must be divisible by 4 for 4:1 pooling")
        for name in ("vision_layers", "qformer_layers", "llm_layers"):
            if getattr(self, name) < 2:
                problems.append(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.reading_steps < 0:
            problems.append(f"reading_steps must be >= 0, got {self.reading_steps}")
        return problems


def _train_llm_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIAL_LLM,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # Each line is fed with and without a leading space so every word becomes one token both at the
    # start of a text and after a space (" red" -> "Ġred", as a real LLM vocabulary would have it).
    lines = _TRAINING_TEXT.splitlines()
    tok.train_from_iterator(lines + [" " + line for line in lines], trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", model_max_length=2048)


def _train_qformer_tokenizer(vocab_size: int):
    """A BERT-style WordPiece tokenizer whose vocabulary is built directly from the training text, not by the
    WordPiece trainer: the trainer breaks ties between equally frequent merges in hash order, so two runs gave
    415 or 416 tokens, and with them Q-Former embeddings of another shape and every later weight drawn
    differently (two `init-tiny` runs were two different models). Here: the specials, every character (alone and
    as a ``##`` continuation), then every whole word, most frequent first, ties alphabetical, up to
    ``vocab_size``; so each training word is one token, as the trainer made them."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for line in _TRAINING_TEXT.splitlines()
                    for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = sorted({c for w in words for c in w})
    ranked = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))]
    tokens = list(dict.fromkeys([*_SPECIAL_QFORMER, *chars, *(f"##{c}" for c in chars), *ranked]))[:vocab_size]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.add_special_tokens(_SPECIAL_QFORMER)
    tok.normalizer = normalizer
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


_POSITION_SCALE = 0.7  # sin/cos values have std ~0.71, so positions end up at std ~0.5 like the patch embeddings


def sincos_positions(grid: int, dim: int):
    """Fixed 2-D sin-cos position embedding ``[grid*grid, dim]`` (raster order): half the channels encode
    the row, half the column, each as sines and cosines at geometrically spaced frequencies."""
    import torch

    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None, :]  # [g*g, quarter]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))


def write_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a random InstructBLIP-layout model to ``out_dir`` and return the path."""
    import torch
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipQFormerConfig,
                              InstructBlipVisionConfig, LlamaConfig)

    cfg = cfg or TinyModelConfig()
    problems = cfg.check()
    if problems:
        raise ValueError("; ".join(problems))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    llm_tok = _train_llm_tokenizer(cfg.vocab_size)
    q_tok = _train_qformer_tokenizer(cfg.vocab_size)

    heads = max(1, cfg.vision_width // 16)
    vision = InstructBlipVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=4 * cfg.vision_width, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
        initializer_range=0.02)  # the class default (1e-10) leaves a random tower with all-zero features
    qformer = InstructBlipQFormerConfig(
        hidden_size=cfg.qformer_width, intermediate_size=4 * cfg.qformer_width, num_hidden_layers=cfg.qformer_layers,
        num_attention_heads=max(1, cfg.qformer_width // 16), vocab_size=len(q_tok), cross_attention_frequency=2,
        max_position_embeddings=512, pad_token_id=q_tok.pad_token_id)
    text = LlamaConfig(
        hidden_size=cfg.llm_width, intermediate_size=4 * cfg.llm_width, num_hidden_layers=cfg.llm_layers,
        num_attention_heads=max(1, cfg.llm_width // 16), num_key_value_heads=max(1, cfg.llm_width // 16),
        vocab_size=len(llm_tok), max_position_embeddings=2048, initializer_range=cfg.llm_init_std,
        bos_token_id=llm_tok.bos_token_id, eos_token_id=llm_tok.eos_token_id, pad_token_id=llm_tok.pad_token_id,
        tie_word_embeddings=False)
    config = InstructBlipConfig(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                                text_config=text.to_dict(), num_query_tokens=cfg.num_query_tokens)

    torch.manual_seed(cfg.seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # InstructBLIP starts its queries at zero; random ones make the tiny Q-Former non-trivial
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
        # A pretrained ViT encodes where each patch is; a random one at std 0.02 barely does (its position
        # signal is ~25x weaker than the patch content), which hides shape and motion from any connector.
        # Smooth 2-D sin-cos positions at the scale of the patch embeddings make the tiny tower honest.
        pos = model.vision_model.embeddings.position_embedding  # [1, 1 + g*g, d]
        grid = cfg.image_size // cfg.patch_size
        pos[0, 1:] = sincos_positions(grid, cfg.vision_width) * _POSITION_SCALE
        pos[0, :1].normal_(0.0, 0.5)
    if cfg.reading_steps:
        from dualfocus.pipeline.tiny_reading import practise_reading

        accuracy = practise_reading(model.language_model, llm_tok, cfg.reading_steps, seed=cfg.seed)
        (out / "reading.json").write_text(json.dumps({"steps": cfg.reading_steps, "seed": cfg.seed,
                                                      "accuracy_on_256_fresh_prompts": accuracy}, indent=2))
    model.save_pretrained(out)
    llm_tok.save_pretrained(out)
    q_tok.save_pretrained(out / "qformer_tokenizer")
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BlipImageProcessor", "do_resize": True,
        "size": {"height": cfg.image_size, "width": cfg.image_size}, "resample": 3, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}, indent=2))
    return out
