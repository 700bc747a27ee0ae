"""``run_extract``: corpus -> Ray Data (decode actors -> encoder actor pool) -> parallel shard writer actors.

Each video is decoded once and run through every encoder of the run (one stream group each, see
``extract/groups.py``); a video already stored in some groups is encoded only for the others. The encoder actors
push their output straight to the writer actors (``extract/writer_actor.py``): writer ``w`` owns slot ``w`` of
every group (disjoint shard names, ``store/slot_writer.py``) and receives every chunk of the videos routed to it,
so a video stays whole in one shard per group; the driver receives one small progress row per video and each
writer's counts at the end, never a feature byte. Rows flow in completion order, not corpus order, so a video
that hangs its decoder holds back only itself.

Exactly once: the driver's ``GroupWriter`` per group holds the group for the run, removes what an interrupted
run left uncommitted, and hands out shard names above every committed one; a shard counts only once its manifest
part exists. A kill of anything (driver, writer, encoder, node) then the same command again redoes only the
videos not committed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from dualfocus.extract.config import ExtractConfig
from dualfocus.extract.encoder import POOL_FACTOR, SEMANTIC_LAYER, SPATIOTEMPORAL_LAYER, planned_compute_dtype
from dualfocus.extract.writing import Outcome


@dataclass
class ExtractSummary(Outcome):
    """What an extract run did; printed at the end and returned to callers. The counts (ok, failed, frames,
    bytes, failures, groups: printed per group when the run writes several) are its writers' outcomes merged."""

    store: str = ""
    total: int = 0
    skipped: int = 0
    seconds: float = 0.0
    removed_garbage: list[str] = field(default_factory=list)
    failures_exceeded: bool = False

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def encoder_fingerprint(cfg: ExtractConfig) -> dict:
    """Everything besides the frame sampling that changes the stored numbers; a group only ever holds one."""
    from dualfocus.pipeline.models import config_hash, load_image_spec

    spec = load_image_spec(cfg.model)
    return {
        "model": str(Path(cfg.model).resolve()),
        "config_hash": config_hash(cfg.model),
        "semantic_layer": SEMANTIC_LAYER,
        "spatiotemporal_layer": SPATIOTEMPORAL_LAYER,
        "pool_factor": POOL_FACTOR,
        "image_size": spec.size,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "dtype": cfg.store.dtype,
        # Stores written before these two keys existed lack them: StoreWriter refuses to continue one,
        # naming the keys, since its precision and decoder are unknown; reading it needs neither.
        "compute_dtype": planned_compute_dtype(cfg.encoder.device, cfg.encoder.compute_dtype, cfg.ray.gpus_per_actor),
        "decode_backend": cfg.decode.backend,
    }


def check_vision_weights(model_dir: str, prefix: str = "vision_model.") -> None:
    """Fail before any work unless ``model_dir`` holds readable weights, some named ``prefix*`` (reads file
    headers only; ``prefix`` "" for a standalone encoder).

    Without this a directory with a valid config.json but missing or broken weights would only fail
    inside the Ray encoder actor, after the store was created, with a traceback.
    """
    from safetensors import safe_open

    from dualfocus.pipeline.models import ModelLoadError, weight_files

    try:
        files = weight_files(Path(model_dir))
        for file in set(files.values()):
            with safe_open(str(file), framework="pt") as f:  # parses the header: catches a corrupt file
                f.keys()
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing shard, a corrupt header, a bad index
        raise ModelLoadError(f"{model_dir}: cannot read the model weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
    if not any(name.startswith(prefix) for name in files):
        raise ModelLoadError(f"{model_dir} holds no vision tower weights (no tensor named {prefix}*)")


def sampling(cfg: ExtractConfig) -> dict:
    """The frame sampling every group of a store shares (``store.json``)."""
    return {"fps": cfg.decode.fps, "max_frames": cfg.decode.max_frames}


def joins_cluster(cfg: ExtractConfig) -> str | None:
    """The address of the Ray cluster extract joins, or None for a local Ray of its own.

    Inside a Ray job (`ray job submit`) RAY_ADDRESS names the job's cluster: join it, as ray.init() does.
    """
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


def _init_ray(cfg: ExtractConfig):
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    address = joins_cluster(cfg)
    if address:
        key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        _check_reachable(key, address)
        try:
            ray.init(address=address, log_to_driver=True, logging_level="WARNING")
        except ConnectionError as e:  # e.g. "auto" with no cluster running
            from dualfocus.pipeline.errors import UserError

            raise UserError(f"{key}={address}: {str(e).splitlines()[0]}") from None
        return
    # Locally, reserve exactly what the stages ask for (at least the machine's cores) so the actor
    # pools always fit, even on a 2-core laptop. address="local": with no address, ray.init would join
    # the last cluster `ray start` recorded on this machine (/tmp/ray/ray_current_cluster), even one long
    # gone or another user's, and then refuse num_cpus; joining a cluster is what ray.address is for.
    wanted = (cfg.ray.decode_workers * cfg.ray.decode_cpus + cfg.ray.encoder_actors * cfg.ray.encoder_cpus
              + cfg.ray.n_writers() * cfg.ray.writer_cpus)
    start_local_ray(lambda: ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(wanted)),
                                     include_dashboard=False, log_to_driver=True, configure_logging=True,
                                     logging_level="ERROR"))


