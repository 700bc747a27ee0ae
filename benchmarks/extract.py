"""Throughput and memory of ``dualfocus extract`` on this machine (a script, not a test).

First the memory check, while the driver has loaded no model: low-resolution videos of a few lengths
(rendered at 2 fps so they are quick to make) extracted at 1 fps with ``chunk_frames=16``; peak RSS
must level off instead of growing with the video's length.

Then, for each encoder (the tiny one, and a randomly initialised ViT-B/16-sized one in the same
InstructBLIP layout), on the same sampled frames and the same torch thread count:

- decode-only frames/s: ``decode_video`` over the corpus in this process (one decoding thread);
- encoder-only frames/s: the encoder the extract actor runs (``encoders.load_encoder`` with the DualFocus
  taps) on those pre-decoded frames, ``batch_frames`` per forward, measured before and after the end-to-end
  run and averaged (the load of a shared machine drifts);
- end-to-end frames/s: ``run_extract`` over the corpus (Ray Data: decode actor -> encoder actor ->
  writer), as its wall time with the Ray start excluded, and steady-state (between the first and the
  last finished video, i.e. without actor start-up and model loading), each with its ratio to
  encoder-only;
- peak RSS of the driver and of each Ray worker (sampled with psutil), and store bytes per frame on
  disk against raw fp16.

``--int8``: the same clips through the ViT-B tower into a float32, a float16 and an int8 store
(``store.dtype``); per store, bytes per frame on disk against raw fp16, and for float16 and int8 the relative
error ||x - x_hat|| / ||x|| over the whole store against the float32 one (per tap and overall). Target: int8
at most 0.55x raw fp16 at under 1 % error.

``--two-encoders``: the ViT-B EVA-layout tower and a ViT-B/16-sized DINOv2 tower (random weights) on the
same frames: each one's encoder-only rate r1, r2, and one ``run_extract`` writing both groups; its rate
against the two towers back to back, 1 / (1/r1 + 1/r2). Target: at least 0.85x.

    python benchmarks/extract.py --which both --videos 6 --seconds 30 --threads 2 --minutes 1,10,30
    python benchmarks/extract.py --which none --long-model none --int8 --two-encoders --videos 3 --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# ---- inputs ---------------------------------------------------------------------------------------------


def write_model(kind: str, root: Path) -> Path:
    """The tiny model, or a ViT-B/16-sized vision tower (768 wide, 12 blocks of 12 heads, 197 tokens)."""
    from dualfocus.pipeline.tiny import TinyModelConfig, write_tiny_model

    cfg = TinyModelConfig() if kind == "tiny" else TinyModelConfig(vision_width=768, vision_layers=12, patch_size=16,
                                                                   image_size=224)
    path = write_tiny_model(root / kind, cfg)
    if kind == "vitb":  # init-tiny gives width/16 heads; ViT-B has 12 heads of 64
        config = json.loads((path / "config.json").read_text())
        config["vision_config"]["num_attention_heads"] = 12
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def model_dir(kind: str, root: Path) -> Path:
    """``write_model(kind, root)``, or the model an earlier step of this run already wrote there."""
    path = root / kind
    return path if (path / "config.json").is_file() else write_model(kind, root)


def write_dinov2_vitb(root: Path, seed: int = 0) -> Path:
    """A ViT-B/16-sized DINOv2 tower with random weights (768 wide, 12 blocks of 12 heads, 197 tokens at 224 px),
    written as ``encoders.write_tiny_encoder`` writes its tiny one: the class's own init (std 0.02),
    config.json + model.safetensors + preprocessor_config.json."""
    path = root / "dinov2-vitb"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from dualfocus.encoders.families import FAMILIES
    from dualfocus.encoders.forward import quiet_transformers

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                     image_size=224, patch_size=16, initializer_range=0.02))
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(path)
    family = FAMILIES["dinov2"]
    pre = {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 224},
           "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_resize": True, "resample": 3,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": list(family.mean), "image_std": list(family.std)}
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    return path


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB texture ``[height, 2*width, 3]`` uint8 (wide enough to pan across)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((2 * width, height), Image.BICUBIC))


def panning_frames(n: int, width: int, height: int, seed: int):
    """A camera panning over a texture, with a bright square crossing it: ``[height, width, 3]`` frames."""
    tex = texture(height, width, seed)
    side = max(4, height // 5)
    for i in range(n):
        x = (i * 3) % width
        frame = tex[:, x:x + width].copy()
        sx, sy = (i * 5) % (width - side), (height - side) // 2
        frame[sy:sy + side, sx:sx + side] = (250, 240, 40)
        yield frame


def write_video(path: Path, seconds: float, fps: int, width: int, height: int, seed: int) -> Path:
    from dualfocus.pipeline.toy import write_mp4

    write_mp4(path, panning_frames(round(seconds * fps), width, height, seed), fps)
    return path


# ---- measurement helpers --------------------------------------------------------------------------------


class RssMonitor:
    """Samples the RSS of this process and all its descendants (Ray's raylet and workers, the decoding
    child) every ``interval`` seconds; keeps each role's peak."""

    ROLES = (("ray::MapWorker(FlatMap(DecodeStage))", "decode actor"),
             ("ray::MapWorker(MapBatches(EncodeStage))", "encoder actor"),
             ("multiprocessing.spawn", "decode child"),
             ("spawn_main", "decode child"))

    OTHER: str | None = None
    """Role of processes no ROLES entry names (None: not sampled)."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.cpu: dict[int, tuple[str, float]] = {}   # pid -> (role, CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def role(self, proc) -> str | None:
        if proc.pid == self.me.pid:
            return "driver"
        try:
            cmd = " ".join(proc.cmdline())
        except Exception:  # noqa: BLE001 - gone, or not ours to read
            return None
        for needle, role in self.ROLES:
            if needle in cmd:
                return role
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.me, *self.me.children(recursive=True)]
            except Exception:  # noqa: BLE001
                procs = [self.me]
            for proc in procs:
                role = self.role(proc) or self.OTHER
                if role is None:
                    continue
                try:
                    rss, times = proc.memory_info().rss, proc.cpu_times()
                except Exception:  # noqa: BLE001
                    continue
                self.peaks[role] = max(self.peaks.get(role, 0), rss)
                self.cpu[proc.pid] = (role, times.user + times.system)
            self._stop.wait(self.interval)

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) of the sampled processes, summed per role."""
        out: dict[str, float] = {}
        for role, seconds in self.cpu.values():
            out[role] = out.get(role, 0.0) + seconds
        return out

    def __enter__(self) -> "RssMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def video_times():
    """Record (time, frames) of every video the extract driver finishes (wraps its progress hook)."""
    import dualfocus.pipeline.progress as progress

    done: list[tuple[float, int]] = []
    original = progress.video_progress

    @contextlib.contextmanager
    def recording(total, enabled=True, label="extract"):
        yield lambda result: done.append((time.perf_counter(), int(result.get("length", 0) or 0)))

    progress.video_progress = recording
    try:
        yield done
    finally:
        progress.video_progress = original


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def extract(corpus: Path, model: Path, out: Path, threads: int, **values):
    """run_extract with RSS sampling and per-video finish times; returns (summary, peaks, finish times)."""
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import run_extract
    from dualfocus.pipeline.config import load_config

    cfg = load_config(ExtractConfig, values={"corpus": str(corpus), "model": str(model), "out": str(out),
                                             "overwrite": True, "encoder.threads": threads, **values})
    with RssMonitor() as monitor, video_times() as done:
        summary = run_extract(cfg, progress=True)
    return summary, dict(monitor.peaks), done


