"""``run_train``: DeepSpeed training of a connector (``connector.name``) on cached features, resumable exactly.

Single process by default (a one-rank gloo/nccl group is set up here); under the ``deepspeed`` launcher
or ``torchrun`` the same code runs data-parallel, each rank taking every ``world``-th batch (streaming a
WebDataset store, ``data.streaming``: its own run of batches, see ``train/streaming.py``). Every rank
makes the same decisions: the step loss is averaged over ranks before it is checked or logged, so a
non-finite loss on one rank stops all of them with the same message instead of leaving the others
waiting in the next collective.

Everything that only needs small files (configs, the DeepSpeed JSON, the store's metadata, the tokenised
samples) is checked before the LLM is loaded.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dualfocus.train.config import RESUME_FREE_KEYS, TrainConfig


@dataclass
class TrainSummary:
    """What a training run did; printed at the end."""

    run_dir: str
    steps: int
    start_step: int
    first_loss: float
    last_loss: float
    samples: int
    seconds: float
    data_wait_fraction: float
    usable: str
    export: str
    loss_plot: str
    stopped: str = ""
    rank: int = 0
    """This process's rank; only rank 0 reports (the figures are global)."""
    trainable_params: int = 0
    """Parameters the optimiser updates (the connector's; the LLM is frozen)."""
    bytes_per_sample: float = 0.0
    """Mean store bytes a training sample reads (its frames of every stream the connector reads)."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def resolve_packaged(path: str) -> Path:
    """A path as given, or else relative to the installed package (``configs/...`` works anywhere)."""
    p = Path(path)
    if p.exists():
        return p
    packaged = Path(__file__).resolve().parent.parent / path
    return packaged if packaged.exists() else p


# DeepSpeed's precision sections ("bfloat16" is its older name for "bf16") and the llm_dtype each one means.
PRECISION_SECTIONS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed JSON with batch, accumulation and clipping filled in from the train config, and its
    precision from ``llm_dtype`` (a section that enables another precision is refused, naming both)."""
    from dualfocus.pipeline.errors import UserError

    path = resolve_packaged(cfg.deepspeed)
    if not path.is_file():
        raise UserError(f"deepspeed config not found: {cfg.deepspeed}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"{path}: remove '{key}'; the optimiser and schedule come from the train config (optim.*)")
    _fill_precision(ds, cfg.llm_dtype, path)
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["train_batch_size"] = cfg.data.batch_size * cfg.optim.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _fill_precision(ds: dict, llm_dtype: str, path: Path) -> None:
    """Enable exactly the precision section ``llm_dtype`` calls for; refuse a JSON that says otherwise."""
    from dualfocus.pipeline.errors import UserError

    for section, dtype in PRECISION_SECTIONS.items():
        given = ds.get(section)
        if given is None:
            continue
        if not isinstance(given, dict):
            raise UserError(f"{path}: '{section}' must be an object such as {{\"enabled\": true}}, got {given!r}")
        enabled = given.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (dtype == llm_dtype):
            raise UserError(f"{path}: {section}.enabled={json.dumps(enabled)} disagrees with llm_dtype={llm_dtype}; "
                            f"change llm_dtype or the JSON (leave '{section}' out and it follows llm_dtype)")
    legacy = ds.pop("bfloat16", None)
    if legacy is not None:
        ds.setdefault("bf16", legacy)
    ds.setdefault("bf16", {})["enabled"] = llm_dtype == "bfloat16"
    ds.setdefault("fp16", {})["enabled"] = llm_dtype == "float16"


def init_distributed() -> tuple[int, int]:
    """(rank, world); sets up a one-process group when no launcher did."""
    if not torch.cuda.is_available():  # say so up front instead of DeepSpeed warning that it fell back to CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:  # a launcher (deepspeed, torchrun) set up the group's environment
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
        else:  # one process: a private TCP rendezvous, leaving os.environ alone so child processes
            import socket  # (e.g. a later `dualfocus train` subprocess) never inherit a port in use

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                       init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
            os.environ.setdefault("LOCAL_RANK", "0")  # the engine asks for it; harmless to inherit
    return dist.get_rank(), dist.get_world_size()


def check_resume(cfg: TrainConfig, run_dir: Path, resume: bool) -> None:
    """Refuse to mix runs: --resume needs the same config; a fresh run needs an empty run dir."""
    import yaml

    from dualfocus.pipeline.config import config_to_dict
    from dualfocus.pipeline.errors import UserError
    from dualfocus.train.checkpoint import latest_complete_tag

    saved = run_dir / "train_config.yaml"
    if not resume:
        if latest_complete_tag(run_dir) is not None:
            raise UserError(f"{run_dir} already holds a training run; pass --resume to continue it or choose another --out")
        return
    if not saved.is_file() or latest_complete_tag(run_dir) is None:
        raise UserError(f"--resume: {run_dir} has no checkpoint to resume from")
    # A key the saved config lacks was added to dualfocus after that run started; the run trained with the
    # behaviour that key's default keeps, so a run begun on an older version still resumes. The defaults are
    # those of the saved run's own connector (a LongVU run has no FFP keys to fill in).
    saved_values = yaml.safe_load(saved.read_text()) or {}
    old = _same_paths({**_flatten(config_to_dict(_defaults_for(saved_values))), **_flatten(saved_values)})
    new = _same_paths(_flatten(config_to_dict(cfg)))
    differing = sorted(k for k in set(old) | set(new) if k not in RESUME_FREE_KEYS and old.get(k) != new.get(k))
    if differing:
        detail = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in differing)
        raise UserError(f"--resume: {run_dir} was trained with a different config: {detail}")