def start_local_ray(init, attempts: int = 3) -> None:
    """Run ``init`` (a local ``ray.init``), retrying a start that timed out.

    Ray gives its own raylet a fixed 30 s to register; on a machine busy with other work that can pass
    while nothing is wrong, so a timed-out start is shut down cleanly and tried again. Still failing after
    ``attempts`` is a one-line ``UserError`` (nothing has been written for this run's videos yet).
    """
    import ray

    from dualfocus.pipeline.errors import UserError

    for attempt in range(1, attempts + 1):
        try:
            init()
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for a start-up time-out
            if "timed out during startup" not in str(e):
                raise
            ray.shutdown()
            if attempt == attempts:
                raise UserError(f"Ray could not start on this machine ({attempts} tries): {e}") from None


def _check_reachable(key: str, address: str, timeout_s: float = 10.0) -> None:
    """Fail in seconds, naming the key, when nothing listens at a ``host:port`` Ray address.

    Without this, ray.init retries an unreachable address for minutes, printing warnings.
    """
    import re
    import socket

    from dualfocus.pipeline.errors import UserError

    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)", address.strip())
    if match is None:  # "auto", or a form Ray resolves itself
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout_s).close()
    except OSError as e:
        raise UserError(f"{key}={address}: no Ray cluster answers there ({e.strerror or e})") from None


MAX_INPUT_BLOCKS = 10_000
"""Input blocks of the pipeline: one video each up to this many videos (a decode task is a block, so a video
that hangs delays only itself); beyond it a block holds several videos."""


