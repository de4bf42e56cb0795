"""Checkpoints on 2, 4 and 8 ranks: what moves between ranks, what each rank writes and reads, and the time, next to
torch.distributed.checkpoint (docs/benchmarks.md, "Scale").

For FSDP2 (fp32 parameters), DeepSpeed ZeRO-2 (bf16 weights, fp32 masters) and FSDP2 x TP 2 (a (dp, tp) mesh) on
N gloo ranks, one model of 16 linear layers with AdamW state (about 200 MB of training state at the default
width): one save and one resume through the checkpoint manager, then `dcp.save` / `dcp.load` of the same sharded state, in the same
processes, the methods taking turns. Every tensor collective is counted on its receiving side (a `recv` its bytes, a
`gather` (N-1) times the tensor at the root, a `broadcast` once per receiver, an `all_reduce` 2(N-1)/N of it per
rank), so "moved" is the bytes that crossed between ranks. Then N/2 ranks resume from the N-rank checkpoint, to
count what each reads on another layout. Each figure is checked against the prediction of
`wsd_pretrain.checkpoint.costs` (what tools/scale_report.py extrapolates to 1,024 ranks).

    python tools/bench_scale.py                          # 2, 4, 8 ranks; rewrites its section of docs/benchmarks.md
    python tools/bench_scale.py --worlds 2 --width 64 --out /tmp/x.md   # the smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench import DOC, ROOT, fmt_bytes, machine, table, write_section

CHILD = r"""
import json, os, sys, tempfile, time, torch
import torch.distributed as dist
from wsd_pretrain import WSDSchedule, WSDScheduler, distributed as D
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
engine, run_dir, width, layers, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
D.init_distributed(backend="gloo", timeout_s=1800)
rank, world = D.get_rank(), D.get_world_size()
torch.set_num_threads(1)
torch.manual_seed(0)
if engine == "fsdp2+tp":
    # the same number of width x width weights as a Llama MLP: up_proj (ColwiseParallel) then down_proj (RowwiseParallel)
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = torch.nn.Linear(width, width, bias=False)
            self.down_proj = torch.nn.Linear(width, width, bias=False)
        def forward(self, h):
            return self.down_proj(torch.relu(self.up_proj(h)))
    model = torch.nn.Sequential(*[MLP() for _ in range(layers // 2)])
else:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

# ------------------------------------------------------------------ counting what crosses between ranks
moved = {"n": 0}
def counted(name, received):
    real = getattr(dist, name)
    def wrapper(*a, **k):
        moved["n"] += received(*a, **k)
        return real(*a, **k)
    setattr(dist, name, wrapper)
nb = lambda t: t.numel() * t.element_size() if t is not None else 0
def arg(a, k, i, name, default=None):
    return a[i] if len(a) > i else k.get(name, default)
def _gather(*a, **k):
    dst, group = arg(a, k, 2, "dst", 0), arg(a, k, 3, "group")
    return nb(arg(a, k, 0, "tensor")) * (dist.get_world_size(group) - 1) if dist.get_rank() == dst else 0
counted("recv", lambda *a, **k: nb(arg(a, k, 0, "tensor")))
# the model's weights travel in batches of point-to-point ops (torch checks that each op is its own irecv or isend,
# so the batch is counted, not the ops): a receive's bytes
counted("batch_isend_irecv", lambda ops: sum(nb(op.tensor) for op in ops if op.op is dist.irecv))
counted("gather", _gather)
counted("broadcast", lambda *a, **k: 0 if dist.get_rank() == arg(a, k, 1, "src", 0) else nb(arg(a, k, 0, "tensor")))
counted("all_reduce", lambda *a, **k: 2 * nb(arg(a, k, 0, "tensor")) * (world - 1) // world)
counted("all_gather", lambda *a, **k: nb(arg(a, k, 1, "tensor")) * (len(arg(a, k, 0, "tensor_list")) - 1))
counted("all_gather_into_tensor", lambda *a, **k: nb(arg(a, k, 0, "output_tensor")) - nb(arg(a, k, 1, "input_tensor")))
counted("reduce_scatter_tensor", lambda *a, **k: nb(arg(a, k, 1, "input")) - nb(arg(a, k, 0, "output")))

# ------------------------------------------------------------------ the engine
schedule = WSDSchedule(total=100, decay_length=10)
x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
if engine == "fsdp2+tp":  # dp x tp 2: FSDP2 over the dp ranks, tensor parallel inside each pair (torchtitan's order)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(mesh.get_local_rank("dp")))  # one batch per TP group
    for block in model:
        parallelize_module(block, mesh["tp"], {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, schedule)
    def train_step():
        model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad(); sched.step()
    target = model
elif engine == "fsdp2":
    from torch.distributed.fsdp import fully_shard
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, schedule)
    def train_step():
        model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad(); sched.step()
    target = model
else:
    from wsd_pretrain import deepspeed_initialize
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, schedule)
    target, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
        "train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    def train_step():
        loss = target(x.to(torch.bfloat16)).float().pow(2).mean(); target.backward(loss); target.step()
mgr = CheckpointManager(run_dir, target, opt, sched, config=CheckpointConfig(
    at_milestones=False, at_end=False, on_preemption=False, keep_last=10))
out = {"rank": rank}

def timed(fn):
    D.barrier(); before = moved["n"]; t0 = time.perf_counter()
    result = fn()
    D.barrier()
    return time.perf_counter() - t0, moved["n"] - before, result

def dcp_state():
    # the same sharded state, as torch.distributed.checkpoint takes it
    if engine in ("fsdp2", "fsdp2+tp"):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        m, o = get_state_dict(target, opt)
        return {"model": m, "optim": o}
    w = target.optimizer
    state = {f"model.{n}": p for n, p in target.module.named_parameters()}  # bf16, whole on every rank: DCP dedups
    for g, flat in enumerate(w.single_partition_of_fp32_groups):
        state[f"r{rank}.master.{g}"] = flat
        for k, v in opt.state[flat].items():
            if torch.is_tensor(v) and v.dim():
                state[f"r{rank}.{k}.{g}"] = v
    return state

if mode == "save":
    train_step()
    # warm-up of both paths (first-use costs: imports, process groups), then the measured rounds, alternating
    import torch.distributed.checkpoint as dcp
    for r in range(4):
        if r:
            train_step()
        t, m, path = timed(lambda: mgr.save(["periodic"]))
        dcp_dir = D.broadcast_object(tempfile.mkdtemp(dir=run_dir) if rank == 0 else None)
        td, md, _ = timed(lambda: dcp.save(dcp_state(), checkpoint_id=dcp_dir))
        t_load, m_load, res = timed(lambda: mgr.load(path))
        t_size, _, _ = timed(lambda: mgr.load(path, verify="size"))
        state = dcp_state()
        def dcp_load():
            dcp.load(state, checkpoint_id=dcp_dir)
            if engine in ("fsdp2", "fsdp2+tp"):
                from torch.distributed.checkpoint.state_dict import set_state_dict
                set_state_dict(target, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        tdl, mdl, _ = timed(dcp_load)
        if r:
            out.setdefault("rounds", []).append({"save_s": t, "save_moved": m, "dcp_save_s": td, "dcp_save_moved": md,
                "load_s": t_load, "load_size_s": t_size, "load_moved": m_load, "dcp_load_s": tdl, "dcp_load_moved": mdl,
                "read": res["stats"]["bytes_read"], "path": str(path)})
else:  # resume the newest checkpoint on this (smaller) world
    path = sorted(p for p in (__import__("pathlib").Path(run_dir) / "checkpoints").iterdir() if p.name.startswith("step-"))[-1]
    t_load, m_load, res = timed(lambda: mgr.load(path))
    out["rounds"] = [{"load_s": t_load, "load_moved": m_load, "read": res["stats"]["bytes_read"], "path": str(path)}]
out["model_bytes"] = sum(p.numel() * p.element_size() for p in (target.module if engine.startswith("ds") else model).parameters())
mgr.close()
print(json.dumps(out), flush=True)
D.teardown()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(world: int, *args: str, timeout: float = 3000) -> list[dict]:
    """Start ``world`` ranks of CHILD (the way torchrun would); return each rank's JSON."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    port = free_port()
    procs = []
    try:
        for r in range(world):
            env = dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(r),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                DS_ACCELERATOR="cpu",
                OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, f.name, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
            )
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        os.unlink(f.name)
    results = []
    for r, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {r} failed:\n{stdout[-1000:]}\n{stderr[-4000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def written_by_rank(ckpt: Path, world: int) -> list[int]:
    from wsd_pretrain.checkpoint import format as F

    manifest = json.loads((ckpt / "manifest.json").read_text())
    out = [0] * world
    for rank, nbytes in F.bytes_written(ckpt, manifest).items():  # a range-written file: each writer its bytes
        out[rank] += nbytes
    return out


def med(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def measure(engine: str, world: int, width: int, layers: int) -> dict:
    from wsd_pretrain.checkpoint.costs import engine_items, load_costs, save_costs

    with tempfile.TemporaryDirectory() as run:
        saved = launch(world, engine, run, str(width), str(layers), "save")
        # half the ranks: for FSDP2 + TP, half the data-parallel degree at the same TP degree
        halves = world > 1 and (engine != "fsdp2+tp" or world >= 4)
        half = launch(max(1, world // 2), engine, run, str(width), str(layers), "load") if halves else None
        rounds = [r["rounds"] for r in saved]
        ckpt = Path(rounds[0][-1]["path"])
        written = written_by_rank(ckpt, world)
        state_bytes = sum(written)
    n = len(rounds[0])
    per_round = lambda key: [max(rank_rounds[i][key] for rank_rounds in rounds) for i in range(n)]
    total = lambda key: [sum(rank_rounds[i][key] for rank_rounds in rounds) for i in range(n)]
    model_bytes = saved[0]["model_bytes"]
    tp = 2 if engine == "fsdp2+tp" else 1
    if tp > 1:
        shapes = [(f"{i}.{w}.weight", (width, width)) for i in range(layers // 2) for w in ("up_proj", "down_proj")]
    else:
        shapes = [s for i in range(layers) for s in ((f"{i}.weight", (width, width)), (f"{i}.bias", (width,)))]
    kind = "zero2" if engine == "ds2" else "fsdp2"
    predicted = save_costs(engine_items(kind, shapes, world, tp), world, 2 * 10**9)
    return {
        "engine": engine,
        "world": world,
        "state": state_bytes,
        "model": model_bytes,
        "save_s": med(per_round("save_s")),
        "dcp_save_s": med(per_round("dcp_save_s")),
        "load_s": med(per_round("load_s")),
        "load_size_s": med(per_round("load_size_s")),
        "dcp_load_s": med(per_round("dcp_load_s")),
        "save_moved": med(total("save_moved")),
        "load_moved": med(total("load_moved")),
        "dcp_save_moved": med(total("dcp_save_moved")),
        "predicted_moved": int(predicted.sent.sum()),
        "written_max": max(written),
        "written_mean": sum(written) / len(written),
        "read_max": max(r[-1]["read"] for r in rounds),
        "predicted_read": int(load_costs(kind, shapes, world, tp=tp).read.max()),
        "half_read_max": max(r["rounds"][0]["read"] for r in half) if half else None,
        "half_predicted": int(load_costs(kind, shapes, world // 2, tp=tp).read.max()) if half else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--engines", nargs="+", default=["fsdp2", "ds2", "fsdp2+tp"])
    parser.add_argument("--tp-worlds", type=int, nargs="+", default=[4, 8], help="world sizes of the FSDP2 + TP 2 rows")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the section here instead of docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows = [
        [
            "engine",
            "ranks",
            "state",
            "save: moved (x model)",
            "resume: moved (x model)",
            "written max/mean",
            "read per rank: same layout / half the ranks",
            "save s (DCP)",
            "resume s: checksums / sizes (DCP)",
        ]
    ]
    results = []
    for engine in args.engines:
        for world in args.tp_worlds if engine == "fsdp2+tp" else args.worlds:
            t0 = time.monotonic()
            res = measure(engine, world, args.width, args.layers)
            results.append(res)
            print(f"{engine} x{world}: {time.monotonic() - t0:.0f}s {json.dumps(res)}", file=sys.stderr)
            m = res["model"]
            rows.append(
                [
                    {"fsdp2": "FSDP2 fp32", "ds2": "ZeRO-2 bf16", "fsdp2+tp": f"FSDP2 {world // 2} x TP 2 fp32"}[
                        engine
                    ],
                    world,
                    fmt_bytes(res["state"]),
                    f"{fmt_bytes(res['save_moved'])} ({res['save_moved'] / m:.2f}x; predicted {res['predicted_moved'] / m:.2f}x)",
                    f"{fmt_bytes(res['load_moved'])} ({res['load_moved'] / m:.3f}x)",
                    f"{res['written_max'] / res['written_mean']:.2f}",
                    f"{fmt_bytes(res['read_max'])} / "
                    + (fmt_bytes(res["half_read_max"]) if res["half_read_max"] else "-"),
                    f"{res['save_s']:.2f} ({res['dcp_save_s']:.2f})",
                    f"{res['load_s']:.2f} / {res['load_size_s']:.2f} ({res['dcp_load_s']:.2f})",
                ]
            )
    body = f"""## Scale: 2-8 ranks against torch.distributed.checkpoint (`tools/bench_scale.py`)

Machine: {machine()}. Run on {time.strftime("%Y-%m-%d")}; gloo ranks on this one machine (all of them share its
{os.cpu_count()} cores and one disk, so times grow with the rank count here where on a cluster each rank has its own
GPU, NIC and share of the filesystem); {args.layers} linear layers of {args.width}x{args.width} with AdamW;
median of 3 rounds after a warm-up round, our save/resume and DCP's taking turns in the same processes.

{table(rows)}

"moved" is every byte that crossed between ranks during the save or the resume (all ranks, all collectives,
counted on the receiving side), as a multiple of the model's weights. A save moves no FSDP2 or ZeRO weight (each
holder writes its own rows or chunk of the Hugging Face shard in place: range-written files), nothing of the master
weights or the optimizer state. Under tensor parallelism a RowwiseParallel weight's column blocks are not byte
ranges of the file, so this release still gathers each such weight whole at its shard's owner: (N-1)/N of it
moves (here half the weights are Rowwise: 0.38x on 4 ranks, 0.44x on 8). "predicted" is
`wsd_pretrain.checkpoint.costs` for the same model (what docs/scale.md extrapolates), which prices the assembly per
TP group that docs/scale.md's TP rows assume (each TP group puts its own rows together and writes them in place:
(tp-1)/tp of the Rowwise weights move, 0.25x here); that assembly is not built yet. A resume moves only the
protocol's small messages; a tensor-parallel one reads each Rowwise column block out of the Hugging Face file row
by row (an fp32 job keeps no separate master weights), which is why its resume is slower than DCP's here. "written max/mean" compares the
busiest rank's bytes with the average. "read per rank" is what the busiest rank read to restore its state (its own
slices, and for ZeRO-2 the whole bf16 model every rank holds), without the checksum verification; "half the ranks"
resumes the same checkpoint on half as many ranks (for FSDP2 x TP 2: half the data-parallel degree, the same TP
degree). The FSDP2 x TP rows train the same number of weights as a Llama MLP, `up_proj` (ColwiseParallel: each
rank's box is a run of whole rows, written in place by its holder) then `down_proj` (RowwiseParallel: a column
block per TP rank, put together by one rank of the TP group, at exactly its bytes), FSDP2 cutting each TP shard
again on dim 0 (torchtitan's order). DCP (`dcp.save`/`dcp.load` of the same sharded state: FSDP2's
`get_state_dict`, or ZeRO-2's bf16 weights and each rank's flat fp32 partitions) writes no Hugging Face folder and
keeps no checksums; ours does both. Our resume is timed twice: with the default checksum verification (each rank
hashes the files its rank number wrote: on this machine 8 ranks hash on 2 cores) and with `verify: size`, which
checks sizes only, as DCP does nothing more.
"""
    write_section("scale", body, args.out or DOC)
    return 0


if __name__ == "__main__":
    sys.exit(main())
