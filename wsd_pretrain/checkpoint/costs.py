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

from .layout import Item, Partition, SavePlan, fsdp_rows, itemsize, plan_save, zero3_chunks, zero12_fragments

__all__ = ["LoadCost", "SaveCost", "engine_items", "load_costs", "save_costs"]

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
    coordination: int  # collectives on the checkpoint's gloo groups
    index_bytes: int  # the state index's size (about)
    plan: SavePlan

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
    """Per-rank cost of saving ``items`` held by ``world`` ranks (see the module docstring)."""
    plan = plan_save(items, world, max_shard_bytes)
    written = plan.bytes_per_rank.astype(np.int64).copy()
    files = plan.files_per_holder.astype(np.int64) + 1  # + the rank's RNG file
    sent = np.zeros(world, dtype=np.int64)
    received = np.zeros(world, dtype=np.int64)
    gathers = 0
    for shard in plan.model_shards:
        files[shard.owner] += 1
        for item in shard.items:
            if item.partition.replicated:
                continue
            gathers += 1
            by_rank = item.partition.bytes_by_rank(item.numel, world, itemsize(item.dtype))
            by_rank[shard.owner] = 0  # the writer's own part does not travel
            sent += by_rank
            received[shard.owner] += int(by_rank.sum())
    # the protocol: plan agreement (all-reduce), staging name (broadcast), fetch agreement (all-reduce), reports
    # (gather to rank 0), outcome (broadcast), visibility (all-gather of a null each)
    reports = files * REPORT_BYTES
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
        coordination,
        index_bytes,
        plan,
    )


def load_costs(
    engine: str,
    shapes: Sequence[tuple[str, tuple[int, ...]]],
    world: int,
    files_written: dict[int, int] | None = None,
    checksum: bool = True,
) -> LoadCost:
    """Per-rank bytes read when ``engine`` resumes on ``world`` ranks: each rank's own elements of every tensor
    (as :func:`engine_items` lays them out at this world size), a replicated low-precision weight whole.
    ``files_written``: bytes written per saving rank, for the verification share (rank ``r mod world``)."""
    items = engine_items(engine, shapes, world)
    read = np.zeros(world, dtype=np.int64)
    for item in items:
        size = itemsize(item.dtype)
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


def engine_items(engine: str, shapes: Sequence[tuple[str, tuple[int, ...]]], world: int) -> list[Item]:
    """The items an engine's adapter reports for a model of these parameter shapes at ``world`` ranks, with AdamW
    (``exp_avg``, ``exp_avg_sq`` and a 0-d ``step`` per parameter): ``fsdp2`` (fp32 parameters, sharded on dim 0),
    ``zero3`` / ``zero2`` (bf16 weights, fp32 masters, one param group for ZeRO-2), ``ddp`` (fp32, replicated).
    The same partition rules as the adapters (:mod:`.layout`)."""
    import torch

    f32, bf16 = torch.float32, torch.bfloat16
    model, master, optim = [], [], []
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
