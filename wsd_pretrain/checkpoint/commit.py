"""Rank 0's commit of a checkpoint whose files every rank has written (docs/checkpoint-format.md).

With every rank's files reported (size and checksum), rank 0 writes the Hugging Face index, the state index, the
JSON state, then ``manifest.json`` **last** and ``manifest.hash`` (the manifest's own checksum), fsyncs every file
and directory, **renames** the staging directory to its final name (the commit), fsyncs ``checkpoints/``, and
points ``latest`` at it (temporary file, fsync, rename, fsync). Before the rename only a staging directory exists,
which no reader looks at; after it the checkpoint is complete.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from . import format as F
from .faults import point
from .layout import SavePlan, itemsize
from .safetensors_io import DEFAULT_CHECKSUM, DTYPE_TO_STR, fsync_dir, write_json

__all__ = ["commit", "manifest_groups", "range_manifest", "state_index", "write_latest"]


def state_index(plan: SavePlan) -> dict[str, Any]:
    """``train_state/state.index.json``: every master and optimizer tensor's shape, dtype and partition (where
    each slice lives), and how many state files each rank wrote."""
    return {
        "format": "wsd_pretrain.state-index",
        "format_version": F.FORMAT_VERSION,
        "world_size": plan.world,
        "files_per_rank": [int(n) for n in plan.files_per_holder],
        "tensors": {
            item.key: {
                "shape": list(item.shape),
                "dtype": DTYPE_TO_STR[item.dtype],
                "partition": item.partition.to_json(),
            }
            for item in plan.state_items
        },
    }


def manifest_groups(plan: SavePlan) -> dict[str, Any]:
    """The manifest's summary of each tensor group."""
    groups: dict[str, Any] = {}
    if plan.model_items:
        groups["model"] = {
            "index": F.index_name("model"),
            "shards": len(plan.model_shards),
            "tensors": len(plan.model_items),
            "bytes": plan.model_bytes(),
            "dtypes": _dtypes(i.dtype for i in plan.model_items),
        }
    for group in ("master", "optimizer"):
        items = [i for i in plan.state_items if i.group == group]
        if items:
            groups[group] = {
                "index": F.STATE_INDEX,
                "tensors": len(items),
                "bytes": sum(i.nbytes for i in items),
                "dtypes": _dtypes(i.dtype for i in items),
            }
    return groups


