"""WebDataset backend: one tar per shard, one sample per video.

    shard-000003.tar
      KEY.semantic.npy        [t, P, D]   one member per array of the shard (a tap, its int8 scales, ...)
      KEY.spatiotemporal.npy  [t, M, D]
      KEY.timestamps.npy      [t] float32
      KEY.json                video_id, path, n_frames, duration_s, native_fps, length, dtype

While a video arrives in chunks each array is spooled to a raw file next to the temp tar (memory is
bounded by one chunk); when the video ends the .npy header is prepended on the fly and the member is
streamed into the tar. Nothing is ever pickled: headers are plain .npy, readers refuse object dtypes.
Readers index member offsets from the tar headers once per shard and memory-map single members.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
from numpy.lib import format as npy

from .protocols import TIMESTAMPS, ArraySpec, Extent


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False,
                                     "shape": shape})
    return buf.getvalue()


class _Concat:
    """Minimal read-only stream: a bytes prefix followed by an open file (what tarfile.addfile reads)."""

    def __init__(self, prefix: bytes, rest):
        self.parts = [io.BytesIO(prefix), rest]

    def read(self, n: int) -> bytes:
        """Up to `n` bytes; fewer only at the end of the last part (tarfile needs full reads)."""
        out = bytearray()
        while self.parts and len(out) < n:
            data = self.parts[0].read(n - len(out))
            if data:
                out += data
            else:
                self.parts.pop(0)
        return bytes(out)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(time.time()), 0o644
    return info


class TarShardWriter:
    """Implements `ShardWriter` for WebDataset tars."""

    def __init__(self, path: Path, *, arrays: dict[str, ArraySpec], attributes: dict):
        self.tar = tarfile.open(str(path), "w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20)
        self.spool_dir = Path(f"{path}.spool")
        self.specs = dict(arrays)
        self.attributes = attributes
        self.key = ""
        self.frames = 0
        self.spools: dict = {}

    def begin(self, key: str) -> None:
        self.spool_dir.mkdir(exist_ok=True)
        self.key, self.frames = key, 0
        self.spools = {name: open(self.spool_dir / f"{name}.raw", "w+b") for name in self.specs}

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        for name in self.specs:
            self.spools[name].write(memoryview(np.ascontiguousarray(chunk[name])).cast("B"))
        self.frames += len(chunk[TIMESTAMPS])

    def end(self, meta: dict) -> Extent:
        for name, spec in self.specs.items():
            spool = self.spools[name]
            size = spool.tell()
            spool.seek(0)
            header = _npy_header(spec.dtype, (self.frames, *spec.tail))
            self.tar.addfile(_tarinfo(f"{self.key}.{name}.npy", len(header) + size),
                             _Concat(header, spool))
        sidecar = {**meta, **self.attributes, "key": self.key, "length": self.frames}
        sidecar = json.dumps(sidecar, sort_keys=True).encode()
        self.tar.addfile(_tarinfo(f"{self.key}.json", len(sidecar)), io.BytesIO(sidecar))
        self._drop_spools()
        return Extent(key=self.key, start=0, length=self.frames)

    def abort(self) -> None:
        self._drop_spools()

    def close(self) -> None:
        self.tar.close()
        shutil.rmtree(self.spool_dir, ignore_errors=True)

    def release(self) -> None:
        for spool in self.spools.values():
            spool.close()
        self.tar.fileobj.close()

    def _drop_spools(self) -> None:
        for spool in self.spools.values():
            spool.close()
            Path(spool.name).unlink(missing_ok=True)
        self.spools = {}


class TarShardReader:
    """Implements `ShardReader` for WebDataset tars."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._members: dict[str, tuple[int, int]] | None = None

    @property
    def members(self) -> dict[str, tuple[int, int]]:
        """Member name -> (data offset, size), from one pass over the tar headers (data is skipped)."""
        if self._members is None:
            with tarfile.open(self.path, "r:") as tar:
                self._members = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        return self._members

    def read(self, extent: Extent, names, frame_indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
        return {name: self._read_npy(f"{extent.key}.{name}.npy", frame_indices) for name in names}

    def order(self, extents: list[Extent]) -> list[Extent]:
        return sorted(extents, key=lambda e: self.members[f"{e.key}.{TIMESTAMPS}.npy"][0])

    def _read_npy(self, member: str, frame_indices: np.ndarray | None) -> np.ndarray:
        if member not in self.members:
            raise KeyError(f"{self.path} has no member {member}")
        offset, size = self.members[member]
        with open(self.path, "rb") as f:
            f.seek(offset)
            version = npy.read_magic(f)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            data_offset = f.tell()
        if dtype.hasobject or fortran:
            raise ValueError(f"{self.path}:{member} is not a plain C-order numeric array")
        if data_offset + int(np.prod(shape)) * dtype.itemsize > offset + size:
            raise ValueError(f"{self.path}:{member} is truncated")
        if 0 in shape:
            full = np.empty(shape, dtype)
        else:
            full = np.memmap(self.path, dtype=dtype, mode="r", offset=data_offset, shape=shape)
        return np.array(full if frame_indices is None else full[frame_indices])
