"""The manifest: one parquet part per committed batch, one row per input video of that batch.

Columns: video_id (original id), key (safe key), path, status ("ok" | "failed"), error ("" when ok),
n_frames, duration_s, native_fps, shard (file name, None for failed rows), start, length (frame range
inside a Zarr shard; start is 0 for WebDataset), bytes (uncompressed stored bytes of the video's arrays).
A video may appear in several parts (failed, then retried); the row in the highest part wins, and
within a part the later row wins.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .layout import MANIFEST_DIR, part_indices, part_name, temp_name

SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("key", pa.string()),
    ("path", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_frames", pa.int64()),
    ("duration_s", pa.float64()),
    ("native_fps", pa.float64()),
    ("shard", pa.string()),
    ("start", pa.int64()),
    ("length", pa.int64()),
    ("bytes", pa.int64()),
])
COLUMNS = SCHEMA.names


def write_part(root: Path, index: int, rows: list[dict]) -> Path:
    """Write `manifest/part-<index>.parquet` atomically (temp file, fsync, rename); this commits the batch."""
    folder = Path(root) / MANIFEST_DIR
    folder.mkdir(exist_ok=True)
    final = folder / part_name(index)
    tmp = Path(temp_name(str(final)))
    table = pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=SCHEMA)
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


def read_all(root: Path) -> pd.DataFrame:
    """Every committed row in commit order (part index, then row order), with a `part` column.

    The parts are read together by a threaded Arrow scan (a 100,000-video store written by parallel writers has
    thousands of parts; reading them one by one into pandas took ~3 s, this ~0.6 s: benchmarks/manifest_scale.py).
    """
    indices = part_indices(root)
    if not indices:
        empty = SCHEMA.empty_table().to_pandas()
        empty["part"] = pd.Series(dtype="int64")
        return empty
    import numpy as np
    import pyarrow.dataset as pds

    folder = Path(root) / MANIFEST_DIR
    files = [str(folder / part_name(index)) for index in indices]
    index_of = dict(zip(files, indices))
    batches, parts = [], []
    for tagged in pds.dataset(files, schema=SCHEMA, format="parquet").scanner(use_threads=True).scan_batches():
        batches.append(tagged.record_batch)
        parts.append(np.full(tagged.record_batch.num_rows, index_of[tagged.fragment.path], np.int64))
    table = pa.Table.from_batches(batches, schema=SCHEMA).append_column("part", pa.array(np.concatenate(parts)))
    rows = table.to_pandas()
    return rows.sort_values("part", kind="stable").reset_index(drop=True)


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """Keep the last row per video_id (rows must be in commit order)."""
    return rows.drop_duplicates("video_id", keep="last").reset_index(drop=True)
