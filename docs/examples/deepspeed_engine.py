"""A DeepSpeed engine (ZeRO-2) with the WSD scheduler from its ds_config and WSD checkpoints, on CPU.

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 docs/examples/deepspeed_engine.py --run-dir runs/ds
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 docs/examples/deepspeed_engine.py --run-dir runs/ds

The checkpoints are the same format as every other engine's: full tensors by name, so the run resumes on another
world size or ZeRO stage, and every model folder loads with ``from_pretrained``-style tools.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from wsd_pretrain import CheckpointConfig, CheckpointManager, deepspeed_initialize
from wsd_pretrain import distributed as D


class RandomBatches:
    """Batch ``i`` of rank ``r`` is a pure function of ``(seed, i, r)``; its state is ``i`` (plain JSON)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank, self.index = seed, rank, 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index * 101 + self.rank)
        self.index += 1
        return torch.randn(4, 16, generator=g), torch.randn(4, 1, generator=g)

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/ds")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--stage", type=int, default=2)
    cli, _ = p.parse_known_args(argv)  # the deepspeed launcher adds --local_rank
    info = D.init_distributed(backend="gloo" if not torch.cuda.is_available() else None)
    if info.rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))
    ds_config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "torch_adam": True}},
        "zero_optimization": {"stage": cli.stage},
        # DeepSpeed has no WSD scheduler; deepspeed_initialize builds ours from this section and DeepSpeed steps it
        # once per real optimizer step
        "scheduler": {"type": "WSD", "params": {"total": cli.steps, "warmup": 2, "decay_fraction": 0.25}},
    }
    engine, _, _, scheduler = deepspeed_initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    data = RandomBatches(seed=0, rank=info.rank)

    manager = CheckpointManager(cli.run_dir, engine, None, scheduler, config=CheckpointConfig(), data=data)
    manager.resume("auto")
    while not scheduler.finished and not manager.should_stop:
        x, y = data.next()
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()  # steps the scheduler at accumulation boundaries only
        manager.maybe_save()  # called every micro-batch: nothing happens until the position moves
    manager.close()
    D.teardown()


if __name__ == "__main__":
    main()