def range_manifest(
    plan: SavePlan, files: dict[str, dict[str, Any]], reported: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """The manifest's ``ranges``: the range-written model files in plan order, each range-written tensor's writers
    (a partition: which holder wrote which elements) and each holder's record (bytes, checksum of its ranges in
    plan order). Checked against the plan: every holder reported exactly the bytes the plan gives it, and every
    range-written file was created by its owner (``ranged`` in its record)."""
    shards = [s for s in plan.model_shards if s.ranged]
    if not shards:
        if reported:
            raise CheckpointError(f"internal: ranges reported by ranks {sorted(reported)[:3]} of no range-written file")
        return None
    expected = np.zeros(plan.world, dtype=np.int64)
    tensors = {}
    for shard in shards:
        rec = files.get(shard.relpath)
        if rec is None or rec.get("ranged") is not True:
            raise CheckpointError(f"internal: {shard.relpath} was not written by its owner as a range-written file")
        for item in shard.items:
            part = shard.ranged.get(item.name)
            if part is not None:
                tensors[item.name] = part.to_json()
                expected += part.bytes_by_rank(item.numel, plan.world, itemsize(item.dtype))
    got = {int(h): int(rec["bytes"]) for h, rec in reported.items()}
    want = {int(h): int(b) for h, b in enumerate(expected) if b}
    if got != want:
        bad = sorted(h for h in set(got) | set(want) if got.get(h) != want.get(h))
        raise CheckpointError(
            f"internal: ranks {bad[:5]} reported {[got.get(h) for h in bad[:5]]} bytes of ranges, the plan gives "
            f"{[want.get(h) for h in bad[:5]]}"
        )
    return {
        "files": [s.relpath for s in shards],
        "tensors": tensors,
        "holders": {str(h): reported[str(h)] for h in sorted(want)},
    }


def _dtypes(dtypes: Any) -> list[str]:
    return sorted({str(d).removeprefix("torch.") for d in dtypes})


def commit(
    staging: Path,
    final: Path,
    root: Path,
    plan: SavePlan,
    files: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    layout: dict[str, Any],
    tied: dict[str, str],
    request: Any,
    world: int,
    rank0_only: bool,
    fsync: bool,
    checksum: str = DEFAULT_CHECKSUM,
    *,
    latest: bool = True,
    with_rng: bool = True,
    ranges: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write the indexes, the JSON state and the manifest into ``staging`` and rename it to ``final``. ``ranges``:
    every holder's record of its ranges of the range-written model files (``{rank: {"bytes", "hash"}}``)."""
    point("commit-begin")
    files = dict(files)
    ranged = range_manifest(plan, files, ranges or {})

    def add_json(rel: str, data: Any) -> None:
        size, digest = write_json(staging / rel, data, fsync=fsync, checksum=checksum)
        files[rel] = {"size": size, "hash": digest, "rank": 0}

    if plan.model_shards:
        weight_map = {item.name: shard.relpath for shard in plan.model_shards for item in shard.items}
        add_json(F.index_name("model"), {"metadata": {"total_size": plan.model_bytes()}, "weight_map": weight_map})
    if plan.state_items:
        add_json(F.STATE_INDEX, state_index(plan))
    if request.hf_config is not None:
        add_json("config.json", request.hf_config)
    for rel, data in request.extra_json.items():
        add_json(rel, data)
    add_json(f"{F.TRAIN_STATE}/engine.json", meta)
    add_json(f"{F.TRAIN_STATE}/trainer.json", request.trainer)
    manifest = {
        "format": F.FORMAT,
        "format_version": F.FORMAT_VERSION,
        "name": final.name,
        "kinds": list(request.kinds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "position": request.position,
        "step": request.step,
        "tokens": request.tokens,
        "schedule": request.schedule,
        "world_size": int(layout.get("world_size", world)),
        "rng": with_rng,
        "layout": layout | {"write_mode": "rank0" if rank0_only else "parallel"},
        "groups": manifest_groups(plan),
        "state": {"index": F.STATE_INDEX, "world_size": plan.world, "files": int(plan.files_per_holder.sum())}
        if plan.state_items
        else None,
        "master_weights": "master" if any(i.group == "master" for i in plan.state_items) else "model",
        "tied": tied,
        "checksum": checksum,
        "files": dict(sorted(files.items())),
        **({"ranges": ranged} if ranged else {}),
        "versions": _versions(),
        **request.extra_manifest,
    }
    point("manifest-begin")
    _, digest = write_json(staging / F.MANIFEST, manifest, fsync=fsync, checksum=checksum)
    point("manifest-written")
    # the manifest's own checksum, in a file of its own: a flipped byte anywhere in manifest.json is caught
    with open(staging / F.MANIFEST_HASH, "x") as f:
        f.write(f"{checksum} {digest}\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    point("manifest-hash-written")
    if fsync:
        for dirpath, _, _ in os.walk(staging):
            fsync_dir(dirpath)
    os.rename(staging, final)  # the commit
    point(f"renamed:{final.name}")
    if fsync:
        fsync_dir(root)
    if latest:
        write_latest(root, final.name, fsync)
        point(f"latest-written:{final.name}")


def write_latest(root: Path, name: str, fsync: bool = True) -> None:
    """Point ``latest`` at ``name``: a temporary file, fsynced, renamed over the old pointer."""
    tmp = root / f".latest-{uuid.uuid4().hex[:8]}"
    write_json(tmp, {"name": name}, fsync=fsync)
    os.replace(tmp, root / F.LATEST)
    if fsync:
        fsync_dir(root)


def _versions() -> dict[str, str]:
    import platform

    import safetensors

    from .. import __version__

    out = {
        "wsd_pretrain": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    deepspeed = sys.modules.get("deepspeed")  # only when the job uses it (importing it takes seconds)
    if deepspeed is not None:
        out["deepspeed"] = str(getattr(deepspeed, "__version__", "?"))
    return out