def decode_corpus(corpus: Path, fps: float, size: int) -> tuple[np.ndarray, float]:
    """Every sampled frame of the corpus, ``[F, size, size, 3]`` uint8, and the seconds decoding took."""
    from dualfocus.extract.decode import decode_video

    start = time.perf_counter()
    frames = []
    for video in sorted(corpus.glob("*.mp4")):
        _, _, chunks = decode_video(video, fps=fps, max_frames=None, size=size, chunk_frames=16)
        frames.extend(chunks)
    return np.concatenate(frames), time.perf_counter() - start


def encoder_only_fps(model: Path, taps: dict[str, str], frames: np.ndarray, threads: int, batch: int) -> float:
    """Frames/s of the encoder the extract actor runs (``load_encoder``, fp32 on the CPU), ``batch`` frames per
    forward over pre-decoded ``frames``; loading and one warm-up batch are not timed."""
    import torch

    from dualfocus.encoders import load_encoder

    torch.set_num_threads(threads)
    encoder = load_encoder(model, device="cpu")
    encoder(frames[:batch], taps)
    start = time.perf_counter()
    for lo in range(0, len(frames), batch):
        encoder(frames[lo:lo + batch], taps)
    return len(frames) / (time.perf_counter() - start)


def steady_rate(done: list[tuple[float, int]]) -> float:
    """Frames/s between the first and the last finished video (start-up excluded)."""
    if len(done) < 2 or done[-1][0] <= done[0][0]:
        return float("nan")
    return sum(n for _, n in done[1:]) / (done[-1][0] - done[0][0])


