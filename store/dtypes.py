"""Storage dtypes: how a tap's arrays are cast on write and decoded on read, in one place.

A tap is one named per-frame array (``[t, T, d]`` features, or exact arrays such as pixels). Its storage dtype
says how it sits on disk:

- ``float16`` / ``float32``: as is. ``bfloat16``: numpy has no bfloat16, so the upper 16 bits of the float32
  pattern (rounded to nearest even) are stored in a uint16 array and decoded back to float32.
- ``int8``: symmetric per-token quantisation. Each token (the last axis) gets one float16 scale
  ``max|x| / 127`` stored beside it as the array ``<tap>.scale`` ``[t, T]``; values are ``round(x / scale)``
  in [-127, 127]. About half of float16's bytes (d + 2 bytes per token instead of 2 d).
- ``uint8`` / ``int32``: exact arrays (pixels, boxes), stored and returned unchanged.

``encode_tap`` gives the on-disk arrays of one tap, ``decode_tap`` undoes them; ``round_trip`` is the two
together, for code that computes features on the spot and must see the numbers a store would give
(``dualfocus ask``). ``transfer_dtype`` is what encoder output travels in before the writer rounds it.
Readers return float16 for float16 taps and float32 for bfloat16, float32 and int8 taps.
"""

from __future__ import annotations

import numpy as np

FEATURE_DTYPES = ("float16", "bfloat16", "float32", "int8")
"""Storage dtypes a user may choose for feature taps (``store.dtype``)."""
EXACT_DTYPES = ("uint8", "int32")
"""Storage dtypes of arrays stored bit for bit (pixels and their valid boxes)."""
STORAGE_DTYPES = FEATURE_DTYPES + EXACT_DTYPES

SCALE_SUFFIX = ".scale"
_ON_DISK = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4"),
            "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "int32": np.dtype("<i4")}
_INT8_MAX = 127
_F16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_F16_MAX = float(np.finfo(np.float16).max)


def _check(storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(FEATURE_DTYPES)}, got {storage_dtype!r}")


def on_disk_arrays(tap: str, shape: tuple[int, ...], storage_dtype: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The arrays one tap occupies on disk: name -> (per-frame shape, numpy dtype)."""
    _check(storage_dtype)
    shape = tuple(int(n) for n in shape)
    arrays = {tap: (shape, _ON_DISK[storage_dtype])}
    if storage_dtype == "int8":
        arrays[tap + SCALE_SUFFIX] = (shape[:-1], np.dtype("<f2"))
    return arrays


def transfer_dtype(storage_dtype: str) -> np.dtype:
    """The dtype encoder output travels in before the writer rounds it to ``storage_dtype``.

    float16 for a float16 store (the writer then keeps it bit for bit, and the traffic is halved); float32
    otherwise: a bfloat16 value sent through float16 would lose bfloat16's range (above 65,504 it becomes inf),
    and int8 scales are computed from the exact values.
    """
    _check(storage_dtype)
    return np.dtype("<f2") if storage_dtype == "float16" else np.dtype("<f4")


def as_numpy(x) -> np.ndarray:
    """Accept numpy arrays or torch tensors (any device, bf16 included) without importing torch."""
    if hasattr(x, "detach"):  # a torch.Tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def encode_tap(tap: str, x, storage_dtype: str) -> dict[str, np.ndarray]:
    """The on-disk arrays of one chunk of a tap (C-contiguous), keyed as ``on_disk_arrays`` names them."""
    _check(storage_dtype)
    x = as_numpy(x)
    if storage_dtype == "int8":
        q, scale = quantize_int8(x)
        return {tap: q, tap + SCALE_SUFFIX: scale}
    if storage_dtype == "bfloat16":
        return {tap: _to_bf16_bits(x)}
    if storage_dtype in EXACT_DTYPES and not np.can_cast(x.dtype, _ON_DISK[storage_dtype], "same_kind"):
        raise ValueError(f"tap {tap!r} is stored as {storage_dtype} but got {x.dtype} values")
    return {tap: np.ascontiguousarray(x, dtype=_ON_DISK[storage_dtype])}


def decode_tap(tap: str, arrays: dict[str, np.ndarray], storage_dtype: str) -> np.ndarray:
    """What readers return for ``tap`` from its on-disk arrays (see the module doc for the dtypes)."""
    x = arrays[tap]
    if storage_dtype == "int8":
        return dequantize_int8(x, arrays[tap + SCALE_SUFFIX])
    if storage_dtype == "bfloat16":
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x


def round_trip(x, storage_dtype: str) -> np.ndarray:
    """What a reader returns for ``x`` once written with ``storage_dtype``."""
    return decode_tap("x", encode_tap("x", x, storage_dtype), storage_dtype)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: ``x [..., d]`` -> (q int8 ``[..., d]``, scale float16 ``[...]``).

    The scale is rounded to float16 first and q computed against the rounded scale, so decoding multiplies by
    exactly the number that was stored. An all-zero token gets scale 0 and q 0.
    """
    x = np.asarray(x, dtype=np.float32)
    amax = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    if not np.isfinite(amax).all():
        raise ValueError("int8 storage needs finite features; got inf or nan")
    scale = (amax / _INT8_MAX).astype(np.float16)
    # a scale that rounded to 0 (or past float16's range) would lose the token: keep it representable
    scale = np.where(amax > 0, np.clip(scale, _F16_TINY, _F16_MAX), 0).astype(np.float16)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)[..., None]
    q = np.clip(np.rint(x / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale)


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``quantize_int8``: float32 ``[..., d]``."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # round to nearest even on the 16 dropped bits; NaNs keep a quiet-NaN payload
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out
