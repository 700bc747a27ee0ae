"""How readable are colour and shape in a toy store's cached features? (a diagnostic, not a test)

    python benchmarks/feature_probe.py --work DIR [--epochs 30] [--relate] [--token-mlp] [--pixels]

DIR holds `toy/` (from `dualfocus toy-corpus`) and `store/` (extract), e.g. what
`benchmarks/toy_learning.py --dir DIR` leaves behind. A small reader is trained on the training clips and scored
on the held-out ones: per frame, 4 learned queries attend over the patch tokens (CLS dropped), an MLP maps
them to the classes, logits are averaged over frames. That is a Q-Former-like reader with nothing else in the
way (no LLM, no prompt), so it bounds what a connector can get from the features in this many examples.

`--area` skips the readers and prints the ceiling of a rule on colour area alone (each clip's coloured share of
its middle frame, best circle/square threshold): what a reader that sees only how much of the frame is coloured
can reach. `--post-norm` normalises what each query read together with the query (LayerNorm(query + read)), as every
attention layer of the Q-Former does: the test of whether a magnitude cue (how much of the frame is coloured)
survives that normalisation. `--relate` puts one self-attention layer over the patch tokens before the queries (patches may look at each
other before being read). `--token-mlp` puts a per-token MLP (residual, 4x wide) before the queries instead: each
patch token may be re-encoded non-linearly, alone, before it is read. `--pixels` reads the raw 14 px patches of the same frames (decoded with PyAV at
1 fps, resized to 224 px) instead of the store: the control for "the tower loses it".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dualfocus.pipeline.toy import COLORS, SHAPES

CLASSES = {"color": list(COLORS), "shape": list(SHAPES)}


def labels(toy: Path) -> tuple[dict, list[str], list[str]]:
    """video_id -> {kind: answer}, and the training and held-out video ids."""
    by_video: dict[str, dict[str, str]] = {}
    for row in json.loads((toy / "train.json").read_text()):
        for kind, values in CLASSES.items():
            if row["a"] in values:
                by_video.setdefault(row["video_id"], {})[kind] = row["a"]
    answers = {a["question_id"]: a for a in json.loads((toy / "test_a.json").read_text())}
    held_out = set()
    for q in json.loads((toy / "test_q.json").read_text()):
        a = answers[q["question_id"]]
        by_video.setdefault(q["video_name"], {})[a["type"]] = a["answer"]
        held_out.add(q["video_name"])
    return by_video, sorted(set(by_video) - held_out), sorted(held_out)


def pixel_patches(path: Path, size: int = 224, patch: int = 14) -> torch.Tensor:
    """Frames at 1 fps as raw patches ``[t, (size/patch)^2, patch*patch*3]`` in [0, 1]."""
    import av
    from PIL import Image

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        step = max(1, round(float(stream.average_rate or 1)))
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)][::step]
    g = size // patch
    out = [np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC), np.float32) / 255.0 for f in frames]
    return torch.tensor(np.stack([x.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)
                                  for x in out]))


def area_ceiling(toy: Path, by_video: dict, ids: list[str]) -> str:
    """What a reader of colour area alone can reach on shape: each clip's coloured share of its middle frame, and
    the best threshold between circles and squares (triangles are the smallest by far)."""
    import av

    from dualfocus.pipeline.toy import BACKGROUND

    area = {}
    for v in ids:
        with av.open(str(toy / "videos" / f"{v}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        frame = frames[len(frames) // 2].astype(np.int32)
        area[v] = float((np.abs(frame - np.array(BACKGROUND)).sum(-1) > 60).mean())
    pairs = [(area[v], by_video[v]["shape"]) for v in ids if by_video[v]["shape"] != "triangle"]
    best = max(np.mean([(a > t) == (s == "square") for a, s in pairs]) for t, _ in pairs)
    ranges = {s: (min(a for v, a in area.items() if by_video[v]["shape"] == s),
                  max(a for v, a in area.items() if by_video[v]["shape"] == s)) for s in SHAPES}
    n_tri = len(ids) - len(pairs)
    return (f"area rule: circle vs square {best:.2f}, 3-way shape {(best * len(pairs) + n_tri) / len(ids):.2f} "
            f"(triangles right); area ranges " + ", ".join(f"{s} {lo:.3f}-{hi:.3f}" for s, (lo, hi) in ranges.items()))


class Reader(torch.nn.Module):
    """forward(tokens [t, n, d]) -> logits [classes] (mean over frames)."""

    def __init__(self, d: int, n_classes: int, relate: bool, token_mlp: bool = False, queries: int = 4,
                 post_norm: bool = False):
        super().__init__()
        self.post_norm = torch.nn.LayerNorm(d) if post_norm else None
        self.norm = torch.nn.LayerNorm(d)
        self.relate = torch.nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True) if relate else None
        self.token_mlp = (
            torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d)) if token_mlp else None
        )
        self.queries = torch.nn.Parameter(torch.randn(queries, d) * 0.1)
        self.key, self.value = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.head = torch.nn.Sequential(torch.nn.Linear(queries * d, 128), torch.nn.GELU(), torch.nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.relate is not None:
            x = self.relate(x)
        if self.token_mlp is not None:
            x = x + self.token_mlp(x)
        weights = torch.softmax(self.queries @ self.key(x).transpose(1, 2) / x.shape[-1] ** 0.5, dim=-1)  # [t, q, n]
        read = weights @ self.value(x)                                                              # [t, q, d]
        if self.post_norm is not None:  # as a BERT-style (Q-Former) layer: LayerNorm(query + attention output)
            read = self.post_norm(self.queries + read)
        return self.head(read.flatten(1)).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--relate", action="store_true", help="one self-attention layer over the patches first")
    ap.add_argument("--token-mlp", action="store_true", help="a per-token MLP over the patches first")
    ap.add_argument("--pixels", action="store_true", help="read raw pixel patches instead of the store")
    ap.add_argument("--post-norm", action="store_true", help="LayerNorm(query + read), as a Q-Former layer does")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--area", action="store_true", help="only print what colour area alone tells about shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    by_video, train_ids, test_ids = labels(args.work / "toy")
    if args.area:
        print(area_ceiling(args.work / "toy", by_video, train_ids + test_ids))
        return
    if args.pixels:
        tokens = {v: pixel_patches(args.work / "toy" / "videos" / f"{v}.mp4") for v in train_ids + test_ids}
    else:
        from dualfocus.store import FeatureStore

        store = FeatureStore.open(args.work / "store")
        tokens = {v: torch.as_tensor(store.read(v, streams=["semantic"])["semantic"], dtype=torch.float32)[:, 1:] for v in train_ids + test_ids}
    d = next(iter(tokens.values())).shape[-1]
    print(f"{len(train_ids)} training clips, {len(test_ids)} held out, tokens {tuple(tokens[train_ids[0]].shape)}")
    for kind, classes in CLASSES.items():
        torch.manual_seed(args.seed)
        reader = Reader(d, len(classes), args.relate, args.token_mlp, post_norm=args.post_norm)
        opt = torch.optim.AdamW(reader.parameters(), 2e-3, weight_decay=1e-2)
        target = {v: classes.index(by_video[v][kind]) for v in train_ids + test_ids}

        def accuracy(ids: list[str]) -> float:
            with torch.no_grad():
                return sum(int(reader(tokens[v]).argmax()) == target[v] for v in ids) / len(ids)

        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(train_ids)).tolist()
            for i in range(0, len(order), 16):
                ids = [train_ids[j] for j in order[i:i + 16]]
                logits = torch.stack([reader(tokens[v]) for v in ids])
                loss = torch.nn.functional.cross_entropy(logits, torch.tensor([target[v] for v in ids]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % 10 == 0 or epoch == args.epochs:
                print(f"{kind:6s} epoch {epoch:3d}: train {accuracy(train_ids):.2f}  held-out {accuracy(test_ids):.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