# ---- the benchmark --------------------------------------------------------------------------------------


def bench_model(kind: str, args, work: Path, corpus: Path) -> dict:
    from dualfocus.extract.groups import DUALFOCUS_TAPS
    from dualfocus.pipeline.models import load_image_spec
    from dualfocus.store.summary import summarize

    model = model_dir(kind, work / "models")
    videos = sorted(corpus.glob("*.mp4"))
    frames, decode_s = decode_corpus(corpus, args.fps, load_image_spec(model).size)   # [F, S, S, 3] uint8
    n = len(frames)

    def encoder_only() -> float:
        return encoder_only_fps(model, DUALFOCUS_TAPS, frames, args.threads, args.batch_frames)

    # encoder-only before and after end-to-end, averaged: this machine's load drifts while we measure
    before = encoder_only()
    summary, peaks, done = extract(corpus, model, work / f"store-{kind}", args.threads,
                                   **{"encoder.batch_frames": args.batch_frames})
    assert summary.ok == len(videos) and summary.failed == 0, summary.failures
    after = encoder_only()
    encoder_fps = (before + after) / 2
    disk = summarize(work / f"store-{kind}")["groups"]["eva"]
    result = {
        "model": kind, "frames": n, "threads": args.threads,
        "decode_only_fps": n / decode_s,
        "encoder_only_fps": encoder_fps,
        "encoder_only_fps_before_after": [before, after],
        "e2e_fps": summary.frames_per_s,
        "e2e_ratio": summary.frames_per_s / encoder_fps,
        "e2e_steady_fps": steady_rate(done),
        "e2e_steady_ratio": steady_rate(done) / encoder_fps,
        "e2e_seconds": summary.seconds,
        "peak_rss": peaks,
        "bytes_per_frame": disk["bytes_per_frame"],
        "raw_fp16_bytes_per_frame": disk["raw_fp16_bytes_per_frame"],
    }
    shutil.rmtree(work / f"store-{kind}", ignore_errors=True)
    return result


def relative_errors(reference: Path, other: Path, group: str = "eva") -> dict:
    """||x - x_hat|| / ||x|| over every stored frame, per tap and overall: x from the ``reference`` store,
    x_hat from ``other``; and, under ``"quantiser"``, the same for x rounded through ``other``'s dtype by
    ``store.dtypes.round_trip`` (the dtype's own error, free of run-to-run differences of the forward)."""
    from dualfocus.store import FeatureStore
    from dualfocus.store.dtypes import round_trip

    ref, test = FeatureStore.open(reference), FeatureStore.open(other)
    taps = list(ref.group_info(group).taps)
    dtype = test.group_info(group).taps[taps[0]].dtype
    streams = [f"{group}.{tap}" for tap in taps]
    sums = {tap: np.zeros(3) for tap in taps}              # ||x - x_hat||^2, ||x - round_trip(x)||^2, ||x||^2
    for video_id in ref.video_ids():
        a, b = ref.read(video_id, streams=streams), test.read(video_id, streams=streams)
        for tap, stream in zip(taps, streams):
            x = a[stream].astype(np.float64)               # [t, T, d]
            sums[tap] += [np.square(x - b[stream]).sum(), np.square(x - round_trip(a[stream], dtype)).sum(),
                          np.square(x).sum()]
    total = sum(sums.values())

    def ratio(parts: np.ndarray, i: int) -> float:
        return float(np.sqrt(parts[i] / parts[2]))

    return {"stored": {**{tap: ratio(v, 0) for tap, v in sums.items()}, "overall": ratio(total, 0)},
            "quantiser": {**{tap: ratio(v, 1) for tap, v in sums.items()}, "overall": ratio(total, 1)}}


