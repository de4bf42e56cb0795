"""What one save and one resume cost, rank by rank, computed from the same plan the code executes.

:func:`save_costs` runs :func:`~.layout.plan_save` on a job's items and counts, per rank, the bytes it writes, the
files it writes, the bytes it sends and receives through collectives (the gathers of partitioned model weights to
their writers, and the protocol's small messages), and the collectives it joins. :func:`load_costs` counts, per
rank of a job resuming on ``world`` ranks, the bytes it reads: each rank reads exactly the elements its engine
holds (the reader's range reads have no amplification), plus its share of the checksum verification.

``tools/bench_scale.py`` checks these predictions against measured runs on 2-8 ranks; ``tools/scale_report.py``
evaluates them for 70B on 1,024 GPUs and 405B on 16,384 (docs/scale.md), where nothing can be measured here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .layout import (
    Grid,
    Item,
    Partition,
    SavePlan,
    fsdp_rows,
    itemsize,
    moved_bytes,
    plan_save,
    zero3_chunks,
    zero12_fragments,
)

__all__ = ["LoadCost", "SaveCost", "engine_items", "load_costs", "save_costs", "tp_dim"]

REPORT_BYTES = 160  # one file's record in a rank's report to rank 0 (name, size, checksum) as JSON


@dataclass
class SaveCost:
    world: int
    model_bytes: int
    state_bytes: int
    written: np.ndarray  # bytes each rank writes
    files: np.ndarray  # files each rank writes (shards, slices, its RNG file)
    sent: np.ndarray  # bytes each rank sends through collectives (gathers of model weights + protocol messages)
    received: np.ndarray
    gathers: int  # partitioned model weights sent to their writers (point to point, on the training group)
    moved: int  # of the bytes sent, those that rebalancing moves (whole parts written by another rank)
    coordination: int  # collectives on the checkpoint's gloo groups
    index_bytes: int  # the state index's size (about)
    plan: SavePlan
    range_files: np.ndarray  # model files each rank writes ranges into besides its own (opened, not created)

    @property
    def total_files(self) -> int:
        return int(self.files.sum()) + 6  # + the indexes, engine.json, trainer.json, manifest and its hash


@dataclass
class LoadCost:
    world: int
    read: np.ndarray  # bytes each rank reads from the checkpoint to restore its state
    verified: np.ndarray  # bytes each rank reads to verify checksums (its share of the files)
    sent: np.ndarray  # bytes through collectives (protocol messages only)
    coordination: int


def save_costs(items: Sequence[Item], world: int, max_shard_bytes: int) -> SaveCost:
    """Per-rank cost of saving ``items`` held by ``world`` ranks (see the module docstring), as a running job saves:
    model tensors written in place by their holders (range-written), or put together by their writers from the
    holders' pieces where the plan moves them (:attr:`~.layout.SavePlan.moved`: a dim-1 TP shard's column blocks
    assembled into row blocks, a tensor's parts moved off the busiest writers): :func:`~.layout.moved_bytes`."""
    plan = plan_save(items, world, max_shard_bytes, ranged=True)
    written = plan.bytes_per_rank.astype(np.int64).copy()
    files = plan.files_per_holder.astype(np.int64) + 1  # + the rank's RNG file
    range_files = np.zeros(world, dtype=np.int64)
    sent, received = moved_bytes(plan)
    balance = moved_bytes(SavePlan(**{**plan.__dict__, "moved": {k: v for k, v in plan.moved.items() if v == "shift"}}))
    gathers = len(plan.moved)
    for shard in plan.model_shards:
        files[shard.owner] += 1
        into = np.zeros(world, dtype=bool)
        for item in shard.items:
            size = itemsize(item.dtype)
            part = shard.ranged.get(item.name)
            if part is not None:
                into |= part.bytes_by_rank(item.numel, world, size) > 0
                continue
            if item.partition.replicated:
                continue
            gathers += 1
            by_rank = item.partition.bytes_by_rank(item.numel, world, size)
            by_rank[shard.owner] = 0  # the writer's own part does not travel
            sent += by_rank
            received[shard.owner] += int(by_rank.sum())
        into[shard.owner] = False
        range_files += into
    # the protocol: plan agreement (all-reduce), staging name (broadcast), fetch agreement (all-reduce), reports
    # (gather to rank 0: one record per file, one per rank's ranges), outcome (broadcast), visibility (all-gather)
    reports = (files + 1) * REPORT_BYTES
    sent += 8 * 4 + reports
    received[0] += int(reports.sum())
    coordination = 6
    index_bytes = 200 + sum(len(i.key) + 80 for i in plan.state_items) + 6 * world
    return SaveCost(
        world,
        plan.model_bytes(),
        plan.state_bytes(),
        written,
        files,
        sent,
        received,
        gathers,
        int(balance[0].sum()),
        coordination,
        index_bytes,
        plan,
        range_files,
    )


