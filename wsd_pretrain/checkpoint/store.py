"""Any range of any tensor of a checkpoint, reading only the bytes it covers (format versions 1 and 2).

A checkpoint holds three groups of tensors: ``model`` (the Hugging Face folder: full tensors named as the model's
parameters), ``master`` (fp32 master weights, when they differ from the model's) and ``optimizer``
(``<param>/<key>``). In version 2 the last two are slices in the files of the rank that held them, described by
``train_state/state.index.json``; in version 1 every tensor is whole, found through a Hugging Face style index.
:class:`CheckpointStore` hides the difference: ``read(group, name, start, numel)`` assembles elements
``[start, start + numel)`` of the flattened tensor from whichever slices overlap them, each read with one
positioned read of exactly its bytes (a resume on the same layout reads each rank's own slices; on another world
size, the overlapping parts of other ranks' slices).

Every file is checked before it is used: its path stays inside the checkpoint and is listed in the manifest, its
header is validated (:func:`~.safetensors_io.read_header`), its tensors are those the index assigns to it with the
index's dtype and element count, and a state file's own metadata (rank, slice starts) agrees with the index.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from . import format as F
from .layout import Partition
from .safetensors_io import STR_TO_DTYPE, SafetensorsReader, read_json

__all__ = ["CheckpointStore", "Entry"]

_STATE_FILE_RE = re.compile(r"^state-r(\d{5})-(\d{5})\.safetensors$")
_MAX_OPEN = 64


@dataclass(frozen=True)
class Entry:
    """One tensor of the checkpoint: full shape, dtype, how it was spread over the saving ranks, and where its
    parts live (``file`` for a whole tensor in a Hugging Face style shard; else the holder ranks' state files)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    partition: Partition
    file: str | None = None  # whole tensors: the shard's path relative to the checkpoint

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class CheckpointStore:
    """Range reads over one checkpoint (see the module docstring). Not thread-safe; close it when done."""

    def __init__(
        self, ckpt: Path, manifest: dict[str, Any], kept: dict[str, list[tuple[int, Any]]] | None = None
    ) -> None:
        self.ckpt, self.manifest = Path(ckpt), manifest
        self.kept = kept or {}
        """``{file: [(offset, bytes)]}`` the verification read (and checksummed): reads are served from them."""
        self.kept_hits = 0
        self.version = int(manifest["format_version"])
        self.groups: dict[str, dict[str, Entry]] = {"model": {}, "master": {}, "optimizer": {}}
        self._readers: OrderedDict[str, SafetensorsReader] = OrderedDict()
        self._checked: set[str] = set()
        self._holder_keys: dict[int, dict[str, str]] = {}  # holder rank -> {key: file}
        self.files_per_rank: list[int] = []
        self.bytes_read = 0
        for group in F.GROUP_NAMES:
            if group in manifest["groups"] and (self.version == 1 or group == "model"):
                self._load_hf_index(group)
        if self.version >= 2 and manifest.get("state"):
            self._load_state_index()

    # ------------------------------------------------------------------ indexes

    def _load_hf_index(self, group: str) -> None:
        rel = F.index_name(group)
        index = read_json(F.safe_path(self.ckpt, rel, "index"))
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{self.ckpt / rel}: weight_map must map tensor names to file names")
        base = F.group_dir(group)
        for name, fname in wm.items():
            if "/" in fname or F.SHARD_RE.match(fname) is None:
                raise CheckpointError(f"{self.ckpt / rel}: shard file name {fname!r} refused")
            path = f"{base}/{fname}" if base else fname
            if path not in self.manifest["files"]:
                raise CheckpointError(f"{self.ckpt / rel}: {fname} is not listed in the manifest")
            # shapes come from the shard's header when first needed; the placeholder is filled by _whole_entry
            self.groups[group][name] = Entry((), torch.float32, Partition(), file=path)

    def _load_state_index(self) -> None:
        rel = F.STATE_INDEX
        where = self.ckpt / rel
        index = read_json(F.safe_path(self.ckpt, rel, "state index"))
        if not isinstance(index, dict) or not isinstance(index.get("tensors"), dict):
            raise CheckpointError(f"{where}: not a state index (no 'tensors' object)")
        counts = index.get("files_per_rank")
        if not isinstance(counts, list) or not all(type(c) is int and c >= 0 for c in counts):
            raise CheckpointError(f"{where}: files_per_rank must be a list of whole numbers")
        self.files_per_rank = counts
        for rank, n in enumerate(counts):
            for k in range(1, n + 1):
                path = F.state_file(rank, k)
                if path not in self.manifest["files"]:
                    raise CheckpointError(f"{where}: {path} is not listed in the manifest")
        for key, info in index["tensors"].items():
            group, _, name = key.partition("/")
            if group not in ("master", "optimizer") or not name:
                raise CheckpointError(f"{where}: tensor key {key!r} must start with master/ or optimizer/")
            if not isinstance(info, dict):
                raise CheckpointError(f"{where}: {key}: not an object")
            shape, dtype = (
                info.get("shape"),
                STR_TO_DTYPE.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None,
            )
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) or dtype is None:
                raise CheckpointError(f"{where}: {key}: needs a shape (whole numbers) and a safetensors dtype")
            numel = math.prod(shape)
            part = Partition.from_json(info.get("partition"), numel, f"{where}: {key}")
            for _, _, r in part.iter_parts(numel, len(counts)):
                if r >= len(counts) or counts[r] == 0:
                    raise CheckpointError(f"{where}: {key}: a part is held by rank {r}, which wrote no state file")
            self.groups[group][name] = Entry(tuple(shape), dtype, part)

    def _whole_entry(self, group: str, name: str) -> Entry:
        entry = self.groups[group][name]
        if entry.file is not None and entry.file not in self._checked:
            self._check_hf_file(group, entry.file)
        return self.groups[group][name]

    def _check_hf_file(self, group: str, path: str) -> None:
        """A whole-tensor shard: it must hold exactly the tensors its index lists; fill in their shapes."""
        reader = self._reader(path)
        listed = {n for n, e in self.groups[group].items() if e.file == path}
        if set(reader.keys()) != listed:
            raise CheckpointError(f"{reader.path}: holds {len(reader.keys())} tensors, the index lists {len(listed)}")
        for name in listed:
            info = reader.header.tensors[name]
            numel = math.prod(info.shape)
            self.groups[group][name] = Entry(info.shape, info.dtype, Partition.whole(0, numel), file=path)
        self._checked.add(path)

    # ------------------------------------------------------------------ files

    def _reader(self, path: str) -> SafetensorsReader:
        reader = self._readers.get(path)
        if reader is None:
            if path not in self.manifest["files"]:
                raise CheckpointError(f"{self.ckpt}: {path} is not listed in the manifest")
            reader = SafetensorsReader(F.safe_path(self.ckpt, path, "checkpoint file"), self.kept.get(path, ()))
            self._readers[path] = reader
            while len(self._readers) > _MAX_OPEN:
                _, old = self._readers.popitem(last=False)
                self.kept_hits += old.kept_hits
                old.close()
        else:
            self._readers.move_to_end(path)
        return reader

    def _holder(self, rank: int) -> dict[str, str]:
        """``{key: file}`` for one holder rank's state files, each checked against the index."""
        keys = self._holder_keys.get(rank)
        if keys is not None:
            return keys
        keys = {}
        if rank >= len(self.files_per_rank):
            raise CheckpointError(f"{self.ckpt}: no state files for rank {rank}")
        for k in range(1, self.files_per_rank[rank] + 1):
            path = F.state_file(rank, k)
            reader = self._reader(path)
            meta = _state_meta(reader, rank)
            for key, info in reader.header.tensors.items():
                group, _, name = key.partition("/")
                entry = self.groups.get(group, {}).get(name) if group in ("master", "optimizer") else None
                local = entry.partition.local(rank, entry.numel) if entry is not None else None
                start = meta.get(key)
                if entry is None or local is None or start != local[0] or math.prod(info.shape) != local[1]:
                    raise CheckpointError(
                        f"{reader.path}: tensor {key!r} ({math.prod(info.shape)} elements from {start}) is not a "
                        "slice the state index gives this rank"
                    )
                if info.dtype != entry.dtype:
                    raise CheckpointError(f"{reader.path}: {key!r} is {info.dtype}, the state index says {entry.dtype}")
                keys[key] = path
        self._holder_keys[rank] = keys
        return keys

    # ------------------------------------------------------------------ the public surface

    def names(self, group: str) -> list[str]:
        return list(self.groups[group])

    def has(self, group: str, name: str) -> bool:
        return name in self.groups[group]

    def entry(self, group: str, name: str) -> Entry:
        if name not in self.groups[group]:
            raise CheckpointError(f"{self.ckpt}: the checkpoint has no {group} tensor {name!r}")
        return self._whole_entry(group, name)

    def optimizer_keys(self) -> dict[str, list[str]]:
        """``{param: [state keys]}`` of the optimizer group, in the checkpoint's order."""
        out: dict[str, list[str]] = {}
        for full in self.groups["optimizer"]:
            pname, _, key = full.rpartition("/")
            out.setdefault(pname, []).append(key)
        return out

    def read(self, group: str, name: str, start: int = 0, numel: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the flattened tensor (1-D); ``numel=None``: the whole tensor in
        its shape."""
        entry = self.entry(group, name)
        whole = numel is None
        n = entry.numel - start if numel is None else numel
        if start < 0 or n < 0 or start + n > entry.numel:
            raise CheckpointError(f"{group} tensor {name!r} has {entry.numel} elements; [{start}, {start + n}) refused")
        if entry.file is not None:
            out = self._reader(entry.file).read_range(name, start, n)
        else:
            parts = self._overlapping(entry, start, start + n)
            if len(parts) == 1 and parts[0][0] <= start and start + n <= parts[0][0] + parts[0][1]:
                # one slice holds it all: read without an assembly buffer (from the bytes the verification kept,
                # a view: no copy)
                p_start, _, rank = parts[0]
                path = self._holder(rank).get(f"{group}/{name}")
                if path is None:
                    raise CheckpointError(f"{self.ckpt}: rank {rank}'s state files lack {group}/{name}")
                out = self._reader(path).read_range(f"{group}/{name}", start - p_start, n)
                self.bytes_read += out.numel() * out.element_size()
                return out.view(entry.shape) if whole else out
            out = torch.empty(n, dtype=entry.dtype)
            for p_start, p_numel, rank in parts:
                lo, hi = max(start, p_start), min(start + n, p_start + p_numel)
                path = self._holder(rank).get(f"{group}/{name}")
                if path is None:
                    raise CheckpointError(f"{self.ckpt}: rank {rank}'s state files lack {group}/{name}")
                self._reader(path).read_range(
                    f"{group}/{name}", lo - p_start, hi - lo, out=out[lo - start : hi - start]
                )
        self.bytes_read += out.numel() * out.element_size()
        return out.view(entry.shape) if whole else out

    @staticmethod
    def _overlapping(entry: Entry, lo: int, hi: int) -> list[tuple[int, int, int]]:
        p = entry.partition
        if hi <= lo:
            return []
        if p.chunk:
            first, last = lo // p.chunk, (hi - 1) // p.chunk
            out = []
            for i in range(first, last + 1):
                s = i * p.chunk
                out.append((s, min(p.chunk, entry.numel - s), p.ranks[i] if p.ranks else i))
            return out
        starts = [s for s, _, _ in p.parts]
        i = max(0, bisect.bisect_right(starts, lo) - 1)
        out = []
        while i < len(p.parts) and p.parts[i][0] < hi:
            if p.parts[i][0] + p.parts[i][1] > lo:
                out.append(p.parts[i])
            i += 1
        return out

    def check_all(self) -> None:
        """Open and check every file the indexes name (``wsd-pretrain ckpt verify``)."""
        for group in ("model", "master", "optimizer"):
            for name in list(self.groups[group]):
                self.entry(group, name)
        for rank, n in enumerate(self.files_per_rank):
            if n:
                held = self._holder(rank)
                for group in ("master", "optimizer"):
                    for name, entry in self.groups[group].items():
                        if entry.file is None and entry.partition.local(rank, entry.numel) is not None:
                            if f"{group}/{name}" not in held:
                                raise CheckpointError(f"{self.ckpt}: rank {rank}'s state files lack {group}/{name}")

    def close(self) -> None:
        for reader in self._readers.values():
            self.kept_hits += reader.kept_hits
            reader.close()
        self._readers.clear()
        self.kept = {}

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _state_meta(reader: SafetensorsReader, rank: int) -> dict[str, int]:
    """A state file's own description of its slices: ``{key: start}``; its rank must be ``rank``."""
    raw = reader.header.metadata.get("wsd_pretrain")
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("rank") != rank or not isinstance(meta.get("starts"), dict):
        raise CheckpointError(f"{reader.path}: its metadata does not describe rank {rank}'s slices")
    starts = meta["starts"]
    if not all(isinstance(k, str) and type(v) is int for k, v in starts.items()):
        raise CheckpointError(f"{reader.path}: slice starts must be whole numbers")
    return starts
