"""Per-question-type learning curves of the connector on an existing toy store (a diagnostic, not a test).

    python benchmarks/learning_probe.py --work DIR [--steps 600] [--lr 1e-3] [--gate-init 0] [--gate-lr-scale 1]
                                        [--gate-kind linear|tanh] [--qformer-dropout P]

DIR holds `toy/` (from `dualfocus toy-corpus`), `model/` (init-tiny) and `store/` (extract), e.g. the
directory `benchmarks/toy_learning.py --dir DIR` leaves behind. The loop is the training step without
DeepSpeed (plain AdamW, warmup, clipping, one thread), so variants are quick to compare; every
`--eval-every` steps it prints greedy exact-match accuracy per question type on the held-out questions
and on as many training questions (so memorising shows as a gap). `--gate-init`, `--gate-lr-scale` and
`--gate-kind` compare ways of opening the FFP's fusion gates (the paper: 0, one learning rate, linear).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--ffp-heads", type=int, default=2)
    ap.add_argument("--max-frames", type=int, default=8)
    ap.add_argument("--gate-init", type=float, default=0.0, help="FFP gate value at step 0 (paper: 0; tiny recipe: 1)")
    ap.add_argument("--gate-lr-scale", type=float, default=1.0, help="gate learning rate / base (paper: 1)")
    ap.add_argument("--gate-kind", choices=("linear", "tanh"), default="linear", help="s + g*c or s + tanh(g)*c")
    ap.add_argument("--qformer-dropout", type=float, default=None, help="Q-Former dropout (default: the model's)")
    ap.add_argument("--time-init-std", type=float, default=None, help="re-initialise the time embedding at this std")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from dualfocus.connectors.dualfocus import DualFocusConfig, build_dualfocus
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset
    from dualfocus.evaluate.metrics import exact_match
    from dualfocus.train.loop import warmup_then_constant

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    w = args.work
    store, model_dir = str(w / "store"), str(w / "model")
    train = prepare_samples(store, str(w / "toy" / "train.json"), model_dir, with_answers=True)
    test = prepare_samples(store, str(w / "toy" / "test_q.json"), model_dir, with_answers=False)
    answers = {str(a["question_id"]): a for a in json.loads((w / "toy" / "test_a.json").read_text())}
    kinds = {a["answer"]: a.get("type", "all") for a in answers.values()}  # answer word -> question type
    train_ds = FeatureQADataset(store, train.samples, args.max_frames)
    train_items = [train_ds[i] for i in range(len(train_ds))]
    test_ds = FeatureQADataset(store, test.samples, args.max_frames)
    test_items = [test_ds[i] for i in range(len(test_ds))]
    # Training questions asked without their answers, to tell learning from memorising.
    seen_items, seen_golds = [], []
    for item in train_items[: len(test_items)]:
        sample = item["sample"]
        n_prompt = sum(1 for label in sample.text_labels if label == -100)
        seen_golds.append(test.tokenizer.decode(sample.text_ids[n_prompt:], skip_special_tokens=True).strip())
        seen_items.append({**item, "sample": dataclasses.replace(sample, text_ids=sample.text_ids[:n_prompt])})
    test_golds = [answers[item["sample"].question_id]["answer"] for item in test_items]

    connector = DualFocusConfig(ffp_heads=args.ffp_heads, gate_init=args.gate_init, gate_kind=args.gate_kind,
                                qformer_dropout=args.qformer_dropout)
    model = build_dualfocus(model_dir, connector, seed=args.seed)
    if args.time_init_std is not None:
        with torch.no_grad():
            model.connector.time_embedding.embedding.weight.normal_(0.0, args.time_init_std)
    gates = model.connector.gate_parameters()
    gate_ids = {id(g) for g in gates}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "lr": args.lr * args.gate_lr_scale}],
                            lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_constant(args.warmup))

    def evaluate(items: list[dict], golds: list[str]) -> dict[str, float]:
        """Greedy exact-match accuracy per question type (golds[i] is the answer to items[i])."""
        model.eval()
        hits: dict[str, list[bool]] = defaultdict(list)
        with torch.no_grad():
            for s in range(0, len(items), 32):
                batch = collate(items[s:s + 32], test.qformer_pad_id)
                out = model.generate(batch, max_new_tokens=4, eos_token_id=test.eos_token_id,
                                     pad_token_id=test.pad_token_id)
                for gold, ids in zip(golds[s:s + 32], out):
                    pred = test.tokenizer.decode(ids, skip_special_tokens=True)
                    hits[kinds.get(gold, "all")].append(exact_match(pred, gold))
        model.train()
        return {k: round(sum(v) / len(v), 3) for k, v in sorted(hits.items())}

    gen = torch.Generator().manual_seed(args.seed)
    start, smooth = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        idx = torch.randperm(len(train_items), generator=gen)[: args.batch].tolist()
        loss = model(collate([train_items[i] for i in idx], train.qformer_pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            held_out = evaluate(test_items, test_golds)
            seen = evaluate(seen_items, seen_golds)
            gate_values = [round(block.gate_value().item(), 3) for block in model.connector.ffp.blocks]
            print(f"step {step:5d} | loss {smooth:.3f} | gates {gate_values} | {time.perf_counter() - start:.0f} s | "
                  f"held-out {held_out} | train {seen}", flush=True)


if __name__ == "__main__":
    main()
