"""Storage dtypes: how feature arrays are cast on write and decoded on read, in one place.

bfloat16 has no numpy dtype, so it is stored as the upper 16 bits of the float32 pattern in a uint16
array (rounded to nearest even) and decoded back to float32 on read.

The writer rounds with ``encode``; readers undo the representation with ``decode``; ``round_trip`` is the
two together, for code that computes features on the spot and must see the numbers a store would give
(``dualfocus ask``). ``transfer_dtype`` is what encoder output travels in before the writer rounds it.
"""

from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float16", "bfloat16", "float32")

# numpy dtype actually written to disk for each storage dtype name
_ON_DISK = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}


def on_disk_dtype(storage_dtype: str) -> np.dtype:
    """The numpy dtype of the stored arrays for `storage_dtype` (bfloat16 -> uint16)."""
    return _ON_DISK[storage_dtype]


def transfer_dtype(storage_dtype: str) -> np.dtype:
    """The dtype encoder output travels in on its way to the writer.

    float16 for a float16 store (the writer then keeps it bit for bit, and the traffic is halved); float32
    otherwise: a bfloat16 value sent through float16 would lose bfloat16's range (above 65,504 it becomes inf).
    """
    _check(storage_dtype)
    return np.dtype("<f2") if storage_dtype == "float16" else np.dtype("<f4")


def round_trip(x, storage_dtype: str) -> np.ndarray:
    """What a reader returns for ``x`` once written with ``storage_dtype`` (float16 as float16, else float32)."""
    return decode(encode(as_numpy(x), storage_dtype), storage_dtype)


def _check(storage_dtype: str) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {list(STORAGE_DTYPES)}, got {storage_dtype!r}")


def as_numpy(x) -> np.ndarray:
    """Accept numpy arrays or torch tensors (any device, bf16 included) without importing torch."""
    if hasattr(x, "detach"):  # a torch.Tensor
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def encode(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Cast a float array of any dtype to its on-disk representation, C-contiguous."""
    _check(storage_dtype)
    if storage_dtype == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        # round to nearest even on the 16 dropped bits; NaNs keep a quiet-NaN payload
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out = rounded.astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            out[nan] = np.uint16(0x7FC0)
        return out
    return np.ascontiguousarray(x, dtype=_ON_DISK[storage_dtype])


def decode(x: np.ndarray, storage_dtype: str) -> np.ndarray:
    """On-disk array -> what readers return: float16 as stored, bfloat16 and float32 as float32."""
    if storage_dtype == "bfloat16":
        return (x.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x