def _defaults_for(saved: dict) -> TrainConfig:
    """The default config of the connector a saved run names (dualfocus when it names none or an unknown one:
    the comparison then reports the difference)."""
    from dataclasses import replace

    from dualfocus.connectors.registry import connector_class

    defaults = TrainConfig()
    name = (saved.get("connector") or {}).get("name", defaults.connector.name)
    try:
        return replace(defaults, connector=connector_class(str(name)).config_class())
    except ValueError:
        return defaults


PATH_KEYS = ("store", "annotations", "model", "out")
"""Keys naming a file or directory: a run started as ``--out runs/a`` resumes as ``--out /abs/runs/a``."""


def save_run_config(cfg: TrainConfig, run_dir: Path) -> Path:
    """Write ``run_dir/train_config.yaml`` with the path keys absolute, so a later ``--resume`` from another
    directory compares the same files."""
    from dualfocus.pipeline.config import save_config

    absolute = {k: os.path.abspath(getattr(cfg, k)) for k in PATH_KEYS if getattr(cfg, k)}
    return save_config(replace(cfg, **absolute), run_dir / "train_config.yaml")


def _same_paths(flat: dict) -> dict:
    """``flat`` with the path keys made absolute (relative ones against the current directory)."""
    return {k: (os.path.abspath(v) if k in PATH_KEYS and v else v) for k, v in flat.items()}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def warmup_then_constant(warmup_steps: int):
    """LR multiplier: linear from 1/warmup to 1 over ``warmup_steps`` steps, then 1."""
    return lambda step: 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def run_train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> TrainSummary:
    """Train the connector; see the module docstring and ``train/checkpoint.py`` for the run layout."""
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.progress import step_progress
    from dualfocus.connectors.export import write_export
    from dualfocus.connectors.limits import ModelLimits, check_context_length, question_problems
    from dualfocus.connectors.registry import build_video_llm, connector_class, frame_planner
    from dualfocus.data.batch import collate
    from dualfocus.data.prepare import prepare_samples
    from dualfocus.data.samples import FeatureQADataset, bytes_per_sample
    from dualfocus.store import FeatureStore
    from dualfocus.train import checkpoint as ckpt
    from dualfocus.train.plot import plot_loss
    from dualfocus.train.sampler import ResumableBatches
    from dualfocus.train.streaming import StreamingQADataset, wants_streaming

    run_dir = Path(cfg.out)
    check_resume(cfg, run_dir, resume)
    # The cheap checks (config.json, the DeepSpeed JSON, store.json, the tokenised samples): every mistake they
    # catch is reported before DeepSpeed starts and before the LLM loads.
    limits = ModelLimits.of(cfg.model)
    system = connector_class(cfg.connector.name)
    problems = system.model_problems(cfg.connector, cfg.model) + question_problems(limits, cfg.data.max_question_tokens)
    if problems:
        raise UserError("; ".join(problems))
    deepspeed_config(cfg, world=1)  # the JSON and its precision; filled for the real world size below
    expected = system.expected_streams(cfg.connector, cfg.model)
    prepared = prepare_samples(cfg.store, cfg.annotations, cfg.model, with_answers=True, expected=expected,
                               max_answer_tokens=cfg.data.max_answer_tokens,
                               max_question_tokens=cfg.data.max_question_tokens,
                               taps=system.expected_taps(cfg.connector, cfg.model),
                               extract_args=functools.partial(system.extract_args, cfg.connector, cfg.model),
                               plan_frames=frame_planner(system, cfg.connector, cfg.model))
    check_context_length(prepared.samples, cfg.data.max_frames, limits,  # planned frames counted where planned
                         tokens_per_frame=system.tokens_per_frame(cfg.connector, cfg.model))
    streaming = wants_streaming(cfg.data.streaming, cfg.store, prepared.store_info["streams"])
    read_bytes = bytes_per_sample(prepared.samples, FeatureStore.open(cfg.store), prepared.store_info["streams"],
                                  cfg.data.max_frames)
    rank, world = init_distributed()
    is_main = rank == 0
    resume_tag = ckpt.latest_complete_tag(run_dir) if resume else None
    if resume_tag is not None:
        saved = ckpt.read_client_state(run_dir, resume_tag)
        saved_world = saved["world"]
        if saved_world != world:  # each rank's data position and RNG belong to that world size
            raise UserError(f"--resume: {run_dir} was trained by {saved_world} process(es), this run has {world}; "
                            f"resume with {saved_world} (the data order and RNG state depend on it)")
        if saved.get("layout") != ckpt.CHECKPOINT_LAYOUT:  # parameter names changed with the connector library
            raise UserError(f"--resume: {run_dir}/checkpoints/{resume_tag} was written by an older dualfocus whose "
                            "checkpoints name the weights differently; start a new run (its final/ export still "
                            "works with generate and ask)")
        if saved.get("streaming", streaming) != streaming:  # data.streaming=auto, and the store changed format
            raise UserError(f"--resume: {run_dir} was trained {'streaming' if saved['streaming'] else 'indexing'} "
                            f"the store, and data.streaming={cfg.data.streaming} now resolves the other way for "
                            f"{cfg.store}; the data order would differ")
    if is_main:
        save_run_config(cfg, run_dir)

    torch.manual_seed(cfg.seed)
    model = build_video_llm(cfg.connector, cfg.model, llm_dtype=cfg.llm_dtype, seed=cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    gates = {id(p) for p in model.connector.gate_parameters()}  # optim.gate_lr_scale applies to these alone
    groups = [{"params": [p for p in trainable if id(p) not in gates]}]
    if gates:  # an empty group would be dropped by ZeRO and leave the scheduler one group short
        groups.append({"params": [p for p in trainable if id(p) in gates], "lr": cfg.optim.lr * cfg.optim.gate_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(cfg.optim.warmup_steps))
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world), model_parameters=trainable)

    if streaming:  # shards in a seeded order, each read front to back (train/streaming.py)
        dataset = StreamingQADataset(cfg.store, prepared.samples, cfg.data.max_frames, cfg.data.batch_size, cfg.seed,
                                     cfg.data.shuffle, rank, world, prepared.store_info["streams"])
        per_epoch = dataset.batches_per_epoch
    else:
        per_epoch = ResumableBatches(len(prepared.samples), cfg.data.batch_size, cfg.seed, cfg.data.shuffle, rank,
                                     world).batches_per_epoch
    micro_per_step = cfg.optim.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / micro_per_step))

    start_step, consumed = 0, 0
    if resume_tag is not None:
        client = ckpt.load_checkpoint(engine, run_dir, resume_tag)
        start_step, consumed = client["step"], client["micro_batches"]
    position = (consumed // per_epoch, consumed % per_epoch)
    if streaming:  # the dataset yields whole batches
        dataset.position, batching = position, {"batch_size": None}
    else:
        dataset = FeatureQADataset(cfg.store, prepared.samples, cfg.data.max_frames, tuple(expected),
                                   cache_mb=cfg.data.cache_mb)
        batching = {"batch_sampler": ResumableBatches(len(prepared.samples), cfg.data.batch_size, cfg.seed,
                                                      cfg.data.shuffle, rank, world, position=position)}
    # The loader gets its own generator: starting an iterator draws a worker seed, and drawing it from the
    # global RNG would shift the dropout stream of a resumed run away from the uninterrupted one.
    loader = torch.utils.data.DataLoader(
        dataset, **batching, num_workers=cfg.data.num_workers,
        collate_fn=functools.partial(collate, qformer_pad_id=prepared.qformer_pad_id,
                                     llm_pad_id=prepared.pad_token_id or 0),
        persistent_workers=cfg.data.num_workers > 0, prefetch_factor=4 if cfg.data.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed))
    data = iter(loader)

    metrics_path = run_dir / "metrics.jsonl"
    dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype
    losses: list[tuple[int, float]] = []
    first_loss = last_loss = float("nan")
    waited = computed = 0.0
    samples_seen = 0
    stopped = ""
    step = start_step
    t0 = time.perf_counter()
    engine.train()
    with step_progress(total_steps, start_step, enabled=progress and is_main) as advance, \
            open(metrics_path, "a" if resume else "w") if is_main else open(os.devnull, "w") as metrics:
        while step < total_steps:
            step_loss = 0.0
            step_samples = 0
            lr = scheduler.get_last_lr()[0]  # the rate this step trains with (the scheduler moves on in step())
            for _ in range(micro_per_step):
                t_wait = time.perf_counter()
                batch = next(data)
                t_ready = time.perf_counter()
                waited += t_ready - t_wait
                batch = batch.to(engine.device, dtype, non_blocking=True)
                loss = engine(batch)
                engine.backward(loss)
                engine.step()
                computed += time.perf_counter() - t_ready
                step_loss += float(loss.detach()) / micro_per_step
                step_samples += len(batch)
                consumed += 1
            step_loss, step_samples = _global_step_figures(step_loss, step_samples, engine.device, world)
            samples_seen += step_samples
            if not math.isfinite(step_loss):  # the same value on every rank, so every rank stops here
                last = ckpt.latest_complete_tag(run_dir)
                stopped = (f"loss became {step_loss} at step {step + 1}; stopped without saving. "
                           f"Last good checkpoint: {last or 'none'}")
                break
            step += 1
            if math.isnan(first_loss):
                first_loss = step_loss
            last_loss = step_loss
            losses.append((step, step_loss))
            elapsed = time.perf_counter() - t0
            if is_main and (step % cfg.log_every == 0 or step == total_steps):
                metrics.write(json.dumps({"step": step, "loss": round(step_loss, 6), "lr": lr,
                                          "samples_per_s": round(samples_seen / elapsed, 3),
                                          "data_wait_fraction": round(waited / max(waited + computed, 1e-9), 4),
                                          "epoch": consumed // per_epoch}) + "\n")
                metrics.flush()
            advance(step_loss, samples_seen / elapsed)
            if step % cfg.save_every == 0 or step == total_steps:
                ckpt.save_checkpoint(engine, run_dir, step,
                                     {"step": step, "micro_batches": consumed, "streaming": streaming,
                                      "layout": ckpt.CHECKPOINT_LAYOUT},
                                     cfg.keep_checkpoints)
    seconds = time.perf_counter() - t0
    export = plot = ""
    if stopped:  # every rank, so each exits with the same one-line message
        raise UserError(stopped)
    if is_main:
        meta = export_meta(cfg, prepared.store_info, step, connector_dtype=dtype)
        export = str(write_export(engine.module.trainable_state_dict(), meta, run_dir / "final"))
        plot = str(plot_loss(metrics_path, run_dir / "loss.png"))
    return TrainSummary(run_dir=str(run_dir), steps=step, start_step=start_step, first_loss=first_loss,
                        last_loss=last_loss, samples=samples_seen, seconds=seconds,
                        data_wait_fraction=waited / max(waited + computed, 1e-9), usable=prepared.report.line(),
                        export=export, loss_plot=plot, rank=rank,
                        trainable_params=sum(p.numel() for p in trainable), bytes_per_sample=read_bytes)


def _global_step_figures(loss: float, samples: int, device, world: int) -> tuple[float, int]:
    """(mean step loss over ranks, samples over ranks); with one rank, the figures as given."""
    if world == 1:
        return loss, samples
    import torch.distributed as dist

    figures = torch.tensor([loss, float(samples)], dtype=torch.float64, device=device)
    dist.all_reduce(figures)  # a NaN or inf on any rank makes the sum non-finite on all of them
    return figures[0].item() / world, int(figures[1].item())


def export_meta(cfg: TrainConfig, store_info: dict, step: int, connector_dtype: torch.dtype):
    """The ``ExportMeta`` generate/ask need to rebuild the model and check they are given matching inputs."""
    from dataclasses import asdict

    from dualfocus.connectors.export import ExportMeta
    from dualfocus.pipeline.models import config_hash

    return ExportMeta(connector=cfg.connector.name, connector_config=asdict(cfg.connector),
                      base_model=str(Path(cfg.model).resolve()), base_model_hash=config_hash(cfg.model),
                      store_fingerprint=store_info["fingerprint"], streams=list(store_info["streams"]),
                      llm_dtype=cfg.llm_dtype, connector_dtype=str(connector_dtype).removeprefix("torch."),
                      max_frames=cfg.data.max_frames, max_question_tokens=cfg.data.max_question_tokens, step=step)