def load_costs(
    engine: str,
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    world: int,
    files_written: dict[int, int] | None = None,
    checksum: bool = True,
    tp: int = 1,
) -> LoadCost:
    """Per-rank bytes read when ``engine`` resumes on ``world`` ranks: each rank's own elements of every tensor
    (as :func:`engine_items` lays them out at this world size), a replicated low-precision weight whole.
    ``files_written``: bytes written per saving rank, for the verification share (rank ``r mod world``)."""
    items = engine_items(engine, shapes, world, tp)
    held = {i.name.rpartition("/")[0]: i.partition for i in items if i.name.endswith("/exp_avg")}
    read = np.zeros(world, dtype=np.int64)
    for item in items:
        size = itemsize(item.dtype)
        if tp > 1 and item.group == "model":  # each rank reads its own box, as its optimizer state
            item = Item(item.group, item.name, item.shape, item.dtype, held[item.name])
        if item.partition.replicated or item.numel == 0:
            read += item.nbytes
        else:
            read += item.partition.bytes_by_rank(item.numel, world, size)
    verified = np.zeros(world, dtype=np.int64)
    if checksum and files_written:
        for r, nbytes in files_written.items():
            verified[r % world] += nbytes
    sent = np.full(world, 64, dtype=np.int64)
    # the manifest and JSON state (broadcast), verification and planning (all-reduce), restore and RNG (all-reduce)
    return LoadCost(world, read, verified, sent, coordination=3)


def engine_items(engine: str, shapes: Sequence[tuple[str, tuple[int, ...]]], world: int, tp: int = 1) -> list[Item]:
    """The items an engine's adapter reports for a model of these parameter shapes at ``world`` ranks, with AdamW
    (``exp_avg``, ``exp_avg_sq`` and a 0-d ``step`` per parameter): ``fsdp2`` (fp32 parameters, sharded on dim 0),
    ``zero3`` / ``zero2`` (bf16 weights, fp32 masters, one param group for ZeRO-2), ``ddp`` (fp32, replicated).
    The same partition rules as the adapters (:mod:`.layout`).

    ``tp > 1`` (``fsdp2`` only): FSDP2 over ``world / tp`` ranks on a (dp, tp) mesh, tensor parallel inside (rank
    ``i * tp + j`` is dp index ``i``, tp index ``j``), with torchtitan's Llama plan (:func:`tp_dim`): a weight
    sharded by TP on dim 0 (embedding, q/k/v, gate/up, the output layer) is ``tp * dp`` row blocks, each held by
    one rank and written by it; a weight sharded on dim 1 (o_proj, down_proj) is ``dp`` row blocks, each put together
    by one rank of its TP group (rotating with the layer) from the group's column blocks (:func:`tp_assembled`);
    a norm (replicated over TP) is ``dp`` chunks, each written by one rank of its group. Optimizer state is counted
    at each rank's own bytes."""
    import torch

    f32, bf16 = torch.float32, torch.bfloat16
    model, master, optim = [], [], []
    if tp > 1:
        if engine != "fsdp2" or world % tp:
            raise ValueError(f"tp={tp}: FSDP2 only, on a world size that tp divides ({world})")
        dp = world // tp
        for name, shape in shapes:
            dim = tp_dim(name, shape)
            # the adapter's grid (adapters.dtensor_partition) on a (dp, tp) mesh: rank i * tp + j
            if dim == 0:  # ColwiseParallel, then FSDP2's _StridedShard inside the TP block
                dims: tuple[tuple[int, ...], ...] = ((1, 0),) + ((),) * (len(shape) - 1)
            elif dim == 1:  # RowwiseParallel: FSDP2 on dim 0, TP on dim 1
                dims = ((0,), (1,)) + ((),) * (len(shape) - 2)
            else:  # a norm: FSDP2 rows, replicated over TP
                dims = ((0,),) + ((),) * (len(shape) - 1)
            p = Partition(grid=Grid(tuple(shape), (dp, tp), None, dims))
            model.append(Item("model", name, shape, f32, p))
            optim += [Item("optimizer", f"{name}/{k}", shape, f32, p) for k in ("exp_avg", "exp_avg_sq")]
            optim.append(Item("optimizer", f"{name}/step", (), f32))
        return model + optim
    if engine == "zero2":
        numels = [math.prod(s) for _, s in shapes]
        offsets = list(np.cumsum([0, *numels[:-1]]))
        total = sum(numels)
        part = -(-total // world)
        frags = zero12_fragments(numels, [int(o) for o in offsets], part, world)
    for i, (name, shape) in enumerate(shapes):
        numel = math.prod(shape)
        if engine == "fsdp2":
            p, lp = fsdp_rows(shape, world), f32
        elif engine == "zero3":
            p, lp = zero3_chunks(numel, world), bf16
        elif engine == "zero2":
            p, lp = frags[i], bf16
        elif engine == "ddp":
            p, lp = Partition(replicated=True), f32
        else:
            raise ValueError(f"engine {engine!r}: fsdp2, zero3, zero2 or ddp")
        model.append(Item("model", name, shape, lp, p if engine in ("fsdp2", "zero3") else Partition(replicated=True)))
        if lp != f32:
            master.append(Item("master", name, shape, f32, p))
        optim += [Item("optimizer", f"{name}/{k}", shape, f32, p) for k in ("exp_avg", "exp_avg_sq")]
        optim.append(Item("optimizer", f"{name}/step", (), f32))
    return model + master + optim


_COLWISE = ("embed_tokens", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
_ROWWISE = ("o_proj", "down_proj")


def tp_dim(name: str, shape: tuple[int, ...]) -> int | None:
    """The dimension torchtitan's Llama plan shards a weight on under tensor parallelism (0: ColwiseParallel, and
    the embedding's RowwiseParallel, which cuts the vocabulary; 1: RowwiseParallel), None: replicated (norms)."""
    if len(shape) == 2 and any(k in name for k in _COLWISE):
        return 0
    if len(shape) == 2 and any(k in name for k in _ROWWISE):
        return 1
    return None