def bench_int8(args, work: Path, corpus: Path, model: Path) -> dict:
    """The corpus through ``model`` into a float32, a float16 and an int8 store: sizes, and errors against float32."""
    from dualfocus.store.summary import summarize

    videos = len(list(corpus.glob("*.mp4")))
    stores = {}
    for dtype in ("float32", "float16", "int8"):
        out = work / f"store-{dtype}"
        summary, _, _ = extract(corpus, model, out, args.threads,
                                **{"store.dtype": dtype, "encoder.batch_frames": args.batch_frames})
        assert summary.ok == videos and summary.failed == 0, summary.failures
        group = summarize(out)["groups"]["eva"]
        stores[dtype] = {
            "frames": group["n_frames"], "e2e_seconds": summary.seconds,
            "bytes_per_frame": group["bytes_per_frame"],
            "stored_bytes_per_frame": group["bytes"] / group["n_frames"],
            "raw_fp16_bytes_per_frame": group["raw_fp16_bytes_per_frame"],
            "ratio": group["bytes_per_frame"] / group["raw_fp16_bytes_per_frame"],
        }
    for dtype in ("float16", "int8"):
        stores[dtype]["relative_error"] = relative_errors(work / "store-float32", work / f"store-{dtype}")
    int8 = stores["int8"]
    error = int8["relative_error"]["stored"]["overall"]
    for dtype in stores:
        shutil.rmtree(work / f"store-{dtype}", ignore_errors=True)
    return {"model": model.name, "threads": args.threads, "stores": stores,
            "target_met": bool(int8["ratio"] <= 0.55 and error < 0.01)}


def bench_two_encoders(args, work: Path, corpus: Path, eva: Path, dino: Path) -> dict:
    """Encoder-only rates of ``eva`` and ``dino`` on the same frames, and one run_extract writing both groups."""
    from dualfocus.encoders import inspect_encoder
    from dualfocus.extract.groups import DUALFOCUS_TAPS
    from dualfocus.store.summary import summarize

    taps = {"eva": (eva, DUALFOCUS_TAPS), "dino": (dino, {"grid": "grid"})}  # each group's taps in the run
    size = max(inspect_encoder(path).spec.size for path, _ in taps.values())  # extract decodes at the largest
    frames, _ = decode_corpus(corpus, args.fps, size)                        # [F, S, S, 3] uint8
    videos = len(list(corpus.glob("*.mp4")))

    def encoder_only() -> dict[str, float]:
        return {name: encoder_only_fps(path, t, frames, args.threads, args.batch_frames)
                for name, (path, t) in taps.items()}

    # before and after the end-to-end run, averaged, as for one encoder
    before = encoder_only()
    out = work / "store-two"
    summary, peaks, done = extract(corpus, eva, out, args.threads, encoders={"dino": {"model": str(dino)}},
                                   **{"encoder.batch_frames": args.batch_frames})
    assert summary.ok == videos and summary.failed == 0, summary.failures
    after = encoder_only()
    rates = {name: (before[name] + after[name]) / 2 for name in taps}
    serial = 1 / sum(1 / r for r in rates.values())        # both towers back to back on one frame
    groups = summarize(out)["groups"]
    shutil.rmtree(out, ignore_errors=True)
    steady = steady_rate(done)
    return {
        "frames": len(frames), "threads": args.threads,
        "encoder_only_fps": rates, "encoder_only_fps_before_after": {n: [before[n], after[n]] for n in taps},
        "serial_fps": serial,
        "e2e_fps": summary.frames_per_s, "e2e_ratio": summary.frames_per_s / serial, "e2e_seconds": summary.seconds,
        "e2e_steady_fps": steady, "e2e_steady_ratio": steady / serial,
        "peak_rss": peaks,
        "bytes_per_frame": {name: g["bytes_per_frame"] for name, g in groups.items()},
    }


