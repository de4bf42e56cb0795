"""The cost of one save and one resume at cluster scale, from the code's own plan (docs/scale.md).

Nothing here is measured: the save plan (`wsd_pretrain.checkpoint.layout.plan_save`, the same function every rank
runs) and the per-rank accounting of `wsd_pretrain.checkpoint.costs` are evaluated for Llama-3 70B on 1,024 GPUs and
405B on 16,384, with FSDP2, DeepSpeed ZeRO-3 and ZeRO-2, beside what torch.distributed.checkpoint, DeepSpeed's
save_checkpoint and Megatron's dist_checkpointing do for the same state (from how their code works; see the notes
in the output). tools/bench_scale.py checks the same accounting against measured runs on 2-8 ranks.

    python tools/scale_report.py                  # rewrites docs/scale.md
    python tools/scale_report.py --out /tmp/x.md  # elsewhere (the smoke test)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsd_pretrain.checkpoint.costs import engine_items, load_costs, save_costs  # noqa: E402
from wsd_pretrain.checkpoint.layout import Item, Partition, itemsize  # noqa: E402
from wsd_pretrain.parallel import stage_layers  # noqa: E402

GB = 1e9
DISK = 2.0  # GB/s written or read per rank (a node's NVMe RAID or a Lustre client, shared by 8 GPUs)
NET = 25.0  # GB/s per rank (200 Gb/s InfiniBand)


def llama(hidden: int, layers: int, ffn: int, vocab: int, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (ffn, hidden)),
            (p + "mlp.up_proj.weight", (ffn, hidden)),
            (p + "mlp.down_proj.weight", (hidden, ffn)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


MODELS = {
    "70B": (llama(8192, 80, 28672, 128256, 1024), 1024),
    "405B": (llama(16384, 126, 53248, 128256, 1024), 16384),
}
# pipeline-parallel layouts: (model, pp, tp) on the model's GPUs, the rest data parallel (FSDP2), pp outermost
PP_LAYOUTS = {"405B": (16, 8)}


def _stage_of(name: str, bounds: list[range], pp: int) -> int:
    if name.startswith("model.layers."):
        index = int(name.split(".")[2])
        return next(s for s, r in enumerate(bounds) if index in r)
    return 0 if name == "model.embed_tokens.weight" else pp - 1


def _shifted(p: Partition, numel: int, offset: int) -> Partition:
    """A stage's partition over its own ranks 0..n-1, moved to the job's ranks ``offset..offset+n-1``."""
    if p.replicated:
        return p
    if p.grid is not None:
        ranks = p.grid.ranks if p.grid.ranks is not None else range(math.prod(p.grid.mesh))
        return Partition(grid=dataclasses.replace(p.grid, ranks=tuple(r + offset for r in ranks)))
    if p.parts:
        return Partition(parts=tuple((s, n, r + offset) for s, n, r in p.parts))
    count = math.ceil(numel / p.chunk)
    ranks = p.ranks if p.ranks is not None else tuple(range(count))
    return Partition(chunk=p.chunk, ranks=tuple(r + offset for r in ranks))


def pp_items(shapes: list[tuple[str, tuple[int, ...]]], world: int, pp: int, tp: int) -> list[Item]:
    """FSDP2 + TP items of a PP x (dp, tp) job: each stage's tensors laid out by ``engine_items`` over that stage's
    ``world / pp`` ranks (the main job's stage split, ``wsd_pretrain.parallel.stage_layers``), stage ``s`` on ranks
    ``s * world / pp ...``; a 0-d ``step`` is replicated over the stage (one writer)."""
    layers = sum(1 for n, _ in shapes if n.endswith("input_layernorm.weight"))
    bounds = stage_layers(layers, pp)
    per_stage = world // pp
    out: list[Item] = []
    for stage in range(pp):
        mine = [(n, s) for n, s in shapes if _stage_of(n, bounds, pp) == stage]
        for item in engine_items("fsdp2", mine, per_stage, tp):
            part = _shifted(item.partition, item.numel, stage * per_stage)
            out.append(Item(item.group, item.name, item.shape, item.dtype, part))
    return out


def pp_row(label: str, shapes: list[tuple[str, tuple[int, ...]]], world: int, pp: int, tp: int, shard: int) -> str:
    """One table row: FSDP2 + TP + PP, saved and resumed on the same layout (each rank reads what it holds)."""
    t0 = time.monotonic()
    items = pp_items(shapes, world, pp, tp)
    cost = save_costs(items, world, shard)
    read = np.zeros(world, dtype=np.int64)
    for item in items:  # each rank reads its own rows and boxes (a replicated 0-d step: every rank of the stage)
        if item.numel and not item.partition.replicated:
            read += item.partition.bytes_by_rank(item.numel, world, itemsize(item.dtype))
    gathered = int(cost.sent.sum())
    save_s = float(cost.written.max()) / (DISK * GB) + float(cost.received.max()) / (NET * GB)
    load_s = float(max(read.max(), cost.written.max())) / (DISK * GB)
    print(f"{label} pp {pp}: planned in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return (
        f"| fsdp2 + TP {tp} + PP {pp} (dp {world // tp // pp}) | {fmt(cost.model_bytes + cost.state_bytes)} | "
        f"{fmt(gathered)} ({gathered / max(cost.model_bytes, 1):.2f}x the model) | {fmt(cost.written.max())} / "
        f"{fmt(cost.written.mean())} ({cost.written.max() / cost.written.mean():.2f}) | {cost.total_files:,} | "
        f"{cost.gathers} weights sent + {cost.coordination} small | {save_s:.1f} s | {fmt(read.max())} (verified: "
        f"{fmt(cost.written.max())}) / (another mesh: format 3 boxes) | {load_s:.1f} s |"
    )


def fmt(n: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def report(models: dict[str, tuple[list[tuple[str, tuple[int, ...]]], int]], shard: int) -> str:
    lines = []
    for label, (shapes, world) in models.items():
        params = sum(math.prod(s) for _, s in shapes)
        lines += [
            f"## {label} ({params / 1e9:.1f}B parameters) on {world:,} GPUs",
            "",
            "| engine | state | save: bytes through collectives (all ranks) | per rank: written max / mean | "
            "files | collectives | save time | resume: read per rank (same layout / half the ranks) | resume time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for engine, tp in (("fsdp2", 1), ("zero3", 1), ("zero2", 1), ("fsdp2", 8)):
            t0 = time.monotonic()
            cost = save_costs(engine_items(engine, shapes, world, tp), world, shard)
            written = {r: int(b) for r, b in enumerate(cost.written)}
            same = load_costs(engine, shapes, world, written, tp=tp)
            half = load_costs(engine, shapes, world // 2, written, checksum=False, tp=tp) if tp == 1 else None
            gathered = int(cost.sent.sum())
            # the time: the slowest rank's writes at DISK, after the gathers into the busiest writer at NET
            save_s = float(cost.written.max()) / (DISK * GB) + float(cost.received.max()) / (NET * GB)
            # each byte read once: what a rank verifies (the files and ranges it wrote) is kept for its restore
            load_s = float(max(same.read.max(), same.verified.max())) / (DISK * GB)
            label_engine = engine if tp == 1 else f"{engine} + TP {tp} (dp {world // tp})"
            half_text = fmt(half.read.max()) if half is not None else "(another mesh: format 3 boxes)"
            lines.append(
                f"| {label_engine} | {fmt(cost.model_bytes + cost.state_bytes)} | {fmt(gathered)} "
                f"({gathered / max(cost.model_bytes, 1):.2f}x the model), balance: {fmt(cost.moved)} | "
                f"{fmt(cost.written.max())} / "
                f"{fmt(cost.written.mean())} ({cost.written.max() / cost.written.mean():.2f}) | {cost.total_files:,} | "
                f"{cost.gathers} weights sent + {cost.coordination} small | {save_s:.1f} s | {fmt(same.read.max())} "
                f"(verified: {fmt(same.verified.max())}) / {half_text} | {load_s:.1f} s |"
            )
            print(f"{label} {label_engine}: planned in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        if label in PP_LAYOUTS:
            lines.append(pp_row(label, shapes, world, *PP_LAYOUTS[label], shard))
        fp32 = params * 4
        lines += [
            "",
            f"Beside it, for the same state (ZeRO-3 or FSDP2 AdamW, {world:,} ranks; from how each tool's code works):",
            "",
            "| tool | save: bytes through collectives | files | metadata | a Hugging Face folder |",
            "|---|---|---|---|---|",
            f"| wsd_pretrain v3 (this) | none for dim-0 shards (written in place by their holders); a dim-1 TP "
            f"shard's column blocks to one writer per TP group | one or more per rank + model "
            f"shards | O(tensors + ranks): {fmt(save_costs(engine_items('zero3', shapes, world), world, shard).index_bytes)} | "
            "in every checkpoint |",
            f"| wsd_pretrain v1 (before) | every tensor all-gathered to every rank: {fmt(params * 14 * (world - 1))} "
            f"sent, {fmt(params * 12)} received per rank | model + state shards | O(tensors) | in every checkpoint |",
            "| torch.distributed.checkpoint (`dcp.save`) | none (each rank writes its shards) + the plan gathered "
            f"to rank 0 | one per rank + `.metadata` | O(tensors x ranks): about {fmt(len(shapes) * 3 * world * 150)} "
            f"pickled | no: consolidating one reads and writes the model again ({fmt(fp32)} in fp32) |",
            "| DeepSpeed `save_checkpoint` (ZeRO-3) | none | two per rank (pickled) | none (`zero_to_fp32` "
            "re-derives it) | no: `zero_to_fp32` reads every rank's files on one machine |",
            "| Megatron `dist_checkpointing` (torch_dist, fully parallel) | the sharded-tensor metadata all-gathered "
            "for validation | one or two per rank + `.metadata` | O(tensors x ranks) | no: a separate conversion |",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scale.md")
    parser.add_argument("--max-shard-size", type=float, default=2e9, help="bytes (default 2e9)")
    parser.add_argument("--small", action="store_true", help="a tiny model on 8 ranks (the smoke test)")
    args = parser.parse_args(argv)
    models = MODELS
    if args.small:
        models = {"tiny": (llama(64, 2, 128, 256, 16), 8)}
        PP_LAYOUTS["tiny"] = (2, 2)
    body = report(models, int(args.max_shard_size))
    text = f"""# Checkpoints at cluster scale

Generated by `python tools/scale_report.py` from the code's own save plan and per-rank accounting
(`wsd_pretrain/checkpoint/layout.py`, `costs.py`): the same functions every rank runs to decide what it writes. The
engines hold AdamW state (fp32 `exp_avg`, `exp_avg_sq`, a 0-d `step`); FSDP2 keeps fp32 parameters (the model
folder is fp32 and is the master), DeepSpeed ZeRO-2/3 keep bf16 weights with fp32 masters. Times assume
{DISK:g} GB/s of disk per rank and {NET:g} GB/s of network per rank, all ranks in parallel: the slowest rank's
writes after the gathers into the busiest writer (save), the slowest rank's reads with checksum verification
(resume). `tools/bench_scale.py` measures the same quantities on 2-8 ranks (docs/benchmarks.md, "Scale") and
checks them against this accounting. Shard size {fmt(args.max_shard_size)}.

Reading the tables: a partitioned model weight does not move: each rank that holds a part of it (an FSDP2 row
block, a ZeRO-3 chunk, a TP x FSDP row block) writes that contiguous byte range of its Hugging Face shard in place
(docs/checkpoint-format.md, "Range-written model files"), and a replicated weight larger than one rank's share
(ZeRO-2's bf16 embedding) is written a chunk per rank; master weights and optimizer state are written by the rank
that holds them. The `fsdp2 + TP 8` row is torchtitan's Llama plan on a (dp, tp) mesh: dim-0 TP shards (embedding,
q/k/v, gate/up, output) cut again on dim 0 by FSDP2 are row ranges, written in place; a dim-1 TP shard (o_proj,
down_proj) is not a byte range of the file, so the plan cuts it into row blocks, one per holder, and each writer
receives its rows from the holders whose column blocks meet them (its own TP group), at exactly the bytes needed:
(tp - 1) / tp of those weights travel, point to point (`layout.assembly_pieces`; bytes from `layout.moved_bytes`).
Where FSDP2's `torch.chunk` leaves ranks writing more than 1.2x the mean, the plan moves whole weights' parts
(the K/V projections of the first ranks) to ranks that write little: "balance" in the collectives column. The
items are the adapters' own grids (`adapters.dtensor_partition`), and every number is `layout.plan_save`'s.
A resume on the same layout reads each byte once: each rank
verifies the files and ranges it wrote (its own slices and rows) and restores from the bytes it hashed (plus, for
ZeRO-2, the whole bf16 model, which every rank holds); on half the ranks each reads twice as much. Six small
messages go over the checkpoint's gloo groups per save.

{body}
## What limits it

- **The busiest writer writes what it holds.** With every partitioned weight written by its holders and the large
  replicated ones cut a chunk per rank, each rank writes its own rows and state: max/mean is 1.00-1.12 at 70B on
  1,024 GPUs and for ZeRO-2/3 at 405B. It was 3-29x when a Hugging Face shard had one writer, which wrote the
  largest tensors (the 128,256 x hidden embedding and output layers) whole. FSDP2 at 405B on
  16,384 ranks held 1.28x (with or without TP): FSDP2 cuts dim 0 with `torch.chunk`, so a 6,656-row FFN block over
  2,048 ranks is 1,664 chunks of 4 rows and the last 384 ranks hold none, and the 128-row K/V blocks sit on the
  first 128 ranks only: the state each rank holds is itself 1.28x the mean (optimizer state alone: 1.28). The plan
  moves the writing of the K/V weights of the first ranks to a window of ranks that hold no FFN rows (each part
  whole, sent by its holder: the "balance" bytes, about 1 % of the model), which brings it to 1.23; the optimizer
  state stays with its holder (its files are the holder's own, which a same-mesh resume reads back alone).
- **Every rank writes into every model file that holds its rows**, so model shards of range-written tensors are
  cut at `max_shard_size` (not at the model divided by the ranks): a rank opens model bytes / 2 GB files (141 at
  70B fp32, 812 at 405B), each once, one after the other; rank 0's manifest holds one checksum per rank for all of
  them (O(ranks), not O(files x ranks)). Verifying a holder's ranges reads every range-written file's header.
- **ZeRO-2 resumes read the whole bf16 model on every rank**: every rank holds it whole. The ranks of a node
  share it through the page cache (8 GPUs per node: the filesystem serves it once per node); reading fragments and
  all-gathering them would move the model once per rank through the network instead. DeepSpeed's own
  `load_checkpoint` reads its model file on every rank too. FSDP2 and ZeRO-3 ranks read only their own rows.
- **Checksum verification** reads each file and range once in the whole job, each rank the ones its own rank
  number wrote; on the same layout these are what it restores, and it restores from the bytes it hashed (up to 16 GB
  a rank), so each byte is read once; `verify: size` skips the hashing.
- **Collectives**: a partitioned weight is sent only by the ranks that hold a part of it, at its exact size (a
  padded gather would make every rank of a 16,384-rank job send a chunk of every small tensor); the protocol's
  own messages are an agreement on the plan, the staging name, an agreement on the fetch, the per-rank file records
  gathered to rank 0 (about 160 bytes per file), rank 0's outcome and a visibility check: six collectives per save;
  a resume has three (the manifest, an agreement after verification and planning, one after the restore), all on
  the checkpoint's gloo groups. The agreement on the plan is one all-reduce of 17 integers (136 bytes per rank at
  any world size): a flag and a digest of the items every rank planned from, with its negation, so that the
  maximum and the minimum of each word agree exactly when every rank planned the same.
- **Pipeline stages** (the `fsdp2 + TP 8 + PP 16` row, the 405B recipe's layout `configs/llama_405b_3d.yaml`):
  each stage's tensors are laid out over that stage's 1,024 ranks (TP 8 x FSDP2 128, the main job's stage split:
  7, 8 x 14, 7 layers) and written by them; nothing crosses stages. The only bytes that move are the TP groups'
  dim-1 assemblies, as in the TP row; the pipeline adds the stages' descriptions exchanged inside each pipeline
  group (checkpoint/pipeline.py, not priced here: about the model's description, ~1.5 MB at 70B). Writes are even (1.01):
  FSDP2 cuts a 6,656-row TP block of the FFN over 128 ranks (52 rows each), where without PP it cut it over
  2,048 and left the last ranks without rows (the 1.28 above).
- **Building the manager** (`checkpoint/agreement.py`) costs each rank one pass over the parameters it holds as
  replicas (DDP and ZeRO-0/1/2's model weights; under FSDP2 and ZeRO-3 there are none): exact sums of their
  bits on their own device, about 17 bytes of memory traffic per byte of weights, so about half a second for the
  140 GB of a 70B model's bf16 weights at an H200's 4.8 TB/s (plus some 17,000 kernel launches), and 16 bytes per
  4M-word chunk copied to the host. Then hashing the
  description of every tensor (group, name, global shape, dtype, partition: kilobytes per hundred tensors) and one
  all-reduce of 17 integers on the checkpoint's gloo group, the same 136 bytes per rank at 8 ranks and at 16,384.
  Only when the ranks disagree, once, before failing, do they exchange more: every rank's error and digests (an
  all-gather of about 100 bytes per rank: 1.6 MB at 16,384 ranks) and the description of one rank of each
  distinct kind (at most four broadcasts of tens of kilobytes).
"""
    args.out.write_text(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
