"""How fast a connector's loss falls, in-process and without DeepSpeed: a quick probe for tuning or diagnosis.

    python benchmarks/connector_probe.py STORE TRAIN_QA MODEL --config configs/train_longvu_tiny.yaml \
        [--steps 300] [--variant plain|pool|frozen-slow] [key=value ...]

Same data path as ``dualfocus train`` (prepare, dataset, collate), AdamW at the recipe's lr and betas, linear
warm-up over the recipe's steps, clip 1.0, batch ``data.batch_size`` drawn with a seeded RNG; prints the loss
averaged over every 50 steps. Variants (LongVU and Slow-Fast diagnosis, README "Connectors"): ``pool`` replaces
LongVU's SVA with 2x2 average pooling of both towers and one linear map; ``frozen-slow`` freezes everything of
Slow-Fast but its projector, so the slow path stays shut (alpha = 0).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from torch import nn


def pooled_sva(width: int, query_side: int, towers_width: int) -> nn.Module:
    """Stand-in for LongVU's SVA: ``(siglip [n, g², d1], dino [n, g², d2]) -> [n, q², width]``."""

    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(towers_width, width)

        def forward(self, siglip, dino):
            x = torch.cat([siglip, dino], -1)
            n, p, d = x.shape
            g = int(round(p ** 0.5))
            r = g // query_side
            x = x.reshape(n, query_side, r, query_side, r, d).mean((2, 4)).reshape(n, query_side ** 2, d)
            return self.linear(x)

    return Pool()


def main() -> None:
    from dualfocus.connectors.registry import build_video_llm, connector_class, frame_planner
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset
    from dualfocus.pipeline.config import load_config
    from dualfocus.train.config import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("annotations")
    ap.add_argument("model")
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--variant", choices=("plain", "pool", "frozen-slow"), default="plain")
    args, overrides = ap.parse_known_args()  # the rest: key=value train overrides

    cfg = load_config(TrainConfig, args.config, overrides,
                      {"store": args.store, "annotations": args.annotations, "model": args.model, "out": "-"})
    system = connector_class(cfg.connector.name)
    expected = system.expected_streams(cfg.connector, cfg.model)
    prepared = prepare_samples(cfg.store, cfg.annotations, cfg.model, True, expected=expected,
                               plan_frames=frame_planner(system, cfg.connector, cfg.model))
    torch.manual_seed(cfg.seed)
    model = build_video_llm(cfg.connector, cfg.model, seed=cfg.seed)
    connector = model.connector
    if args.variant == "pool":
        c = cfg.connector
        connector.sva = pooled_sva(c.width, c.query_side, c.siglip_width + c.dino_width)
    elif args.variant == "frozen-slow":
        for name, p in connector.named_parameters():
            if "projector" not in name:
                p.requires_grad_(False)
    dataset = FeatureQADataset(cfg.store, prepared.samples, cfg.data.max_frames, tuple(expected))
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{cfg.connector.name} ({args.variant}): {sum(p.numel() for p in params):,} trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    warmup = max(cfg.optim.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    rng, losses, start = random.Random(cfg.seed), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        picks = rng.sample(range(len(dataset)), cfg.data.batch_size)
        batch = collate([dataset[i] for i in picks], prepared.qformer_pad_id, prepared.pad_token_id or 0)
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or float("inf"))
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}: loss (mean of the last 50) {sum(losses[-50:]) / 50:.3f} | "
                  f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
