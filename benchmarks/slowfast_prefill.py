"""LLM prefill cost against frames: Slow-Fast (fast tokens in the sequence, slow tokens by cross-attention in 4
hybrid layers) versus every slow token in the sequence.

    python benchmarks/slowfast_prefill.py                       # width 512, 8 layers, 16 tokens per frame, CPU
    python benchmarks/slowfast_prefill.py --frames 16 64 256 --tokens-per-frame 16 --repeats 3

A random Llama-family LLM (``--width``, ``--layers``; 8 query heads, 2 key/value heads) reads a 64-token text plus
the visual tokens of ``F`` frames of ``--tokens-per-frame`` tokens each, one sample, fp32, no gradient:

- slowfast: a fixed budget of 16 fast frames in the sequence (as the paper's 64-frame model: temporal stride
  F/16), and all F x p slow tokens read by cross-attention in the layers {0, L/4, L/2, 3L/4} (alpha set to 0.5
  so the cross term is computed and used);
- all-in-sequence: every one of the F x p tokens in the sequence, the plain LLM.

Printed per F: sequence lengths, median forward time of each over ``--repeats`` (after one untimed call), and
the growth of each against its 16-frame figure. The paper's claim: many more frames cost Slow-Fast only a few
per cent more prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_llm(width: int, layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=width, intermediate_size=int(width * 2.75), num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def timed(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--tokens-per-frame", type=int, default=16, help="p after the 2x2 pooling (paper: 81)")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--text", type=int, default=64, help="text tokens around the video")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dualfocus.connectors.interface import LLMInputs
    from dualfocus.connectors.slowfast_layers import SlowFastLayers, default_layers

    hybrid_llm = build_llm(args.width, args.layers)
    plain_llm = build_llm(args.width, args.layers)
    layers = default_layers(args.layers)
    hybrid = SlowFastLayers(hybrid_llm, layers)
    hybrid.attach(hybrid_llm)
    with torch.no_grad():
        for alpha in hybrid.gate_parameters():
            alpha.fill_(0.5)
    p, d = args.tokens_per_frame, args.width
    print(f"LLM width {d}, {args.layers} layers (hybrid {layers}), {p} tokens per frame, {args.text} text tokens, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}\n")
    print(f"{'frames':>6s} {'slowfast seq':>13s} {'slow tokens':>12s} {'slowfast ms':>12s} {'all-in seq':>11s} "
          f"{'all-in ms':>10s} {'slowfast growth':>16s} {'all-in growth':>14s}")
    rows, base = [], None
    g = torch.Generator().manual_seed(1)
    for frames in args.frames:
        fast = min(frames, 16) * p
        slow = torch.randn(1, frames * p, d, generator=g)
        seq = torch.randn(1, args.text + fast, d, generator=g)
        visual = torch.zeros(1, seq.shape[1], dtype=torch.bool)
        visual[0, args.text // 2: args.text // 2 + fast] = True
        inputs = LLMInputs(seq, torch.ones(1, seq.shape[1], dtype=torch.long), None, visual)

        def slowfast():
            with torch.no_grad(), hybrid.slow_context(slow, torch.ones(1, slow.shape[1], dtype=torch.bool), inputs):
                hybrid_llm(inputs_embeds=seq, attention_mask=inputs.attention_mask, use_cache=False)

        full = torch.cat([seq[:, : args.text // 2], slow, seq[:, args.text // 2 + fast:]], dim=1)

        def all_in():
            with torch.no_grad():
                plain_llm(inputs_embeds=full, use_cache=False)

        t_sf, t_all = timed(slowfast, args.repeats), timed(all_in, args.repeats)
        base = base or (t_sf, t_all)
        rows.append({"frames": frames, "slowfast_tokens": seq.shape[1], "slow_tokens": slow.shape[1],
                     "slowfast_ms": round(1000 * t_sf, 1), "all_in_tokens": full.shape[1],
                     "all_in_ms": round(1000 * t_all, 1), "slowfast_growth": round(t_sf / base[0], 3),
                     "all_in_growth": round(t_all / base[1], 3)})
        r = rows[-1]
        print(f"{frames:6d} {r['slowfast_tokens']:13d} {r['slow_tokens']:12d} {r['slowfast_ms']:12.1f} "
              f"{r['all_in_tokens']:11d} {r['all_in_ms']:10.1f} {r['slowfast_growth']:15.2f}x {r['all_in_growth']:13.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
