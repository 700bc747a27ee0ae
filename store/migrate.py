"""`migrate_v1(root)`: turn a store written before stream groups (format 1) into a format-2 store, in place.

Format 1 kept one encoder's shards and manifest at the top level. Migrating moves them, unchanged, into
`groups/eva/`, writes that group's `group.json` and then the new `store.json` (last, so an interrupted
migration is still a format-1 store on disk; running it again finishes the move). Nothing is re-encoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import info as store_info
from . import layout
from .errors import StoreError


def migrate_v1(root) -> list[str]:
    """Migrate the store at `root`; returns what was moved (relative names). A format-2 store is left as is."""
    root = Path(root)
    old = store_info.read_store_json(root)
    if not store_info.is_v1(old):
        return []
    group = store_info.v1_group(root, old)
    target = store_info.group_dir(root, store_info.V1_GROUP)
    if target.exists() and not (target / store_info.GROUP_JSON).is_file() and any(target.iterdir()):
        raise StoreError(f"{target} exists and is not a group from an earlier migration; move it away first")
    target.mkdir(parents=True, exist_ok=True)
    fingerprint = {k: v for k, v in group.fingerprint.items() if k not in store_info.SAMPLING_KEYS}
    new_group = store_info.GroupInfo(group.name, target, group.kind, group.format, fingerprint, group.taps,
                                     group.created)
    layout.write_json_atomic(target / store_info.GROUP_JSON, new_group.to_json())
    moved = []
    for entry in sorted(root.iterdir()):
        if entry.name == layout.MANIFEST_DIR or entry in layout.shard_paths(root):
            os.replace(entry, target / entry.name)
            moved.append(entry.name)
    new = {"format_version": store_info.FORMAT_VERSION, "sampling": store_info.v1_sampling(old),
           "created": old.get("created"), "migrated_from_format_1": layout.now_iso()}
    layout.write_json_atomic(root / layout.STORE_JSON, new)
    return moved
