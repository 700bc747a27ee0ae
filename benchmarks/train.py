"""Training throughput from cached features versus encoding frames inside the step.

Two input paths feed the same DualFocus model and the same optimiser step, one after the other in one run:

- cached: the training path of ``train/loop.py``: ``FeatureQADataset`` reads the feature store in a
  DataLoader worker, batches are collated with ``train.data.collate``, order from ``ResumableBatches``;
- online: the DataLoader worker decodes the sampled frames with ``extract.decode.decode_video``, and the
  step first runs the frozen vision tower on them (``extract.encoder.encode_pixels``), then the same
  connector + LLM forward/backward/update.

The optimiser is a plain ``torch.optim.AdamW`` with the loop's warmup schedule and gradient clipping,
not DeepSpeed: DeepSpeed's per-step cost is the same for both paths and would only blur the comparison.

Printed per path: samples/s, mean step time, the share of the step spent waiting for the DataLoader,
and (online) the share spent in the vision encoder. Targets: data wait <= 5 % of the cached step, and
the cached step shorter than the online one by at least the encoder's share of the online step.

    python benchmarks/train.py                 # tiny model (vision width 64, 3 blocks) on the toy corpus
    python benchmarks/train.py --vit-b         # a ViT-B/16-sized vision tower, where the encoder costs what it does
    python benchmarks/train.py --steps 40 --batch-size 8 --workers 2 --threads 1 --rounds 2
    python benchmarks/train.py --qavit --vit-b # QA-ViT mode against the default mode (benchmarks/qavit_compare.py)

Model, toy corpus and feature store are made once under --work (a temp directory by default) and
reused by later runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dualfocus.pipeline.tiny import TinyModelConfig

VARIANTS = {
    "tiny": TinyModelConfig(),
    "vit-b": TinyModelConfig(vision_width=768, vision_layers=12, patch_size=16),
}


# ---------------------------------------------------------------------------------------------- setup
def _has_group(store: Path, group: str) -> bool:
    """Whether ``store`` exists and holds ``group`` with at least one video."""
    from dualfocus.store import FeatureStore

    if not (store / "store.json").is_file():
        return False
    groups = FeatureStore.open(store).groups
    return group in groups and len(groups[group].manifest) > 0


def prepare_inputs(work: Path, variant: str, videos: int) -> tuple[Path, Path, Path]:
    """(model dir, QA file, feature store) under ``work``, each made only when missing."""
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config
    from dualfocus.pipeline.tiny import write_tiny_model
    from dualfocus.pipeline.toy import make_toy_corpus

    model, corpus, store = work / "model", work / f"toy-{videos}", work / f"store-{videos}"
    if not (model / "config.json").is_file():
        print(f"writing the {variant} model to {model}", flush=True)
        write_tiny_model(model, VARIANTS[variant])
    if not (corpus / "train.json").is_file():
        print(f"rendering {videos} toy clips to {corpus}", flush=True)
        make_toy_corpus(corpus, n_videos=videos, seed=0)
    if not _has_group(store, "eva"):
        print(f"extracting features to {store}", flush=True)
        cfg = load_config(ExtractConfig, values={"corpus": str(corpus / "videos"), "model": str(model),
                                                 "out": str(store), "overwrite": True})
        summary = run_extract(cfg, progress=False)
        if summary.failed:
            raise SystemExit(f"extract failed on {summary.failed} clips: {summary.failures[:3]}")
    return model, corpus / "train.json", store


# ---------------------------------------------------------------------------------------------- online path
class DecodedFramesDataset(torch.utils.data.Dataset):
    """Decodes a sample's frames (uint8 ``[t, H, W, 3]``) from its video file, as extract would."""

    def __init__(self, samples, video_paths: dict[str, str], fps: float, max_frames: int | None, size: int):
        self.samples, self.video_paths = samples, video_paths
        self.fps, self.max_frames, self.size = fps, max_frames, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        from dualfocus.extract.decode import decode_video

        s = self.samples[i]
        _, _, chunks = decode_video(self.video_paths[s.video_id], self.fps, self.max_frames, self.size)
        return {"frames": torch.from_numpy(np.concatenate(list(chunks))), "sample": s, "index": i}


def collate_frames(batch: list[dict], qformer_pad_id: int) -> dict:
    """``{"batch": Batch without streams, "frames": [N, H, W, 3] uint8}``: the valid frames of the batch
    stacked, plus the training collate's masks and ids.

    The training ``collate`` is reused on zero-width placeholders so the text side is exactly the one the
    cached path gets; the encoder fills in the features inside the step.
    """
    import dataclasses

    from dualfocus.data.batch import collate

    placeholders = [{"semantic": torch.zeros(len(x["frames"]), 1, 1),
                     "spatiotemporal": torch.zeros(len(x["frames"]), 1, 1),
                     "sample": x["sample"], "index": x["index"]} for x in batch]
    out = dataclasses.replace(collate(placeholders, qformer_pad_id), streams={})
    return {"batch": out, "frames": torch.cat([x["frames"] for x in batch])}


