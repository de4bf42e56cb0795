"""Scheduler cost per step: WSDScheduler against the seed (pytorch_accelerated's WSDLrScheduler) and transformers'
get_wsd_schedule, and how ours grows with the number of milestones (it bisects precomputed phase boundaries).

    python tools/bench_scheduler.py [--steps 20000] [--out docs/benchmarks.md]

The milestone counts measured are those that fit the run (10, 100 and 1000 at the default 20000 steps; each
period needs at least 2 steps for its decay).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from _bench import add_out_argument, machine, table, write_section


def per_step(make, steps: int, repeat: int = 5) -> float:
    best = []
    for _ in range(repeat):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD(
            [{"params": [p], "lr": 0.1}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}]
        )
        sched = make(opt)
        t0 = time.perf_counter()
        for _ in range(steps):
            sched.step()
        best.append((time.perf_counter() - t0) / steps)
    return sorted(best)[len(best) // 2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20000)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    if args.steps < 100:
        ap.error("--steps: at least 100 (the seed's schedulers need room for 3 checkpoints)")
    from wsd_pretrain import WSDSchedule, WSDScheduler

    n = args.steps
    rows = [["scheduler", "milestones", "µs per step()", "relative to ours (1 milestone)"]]
    ours1 = per_step(lambda o: WSDScheduler(o, WSDSchedule(total=n, warmup=n // 100, decay_fraction=0.2)), n)
    rows.append(["wsd_pretrain WSDScheduler", "1", f"{ours1 * 1e6:.2f}", "1.00"])
    counts = [m for m in (10, 100, 1000) if n >= 2 * m]  # each period >= 2 steps: a decay of at least 1
    for m in counts:
        ms = tuple(n * (i + 1) // m for i in range(m))
        t = per_step(
            lambda o, ms=ms: WSDScheduler(o, WSDSchedule(total=n, warmup=0, milestones=ms, decay_fraction=0.5)), n
        )
        rows.append(["wsd_pretrain WSDScheduler", str(m), f"{t * 1e6:.2f}", f"{t / ours1:.2f}"])
    try:
        from pytorch_accelerated.schedulers.wsd_scheduler import WSDLrScheduler

        for k in (1, 3):
            t = per_step(
                lambda o, k=k: WSDLrScheduler(o, total_steps=n, num_warmup_steps=n // 100, num_checkpoints=k), n
            )
            rows.append(["seed: pytorch_accelerated WSDLrScheduler", str(k), f"{t * 1e6:.2f}", f"{t / ours1:.2f}"])
    except ImportError:
        pass
    from wsd_pretrain.compat import WSDLrScheduler as Compat

    t = per_step(lambda o: Compat(o, total_steps=n, num_warmup_steps=n // 100, num_checkpoints=3), n)
    rows.append(["wsd_pretrain.compat WSDLrScheduler", "3", f"{t * 1e6:.2f}", f"{t / ours1:.2f}"])
    try:
        from transformers.optimization import get_wsd_schedule

        t = per_step(lambda o: get_wsd_schedule(o, n // 100, n // 5, num_training_steps=n), n)
        rows.append(["transformers get_wsd_schedule (LambdaLR)", "1", f"{t * 1e6:.2f}", f"{t / ours1:.2f}"])
    except ImportError:
        pass
    most = counts[-1] if counts else 1
    ratio = float(rows[len(counts) + 1][3]) if counts else 1.0
    body = f"""## Scheduler cost per step (`tools/bench_scheduler.py`)

Machine: {machine()}. Run on {time.strftime("%Y-%m-%d")}; {n} calls to `step()` on an optimizer with 2 param
groups, median of 5 runs.

{table(rows)}

Ours computes the factor from precomputed phase boundaries by bisection (O(log milestones)): {most} milestones cost
{ratio:.2f}x one here. Either way `step()` costs microseconds, against a training step of milliseconds or more.
"""
    write_section("scheduler", body, args.out)
    print(body)


if __name__ == "__main__":
    main()
