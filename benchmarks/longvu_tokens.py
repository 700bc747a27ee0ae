"""LongVU's token count on long clips: visual tokens per video before and after its compression.

    python benchmarks/longvu_tokens.py [--seconds 120 --moving 12 --budget 254]

A long toy clip at 1 fps: a static scene (one square, still) with a short stretch where it moves, rendered in
memory, encoded by tiny random SigLIP and DINOv2 towers (what `init-tiny --family` writes) at the tiny recipe's
8x8 grid, then through the tiny recipe's LongVU connector (configs/train_longvu_tiny.yaml): the DINO redundancy
drop, then the budget's resolution plan and spatial token compression. Printed: frames and tokens at each step
against a budget of ``--budget`` visual tokens (the tiny recipe's ~254), for a few clip lengths.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch


def render(seconds: int, moving: int, size: int = 224) -> np.ndarray:
    """uint8 ``[seconds, size, size, 3]``: a still red square, except ``moving`` frames in the middle where it
    slides to the right."""
    frames = np.full((seconds, size, size, 3), 40, np.uint8)
    start = (seconds - moving) // 2
    for t in range(seconds):
        shift = 0 if t < start else min(t - start, moving) * (size // (2 * max(moving, 1)))
        frames[t, 80:140, 30 + shift:90 + shift] = (220, 30, 30)
    return frames


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, nargs="+", default=[16, 60, 120, 300])
    ap.add_argument("--moving", type=int, default=12, help="seconds in which the square moves")
    ap.add_argument("--budget", type=int, default=254)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from dualfocus.connectors.longvu import LongVU, LongVUConfig, longvu_modules, reduction_applies, select_frames
    from dualfocus.encoders import load_encoder
    from dualfocus.encoders.tiny import write_tiny_encoder
    from dualfocus.pipeline.config import load_config

    recipe = Path(__file__).resolve().parent.parent / "configs" / "train_longvu_tiny.yaml"
    import yaml

    cfg = load_config(LongVUConfig, values=yaml.safe_load(recipe.read_text())["connector"])
    work = Path(tempfile.mkdtemp(prefix="longvu-tokens-"))
    towers = {name: load_encoder(write_tiny_encoder(work / family, family))
              for name, family in (("siglip", "siglip"), ("dino", "dinov2"))}
    taps = {"grid": f"grid@{cfg.grid}x{cfg.grid}"}
    torch.manual_seed(0)
    sva, projector, newline = longvu_modules(cfg, 64)
    connector = LongVU(sva, projector, newline, cfg, cfg.max_positions).eval()
    per_frame = cfg.query_side * (cfg.query_side + 1)
    print(f"tiny LongVU: {per_frame} high-res tokens per frame, budget {args.budget}; a clip still but for "
          f"{args.moving} s\n")
    print(f"{'seconds':>7s} {'tokens at 1 fps':>16s} {'frames kept':>12s} {'after the drop':>15s} {'final':>6s}")
    rows = []
    for seconds in args.seconds:
        frames = render(seconds, args.moving)
        feats = {name: torch.from_numpy(tower(frames, taps)["grid"]) for name, tower in towers.items()}
        kept = (select_frames(feats["dino"], cfg.dino_window, cfg.dino_threshold, cfg.frame_cap)
                if reduction_applies(seconds, args.budget, cfg.lowres_side ** 2) else list(range(seconds)))
        with torch.no_grad():
            sampled = connector.sva(feats["siglip"][kept], feats["dino"][kept])
            final = connector.assemble(sampled, args.budget, None).shape[0]
        rows.append({"seconds": seconds, "tokens_1fps": seconds * per_frame, "kept": len(kept),
                     "tokens_kept": len(kept) * per_frame, "final": final})
        r = rows[-1]
        print(f"{seconds:7d} {r['tokens_1fps']:16d} {r['kept']:12d} {r['tokens_kept']:15d} {r['final']:6d}")
        assert final <= args.budget
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