def encode_batch(encoder, item: dict, device):
    """Run the frozen vision tower on the batch's frames and lay the streams out as the cached path has them."""
    import dataclasses

    from dualfocus.extract.encoder import encode_pixels
    from dualfocus.pipeline.models import normalize_frames

    pixels = normalize_frames(item["frames"], encoder.spec).to(device, encoder.dtype)
    semantic, motion = encode_pixels(encoder.model, pixels)                     # [N, P, d], [N, M, d]
    mask = item["batch"].frame_mask.to(device)                                  # [b, T]
    b, T = mask.shape
    # Scattered into fresh tensors made outside inference_mode: autograd may not save inference tensors.
    streams = {"semantic": torch.zeros(b, T, *semantic.shape[1:], device=device),        # [b, T, P, d]
               "spatiotemporal": torch.zeros(b, T, *motion.shape[1:], device=device)}    # [b, T, M, d]
    streams["semantic"][mask] = semantic.float()
    streams["spatiotemporal"][mask] = motion.float()
    return dataclasses.replace(item["batch"], streams=streams)


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class PathTimes:
    """Seconds summed over the measured steps of one path."""

    name: str
    steps: int = 0
    samples: int = 0
    wait: float = 0.0
    encode: float = 0.0
    compute: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.wait + self.encode + self.compute

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.total if self.total else 0.0

    @property
    def step_ms(self) -> float:
        return 1000 * self.total / max(self.steps, 1)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(name, model, optimizer, scheduler, loader, steps: int, warmup: int, device, dtype, grad_clip: float,
             encoder=None) -> PathTimes:
    """``warmup`` unmeasured steps, then ``steps`` measured ones: wait for a batch, (encode), train step."""
    times = PathTimes(name)
    data = iter(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(data)
        t1 = time.perf_counter()
        if encoder is not None:
            batch = encode_batch(encoder, batch, device)
            sync(device)
        t2 = time.perf_counter()
        batch = batch.to(device, dtype, non_blocking=True)
        loss = model(batch)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if i >= warmup:
            times.steps += 1
            times.samples += len(batch)
            times.wait += t1 - t0
            times.encode += t2 - t1
            times.compute += t3 - t2
            times.losses.append(float(loss.detach()))
    del data  # shuts the workers down before the other path starts
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit-b", action="store_true", help="ViT-B/16-sized vision tower (width 768, 12 blocks).")
    parser.add_argument("--work", type=Path, default=None, help="Where model, corpus and store are kept.")
    parser.add_argument("--videos", type=int, default=12, help="Toy clips to render.")
    parser.add_argument("--steps", type=int, default=20, help="Measured steps per path.")
    parser.add_argument("--warmup", type=int, default=3, help="Unmeasured steps per path first.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-frames", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (configs/train_tiny.yaml: 1).")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Rounds of (cached, online), order flipped every round; figures are summed over rounds.")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto.")
    parser.add_argument("--qavit", action="store_true",
                        help="Instead: QA-ViT mode against the default mode on cached batches (step time, memory, "
                             "the top ViT blocks' share of the step).")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of the training process (default: torch's choice). On a shared "
                             "CPU, 1 avoids OpenMP threads waiting on each other.")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from dualfocus.extract.encoder import FrameEncoder
    from dualfocus.store import FeatureStore
    from dualfocus.connectors.dualfocus import DualFocusConfig, build_dualfocus
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset
    from dualfocus.train.loop import warmup_then_constant
    from dualfocus.train.sampler import ResumableBatches

    variant = "vit-b" if args.vit_b else "tiny"
    work = args.work or Path(tempfile.gettempdir()) / f"dualfocus-bench-{variant}"
    model_dir, qa, store_dir = prepare_inputs(work, variant, args.videos)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.qavit:
        from qavit_compare import compare

        print(json.dumps({"variant": variant, "device": str(device), "batch_size": args.batch_size,
                          "max_frames": args.max_frames, **compare(model_dir, store_dir, qa, args, device)}))
        return

    prepared = prepare_samples(str(store_dir), str(qa), str(model_dir), with_answers=True)
    store = FeatureStore.open(store_dir)
    fingerprint = store.fingerprint(["semantic", "spatiotemporal"])
    manifest = store.groups[store.group_info("semantic").name].manifest
    paths = dict(zip(manifest["video_id"].astype(str), manifest["path"].astype(str)))
    encoder = FrameEncoder(str(model_dir), device=str(device))

    torch.manual_seed(0)
    model = build_dualfocus(str(model_dir), DualFocusConfig(), llm_dtype="float32").to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(10))

    n = len(prepared.samples)
    loader_args = dict(num_workers=args.workers, persistent_workers=False,
                       prefetch_factor=4 if args.workers > 0 else None, pin_memory=device.type == "cuda")
    cached_data = FeatureQADataset(str(store_dir), prepared.samples, args.max_frames)
    online_data = DecodedFramesDataset(prepared.samples, paths, fingerprint["fps"], args.max_frames,
                                       encoder.spec.size)

    def loader(dataset, collate_fn):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=ResumableBatches(n, args.batch_size, seed=0),
            collate_fn=functools.partial(collate_fn, qformer_pad_id=prepared.qformer_pad_id), **loader_args)

    vision = encoder.model
    n_vision = sum(p.numel() for p in vision.parameters())
    print(f"\nvariant {variant}: vision tower {n_vision / 1e6:.1f} M params "
          f"(width {vision.config.hidden_size}, {vision.config.num_hidden_layers} blocks, "
          f"{(vision.config.image_size // vision.config.patch_size) ** 2 + 1} tokens/frame); "
          f"trainable {sum(p.numel() for p in trainable) / 1e6:.2f} M; device {device}, "
          f"{torch.get_num_threads()} threads; {n} samples, batch {args.batch_size}, max_frames {args.max_frames}, "
          f"{args.workers} DataLoader worker(s); {args.warmup} warmup + {args.steps} measured steps per path\n",
          flush=True)

    totals = {"cached": PathTimes("cached"), "online": PathTimes("online")}
    for r in range(args.rounds):
        # the order flips every round, so neither path always runs first (allocator warmup, drifting load)
        for name in ("cached", "online") if r % 2 == 0 else ("online", "cached"):
            t = run_path(name, model, optimizer, scheduler,
                         loader(cached_data, collate) if name == "cached" else loader(online_data, collate_frames),
                         args.steps, args.warmup, device, torch.float32, grad_clip=1.0,
                         encoder=encoder if name == "online" else None)
            total = totals[name]
            for key in ("steps", "samples", "wait", "encode", "compute", "losses"):
                setattr(total, key, getattr(total, key) + getattr(t, key))
            print(f"  round {r + 1} {name:6s}: {t.samples_per_s:7.2f} samples/s, step {t.step_ms:7.1f} ms, "
                  f"data wait {100 * t.wait / t.total:5.1f} %, encoder {100 * t.encode / t.total:5.1f} %, "
                  f"mean loss {np.mean(t.losses):.3f}", flush=True)

    cached, online = totals["cached"], totals["online"]
    print(f"\n{'path':8s} {'samples/s':>10s} {'step ms':>9s} {'data wait':>10s} {'encoder':>8s} {'train step':>11s}")
    for t in (cached, online):
        print(f"{t.name:8s} {t.samples_per_s:10.2f} {t.step_ms:9.1f} {100 * t.wait / t.total:9.1f}% "
              f"{100 * t.encode / t.total:7.1f}% {100 * t.compute / t.total:10.1f}%")
    speedup = cached.samples_per_s / online.samples_per_s
    saved = 1 - cached.step_ms / online.step_ms          # share of the online step the cache removes
    encoder_share = online.encode / online.total
    wait_share = cached.wait / cached.total
    print(f"\ncached/online samples/s ratio: {speedup:.2f}x; the cached step is {100 * saved:.1f} % shorter; "
          f"the encoder is {100 * encoder_share:.1f} % of the online step")
    print(f"target data wait <= 5 % (cached): {100 * wait_share:.1f} % -> {'met' if wait_share <= 0.05 else 'MISSED'}")
    print(f"target cached faster by >= the encoder share: {100 * saved:.1f} % vs {100 * encoder_share:.1f} % -> "
          f"{'met' if saved >= encoder_share else 'MISSED'}")
    print(json.dumps({"variant": variant, "device": str(device), "cached_samples_per_s": round(cached.samples_per_s, 3),
                      "online_samples_per_s": round(online.samples_per_s, 3), "ratio": round(speedup, 3),
                      "cached_data_wait": round(wait_share, 4),
                      "online_data_wait": round(online.wait / online.total, 4),
                      "encoder_share": round(encoder_share, 4), "step_saved": round(saved, 4),
                      "finite_losses": all(math.isfinite(x) for x in cached.losses + online.losses)}))


if __name__ == "__main__":
    main()