def bench_long_video(args, work: Path, model: Path) -> list[dict]:
    """Peak RSS of extracting one short and one long video (same content rate, 1 fps, chunks of 16)."""
    rows = []
    for minutes in args.minutes:
        folder = work / f"long-{minutes}"
        folder.mkdir(parents=True, exist_ok=True)
        write_video(folder / f"clip_{minutes}min.mp4", minutes * 60, 2, 128, 96, seed=7)
        summary, peaks, _ = extract(folder, model, work / f"store-long-{minutes}", args.threads,
                                    **{"decode.fps": 1.0, "decode.chunk_frames": 16})
        assert summary.ok == 1, summary.failures
        rows.append({"minutes": minutes, "frames": summary.frames, "seconds": summary.seconds, "peak_rss": peaks})
        shutil.rmtree(work / f"store-long-{minutes}", ignore_errors=True)
    return rows


def print_model(r: dict) -> None:
    print(f"\n== {r['model']}: {r['frames']} frames, torch threads {r['threads']}")
    print(f"  decode-only     {r['decode_only_fps']:8.2f} frames/s  (one process, one decoding thread)")
    b, a = r["encoder_only_fps_before_after"]
    print(f"  encoder-only    {r['encoder_only_fps']:8.2f} frames/s  (the actor's encoder on pre-decoded frames; "
          f"{b:.2f} before, {a:.2f} after end-to-end)")
    print(f"  end-to-end      {r['e2e_fps']:8.2f} frames/s  = {r['e2e_ratio']:.2f}x encoder-only "
          f"(run_extract wall {r['e2e_seconds']:.1f} s, Ray already up)")
    print(f"  e2e steady      {r['e2e_steady_fps']:8.2f} frames/s  = {r['e2e_steady_ratio']:.2f}x encoder-only "
          f"(first to last finished video)")
    rss = ", ".join(f"{k} {mib(v)}" for k, v in sorted(r["peak_rss"].items()))
    print(f"  peak RSS        {rss} (the driver's includes this script's pre-decoded frames)")
    raw = r["raw_fp16_bytes_per_frame"]
    print(f"  on disk         {r['bytes_per_frame'] / 1024:.1f} KiB/frame vs {raw / 1024:.1f} KiB/frame raw fp16 "
          f"({r['bytes_per_frame'] / raw:.2f}x)")


def print_int8(r: dict) -> None:
    frames = r["stores"]["float32"]["frames"]
    print(f"\n== storage dtypes: {r['model']} (EVA layout, random weights), {frames} frames, "
          f"torch threads {r['threads']}")
    print("  dtype     on disk/frame  stored/frame  raw fp16/frame  disk/raw  rel. error (stored; quantiser alone)")
    for dtype, s in r["stores"].items():
        err = s.get("relative_error")
        text = "reference" if err is None else (
            f"{100 * err['stored']['overall']:.3f} %; {100 * err['quantiser']['overall']:.3f} %  ("
            + ", ".join(f"{tap} {100 * v:.3f} %" for tap, v in err["stored"].items() if tap != "overall") + ")")
        print(f"  {dtype:8s} {s['bytes_per_frame'] / 1024:9.1f} KiB {s['stored_bytes_per_frame'] / 1024:9.1f} KiB "
              f"{s['raw_fp16_bytes_per_frame'] / 1024:11.1f} KiB {s['ratio']:8.3f}x  {text}")
    int8 = r["stores"]["int8"]
    print(f"  target int8 <= 0.55x raw fp16 at < 1 % error: {int8['ratio']:.3f}x at "
          f"{100 * int8['relative_error']['stored']['overall']:.3f} % -> {'met' if r['target_met'] else 'NOT met'}")