def build_pipeline(cfg: ExtractConfig, todo: list[dict], plans: list, writers: list, encode_stage: type | None = None):
    """The Ray Dataset for the videos in ``todo`` (lazy; nothing runs yet).

    The encoded chunks go to ``writers`` (``WriterActor`` handles); the dataset's rows are progress rows
    (``writer_actor.progress_rows``).
    ``encode_stage`` replaces ``EncodeStage`` (same constructor; ``benchmarks/extract_scale.py``'s synthetic one).
    Each video is decoded once, at the largest frame size any group's encoder reads; every encoder of the
    run sits in each encoder actor and resizes from there to its own size (``encoders.prepare_frames``).
    """
    import numpy as np
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from dualfocus.extract.resize import FrameViews
    from dualfocus.extract.stages import DecodeStage, EncodeStage
    from dualfocus.extract.writer_actor import route
    from dualfocus.pipeline.progress import quiet_ray_data
    from dualfocus.store.dtypes import transfer_dtype

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = False  # completion order: a slow video never holds others back
    # A decode actor takes one video at a time (none waits behind a slow one), so its pool is at most 100 %
    # busy; Ray Data grows a pool only above 175 % unless told otherwise (only decode's pool can grow).
    ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0)
    quiet_ray_data(ctx)
    # max_restarts (below) has no named parameter: Ray 2.60 warns that its **ray_remote_args route goes
    # away in Ray 2.64 (ray-project/ray#65228). The warning is for us, not for the user running extract.
    warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
    encoders = [plan for plan in plans if plan.kind == "encoder"]
    pixels = next((plan for plan in plans if plan.kind == "pixels"), None)
    square = max((plan.image_size for plan in encoders), default=None)
    size = square if pixels is None else FrameViews(square=square, long_side=pixels.image_size)
    # Memory is bounded by chunks, not by video length. Blocks: about one chunk each (Ray's default of
    # 128 MiB would let a long video pile up in the decoding actor and travel as one object). Buffering:
    # decoding is far faster than a CPU encoder and would otherwise run ahead through a whole video, so
    # the object store budget of the pipeline is capped at a few encoder batches (in and out) per
    # encoder actor, and each encoder actor holds at most 2 batches (one running, one queued).
    feature_bytes = sum(int(np.prod(shape)) * transfer_dtype(plan.dtype).itemsize
                        for plan in encoders for shape in plan.shapes.values())
    decoded_bytes = (square or 0) ** 2 * 3 + (pixels.image_size ** 2 * 3 + 8 if pixels else 0)
    frame_bytes = decoded_bytes + feature_bytes
    ctx.target_max_block_size = cfg.decode.chunk_frames * decoded_bytes
    budget = max(32 * 2**20, 4 * cfg.encoder.batch_frames * frame_bytes * cfg.ray.encoder_actors)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(object_store_memory=budget)
    # Actor restarts. Ray Data always hands its actors their constructor arguments through the object
    # store (ours are a few numbers and strings), and Ray logs an "E ... core_worker.cc" line for every
    # restartable actor built that way: a false alarm (ray-project/ray#57733). On one machine a lost actor
    # is a crash that restarting would not cure, so local runs turn restarts off and print no such line.
    # On a cluster, where a node can be preempted, Ray Data's default (restart) is kept and the line shows;
    # a retried task may then push a chunk twice, which the writers drop (``writing.VideoAssembler``).
    restarts = {} if joins_cluster(cfg) else {"max_restarts": 0}
    ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), MAX_INPUT_BLOCKS)))
    ds = ds.flat_map(
        DecodeStage,
        fn_constructor_kwargs=dict(fps=cfg.decode.fps, max_frames=cfg.decode.max_frames, size=size,
                                   chunk_frames=cfg.decode.chunk_frames, backend=cfg.decode.backend,
                                   timeout_s=cfg.decode.timeout_s),
        # one video at a time per actor (none queued behind a slow one); the pool grows while encoders wait
        compute=ActorPoolStrategy(min_size=cfg.ray.decode_min_workers, max_size=cfg.ray.decode_workers,
                                  max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.ray.decode_cpus,
        **restarts,
    )
    if not encoders:  # the pixels group alone: nothing to encode
        return ds.map_batches(route, fn_kwargs={"writers": writers}, batch_format="numpy")
    ds = ds.map_batches(
        encode_stage or EncodeStage,
        fn_constructor_kwargs=dict(groups=[plan.stage_spec() for plan in encoders], device=cfg.encoder.device,
                                   compute_dtype=planned_compute_dtype(cfg.encoder.device, cfg.encoder.compute_dtype,
                                                                       cfg.ray.gpus_per_actor),
                                   batch_frames=cfg.encoder.batch_frames, threads=cfg.encoder.threads,
                                   writers=writers),
        # a block (about one chunk) per call: a batch of several rows would wait for its last row, i.e. at the
        # end of a run behind a video that hangs its decoder
        batch_size=None,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.ray.encoder_actors, max_tasks_in_flight_per_actor=2),
        num_cpus=cfg.ray.encoder_cpus,
        num_gpus=cfg.ray.gpus_per_actor,
        **restarts,
    )
    return ds


def open_writers(cfg: ExtractConfig, plans: list) -> dict:
    """One ``GroupWriter`` per group of the run (all or none: a refusal closes the ones already open)."""
    from dualfocus.store import GroupWriter, TapInfo

    writers = {}
    try:
        for plan in plans:
            dtypes = plan.tap_dtypes or {}
            taps = {name: TapInfo(plan.shapes[name], dtypes.get(name, plan.dtype), tap) for name, tap in plan.taps.items()}
            writers[plan.name] = GroupWriter(
                cfg.out, plan.name, taps=taps, fingerprint=plan.fingerprint, sampling=sampling(cfg), kind=plan.kind,
                format=cfg.store.format, videos_per_shard=cfg.store.videos_per_shard,
                max_shard_bytes=cfg.store.max_shard_mb * 2**20, overwrite=cfg.overwrite)
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise
    return writers


