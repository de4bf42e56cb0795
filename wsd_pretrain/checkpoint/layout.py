"""Where every byte of a checkpoint comes from and goes to: partitions, items and the save plan (pure functions).

A training job's state is a list of :class:`Item`: one tensor each (a model weight, an fp32 master weight, one
optimizer moment), with its full shape and a :class:`Partition` saying which ranks hold which elements. Elements
are counted in the tensor's flattened, row-major order, so one description covers DeepSpeed ZeRO-1/2 (a parameter's
fragment of a flat partition), ZeRO-3 (``ceil(numel / world)`` elements per rank) and FSDP2 (``ceil(rows / world)``
rows per rank): each is a set of contiguous element ranges. Learnt from Megatron-core's ``ShardedTensor``
(``flattened_range``) and DCP's chunk metadata, without their pickles.

:func:`plan_save` turns the items into files, identically on every rank and without communication:

* the model group becomes a Hugging Face folder of full tensors, cut into shards in parameter order; each shard has
  one owner rank (balanced by bytes), which writes its header and the tensors it does not share. With ``ranged``
  (a running job's save) a partitioned model tensor is not moved at all: each holder writes its own contiguous
  byte range of the shard file in place (``pwrite``), and a replicated tensor larger than one rank's share is cut
  into ``world`` ranges written by every rank (docs/checkpoint-format.md, "Range-written model files"); the shards
  are then cut at ``max_shard_bytes``, or sooner where their owner's own bytes reach ``model bytes / world``.
  Without it (converters, ``write_mode: rank0``) a shard is cut at ``min(max_shard_bytes, model bytes / world)``
  (about one shard per rank) and a partitioned tensor travels to its owner (a gather);
* master weights and optimizer state are written by the rank that holds them, as 1-D slices in that rank's own
  files (``train_state/state-r<rank>-<k>.safetensors``, cut at the shard size); a replicated tensor (DDP, a 0-d Adam
  step) is written once, by the rank with the fewest bytes so far.

Everything here is arithmetic on shapes: ``tools/scale_report.py`` runs the same functions for a 70B model on
1,024 ranks to produce docs/scale.md.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "GROUPS",
    "Grid",
    "Item",
    "ModelShard",
    "Partition",
    "SavePlan",
    "StateFile",
    "chunked",
    "fsdp_rows",
    "moved_bytes",
    "plan_save",
    "range_partition",
    "runs",
    "zero3_chunks",
    "zero12_fragments",
]

GROUPS = ("model", "master", "optimizer")
MIN_MODEL_SHARD = 2**20


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


Box = tuple[tuple[int, ...], tuple[int, ...]]
"""A box of a tensor: ``(offsets, lengths)``, one of each per dimension."""


def chunk_piece(size: int, count: int, index: int) -> tuple[int, int]:
    """``(offset, length)`` of piece ``index`` when ``torch.chunk`` cuts ``size`` into ``count`` (``ceil`` pieces;
    pieces past the end are empty): what DTensor's ``Shard`` and FSDP2 do along one dimension."""
    piece = -(-size // count) if count else size
    lo = min(index * piece, size)
    return lo, min(lo + piece, size) - lo


@dataclass(frozen=True)
class Grid:
    """Boxes by rule (format 3): a tensor of ``shape`` cut on a device mesh of ``mesh`` shape whose coordinates are
    the global ranks ``ranks`` (row-major; None: ``0 .. n-1``). ``dims[d]`` lists the mesh dimensions that cut tensor
    dimension ``d``, outermost first, each by :func:`chunk_piece` inside the piece before it (tensor parallelism,
    then FSDP2 cutting the TP-local tensor: DTensor's ``_StridedShard``). A mesh dimension that cuts nothing holds
    replicas: coordinate 0 along it is the holder, so a TP-replicated tensor is written once. The rule is O(1) per
    tensor whatever the world size (DCP writes one chunk entry per rank and tensor)."""

    shape: tuple[int, ...]
    mesh: tuple[int, ...]
    ranks: tuple[int, ...] | None
    dims: tuple[tuple[int, ...], ...]

    def coord(self, rank: int) -> tuple[int, ...] | None:
        """This rank's mesh coordinate, or None when the mesh does not hold it."""
        if self.ranks is None:
            if not 0 <= rank < math.prod(self.mesh):
                return None
            flat = rank
        else:
            try:
                flat = self.ranks.index(rank)
            except ValueError:
                return None
        return tuple(int(c) for c in np.unravel_index(flat, self.mesh)) if self.mesh else ()

    def rank_at(self, coord: Sequence[int]) -> int:
        flat = int(np.ravel_multi_index(tuple(coord), self.mesh)) if self.mesh else 0
        return self.ranks[flat] if self.ranks is not None else flat

    @property
    def cutting(self) -> set[int]:
        return {m for dims in self.dims for m in dims}

    def box(self, coord: Sequence[int]) -> Box:
        offsets, lengths = [], []
        for size, dims in zip(self.shape, self.dims):
            off, n = 0, size
            for m in dims:
                o, n = chunk_piece(n, self.mesh[m], coord[m])
                off += o
            offsets.append(off)
            lengths.append(n)
        return tuple(offsets), tuple(lengths)

    def holder_coords(self) -> Iterator[tuple[int, ...]]:
        """Every coordinate that holds (and writes) a box: 0 along the mesh dimensions that cut nothing."""
        cut = self.cutting
        ranges = [range(n) if m in cut else range(1) for m, n in enumerate(self.mesh)]
        yield from itertools.product(*ranges)

    def overlapping(self, target: Box) -> Iterator[tuple[int, ...]]:
        """The holder coordinates whose boxes meet ``target`` (only those: a read touches its neighbours, not every
        rank of the mesh)."""
        per_dim = [
            self._pieces(self.shape[d], dims, target[0][d], target[0][d] + target[1][d])
            for d, dims in enumerate(self.dims)
        ]
        for combo in itertools.product(*per_dim):
            coord = [0] * len(self.mesh)
            for part in combo:
                for m, i in part.items():
                    coord[m] = i
            yield tuple(coord)

    def _pieces(self, size: int, dims: tuple[int, ...], lo: int, hi: int) -> list[dict[int, int]]:
        """The coordinates (along ``dims``, nested) of the pieces of one tensor dimension that meet ``[lo, hi)``."""
        level: list[tuple[int, int, dict[int, int]]] = [(0, size, {})]
        for m in dims:
            count, nxt = self.mesh[m], []
            for off, n, chosen in level:
                piece = -(-n // count)
                if piece == 0:
                    continue
                for i in range(max(0, (lo - off) // piece), min(count - 1, (hi - 1 - off) // piece) + 1):
                    o, k = chunk_piece(n, count, i)
                    nxt.append((off + o, k, {**chosen, m: i}))
            level = nxt
        return [chosen for off, n, chosen in level if n and off < hi and off + n > lo]

    def to_json(self) -> dict:
        out: dict = {"mesh": list(self.mesh), "dims": [list(d) for d in self.dims]}
        if self.ranks is not None:
            out["ranks"] = list(self.ranks)
        return out

    @staticmethod
    def from_json(data: object, shape: tuple[int, ...], where: str) -> Grid:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: grid must be an object")
        mesh, dims, ranks = data.get("mesh"), data.get("dims"), data.get("ranks")
        if not isinstance(mesh, list) or not mesh or not all(type(m) is int and m > 0 for m in mesh):
            raise CheckpointError(f"{where}: grid mesh must be a list of sizes > 0")
        if (
            not isinstance(dims, list)
            or len(dims) != len(shape)
            or not all(isinstance(d, list) and all(type(m) is int and 0 <= m < len(mesh) for m in d) for d in dims)
        ):
            raise CheckpointError(f"{where}: grid dims must list, for each of the {len(shape)} dimensions, mesh dims")
        flat = [m for d in dims for m in d]
        if len(flat) != len(set(flat)):
            raise CheckpointError(f"{where}: a mesh dimension cuts the tensor twice")
        if ranks is not None and (
            not isinstance(ranks, list)
            or len(ranks) != math.prod(mesh)
            or not all(type(r) is int and r >= 0 for r in ranks)
            or len(set(ranks)) != len(ranks)
        ):
            raise CheckpointError(f"{where}: grid ranks must list a distinct rank for every mesh coordinate")
        return Grid(shape, tuple(mesh), tuple(ranks) if ranks is not None else None, tuple(tuple(d) for d in dims))

    def lengths_by_coord(self) -> np.ndarray:
        """Elements of each holder's box, as an array of the mesh's shape (0 where a coordinate writes nothing):
        vectorised, so that a plan at 16,384 ranks stays arithmetic."""
        out = np.ones(self.mesh, dtype=np.int64)
        for size, dims in zip(self.shape, self.dims):
            lengths = np.full(self.mesh, size, dtype=np.int64)
            for m in dims:
                count = self.mesh[m]
                piece = -(-lengths // count)
                idx = np.arange(count).reshape([count if i == m else 1 for i in range(len(self.mesh))])
                lo = np.minimum(idx * piece, lengths)
                lengths = np.minimum(lo + piece, lengths) - lo
            out *= lengths
        for m, n in enumerate(self.mesh):
            if m not in self.cutting and n > 1:
                sel = [slice(None)] * len(self.mesh)
                sel[m] = slice(1, None)
                out[tuple(sel)] = 0
        return out

    def boxes_by_coord(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every coordinate's box, vectorised: ``(offsets, lengths, ranks)``, arrays of shape (coordinates,
        dimensions) in row-major coordinate order (lengths 0 where a coordinate writes nothing), and the global
        rank at each coordinate."""
        n = math.prod(self.mesh)
        coords = np.stack(np.unravel_index(np.arange(n), self.mesh), axis=1) if self.mesh else np.zeros((1, 0), int)
        offsets = np.zeros((n, len(self.shape)), dtype=np.int64)
        lengths = np.zeros((n, len(self.shape)), dtype=np.int64)
        for d, (size, dims) in enumerate(zip(self.shape, self.dims)):
            off, length = np.zeros(n, dtype=np.int64), np.full(n, size, dtype=np.int64)
            for m in dims:
                piece = -(-length // self.mesh[m])
                lo = np.minimum(coords[:, m] * piece, length)
                off, length = off + lo, np.minimum(lo + piece, length) - lo
            offsets[:, d], lengths[:, d] = off, length
        held = np.ones(n, dtype=bool)
        for m in range(len(self.mesh)):
            if m not in self.cutting:
                held &= coords[:, m] == 0
        lengths[~held] = 0
        ranks = np.arange(n) if self.ranks is None else np.asarray(self.ranks, dtype=np.int64)
        return offsets, lengths, ranks


@dataclass(frozen=True)
class Partition:
    """Which ranks hold which elements of a tensor's flattened form.

    * ``replicated``: every rank holds the whole tensor (DDP, a ZeRO-1/2 model weight, a 0-d ``step``); it is
      written once, by a rank the plan chooses.
    * ``chunk > 0``: even chunks, as ZeRO-3 and FSDP2 cut a tensor: part ``i`` is elements
      ``[i * chunk, min((i + 1) * chunk, numel))``, held by ``ranks[i]`` (rank ``i`` when ``ranks`` is None);
      parts past the end are empty.
    * ``parts``: explicit ``(start, numel, rank)`` ranges (ZeRO-1/2 fragments; a whole tensor in one file).
    * ``grid`` (format 3): each holder a box of the tensor, by rule (:class:`Grid`: tensor parallelism, FSDP2 +
      TP, HSDP + TP); a holder's part is its whole box, flattened row-major.

    Every part is a box of the tensor with a flat element range inside it: the flat kinds are the whole tensor's
    box with a range, a grid's parts are boxes with their whole range (:meth:`iter_boxes`).
    """

    replicated: bool = False
    chunk: int = 0
    ranks: tuple[int, ...] | None = None
    parts: tuple[tuple[int, int, int], ...] = ()
    grid: Grid | None = None
    shift: int = 0  # flat kinds: every part's rank moved by this (a range-written tensor's writers, rebalanced)

    @staticmethod
    def whole(rank: int, numel: int) -> Partition:
        return Partition(parts=((0, numel, rank),))

    def iter_parts(self, numel: int, world: int) -> Iterator[tuple[int, int, int]]:
        """Every non-empty ``(start, numel, rank)``, in element order (a replicated tensor has none: see plan); a
        grid's parts as ``(0, box elements, rank)``: their place is :meth:`iter_boxes`'s."""
        if self.grid is not None:
            for _, _, start, n, rank in self.iter_boxes(self.grid.shape):
                yield start, n, rank
        elif self.chunk:
            count = math.ceil(numel / self.chunk) if numel else 0
            for i in range(count):
                start = i * self.chunk
                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else i) + self.shift
        else:
            yield from ((a, n, r + self.shift) for a, n, r in self.parts if n > 0)

    def iter_boxes(self, shape: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...], int, int, int]]:
        """Every non-empty part as ``(offsets, lengths, start, numel, rank)``: a box of the tensor and the flat
        range ``[start, start + numel)`` of the box's row-major elements that the part holds."""
        shape = tuple(shape)
        if self.grid is not None:
            for coord in self.grid.holder_coords():
                offsets, lengths = self.grid.box(coord)
                n = math.prod(lengths)
                if n:
                    yield offsets, lengths, 0, n, self.grid.rank_at(coord)
            return
        zero = (0,) * len(shape)
        for start, n, rank in self.iter_parts(math.prod(shape), 0):
            yield zero, shape, start, n, rank

    def box_of(self, rank: int) -> Box | None:
        """A grid holder's box (None: not a grid, or ``rank`` holds none)."""
        if self.grid is None:
            return None
        coord = self.grid.coord(rank)
        if coord is None or any(coord[m] for m in range(len(coord)) if m not in self.grid.cutting):
            return None
        box = self.grid.box(coord)
        return box if math.prod(box[1]) else None

    def local(self, rank: int, numel: int) -> tuple[int, int] | None:
        """``(start, numel)`` of ``rank``'s part, or None when it holds none (a replicated tensor: the whole; a grid
        holder: its whole box, from 0)."""
        if self.replicated:
            return (0, numel)
        if self.grid is not None:
            box = self.box_of(rank)
            return (0, math.prod(box[1])) if box is not None else None
        rank -= self.shift
        if rank < 0:
            return None
        if self.chunk:
            if self.ranks is not None and rank not in self.ranks:
                return None
            i = self.ranks.index(rank) if self.ranks is not None else rank
            start = i * self.chunk
            n = max(0, min(self.chunk, numel - start))
            return (start, n) if n else None
        for start, n, r in self.parts:
            if r == rank and (n > 0 or numel == 0):
                return (start, n)
        return None

    def bytes_by_rank(self, numel: int, world: int, size: int) -> np.ndarray:
        """Bytes each rank holds (a replicated tensor: zero everywhere; the plan assigns its writer)."""
        out = np.zeros(world, dtype=np.int64)
        if self.replicated:
            return out
        if self.grid is not None:
            counts = self.grid.lengths_by_coord().reshape(-1) * size
            ranks = np.arange(counts.size) if self.grid.ranks is None else np.asarray(self.grid.ranks)
            keep = ranks < world
            np.add.at(out, ranks[keep], counts[keep])
            return out
        if self.chunk:
            i = np.arange(world if self.ranks is None else len(self.ranks), dtype=np.int64)
            counts = np.clip(numel - i * self.chunk, 0, self.chunk) * size
            ranks = i if self.ranks is None else np.asarray(self.ranks, dtype=np.int64)
            keep = (counts > 0) & (ranks + self.shift < world) & (ranks + self.shift >= 0)
            np.add.at(out, ranks[keep] + self.shift, counts[keep])
            return out
        if self.parts:
            parts = np.asarray(self.parts, dtype=np.int64).reshape(-1, 3)
            np.add.at(out, parts[:, 2] + self.shift, parts[:, 1] * size)
        return out

    def to_json(self) -> dict:
        if self.replicated:
            raise CheckpointError("internal: a replicated tensor is written as one part; plan it first")
        if self.grid is not None:
            return {"grid": self.grid.to_json()}
        shift = {"shift": self.shift} if self.shift else {}
        if self.chunk:
            return {"chunk": self.chunk} | ({"ranks": list(self.ranks)} if self.ranks is not None else {}) | shift
        return {"parts": [list(p) for p in self.parts]} | shift

    @staticmethod
    def from_json(data: object, numel: int, where: str, shape: Sequence[int] | None = None) -> Partition:
        """A partition read from an index, checked: the parts must tile ``[0, numel)`` exactly (a grid tiles its
        tensor by construction: its boxes are nested ``torch.chunk`` pieces)."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: partition must be an object")
        shift = data.get("shift", 0)
        if type(shift) is not int:
            raise CheckpointError(f"{where}: shift must be a whole number")
        if shift:  # a range-written tensor's writers, moved for balance: the same parts, each rank + shift
            if "grid" in data:
                raise CheckpointError(f"{where}: a grid partition has no shift")
            base = Partition.from_json({k: v for k, v in data.items() if k != "shift"}, numel, where, shape)
            low = min((r for _, _, r in base.iter_parts(numel, 0)), default=0)
            if low + shift < 0:
                raise CheckpointError(f"{where}: shift {shift} moves a part to a negative rank")
            return Partition(base.replicated, base.chunk, base.ranks, base.parts, None, shift)
        if "grid" in data:
            if shape is None:
                raise CheckpointError(f"{where}: a grid partition needs the tensor's shape")
            return Partition(grid=Grid.from_json(data["grid"], tuple(shape), where))
        if "chunk" in data:
            chunk, ranks = data.get("chunk"), data.get("ranks")
            if type(chunk) is not int or chunk <= 0:
                raise CheckpointError(f"{where}: chunk must be a whole number > 0")
            if ranks is not None and (
                not isinstance(ranks, list)
                or not all(type(r) is int and r >= 0 for r in ranks)
                or len(ranks) < math.ceil(numel / chunk)
            ):
                raise CheckpointError(f"{where}: ranks must list a rank for every chunk")
            return Partition(chunk=chunk, ranks=tuple(ranks) if ranks is not None else None)
        parts = data.get("parts")
        if not isinstance(parts, list) or not all(
            isinstance(p, list) and len(p) == 3 and all(type(v) is int and v >= 0 for v in p) for p in parts
        ):
            raise CheckpointError(f"{where}: parts must be [start, numel, rank] triples of whole numbers")
        cursor = 0
        for start, n, _ in sorted(parts):
            if start != cursor:
                raise CheckpointError(f"{where}: parts leave a gap or overlap at element {min(start, cursor)}")
            cursor += n
        if cursor != numel:
            raise CheckpointError(f"{where}: parts cover {cursor} elements of {numel}")
        return Partition(parts=tuple(tuple(p) for p in sorted(parts)))  # type: ignore[misc]


@dataclass(frozen=True)
class Item:
    """One tensor of the training state: group (model, master, optimizer), name (``<param>`` or
    ``<param>/<key>`` for optimizer state), full shape and dtype, and how it is spread over the ranks."""

    group: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    partition: Partition = field(default_factory=lambda: Partition(replicated=True))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def key(self) -> str:
        """The tensor's key inside a state file: ``master/<param>`` or ``optimizer/<param>/<key>``."""
        return f"{self.group}/{self.name}"


def runs(inner: Box, outer: Box, *others: Box) -> tuple[int, np.ndarray, list[np.ndarray]]:
    """The sub-box ``inner`` (inside ``outer`` and each of ``others``, all boxes of one tensor) as
    contiguous runs in every one of those boxes' row-major layouts: ``(run length, starts in outer, [starts in each
    other])``. A run is as long as the trailing dimensions that ``inner`` spans whole in every box allow: a box read
    from the same box is one run; a column block of a row block one run per row."""
    offs, lens = inner
    boxes = (outer, *others)
    ndim = len(lens)
    k = 0  # runs are contiguous over dims k.. (dims after k spanned whole in every box)
    for d in range(ndim - 1, -1, -1):
        if any(lens[d] != b[1][d] for b in boxes):
            k = d
            break
    length = math.prod(lens[k:]) if ndim else 1
    count = math.prod(lens[:k])
    idx = np.indices(lens[:k], dtype=np.int64).reshape(k, -1) if k else np.zeros((0, 1), dtype=np.int64)
    out = []
    for b_offs, b_lens in boxes:
        strides = [math.prod(b_lens[d + 1 :]) for d in range(ndim)]
        start = sum((offs[d] - b_offs[d]) * strides[d] for d in range(k, ndim))
        starts = np.full(count, start, dtype=np.int64)
        for d in range(k):
            starts = starts + (idx[d] + offs[d] - b_offs[d]) * strides[d]
        out.append(starts)
    return length, out[0], out[1:]


def intersect(a: Box, b: Box) -> Box | None:
    """The common box of two boxes, or None when they do not meet."""
    offs, lens = [], []
    for ao, al, bo, bl in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + al, bo + bl)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return tuple(offs), tuple(lens)


# ---------------------------------------------------------------------------------------------- partitions


def chunked(numel: int, world: int, row: int = 1, ranks: Sequence[int] | None = None) -> Partition:
    """Even chunks of ``ceil(numel / row / world)`` rows (``row`` elements each) over ``world`` ranks."""
    rows = numel // row if row else 0
    chunk = max(1, math.ceil(rows / world)) * row if numel else 1
    return Partition(chunk=chunk, ranks=tuple(ranks) if ranks is not None else None)


def zero3_chunks(numel: int, world: int) -> Partition:
    """DeepSpeed ZeRO-3: every rank holds ``ceil(numel / world)`` elements (the last ones padded)."""
    return Partition(chunk=max(1, math.ceil(numel / world)))


def fsdp_rows(shape: Sequence[int], world: int, ranks: Sequence[int] | None = None) -> Partition:
    """FSDP2 ``Shard(0)``: ``ceil(rows / world)`` rows per rank, as ``torch.chunk`` cuts dim 0."""
    if not shape:
        return Partition(replicated=True)
    return chunked(math.prod(shape), world, row=math.prod(shape[1:]), ranks=ranks)


def zero12_fragments(numels: Sequence[int], offsets: Sequence[int], partition_size: int, world: int) -> list[Partition]:
    """DeepSpeed ZeRO-1/2 (and BF16_Optimizer): a param group is one flat buffer cut into ``world`` partitions of
    ``partition_size`` elements; parameter ``j`` sits at ``offsets[j]``. Each parameter's fragments, per rank."""
    out = []
    for numel, offset in zip(numels, offsets):
        parts = []
        first = offset // partition_size if partition_size else 0
        last = (offset + numel - 1) // partition_size if numel and partition_size else first
        for r in range(first, min(last, world - 1) + 1):
            lo, hi = max(offset, r * partition_size), min(offset + numel, (r + 1) * partition_size)
            if hi > lo:
                parts.append((lo - offset, hi - lo, r))
        if sum(p[1] for p in parts) != numel:
            raise CheckpointError(f"internal: a ZeRO fragment map covers {sum(p[1] for p in parts)} of {numel}")
        out.append(Partition(parts=tuple(parts)))
    return out


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class ModelShard:
    """One file of the Hugging Face folder: full tensors. ``owner`` writes its header and every tensor not in
    ``ranged``; a tensor in ``ranged`` is written in place by its holders, each its own element ranges (the
    partition given there: the tensor's own, or even chunks of a replicated one)."""

    index: int  # 1-based
    count: int
    items: list[Item]
    owner: int
    ranged: dict[str, Partition] = field(default_factory=dict)

    @property
    def owner_bytes(self) -> int:
        """The bytes of tensors the owner writes (besides the header)."""
        return sum(i.nbytes for i in self.items if i.name not in self.ranged)

    @property
    def relpath(self) -> str:
        return f"model-{self.index:05d}-of-{self.count:05d}.safetensors"

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)


@dataclass
class StateFile:
    """One file of a holder rank's slices: ``(item, start, numel)`` entries in plan order."""

    holder: int
    index: int  # 1-based within the holder
    entries: list[tuple[Item, int, int]]

    @property
    def relpath(self) -> str:
        return state_file_name(self.holder, self.index)

    @property
    def nbytes(self) -> int:
        return sum(n * itemsize(item.dtype) for item, _, n in self.entries)


def state_file_name(holder: int, index: int) -> str:
    return f"train_state/state-r{holder:05d}-{index:05d}.safetensors"


@dataclass
class SavePlan:
    """Every file of one save and who writes it, the same on every rank (see the module docstring)."""

    world: int
    max_shard_bytes: int
    model_items: list[Item]
    state_items: list[Item]  # replicated ones resolved to a single part
    model_shards: list[ModelShard]
    files_per_holder: np.ndarray
    bytes_per_rank: np.ndarray  # what each rank writes (model shards it owns + its slices)
    # range-written model tensors whose writers are not their holders: the writer of each range puts it together
    # from the holders' pieces (point to point, exactly those bytes): "rows" (a grid's column blocks assembled into
    # row blocks), "shift" (a holder's whole part written by the rank ``shift`` above it, for balance)
    moved: dict[str, str] = field(default_factory=dict)

    def state_files(self, holder: int) -> list[StateFile]:
        """The files of ``holder``'s slices, in plan order, cut at ``max_shard_bytes`` (a larger slice gets a file
        of its own)."""
        files: list[StateFile] = []
        size = 0
        for item in self.state_items:
            local = item.partition.local(holder, item.numel)
            if local is None:
                continue
            nbytes = local[1] * itemsize(item.dtype)
            if not files or (size + nbytes > self.max_shard_bytes and size > 0):
                files.append(StateFile(holder, len(files) + 1, []))
                size = 0
            files[-1].entries.append((item, *local))
            size += nbytes
        return files

    def model_bytes(self) -> int:
        return sum(i.nbytes for i in self.model_items)

    def state_bytes(self) -> int:
        return sum(i.nbytes for i in self.state_items)


def range_partition(item: Item, world: int, split_bytes: int) -> Partition | None:
    """Who writes which elements of a model tensor in place (a range-written tensor), or None when its shard's owner
    writes it whole: a partitioned tensor is written by its holders (every part a contiguous element range, so a
    contiguous byte range of the file); a replicated one larger than ``split_bytes`` in ``world`` even chunks, one
    per rank (every rank holds it whole)."""
    if item.numel == 0:
        return None
    if item.partition.replicated:
        return chunked(item.numel, world) if world > 1 and item.nbytes > split_bytes else None
    if item.partition.grid is not None:
        return _contiguous_boxes(item) or _row_writers(item)
    return item.partition


def _contiguous_boxes(item: Item) -> Partition | None:
    """A grid partition as flat element ranges when every holder's box is one contiguous run of the tensor's
    row-major elements (tensor parallelism on dim 0 and FSDP2's rows of it: ColwiseParallel weights, the
    embedding's vocabulary cut), else None (a RowwiseParallel weight's column block: :func:`_row_writers`).
    Vectorised over the mesh: a plan at 16,384 ranks stays arithmetic."""
    shape = item.shape
    grid = item.partition.grid
    assert grid is not None
    offsets, lengths, ranks = grid.boxes_by_coord()
    keep = lengths.prod(axis=1) > 0
    offsets, lengths, ranks = offsets[keep], lengths[keep], ranks[keep]
    ndim = len(shape)
    not_one = lengths != 1
    first = np.where(not_one.any(axis=1), not_one.argmax(axis=1), ndim)
    later = np.arange(ndim)[None, :] > first[:, None]
    if np.any(later & (lengths != np.asarray(shape, dtype=np.int64)[None, :])):
        return None
    strides = np.asarray([math.prod(shape[d + 1 :]) for d in range(ndim)], dtype=np.int64)
    starts = (offsets * strides[None, :]).sum(axis=1) if ndim else np.zeros(len(ranks), dtype=np.int64)
    numels = lengths.prod(axis=1)
    order = np.argsort(starts, kind="stable")
    return Partition(parts=tuple(zip(starts[order].tolist(), numels[order].tolist(), ranks[order].tolist())))


def _row_writers(item: Item) -> Partition:
    """The writers of a grid tensor whose boxes are not contiguous runs (a RowwiseParallel weight: each holder a
    column block): even blocks of whole rows, one per holder, in the order of the holders' boxes, so that each
    writer puts its rows together from the few holders whose boxes meet them (its own TP group's column blocks
    under FSDP2 + TP), at exactly those bytes, and every holder writes as many bytes as it holds."""
    grid = item.partition.grid
    assert grid is not None
    offsets, lengths, ranks = grid.boxes_by_coord()
    keep = lengths.prod(axis=1) > 0
    order = np.lexsort(offsets[keep].T[::-1])
    holders = ranks[keep][order].tolist()
    rows, row = item.shape[0], math.prod(item.shape[1:])
    per = max(1, -(-rows // len(holders)))
    return Partition(chunk=per * row, ranks=tuple(holders[: -(-rows // per)]))


def plan_save(items: Sequence[Item], world: int, max_shard_bytes: int, *, ranged: bool = False) -> SavePlan:
    """Plan one save of ``items`` held by ``world`` ranks (see the module docstring); deterministic. ``ranged``: model
    tensors are written in place by their holders (a running job's save)."""
    if max_shard_bytes < 1:
        raise CheckpointError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    model = [i for i in items if i.group == "model"]
    state = [i for i in items if i.group != "model"]
    load = np.zeros(world, dtype=np.int64)
    for item in state:
        if not item.partition.replicated:
            load += item.partition.bytes_by_rank(item.numel, world, itemsize(item.dtype))
    # replicated state tensors and model shards go to the rank with the fewest bytes so far (ties: lowest rank)
    heap = [(int(b), r) for r, b in enumerate(load)]
    heapq.heapify(heap)

    def take(nbytes: int) -> int:
        b, r = heapq.heappop(heap)
        heapq.heappush(heap, (b + nbytes, r))
        load[r] += nbytes
        return r

    resolved = []
    for item in state:
        if item.partition.replicated or item.numel == 0:  # an empty tensor: one (empty) part, like a replicated one
            item = Item(item.group, item.name, item.shape, item.dtype, Partition.whole(take(item.nbytes), item.numel))
        resolved.append(item)
    # model shards of about one rank's share of the bytes their owners write, so that every rank writes about as
    # much (a tensor larger than that still gets a shard of its own: a Hugging Face shard holds whole tensors);
    # range-written tensors count for their holders, and only the file size caps a shard of them
    shard_bytes = min(max_shard_bytes, max(MIN_MODEL_SHARD, -(-sum(i.nbytes for i in model) // world)))
    writers: dict[str, Partition] = {}
    moved: dict[str, str] = {}
    if ranged:
        for item in model:
            part = range_partition(item, world, shard_bytes)
            if part is not None:
                writers[item.name] = part
                load += part.bytes_by_rank(item.numel, world, itemsize(item.dtype))
                if item.partition.grid is not None and part.ranks is not None:
                    moved[item.name] = "rows"
    owned_total = sum(i.nbytes for i in model if i.name not in writers)
    if ranged and world > 1:
        _rebalance(model, writers, moved, load, int(load.sum()) + owned_total)
    owner_cap = min(max_shard_bytes, max(MIN_MODEL_SHARD, -(-owned_total // world)))
    chunks: list[list[Item]] = []
    size = owned = 0
    for item in model:
        mine = 0 if item.name in writers else item.nbytes
        if chunks and size + item.nbytes <= max_shard_bytes and owned + mine <= owner_cap:
            chunks[-1].append(item)
        else:
            chunks.append([item])
            size = owned = 0
        size += item.nbytes
        owned += mine
    shards = [
        ModelShard(i + 1, len(chunks), chunk, 0, {it.name: writers[it.name] for it in chunk if it.name in writers})
        for i, chunk in enumerate(chunks)
    ]
    header = 128  # about a header's bytes per tensor: a shard of range-written tensors still costs its owner that
    for shard in sorted(shards, key=lambda s: (-s.owner_bytes, s.index)):  # largest first: a tighter balance
        shard.owner = take(shard.owner_bytes + (header * len(shard.items) if shard.ranged else 0))
    files = _files_per_holder(resolved, world, max_shard_bytes)
    return SavePlan(world, max_shard_bytes, model, resolved, shards, files, load, moved)


BALANCE = 1.2
"""The busiest writer's bytes over the mean that :func:`plan_save` aims for (the issue's bound is 1.25)."""


def _rebalance(
    model: list[Item], writers: dict[str, Partition], moved: dict[str, str], load: np.ndarray, total: int
) -> None:
    """Move whole range-written tensors' writers off the ranks that write more than :data:`BALANCE` times the mean:
    each moved tensor's every part is written by the rank ``shift`` above its holder (the same parts, a window of
    ranks that writes little: FSDP2's ``torch.chunk`` leaves the last ranks without rows of the largest tensors and
    puts the few rows of the K/V projections on the first ranks only). Its holders send those bytes to the writers
    (counted by :func:`moved_bytes`). The tensors on the fewest ranks move first (they made the imbalance and cost
    the fewest messages); a move is kept only if no rank of the new window then writes more than the bound. In
    place on ``writers``, ``moved`` and ``load``; deterministic."""
    world = len(load)
    target = BALANCE * total / world
    if load.max() <= target:
        return
    sizes = {i.name: i for i in model}
    candidates = []
    for name, part in writers.items():
        item = sizes[name]
        if item.partition.replicated or part.grid is not None or part.shift or moved.get(name) == "rows":
            continue  # a replicated weight is held by every rank: its chunks are already spread over all of them
        ranks = np.nonzero(part.bytes_by_rank(item.numel, world, 1))[0]
        if len(ranks):
            candidates.append((int(ranks[-1] - ranks[0]) + 1, item.nbytes, name))
    for span, _, name in sorted(candidates):
        if load.max() <= target:
            return
        item, part = sizes[name], writers[name]
        b = part.bytes_by_rank(item.numel, world, itemsize(item.dtype))
        held = np.nonzero(b)[0]
        if load[held].max() <= target:
            continue  # not on a rank that writes too much
        lo, hi = int(held[0]), int(held[-1])
        shifts = {k * span - lo for k in range(world // span)} | {world - 1 - hi}
        best: tuple[int, int] | None = None
        for shift in sorted(shifts):
            if abs(shift) < span or lo + shift < 0 or hi + shift >= world:
                continue  # the new window must not meet the old one
            peak = int((load[held + shift] + b[held]).max())
            if peak <= target and (best is None or peak < best[0]):
                best = (peak, shift)
        if best is None:
            continue
        shift = best[1]
        load[held] -= b[held]
        load[held + shift] += b[held]
        writers[name] = Partition(part.replicated, part.chunk, part.ranks, part.parts, None, shift)
        moved[name] = "shift"


def assembly_pieces(
    item: Item, writer: Partition, kind: str, world: int
) -> Iterator[tuple[int, int, int, int, tuple[Box, Box, Box] | None]]:
    """``(start, numel, writer rank, holder rank, piece)`` for every piece a writer of a moved tensor receives (or
    copies) from a holder, in the same order on every rank: ``piece`` None for a holder's whole part moved for
    balance (``kind`` "shift"), else ``(common box, the holder's box, the writer's row block)`` (``kind`` "rows":
    only the grid boxes that meet the writer's rows)."""
    row = math.prod(item.shape[1:])
    for start, n, w in writer.iter_parts(item.numel, world):
        if kind == "shift":
            yield start, n, w, w - writer.shift, None
            continue
        grid = item.partition.grid
        assert grid is not None and start % row == 0 and n % row == 0
        wbox: Box = ((start // row,) + (0,) * (len(item.shape) - 1), (n // row, *item.shape[1:]))
        for coord in grid.overlapping(wbox):
            hbox = grid.box(coord)
            inter = intersect(wbox, hbox) if math.prod(hbox[1]) else None
            if inter is not None:
                yield start, n, w, grid.rank_at(coord), (inter, hbox, wbox)


def moved_bytes(plan: SavePlan) -> tuple[np.ndarray, np.ndarray]:
    """``(sent, received)``: the bytes each rank sends to and receives from other ranks so that the writers of the
    moved range-written tensors (:attr:`SavePlan.moved`) can write them: every byte a holder holds goes to the writer
    of its range, except the bytes a rank holds and writes itself. Vectorised (a plan at 16,384 ranks)."""
    world = plan.world
    sent = np.zeros(world, dtype=np.int64)
    received = np.zeros(world, dtype=np.int64)
    for shard in plan.model_shards:
        for item in shard.items:
            kind = plan.moved.get(item.name)
            if kind is None:
                continue
            writer = shard.ranged[item.name]
            size = itemsize(item.dtype)
            held = item.partition.bytes_by_rank(item.numel, world, size)
            written = writer.bytes_by_rank(item.numel, world, size)
            own = np.zeros(world, dtype=np.int64)
            if kind == "rows" and item.partition.grid is not None:
                own = _own_rows(item, writer, world) * size
            sent += held - own
            received += written - own
    return sent, received


def _own_rows(item: Item, writer: Partition, world: int) -> np.ndarray:
    """Elements each rank both holds (its grid box) and writes (its block of rows)."""
    grid = item.partition.grid
    assert grid is not None
    offsets, lengths, ranks = grid.boxes_by_coord()
    row = math.prod(item.shape[1:])
    w_lo = np.full(world, -1, dtype=np.int64)
    w_hi = np.full(world, -1, dtype=np.int64)
    for start, n, r in writer.iter_parts(item.numel, world):
        w_lo[r], w_hi[r] = start // row, (start + n) // row
    keep = (lengths.prod(axis=1) > 0) & (ranks < world)
    offsets, lengths, ranks = offsets[keep], lengths[keep], ranks[keep]
    rows = np.clip(
        np.minimum(offsets[:, 0] + lengths[:, 0], w_hi[ranks]) - np.maximum(offsets[:, 0], w_lo[ranks]), 0, None
    )
    out = np.zeros(world, dtype=np.int64)
    np.add.at(out, ranks, rows * lengths[:, 1:].prod(axis=1))
    return out


def _files_per_holder(items: list[Item], world: int, max_bytes: int) -> np.ndarray:
    """How many state files each holder writes: :meth:`SavePlan.state_files`'s cut, for every rank at once."""
    count = np.zeros(world, dtype=np.int64)
    size = np.zeros(world, dtype=np.int64)
    for item in items:
        b = item.partition.bytes_by_rank(item.numel, world, itemsize(item.dtype))
        zero = b == 0
        if item.numel == 0:  # an empty tensor still takes an entry with its holder
            r = item.partition.parts[0][2] if item.partition.parts else 0
            zero = np.ones(world, dtype=bool)
            zero[r] = False
        new = ~zero & ((count == 0) | ((size + b > max_bytes) & (size > 0)))
        count += new
        size = np.where(new, b, np.where(zero, size, size + b))
    return count