def print_two_encoders(r: dict) -> None:
    print(f"\n== two encoders in one run (ViT-B EVA layout + ViT-B/16 DINOv2, random weights): "
          f"{r['frames']} frames, torch threads {r['threads']}")
    for name, rate in r["encoder_only_fps"].items():
        b, a = r["encoder_only_fps_before_after"][name]
        print(f"  encoder-only {name:5s} {rate:8.2f} frames/s  ({b:.2f} before, {a:.2f} after end-to-end)")
    print(f"  back to back     {r['serial_fps']:8.2f} frames/s  = 1 / (1/r1 + 1/r2)")
    print(f"  end-to-end       {r['e2e_fps']:8.2f} frames/s  = {r['e2e_ratio']:.2f}x back to back "
          f"(one run_extract, both groups, wall {r['e2e_seconds']:.1f} s, Ray already up)")
    print(f"  e2e steady       {r['e2e_steady_fps']:8.2f} frames/s  = {r['e2e_steady_ratio']:.2f}x back to back "
          f"(first to last finished video)")
    print(f"  target >= 0.85x: whole run {'met' if r['e2e_ratio'] >= 0.85 else 'NOT met'}, "
          f"steady state {'met' if r['e2e_steady_ratio'] >= 0.85 else 'NOT met'}")
    rss = ", ".join(f"{k} {mib(v)}" for k, v in sorted(r["peak_rss"].items()))
    print(f"  peak RSS         {rss}")
    disk = ", ".join(f"{name} {b / 1024:.1f} KiB/frame" for name, b in r["bytes_per_frame"].items())
    print(f"  on disk          {disk}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--which", choices=["tiny", "vitb", "both", "none"], default="both",
                        help="encoder(s) for the throughput figures (none: only the memory check)")
    parser.add_argument("--videos", type=int, default=8, help="videos in the throughput corpus")
    parser.add_argument("--seconds", type=float, default=30, help="length of each video")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads, for encoder-only and for the extract encoder actor")
    parser.add_argument("--fps", type=float, default=1.0, help="sampling rate (extract's decode.fps)")
    parser.add_argument("--batch-frames", type=int, default=32, help="frames per encoder forward")
    parser.add_argument("--width", type=int, default=320, help="source video width (height = 3/4 of it)")
    parser.add_argument("--long-model", choices=["tiny", "vitb", "none"], default="tiny",
                        help="encoder for the RSS-vs-video-length check (none: skip it)")
    parser.add_argument("--minutes", type=lambda text: [int(m) for m in text.split(",")], default=[1, 10],
                        help="lengths of the videos for the memory check, e.g. 1,10,30")
    parser.add_argument("--int8", action="store_true",
                        help="also store the ViT-B features as float32, float16 and int8: size and error of each")
    parser.add_argument("--two-encoders", action="store_true",
                        help="also time one extract run writing a ViT-B EVA group and a ViT-B DINOv2 group")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import ray

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dualfocus-bench-"))
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(args.videos):
        path = corpus / f"clip_{i:03d}.mp4"
        if not path.exists():
            write_video(path, args.seconds, 10, args.width, args.width * 3 // 4, seed=i)
    print(f"corpus: {args.videos} videos x {args.seconds:g} s, {args.width}x{args.width * 3 // 4} at 10 fps, "
          f"sampled at {args.fps:g} fps | cpus {os.cpu_count()} | load average {os.getloadavg()[0]:.1f}")

    start = time.perf_counter()
    from dualfocus.extract.config import ExtractConfig
    from dualfocus.extract.run import _init_ray

    _init_ray(ExtractConfig())
    print(f"ray.init: {time.perf_counter() - start:.1f} s (not counted below)")

    # The memory check first, while this driver has loaded no model and holds no frames of its own.
    results = {"long_video": [], "models": []}
    if args.long_model != "none":
        model = model_dir(args.long_model, work / "models")
        rows = bench_long_video(args, work, model)
        results["long_video"] = rows
        print(f"\n== peak RSS vs video length ({args.long_model} encoder, 1 fps, chunks of 16 frames)")
        for row in rows:
            print(f"  {row['minutes']:3d} min, {row['frames']:4d} frames, {row['seconds']:6.1f} s: "
                  + ", ".join(f"{k} {mib(v)}" for k, v in sorted(row["peak_rss"].items())))

    for kind in {"both": ["tiny", "vitb"], "none": []}.get(args.which, [args.which]):
        r = bench_model(kind, args, work, corpus)
        results["models"].append(r)
        print_model(r)

    if args.int8:
        results["int8"] = bench_int8(args, work, corpus, model_dir("vitb", work / "models"))
        print_int8(results["int8"])
        print(f"  load average now {os.getloadavg()[0]:.1f}")
    if args.two_encoders:
        results["two_encoders"] = bench_two_encoders(args, work, corpus, model_dir("vitb", work / "models"),
                                                     write_dinov2_vitb(work / "models"))
        print_two_encoders(results["two_encoders"])
        print(f"  load average now {os.getloadavg()[0]:.1f}")

    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    ray.shutdown()
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
