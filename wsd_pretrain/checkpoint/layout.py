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
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CheckpointError

__all__ = [
    "GROUPS",
    "Item",
    "ModelShard",
    "Partition",
    "SavePlan",
    "StateFile",
    "chunked",
    "fsdp_rows",
    "plan_save",
    "range_partition",
    "zero3_chunks",
    "zero12_fragments",
]

GROUPS = ("model", "master", "optimizer")
MIN_MODEL_SHARD = 2**20


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Partition:
    """Which ranks hold which elements of a tensor's flattened form.

    * ``replicated``: every rank holds the whole tensor (DDP, a ZeRO-1/2 model weight, a 0-d ``step``); it is
      written once, by a rank the plan chooses.
    * ``chunk > 0``: even chunks, as ZeRO-3 and FSDP2 cut a tensor: part ``i`` is elements
      ``[i * chunk, min((i + 1) * chunk, numel))``, held by ``ranks[i]`` (rank ``i`` when ``ranks`` is None);
      parts past the end are empty.
    * ``parts``: explicit ``(start, numel, rank)`` ranges (ZeRO-1/2 fragments; a whole tensor in one file).
    """

    replicated: bool = False
    chunk: int = 0
    ranks: tuple[int, ...] | None = None
    parts: tuple[tuple[int, int, int], ...] = ()

    @staticmethod
    def whole(rank: int, numel: int) -> Partition:
        return Partition(parts=((0, numel, rank),))

    def iter_parts(self, numel: int, world: int) -> Iterator[tuple[int, int, int]]:
        """Every non-empty ``(start, numel, rank)``, in element order (a replicated tensor has none: see plan)."""
        if self.chunk:
            count = math.ceil(numel / self.chunk) if numel else 0
            for i in range(count):
                start = i * self.chunk
                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else i)
        else:
            yield from (p for p in self.parts if p[1] > 0)

    def local(self, rank: int, numel: int) -> tuple[int, int] | None:
        """``(start, numel)`` of ``rank``'s part, or None when it holds none (a replicated tensor: the whole)."""
        if self.replicated:
            return (0, numel)
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
        if self.chunk:
            i = np.arange(world if self.ranks is None else len(self.ranks), dtype=np.int64)
            counts = np.clip(numel - i * self.chunk, 0, self.chunk) * size
            if self.ranks is None:
                out[: len(counts)] += counts[:world]
            else:
                np.add.at(out, np.asarray(self.ranks, dtype=np.int64), counts)
            return out
        for _, n, r in self.parts:
            out[r] += n * size
        return out

    def to_json(self) -> dict:
        if self.replicated:
            raise CheckpointError("internal: a replicated tensor is written as one part; plan it first")
        if self.chunk:
            return {"chunk": self.chunk} | ({"ranks": list(self.ranks)} if self.ranks is not None else {})
        return {"parts": [list(p) for p in self.parts]}

    @staticmethod
    def from_json(data: object, numel: int, where: str) -> Partition:
        """A partition read from an index, checked: the parts must tile ``[0, numel)`` exactly."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: partition must be an object")
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
    return item.partition


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
    if ranged:
        for item in model:
            part = range_partition(item, world, shard_bytes)
            if part is not None:
                writers[item.name] = part
                load += part.bytes_by_rank(item.numel, world, itemsize(item.dtype))
    owned_total = sum(i.nbytes for i in model if i.name not in writers)
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
    return SavePlan(world, max_shard_bytes, model, resolved, shards, files, load)


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
