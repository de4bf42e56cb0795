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

import numpy as np
import torch

from ..errors import CheckpointError
from . import format as F
from .layout import Box, Partition, intersect, runs
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
        self.opened: set[str] = set()  # every file a read opened (a same-mesh resume: the rank's own state files)
        for group in F.GROUP_NAMES:
            if group in manifest["groups"] and (self.version == 1 or group == "model"):
                self._load_hf_index(group)
        if self.version >= 2 and manifest.get("state"):
            self._load_state_index()

    # ------------------------------------------------------------------ indexes

    def _load_hf_index(self, group: str) -> None:
        rel = F.index_name(group)
        index = self._json(rel, "index")
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
        index = self._json(rel, "state index")
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
            part = Partition.from_json(info.get("partition"), numel, f"{where}: {key}", tuple(shape))
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

    def _json(self, rel: str, what: str) -> Any:
        """An index file's JSON (a store over object storage fetches it: :mod:`.objread`)."""
        return read_json(F.safe_path(self.ckpt, rel, what))

    def _open(self, path: str) -> SafetensorsReader:
        """A reader of one listed safetensors file, served from the kept bytes where they hold a range."""
        return SafetensorsReader(F.safe_path(self.ckpt, path, "checkpoint file"), self.kept.get(path, ()))

    def _reader(self, path: str) -> SafetensorsReader:
        reader = self._readers.get(path)
        if reader is None:
            if path not in self.manifest["files"]:
                raise CheckpointError(f"{self.ckpt}: {path} is not listed in the manifest")
            reader = self._open(path)
            self._readers[path] = reader
            self.opened.add(path)
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
            meta, boxes = _state_meta(reader, rank)
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
                box = entry.partition.box_of(rank)
                if box is not None and boxes.get(key) != [list(box[0]), list(box[1])]:
                    raise CheckpointError(
                        f"{reader.path}: tensor {key!r} is the box {boxes.get(key)} by its own metadata, the state "
                        f"index gives this rank {[list(box[0]), list(box[1])]}"
                    )
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

    def read(
        self, group: str, name: str, start: int = 0, numel: int | None = None, box: Box | None = None
    ) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of the row-major elements of ``box`` (``(offsets, lengths)``; None:
        the whole tensor), as a 1-D tensor; ``numel=None``: the whole box, in its shape.

        Box intersection: each stored part (a box with a flat range inside it; a Hugging Face tensor is its whole
        box) that meets the target is read as the runs that are contiguous in both, each with one positioned read
        of exactly its bytes, straight into place."""
        entry = self.entry(group, name)
        shape = entry.shape
        if box is None:
            box = ((0,) * len(shape), shape)
        elif (
            len(box[0]) != len(shape)
            or len(box[1]) != len(shape)
            or any(o < 0 or n < 0 or o + n > s for o, n, s in zip(box[0], box[1], shape))
        ):
            raise CheckpointError(f"{group} tensor {name!r} of shape {list(shape)}: box {box} refused")
        box_numel = math.prod(box[1])
        whole = numel is None
        n = box_numel - start if numel is None else numel
        if start < 0 or n < 0 or start + n > box_numel:
            raise CheckpointError(f"{group} tensor {name!r} has {box_numel} elements; [{start}, {start + n}) refused")
        key = f"{group}/{name}"
        parts = self._parts(entry, box, start, n)
        if len(parts) == 1:
            p_offs, p_lens, p_start, p_numel, rank = parts[0]
            if (
                tuple(p_offs) == tuple(box[0])
                and tuple(p_lens) == tuple(box[1])
                and p_start <= start
                and start + n <= p_start + p_numel
            ):
                # one stored part holds it all in the same order: read without an assembly buffer (from the bytes
                # the verification kept, a view: no copy)
                if entry.file is not None:
                    out = self._reader(entry.file).read_range(name, start, n)
                else:
                    path = self._holder(rank).get(key)
                    if path is None:
                        raise CheckpointError(f"{self.ckpt}: rank {rank}'s state files lack {key}")
                    out = self._reader(path).read_range(key, start - p_start, n)
                self.bytes_read += out.numel() * out.element_size()
                return out.view(box[1]) if whole else out
        out = torch.empty(n, dtype=entry.dtype)
        for p_offs, p_lens, p_start, p_numel, rank in parts:
            common = intersect(box, (p_offs, p_lens)) if box_numel else None
            if common is None:
                continue
            if entry.file is not None:
                reader, stored = self._reader(entry.file), name
            else:
                path = self._holder(rank).get(key)
                if path is None:
                    raise CheckpointError(f"{self.ckpt}: rank {rank}'s state files lack {key}")
                reader, stored = self._reader(path), key
            length, at, (src,) = runs(common, box, (p_offs, p_lens))
            # each run clipped to the target's flat range and to the part's (both contiguous along a run)
            lo = np.maximum(0, np.maximum(start - at, p_start - src))
            hi = np.minimum(length, np.minimum(start + n - at, p_start + p_numel - src))
            reads = _coalesced(at + lo - start, src + lo - p_start, hi - lo)
            first, last = (reads[0][1], reads[-1][1] + reads[-1][2]) if reads else (0, 0)
            if len(reads) > SPAN_READS and last - first <= SPAN_FACTOR * sum(k for _, _, k in reads):
                # many short runs close together (a column block of a row block, read out of a Hugging Face file
                # row by row): one read of the span they lie in, then copies from memory
                span = reader.read_range(stored, first, last - first)
                for a, s, k in reads:
                    out[a : a + k] = span[s - first : s - first + k]
                continue
            for a, s, k in reads:
                reader.read_range(stored, s, k, out=out[a : a + k])
        self.bytes_read += out.numel() * out.element_size()
        return out.view(box[1]) if whole else out

    def _parts(
        self, entry: Entry, box: Box, start: int, n: int
    ) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int, int]]:
        """The stored parts that may meet the target (a superset; box intersection decides): a Hugging Face tensor's
        one box; a grid's neighbouring boxes; flat parts within the target's first and last element."""
        shape, p = entry.shape, entry.partition
        if entry.file is not None:
            return [((0,) * len(shape), shape, 0, entry.numel, 0)]
        if p.grid is not None:
            out = []
            for coord in p.grid.overlapping(box):
                offsets, lengths = p.grid.box(coord)
                if math.prod(lengths):
                    out.append((offsets, lengths, 0, math.prod(lengths), p.grid.rank_at(coord)))
            return out
        # flat parts of the whole tensor: the target's elements lie between its first and last one
        if n == 0:
            return []
        strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
        first = np.unravel_index(start, box[1]) if box[1] else ()
        last = np.unravel_index(start + n - 1, box[1]) if box[1] else ()
        lo = sum((box[0][d] + int(first[d])) * strides[d] for d in range(len(shape)))
        hi = sum((box[0][d] + int(last[d])) * strides[d] for d in range(len(shape))) + 1
        zero = (0,) * len(shape)
        return [(zero, shape, s, k, r) for s, k, r in self._overlapping(entry, lo, hi)]

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


SPAN_READS = 4
"""More runs than this of one stored part, lying within :data:`SPAN_FACTOR` times their bytes, are read as one span."""
SPAN_FACTOR = 4


def _coalesced(dst: np.ndarray, src: np.ndarray, count: np.ndarray) -> list[tuple[int, int, int]]:
    """``(target offset, stored offset, elements)`` reads, adjacent runs (contiguous in both) merged into one."""
    keep = count > 0
    dst, src, count = dst[keep], src[keep], count[keep]
    if dst.size == 0:
        return []
    joins = (dst[1:] == dst[:-1] + count[:-1]) & (src[1:] == src[:-1] + count[:-1])
    firsts = np.flatnonzero(np.concatenate([[True], ~joins]))
    ends = np.concatenate([firsts[1:], [dst.size]])
    totals = np.add.reduceat(count, firsts)
    return [(int(dst[f]), int(src[f]), int(t)) for f, t in zip(firsts, totals)] if ends.size else []


def _state_meta(reader: SafetensorsReader, rank: int) -> tuple[dict[str, int], dict[str, Any]]:
    """A state file's own description of its slices: ``{key: start}`` and (format 3) ``{key: [offsets, lengths]}``
    of each grid part; its rank must be ``rank``."""
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
    boxes = meta.get("boxes", {})  # format 3: a grid part's box, [offsets, lengths]
    if not isinstance(boxes, dict):
        raise CheckpointError(f"{reader.path}: slice boxes must be an object")
    return starts, boxes