def run_extract(cfg: ExtractConfig, progress: bool = True, encode_stage: type | None = None) -> ExtractSummary:
    """Extract every group of the run for every video of ``cfg.corpus`` not already in it; see module doc.
    (``encode_stage``: see ``build_pipeline``.)"""
    from dualfocus.extract.groups import plan_groups
    from dualfocus.pipeline.config import save_config
    from dualfocus.pipeline.corpus import read_corpus

    rows = read_corpus(cfg.corpus)                 # errors on duplicates / empty before any work
    compute_dtype = planned_compute_dtype(cfg.encoder.device, cfg.encoder.compute_dtype, cfg.ray.gpus_per_actor)
    plans = plan_groups(cfg, compute_dtype)        # errors on a bad model dir, family or tap before any work
    for plan in plans:
        if plan.kind == "encoder":
            check_vision_weights(plan.model, "vision_model." if plan.family == "eva" else "")
    summary = ExtractSummary(store=cfg.out, total=len(rows))
    start = time.perf_counter()
    groups = open_writers(cfg, plans)
    try:
        several = len(groups) > 1
        for name, group in groups.items():
            summary.removed_garbage += [f"{name}/{entry}" if several else entry for entry in group.removed_garbage()]
        done = {name: group.done_ids() for name, group in groups.items()}
        todo = []
        for r in rows:
            need = [name for name in groups if r.video_id not in done[name]]
            if need:
                todo.append({"video_id": r.video_id, "path": r.path, "need": ",".join(need)})
        summary.skipped = len(rows) - len(todo)
        if cfg.limit is not None:
            todo = todo[: cfg.limit]
        for name in {g for item in todo for g in item["need"].split(",")}:   # a group with nothing to do stays as is
            save_config(cfg, groups[name].dir / "extract_config.yaml")
        if todo:
            _init_ray(cfg)
            _write_in_parallel(cfg, todo, plans, groups, summary, progress, encode_stage)
    except BaseException:
        for group in groups.values():
            group.abandon()
        raise
    for group in groups.values():
        group.close()
    summary.seconds = time.perf_counter() - start
    summary.failures_exceeded = cfg.failures_exceeded(summary.failed, summary.ok + summary.failed)
    return summary


def _write_in_parallel(cfg: ExtractConfig, todo: list[dict], plans: list, groups: dict, summary: ExtractSummary,
                       progress: bool, encode_stage: type | None) -> None:
    """Run the pipeline into ``cfg.ray.n_writers()`` writer actors and count what they stored into ``summary``.

    If the run stops (an actor or node lost, Ctrl-C), the writers still alive commit the videos they finished,
    so the rerun redoes as little as possible; then a one-line ``UserError`` says so.
    """
    import ray

    from dualfocus.extract.stages import one_line_reason
    from dualfocus.extract.writer_actor import start_writers
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.progress import video_progress

    specs = {name: group.slot_specs(cfg.ray.n_writers()) for name, group in groups.items()}
    writers = start_writers(specs, cpus=cfg.ray.writer_cpus, spread=bool(joins_cluster(cfg)),
                            on_gpu_nodes=cfg.ray.gpus_per_actor > 0)
    try:
        ds = build_pipeline(cfg, todo, plans, writers, encode_stage)
        with video_progress(len(todo), enabled=progress) as advance:
            for row in ds.iter_rows():
                advance(row)
        outcomes = ray.get([writer.close.remote() for writer in writers])
    except BaseException as e:
        kept = _close_survivors(writers)
        if isinstance(e, Exception):
            raise UserError(f"extract stopped ({one_line_reason(e)}); {kept} video(s) of this run are committed; "
                            "run the same command again to redo only the rest") from e
        raise
    for outcome in outcomes:   # each writer counts every group of the run
        summary.merge(outcome)
    order = {item["video_id"]: i for i, item in enumerate(todo)}
    summary.failures.sort(key=lambda failure: order.get(failure[0], len(order)))


def _close_survivors(writers: list, timeout_s: float = 120.0) -> int:
    """Commit what each live writer finished; returns how many videos that kept (dead writers count 0)."""
    import ray

    refs = [writer.close.remote(stopped=True) for writer in writers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    kept = 0
    for ref in ready:
        try:
            outcome = ray.get(ref)
        except Exception:  # noqa: BLE001 - a dead writer: its open shards are garbage for the next run
            continue
        kept += outcome.ok + outcome.failed
    return kept
