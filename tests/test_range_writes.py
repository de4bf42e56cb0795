"""Range-written model files (docs/checkpoint-format.md, "Range-written model files"): a partitioned model weight is
written in place by the ranks that hold it, each its own byte range of the shard file, with one checksum per holder
in the manifest. The plan and the cost model here; the files of real FSDP2 and ZeRO-3 saves on 2 gloo ranks are
checked by :func:`check_ranges` from tests/test_checkpoint_resume.py (which resumes them exactly)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint.layout import Item, fsdp_rows, plan_save, zero3_chunks


def check_ranges(ckpt: Path, scratch: Path) -> dict[int, int]:
    """Check one checkpoint with range-written model files; returns the bytes each rank wrote.

    * the files are bitwise what one streaming writer makes of the same tensors (the format did not change);
    * the model bytes every holder wrote are exactly its own parts (nothing moved), as the manifest records;
    * verify names the rank whose range holds a flipped byte, for a byte in every holder's first and last range,
      and the file whose owner's bytes (its header) hold one;
    * each rank wrote at most 1.25 times the mean of the checkpoint's tensor files."""
    from wsd_pretrain.checkpoint.layout import Partition
    from wsd_pretrain.checkpoint.safetensors_io import SafetensorsReader, read_header, write_safetensors
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    manifest = F.load_manifest(ckpt)
    ranges = manifest["ranges"]
    assert ranges["files"] and ranges["holders"], "the model files are range-written"
    scratch.mkdir(parents=True, exist_ok=True)
    written: dict[int, int] = {}
    for rel in ranges["files"]:
        with SafetensorsReader(ckpt / rel) as reader:
            tensors = {name: reader.get(name) for name in reader.keys()}
        out = scratch / Path(rel).name
        write_safetensors(out, tensors, fsync=False)
        assert out.read_bytes() == (ckpt / rel).read_bytes(), f"{rel} differs from the streaming writer's file"
        header = read_header(ckpt / rel)
        owned = sum(i.end - i.start for i in header.tensors.values() if i.name not in ranges["tensors"])
        owner = manifest["files"][rel]["rank"]
        written[owner] = written.get(owner, 0) + header.data_start + owned
        for name, spec in ranges["tensors"].items():
            if name in header.tensors:
                info = header.tensors[name]
                numel = (info.end - info.start) // info.dtype.itemsize
                by_rank = Partition.from_json(spec, numel, name).bytes_by_rank(numel, manifest["world_size"], 1)
                for h, n in enumerate(by_rank):
                    written[h] = written.get(h, 0) + int(n) * info.dtype.itemsize
    for h, rec in ranges["holders"].items():
        assert rec["bytes"] == sum(n for rel, _, n in F.holder_pieces(ckpt, manifest, [int(h)])[int(h)]), (
            f"rank {h} wrote other bytes than its own parts"
        )
    for rel, rec in manifest["files"].items():
        if rel.endswith(".safetensors") and not rec.get("ranged"):
            written[rec["rank"]] = written.get(rec["rank"], 0) + rec["size"]
    every = F.bytes_written(ckpt, manifest)  # the same, JSON files included (what tools/bench_scale.py reports)
    assert all(every[r] >= n for r, n in written.items()) and sum(every.values()) == sum(
        rec["size"] for rec in manifest["files"].values()
    )
    mean = sum(written.values()) / manifest["world_size"]
    assert max(written.values()) <= 1.25 * mean, written

    def flip(rel: str, offset: int) -> list[str]:
        path = ckpt / rel
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x40
        path.write_bytes(bytes(raw))
        try:
            return verify_checkpoint_files(ckpt)
        finally:
            raw[offset] ^= 0x40
            path.write_bytes(bytes(raw))

    pieces = F.holder_pieces(ckpt, manifest, [int(h) for h in ranges["holders"]])
    for h, own in pieces.items():
        for rel, offset, n in {own[0], own[-1]}:
            problems = flip(rel, offset + n // 2)
            assert len(problems) == 1 and f"the ranges rank {h} wrote (" in problems[0], problems
    rel = ranges["files"][0]
    problems = flip(rel, 12)  # inside the header, which the file's owner wrote
    assert any(p.startswith(f"{rel}: its owner's bytes") for p in problems), problems
    assert verify_checkpoint_files(ckpt) == []
    return written


def _fsdp(name: str, shape: tuple[int, ...], world: int) -> Item:
    return Item("model", name, shape, torch.float32, fsdp_rows(shape, world))


def test_a_partitioned_weight_is_written_by_its_holders_and_never_moves():
    world = 4
    items = [_fsdp(f"w{i}", (8, 25), world) for i in range(6)] + [_fsdp("huge", (40, 25), world)]
    items += [Item("model", "bias", (25,), torch.float32), Item("model", "big", (4000,), torch.float32)]
    items += [Item("optimizer", f"w{i}/exp_avg", (8, 25), torch.float32, fsdp_rows((8, 25), world)) for i in range(6)]
    plan = plan_save(items, world, max_shard_bytes=5000, ranged=True)
    ranged = {name: part for s in plan.model_shards for name, part in s.ranged.items()}
    # every partitioned weight is written in place by its holders, with its own partition; the replicated weight
    # larger than one rank's share of the model is cut into one chunk per rank; the small one stays with an owner
    assert set(ranged) == {f"w{i}" for i in range(6)} | {"huge", "big"}
    assert ranged["huge"] == items[6].partition and ranged["big"].chunk == 1000
    assert all(s.nbytes <= 5000 or len(s.items) == 1 for s in plan.model_shards)
    owners = [s for s in plan.model_shards if "bias" in {i.name for i in s.items}]
    assert len(owners) == 1 and owners[0].owner_bytes == 100
    # each rank writes what it holds (+ a quarter of "big"), and one rank the bias: nearly equal
    per_rank = plan.bytes_per_rank
    assert max(per_rank) - min(per_rank) <= 100 + 128 * len(plan.model_shards[0].items) * len(plan.model_shards)
    # without ranges (converters, write_mode rank0) the plan is the one-writer plan of before
    one = plan_save(items, world, max_shard_bytes=5000)
    assert all(not s.ranged for s in one.model_shards)
    assert [len(s.items) for s in one.model_shards] == [
        len(s.items) for s in plan_save(items, world, 5000).model_shards
    ]


def test_dim1_shards_are_assembled_in_their_tp_group_and_the_busiest_writers_are_relieved():
    """A RowwiseParallel weight on a (dp 2, tp 2) grid is written as row blocks, each put together by one rank of
    the TP group holding those rows from exactly the group's column blocks; a weight whose rows all sit on the
    first ranks is moved (whole parts, shift) to ranks that write little, and the moved bytes are counted."""
    from wsd_pretrain.checkpoint.layout import BALANCE, Grid, Partition, assembly_pieces, moved_bytes

    grid = Grid((8, 6), (2, 2), None, ((0,), (1,)))
    row = Item("model", "down", (8, 6), torch.float32, Partition(grid=grid))
    plan = plan_save([row], 4, 10**6, ranged=True)
    writers = plan.model_shards[0].ranged["down"]
    assert plan.moved == {"down": "rows"} and writers.chunk == 2 * 6 and writers.ranks == (0, 1, 2, 3)
    pieces = list(assembly_pieces(row, writers, "rows", 4))
    # rows 0-1 by rank 0 and 2-3 by rank 1 (dp group 0 = ranks 0, 1), from ranks 0 and 1 only, 6 elements each
    assert {(w, h) for _, _, w, h, _ in pieces} == {(w, h) for w in range(4) for h in range(4) if w // 2 == h // 2}
    assert all(math.prod(p[0][1]) == 6 for *_, p in pieces)
    sent, received = moved_bytes(plan)
    assert list(sent) == list(received) == [6 * 4] * 4  # half of each rank's 12 elements travels, once
    # rank 0 holds every row of the one-row weights: their writing moves to the ranks above it
    items = [_fsdp(f"k{i}", (1, 64), 4) for i in range(8)] + [_fsdp("big", (16, 64), 4)]
    items += [Item("optimizer", f"{i.name}/exp_avg", i.shape, i.dtype, i.partition) for i in items]
    plan = plan_save(items, 4, 10**6, ranged=True)
    shifted = {n: p for s in plan.model_shards for n, p in s.ranged.items() if p.shift}
    assert shifted and set(plan.moved) == set(shifted) and all(n.startswith("k") for n in shifted)
    for part in shifted.values():  # the same part, written by the rank ``shift`` above its holder (rank 0)
        assert [(0, 64, part.shift)] == list(part.iter_parts(64, 4)) and part.local(part.shift, 64) == (0, 64)
    load = plan.bytes_per_rank
    assert load.max() <= BALANCE * load.mean() + 128 * 9, load
    sent, received = moved_bytes(plan)
    assert sent[0] == sum(256 for _ in shifted) and received.sum() == sent.sum()
    assert Partition.from_json(next(iter(shifted.values())).to_json(), 64, "t") == next(iter(shifted.values()))


def test_zero3_chunks_and_a_tiny_world_plan_alike():
    items = [Item("model", "w", (10,), torch.bfloat16, zero3_chunks(10, 4))]
    plan = plan_save(items, 4, 10**6, ranged=True)
    (shard,) = plan.model_shards
    assert shard.ranged == {"w": zero3_chunks(10, 4)} and shard.owner_bytes == 0
    assert list(plan.bytes_per_rank - [128 if r == shard.owner else 0 for r in range(4)]) == [6, 6, 6, 2]
    # one process: a replicated weight is written whole by its owner, whatever its size
    solo = plan_save([Item("model", "r", (10**6,), torch.float32)], 1, 10**6, ranged=True)
    assert all(not s.ranged for s in solo.model_shards)


@pytest.mark.parametrize(
    "label", ["70B", pytest.param("405B", marks=pytest.mark.slow)]
)  # 405B: same path, 10x the plan
def test_scale_report_balances_the_writers_of_tensor_parallel_jobs(label):
    """docs/scale.md's TP 8 x FSDP rows: 70B on 1,024 GPUs and 405B on 16,384, from the plan the ranks run."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from scale_report import MODELS

    from wsd_pretrain.checkpoint.costs import engine_items, save_costs

    shapes, world = MODELS[label]
    cost = save_costs(engine_items("fsdp2", shapes, world, tp=8), world, 2 * 10**9)
    ratio = cost.written.max() / cost.written.mean()
    # dim-0 weights do not move; dim-1 weights move (tp - 1) / tp of their bytes inside their TP group, once
    assert cost.sent.sum() <= 0.4 * cost.model_bytes
    # FSDP2's torch.chunk leaves the last ranks of a 2,048-way group without rows of the 6,656-row FFN blocks and
    # puts the K/V rows on the first 128: the state each rank holds is itself 1.28x at 405B; the plan moves the
    # K/V weights' writing to ranks without FFN rows (about 1 % of the model moves)
    assert ratio <= 1.25, ratio
    assert cost.moved <= 0.02 * cost.model_bytes


def test_manifest_ranges_are_checked(tmp_path):
    """A manifest whose ranged records and ranges object disagree is refused with the reason."""
    from wsd_pretrain.checkpoint.safetensors_io import hash_file
    from wsd_pretrain.errors import CheckpointError

    ckpt = tmp_path / "step-000000001-periodic"
    ckpt.mkdir()
    manifest = {
        "format": F.FORMAT,
        "format_version": F.FORMAT_VERSION,
        "position": 1,
        "step": 1,
        "tokens": 0,
        "world_size": 2,
        "kinds": ["periodic"],
        "layout": {},
        "groups": {},
        "checksum": "xxh3_128",
        "files": {"model-00001-of-00001.safetensors": {"size": 8, "hash": "0" * 32, "rank": 0, "ranged": True}},
    }

    def write(m: dict) -> None:
        (ckpt / F.MANIFEST).write_text(json.dumps(m))
        (ckpt / F.MANIFEST_HASH).write_text(f"xxh3_128 {hash_file(ckpt / F.MANIFEST)[1]}\n")

    write(manifest)
    with pytest.raises(CheckpointError, match="need a 'ranges' object"):
        F.load_manifest(ckpt)
    write(manifest | {"ranges": {"files": [], "tensors": {}, "holders": {}}})
    with pytest.raises(CheckpointError, match=r"ranges\.files must list exactly"):
        F.load_manifest(ckpt)
    good = {"files": ["model-00001-of-00001.safetensors"], "tensors": {}, "holders": {"0": {"bytes": 1, "hash": "x"}}}
    write(manifest | {"ranges": good})
    with pytest.raises(CheckpointError, match=r"ranges\.holders must map ranks"):
        F.load_manifest(ckpt)
    write(manifest | {"format_version": 2, "ranges": good | {"holders": {}}})
    with pytest.raises(CheckpointError, match="format version 3 or later"):
        F.load_manifest(ckpt)
    shutil.rmtree(ckpt)


def _ddp_ranges(rank: int, world: int, run_dir: str) -> dict:
    """DDP: a replicated weight larger than one rank's share is written a chunk per rank; the resume on the same
    ranks reads each byte once (the verification keeps what it hashed) and restores exactly."""
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    def build() -> tuple:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, WSDScheduler(opt, WSDSchedule(total=10, decay_length=2))

    cfg = CheckpointConfig(at_milestones=False, at_end=False, max_shard_size=40_000)
    model, opt, sched = build()
    for _ in range(2):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    mgr = CheckpointManager(run_dir, model, opt, sched, config=cfg)
    ckpt = mgr.save(["periodic"])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    model2, opt2, sched2 = build()
    mgr2 = CheckpointManager(run_dir, model2, opt2, sched2, config=cfg)
    out = mgr2.load(ckpt)
    mgr2.close()
    same = all(torch.equal(v, model2.state_dict()[k]) for k, v in saved.items())
    same_opt = [
        torch.equal(v, q[k]) for p, q in zip(opt.state.values(), opt2.state.values(), strict=True) for k, v in p.items()
    ]
    result = {"ckpt": str(ckpt), "same": same, "same_opt": all(same_opt) and bool(same_opt), "stats": out["stats"]}
    return result | _fsdp2_moved(rank, run_dir + "-fsdp2", cfg)


class _Fan(torch.nn.Module):
    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(layer(x).square().sum() for layer in self.layers)


def _fsdp2_moved(rank: int, run_dir: str, cfg: object) -> dict:
    """FSDP2 where rank 0 holds every row of the one-row weights (``torch.chunk`` of 1 row over 2 ranks): the plan
    moves those weights' parts to rank 1, which receives them from rank 0 and writes them; the resume is exact."""
    from torch.distributed.fsdp import fully_shard

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    def build() -> tuple:
        torch.manual_seed(1)
        model = _Fan([torch.nn.Linear(512, 1, bias=False) for _ in range(6)] + [torch.nn.Linear(512, 4)])
        fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, WSDScheduler(opt, WSDSchedule(total=10, decay_length=2))

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
        x = torch.randn(4, 512, generator=torch.Generator().manual_seed(10 * i + rank))
        model(x).backward()
        opt.step()
        opt.zero_grad()

    model, opt, sched = build()
    step(model, opt, 0)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=cfg)
    ckpt = mgr.save(["periodic"])
    mgr.close()
    saved_first = model.layers[0].weight.full_tensor().reshape(-1).tolist()
    step(model, opt, 1)
    after = [p.full_tensor().clone() for p in model.parameters()]
    model2, opt2, sched2 = build()
    mgr2 = CheckpointManager(run_dir, model2, opt2, sched2, config=cfg)
    mgr2.load(ckpt)
    mgr2.close()
    step(model2, opt2, 1)
    same = all(torch.equal(a, p.full_tensor()) for a, p in zip(after, model2.parameters(), strict=True))
    return {"fsdp2_ckpt": str(ckpt), "fsdp2_same": same, "fsdp2_first": saved_first}


@pytest.mark.distributed
def test_ddp_replicated_weights_are_written_a_range_per_rank_and_resumed_reading_each_byte_once(tmp_path):
    from distributed_helpers import run_distributed

    results = run_distributed(_ddp_ranges, args=(str(tmp_path / "run"),), timeout=300)
    ckpt = Path(results[0]["ckpt"])
    manifest = F.load_manifest(ckpt)
    # both Linear weights (64 KB each, above 40 KB) are cut into one range per rank; the biases stay with an owner
    assert sorted(manifest["ranges"]["tensors"]) == ["0.weight", "1.weight"], manifest["ranges"]["tensors"]
    assert sorted(manifest["ranges"]["holders"]) == ["0", "1"]
    check_ranges(ckpt, tmp_path / "scratch")
    for r in results:
        assert r["same"] and r["same_opt"], r
        # what a rank verified (the files and ranges it wrote) it restores from the bytes it hashed, not the disk
        assert r["stats"]["kept_hits"] > 0 and r["stats"]["bytes_kept"] > 0, r["stats"]
    # FSDP2: rank 0 held every one-row weight; the plan moved their writing to rank 1 (shift 1), which received
    # the rows from rank 0; the files verify, hold the values, and training resumed from them identically
    from wsd_pretrain.checkpoint.safetensors_io import SafetensorsReader

    ckpt = Path(results[0]["fsdp2_ckpt"])
    manifest = F.load_manifest(ckpt)
    moved = {n: p for n, p in manifest["ranges"]["tensors"].items() if p.get("shift")}
    assert sorted(moved) == [f"layers.{i}.weight" for i in range(6)], manifest["ranges"]["tensors"]
    assert all(p["shift"] == 1 for p in moved.values())
    assert manifest["ranges"]["holders"]["1"]["bytes"] >= 6 * 512 * 4
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    assert verify_checkpoint_files(ckpt) == []
    assert all(r["fsdp2_same"] for r in results), results
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    reader = SafetensorsReader(ckpt / index["layers.0.weight"])
    saved = reader.read_range("layers.0.weight", 0, 512)
    assert saved.tolist() == results[0]["fsdp2_first"]  # the bytes rank 1 received from rank 0 and wrote
