"""Which stream groups an extract run writes, resolved and checked before any work.

An extract run writes one group per frozen encoder, all from one decode of each video:

- ``model`` (``--model``): the DualFocus default, group ``store.group`` (``eva``) with the taps
  ``semantic = post_ln`` and ``spatiotemporal = pool4``; its fingerprint keeps the keys stores have always had.
- ``encoders`` (a recipe YAML, or ``--encoder NAME=PATH``): more groups, each
  ``{model: DIR, taps: {name: tap}, image_size: null, dtype: null}``. Taps default per family (the DualFocus
  pair for eva, ``grid`` otherwise); ``dtype`` defaults to ``store.dtype``.

``plan_groups`` reads only config files: an unsupported family, a tap the encoder cannot give (e.g.
``hidden[k]`` past its depth) or a malformed entry is one error naming the key, before a store is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dualfocus.extract.config import ExtractConfig

DUALFOCUS_TAPS = {"semantic": "post_ln", "spatiotemporal": "pool4"}
"""The two streams DualFocus reads, as taps of an EVA-family tower (see ``extract/encoder.py``)."""
GROUP_KEYS = ("model", "taps", "image_size", "dtype")


def default_taps(family: str) -> dict[str, str]:
    """Taps a group of ``family`` stores when its entry names none."""
    return dict(DUALFOCUS_TAPS) if family == "eva" else {"grid": "grid"}


@dataclass(frozen=True)
class GroupPlan:
    """One group of the run: its encoder, taps (name -> tap text), per-frame shapes, dtype and fingerprint."""

    name: str
    family: str
    """The encoder family, or ``pixels`` for the pixels group."""
    model: str
    taps: dict[str, str]
    image_size: int
    """The square frame size its encoder reads (the pixels group: its long side)."""
    dtype: str
    shapes: dict[str, tuple[int, ...]]
    fingerprint: dict
    override_size: int | None = None
    """``image_size`` as the entry gave it (for families that take other sizes)."""
    tap_dtypes: dict[str, str] | None = None
    """Per-tap storage dtypes where they differ from ``dtype`` (the pixels group's box)."""

    @property
    def kind(self) -> str:
        return "pixels" if self.family == "pixels" else "encoder"

    def stage_spec(self) -> dict:
        """What an encoder actor needs to build this group's encoder (plain, picklable)."""
        return {"name": self.name, "model": str(Path(self.model).resolve()), "taps": dict(self.taps),
                "image_size": self.override_size, "dtype": self.dtype}


def _entries(cfg: ExtractConfig, problems: list[str]) -> dict[str, dict]:
    """name -> entry, the --model group first; problems named by their config key."""
    entries: dict[str, dict] = {}
    if cfg.model:
        entries[cfg.store.group] = {"model": cfg.model, "taps": dict(DUALFOCUS_TAPS), "default": True}
    for name, entry in cfg.encoders.items():
        key = f"encoders.{name}"
        if name in entries:
            problems.append(f"{key}: group {name!r} is also the --model group (store.group); pick another name")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{key} must be a mapping with {', '.join(GROUP_KEYS)}, got {entry!r}")
            continue
        unknown = sorted(set(entry) - set(GROUP_KEYS))
        if unknown:
            problems.append(f"{key}: unknown key(s) {', '.join(unknown)} (known: {', '.join(GROUP_KEYS)})")
        if not entry.get("model"):
            problems.append(f"{key}.model is required (a local encoder directory)")
        taps = entry.get("taps") or {}
        if not isinstance(taps, dict) or not all(isinstance(v, str) for v in taps.values()):
            problems.append(f"{key}.taps must map names to taps such as post_ln, hidden[6], grid@24x24, got {taps!r}")
        size = entry.get("image_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            problems.append(f"{key}.image_size must be a positive integer or null, got {size!r}")
        entries[name] = {**entry, "default": False}
    return entries


def plan_groups(cfg: ExtractConfig, compute_dtype: str) -> list[GroupPlan]:
    """The run's groups in order, every problem reported at once as a ``UserError``."""
    from dualfocus.encoders import inspect_encoder
    from dualfocus.extract.run import encoder_fingerprint
    from dualfocus.pipeline.errors import UserError
    from dualfocus.pipeline.models import ModelLoadError
    from dualfocus.store.dtypes import FEATURE_DTYPES
    from dualfocus.store.info import check_name

    problems: list[str] = []
    entries = _entries(cfg, problems)
    if not entries and not problems and cfg.pixels.long_side is None:
        problems.append("no encoder given: pass --model DIR, or encoders in a recipe (--encoder NAME=DIR)")
    plans = []
    for name, entry in entries.items():
        key = "model" if entry["default"] else f"encoders.{name}"
        try:
            check_name(name)
        except ValueError as e:
            problems.append(f"{key}: {e}")
        dtype = entry.get("dtype") or cfg.store.dtype
        if dtype not in FEATURE_DTYPES:
            problems.append(f"{key}.dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
        if not entry.get("model") or not isinstance(entry.get("taps") or {}, dict):
            continue
        try:
            info = inspect_encoder(entry["model"], entry.get("image_size"))
        except (ModelLoadError, ValueError) as e:
            problems.append(f"{key}: {e}")
            continue
        taps = entry.get("taps") or default_taps(info.family.name)
        tap_problems = info.check_taps(taps)
        if tap_problems:
            problems += [f"{key}.{p}" for p in tap_problems]
            continue
        if entry["default"]:
            if info.family.name != "eva":
                problems.append(f"model: {entry['model']} is a {info.family.name} encoder; --model takes an "
                                "InstructBLIP/BLIP-2 checkpoint (add other encoders with --encoder NAME=DIR)")
                continue
            try:
                fingerprint = encoder_fingerprint(cfg)    # the keys stores have always had: old stores resume
            except ModelLoadError as e:
                problems.append(f"model: {e}")
                continue
        else:
            fingerprint = {**info.fingerprint(taps, compute_dtype), "dtype": dtype,
                           "decode_backend": cfg.decode.backend}
        plans.append(GroupPlan(name=name, family=info.family.name, model=str(entry["model"]), taps=dict(taps), image_size=info.spec.size,
                               dtype=dtype, shapes=info.tap_shapes(taps), fingerprint=fingerprint,
                               override_size=entry.get("image_size")))
    if cfg.pixels.long_side is not None:
        if cfg.pixels.group in entries:
            problems.append(f"pixels.group: {cfg.pixels.group!r} is also an encoder group; pick another name")
        plans.append(pixels_plan(cfg))
    if problems:
        raise UserError("; ".join(problems))
    return plans


def pixels_plan(cfg: ExtractConfig) -> GroupPlan:
    """The pixels group: uint8 frames, long side ``pixels.long_side``, padded, with each frame's valid box."""
    side = cfg.pixels.long_side
    return GroupPlan(name=cfg.pixels.group, family="pixels", model="", taps={"frames": "pixels", "box": "box"},
                     image_size=side, dtype="uint8", shapes={"frames": (side, side, 3), "box": (2,)},
                     fingerprint={"kind": "pixels", "long_side": side, "resample": "bicubic", "layout": "top-left padded",
                                  "decode_backend": cfg.decode.backend},
                     tap_dtypes={"box": "int32"})
