"""QA-ViT mode against the default mode on the cached path: step time, memory, the top ViT blocks' share.

Run through ``python benchmarks/train.py --qavit [--vit-b]``. Both connectors are built from the same model
and trained with the same optimiser on the same batches (the store holds both the post-LN output and the cut
entering block depth//2). Printed per mode: mean step time (forward, backward, update), samples/s, the bytes
autograd saved for backward in one step (the activation memory a step holds at its peak; on CUDA also
``max_memory_allocated``), and for QA-ViT the share of the step spent in the question-aware top blocks
(their forward and backward timed alone on the same frames).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch


def ensure_cut_group(store, videos, model_dir, start: int) -> None:
    """Add the ``qavit`` group (tap ``cut = hidden[start]``) of the clips in ``videos`` to ``store`` when it is
    not there yet."""
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config
    from dualfocus.store import FeatureStore

    if "qavit" in FeatureStore.open(store).groups:
        return
    print(f"extracting the cut hidden[{start}] into {store}", flush=True)
    cfg = load_config(ExtractConfig, values={"corpus": str(videos), "out": str(store),
                                             "encoders": {"qavit": {"model": str(model_dir),
                                                                    "taps": {"cut": f"hidden[{start}]"}}}})
    summary = run_extract(cfg, progress=False)
    if summary.failed:
        raise SystemExit(f"extract of the cut failed on {summary.failed} clips: {summary.failures[:3]}")


@dataclass
class ModeFigures:
    name: str
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    saved_bytes: list[int] = field(default_factory=list)
    cuda_peak: int = 0
    top_seconds: float = 0.0

    @property
    def step_ms(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)


@contextlib.contextmanager
def count_saved_bytes(out: list[int]):
    """Sum the bytes of every tensor autograd saves for backward inside the block (appended to ``out``)."""
    total = [0]

    def pack(t: torch.Tensor):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield
    out.append(total[0])


def time_top_blocks(connector, batch, llm) -> float:
    """Seconds of the question-aware top blocks' forward + backward on the batch's frames, alone."""
    mask = batch.frame_mask.bool()
    b, T = mask.shape
    cut = batch.streams["cut"][mask]
    which = torch.arange(b).unsqueeze(1).expand(b, T)[mask]
    ids = batch.question_ids[:, : connector.question_tokens]
    qmask = batch.question_mask[:, : connector.question_tokens]
    with torch.no_grad():
        words = llm.get_input_embeddings()(ids)
    start = time.perf_counter()
    connector.qavit(cut, words[which], qmask[which]).float().sum().backward()
    return time.perf_counter() - start


def run_mode(name, model, batches, lr: float, device, with_top: bool) -> ModeFigures:
    """One untimed step, then a timed step per batch; returns the figures of the timed ones."""
    from dualfocus.train.loop import warmup_then_constant

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(0))
    figures = ModeFigures(name)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i, batch in enumerate(batches):
        batch = batch.to(device, torch.float32)
        start = time.perf_counter()
        with count_saved_bytes(figures.saved_bytes):
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            figures.saved_bytes.clear()
            continue
        figures.seconds += time.perf_counter() - start
        figures.steps += 1
        figures.samples += len(batch)
        if with_top:
            figures.top_seconds += time_top_blocks(model.connector, batch, model.llm)
            model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        figures.cuda_peak = torch.cuda.max_memory_allocated(device)
    return figures


def compare(model_dir, store, qa, args, device) -> dict:
    """Build both connectors, run both modes on the same batches, print the table; returns the figures."""
    from dualfocus.connectors.dualfocus import DualFocusConfig, DualFocusQAViT, DualFocusQAViTConfig
    from dualfocus.connectors.registry import build_video_llm
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset
    from dualfocus.pipeline.models import load_config

    depth = load_config(model_dir).vision_config.num_hidden_layers
    ensure_cut_group(store, qa.parent / "videos", model_dir, depth // 2)
    qcfg = DualFocusQAViTConfig()
    expected = {**DualFocusQAViT.expected_streams(qcfg, str(model_dir)),
                "semantic": DualFocusQAViT.expected_streams(qcfg, str(model_dir))["cut"]}
    prepared = prepare_samples(str(store), str(qa), str(model_dir), with_answers=True, expected=expected)
    dataset = FeatureQADataset(str(store), prepared.samples, args.max_frames, tuple(expected))
    order = np.random.default_rng(0).permutation(len(dataset))
    n = args.batch_size
    batches = [collate([dataset[int(i)] for i in order[s * n:(s + 1) * n]], prepared.qformer_pad_id,
                       prepared.pad_token_id or 0) for s in range(args.steps + 1)]
    results = {}
    for name, cfg in (("default", DualFocusConfig()), ("qavit", qcfg)):
        torch.manual_seed(0)
        model = build_video_llm(cfg, str(model_dir)).to(device)
        results[name] = run_mode(name, model, batches, 1e-4, device, with_top=name == "qavit")
        del model
    print(f"\n{'mode':8s} {'step ms':>9s} {'samples/s':>10s} {'saved for backward':>19s} {'top blocks':>11s}"
          + (f" {'CUDA peak':>10s}" if device.type == "cuda" else ""))
    for f in results.values():
        share = f"{100 * f.top_seconds / f.seconds:10.1f}%" if f.top_seconds else f"{'-':>11s}"
        peak = f" {f.cuda_peak / 2**20:8.1f} MiB" if device.type == "cuda" else ""
        print(f"{f.name:8s} {f.step_ms:9.1f} {f.samples / f.seconds:10.2f} "
              f"{np.mean(f.saved_bytes) / 2**20:15.1f} MiB {share}{peak}")
    d, q = results["default"], results["qavit"]
    print(f"\nQA-ViT step / default step: {q.step_ms / d.step_ms:.2f}x; saved-for-backward "
          f"{np.mean(q.saved_bytes) / np.mean(d.saved_bytes):.2f}x; the top {depth - depth // 2} ViT blocks are "
          f"{100 * q.top_seconds / q.seconds:.1f} % of the QA-ViT step")
    return {name: {"step_ms": round(f.step_ms, 1), "samples_per_s": round(f.samples / f.seconds, 3),
                   "saved_for_backward_mib": round(float(np.mean(f.saved_bytes)) / 2**20, 1),
                   "top_blocks_share": round(f.top_seconds / f.seconds, 4) if f.top_seconds else None,
                   "cuda_peak_mib": round(f.cuda_peak / 2**20, 1) if f.cuda_peak else None}
            for name, f in results.items()}
