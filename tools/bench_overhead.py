"""The checkpoint manager's cost per training step when it is not saving (goal: under 1%).

The tiny default model trains for N updates with and without `manager.maybe_save()` after each (no checkpoint is
due in the measured window: it only checks the schedule's events and, every `decide_every` updates, agrees with
the other ranks on time-based and preemption saves: one small all-reduce). Runs alternate, in one process and on
2 ranks (gloo).

    python tools/bench_overhead.py [--steps 100] [--rounds 3] [--out docs/benchmarks.md]
    python tools/bench_overhead.py --steps 2 --rounds 1 --batch 2 --seq-len 16 --ranks 2 --out /tmp/o.md  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _bench import add_out_argument, machine, table, write_section

CHILD = r"""
import json, os, shutil, sys, tempfile, time, torch
from wsd_pretrain import WSDSchedule, WSDScheduler, distributed as D
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.model import LlamaLM, ModelConfig
steps, rounds, batch, seq_len = (int(a) for a in sys.argv[1:5])
D.init_distributed(backend="gloo")
torch.manual_seed(0)
torch.set_num_threads(max(1, 2 // D.get_world_size()))
model = LlamaLM(ModelConfig())
ddp = torch.nn.parallel.DistributedDataParallel(model) if D.get_world_size() > 1 else model
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = WSDScheduler(opt, WSDSchedule(total=10**6, warmup=10, milestones="none"))
run = tempfile.mkdtemp() if D.get_rank() == 0 else None
run = D.broadcast_object(run)
mgr = CheckpointManager(run, ddp, opt, sched, config=CheckpointConfig(every_minutes=600, at_end=False))
x = torch.randint(0, 256, (batch, seq_len + 1))
def step(with_manager):
    ddp(x[:, :-1], x[:, 1:]).backward(); opt.step(); opt.zero_grad(); sched.step()
    if with_manager:
        mgr.maybe_save()
out = {"with": [], "without": []}
for r in range(rounds + 1):
    for mode in ("without", "with"):
        D.barrier(); t0 = time.perf_counter()
        for _ in range(steps):
            step(mode == "with")
        D.barrier()
        # updates taken without the manager: its double-stepping guard starts again from here (a training loop
        # calls maybe_save() after every update, which the "with" rounds do)
        mgr._step_guard.reset(sched)
        if r:
            out[mode].append((time.perf_counter() - t0) / steps)
# the manager's own work, timed alone (its share of a step, without the noise of the training step)
# (each call follows one scheduler step, as in a training loop; the scheduler step's own ~2 us are subtracted)
t0 = time.perf_counter()
for _ in range(steps * 10):
    sched.step()
sched_only = (time.perf_counter() - t0) / (steps * 10)
mgr._step_guard.reset(sched)
t0 = time.perf_counter()
for _ in range(steps * 10):
    sched.step()
    mgr.maybe_save()
out["maybe_save_alone"] = max(0.0, (time.perf_counter() - t0) / (steps * 10) - sched_only)
mgr.close()
if D.get_rank() == 0:
    shutil.rmtree(run, ignore_errors=True)
    print(json.dumps(out))
D.teardown()
"""


def launch(world: int, steps: int, rounds: int, batch: int = 16, seq_len: int = 128) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(f"/tmp/bench_overhead_{os.getpid()}.py")
    script.write_text(CHILD)
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS=str(max(1, 2 // world)),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(steps), str(rounds), str(batch), str(seq_len)],
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=3600) for p in procs]
    script.unlink()
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise RuntimeError(err[-3000:])
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="sequences per rank per update")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to measure (default 1 2)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    rows = [
        [
            "ranks",
            "step without manager (ms)",
            "step with maybe_save (ms)",
            "difference",
            "maybe_save alone (µs)",
            "maybe_save alone / step",
        ]
    ]
    for world in args.ranks:
        res = launch(world, args.steps, args.rounds, args.batch, args.seq_len)
        a, b = statistics.median(res["without"]), statistics.median(res["with"])
        alone = res["maybe_save_alone"]
        rows.append(
            [
                str(world),
                f"{a * 1e3:.2f}",
                f"{b * 1e3:.2f}",
                f"{100 * (b - a) / a:+.2f}%",
                f"{alone * 1e6:.1f}",
                f"{100 * alone / a:.3f}%",
            ]
        )
        print(rows[-1], file=sys.stderr)
    body = f"""## Checkpoint manager overhead when not saving (`tools/bench_overhead.py`)

Machine: {machine()}. Run on {time.strftime("%Y-%m-%d")}. The tiny default model (0.8M parameters, {args.batch} sequences of
{args.seq_len} tokens per rank), median of {args.rounds} alternating rounds of {args.steps} updates each way.

{table(rows)}

"maybe_save alone" times the manager's per-step work by itself ({args.steps * 10} calls, each after a scheduler
step, whose own time is subtracted): reading the schedule's events and, on every update by default
(`decide_every: 1`), one all-reduce of two integers on the checkpoint's gloo group (CPU: no device
synchronisation) so that every rank agrees on time-based and preemption saves. The "difference" column is within the noise of the step time; the
manager's own share is the last column.
"""
    write_section("overhead", body, args.out)
    print(body)


if __name__ == "__main__":
    main()
