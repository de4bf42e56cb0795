"""A plain PyTorch loop (DDP under torchrun) with WSD checkpoints: the manager in its simplest use.

    torchrun --nproc-per-node 2 docs/examples/plain_torchrun.py --run-dir runs/plain     # run again: it resumes
    python docs/examples/plain_torchrun.py --run-dir runs/plain1                           # one process

Each rank reads its own slice of a stream of random batches; the stream's position is the ``data=`` state, so a
resumed run reads the next batch, not the first one.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
from wsd_pretrain import distributed as D


class RandomBatches:
    """Batch ``i`` of rank ``r`` is a pure function of ``(seed, i, r)``; its state is ``i`` (plain JSON)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank, self.index = seed, rank, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index * 101 + self.rank)
        self.index += 1
        return torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/plain")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--every-steps", type=int, default=None)
    cli = p.parse_args(argv)
    info = D.init_distributed(backend="gloo" if not torch.cuda.is_available() else None)
    if info.rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    if D.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = WSDScheduler(optimizer, WSDSchedule(total=cli.steps, warmup=3, decay_fraction=0.25))
    data = RandomBatches(seed=0, rank=info.rank)

    manager = CheckpointManager(
        cli.run_dir, model, optimizer, scheduler, config=CheckpointConfig(every_steps=cli.every_steps), data=data
    )
    manager.resume("auto")  # model, optimizer, scheduler, RNG, data position; or a fresh start
    while not scheduler.finished and not manager.should_stop:
        x, y = data.next()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        manager.maybe_save()  # pre-decay, post-decay, periodic, final, preemption (SIGTERM / SIGUSR1)
    manager.close()
    D.teardown()


if __name__ == "__main__":
    main()
