"""A training loop with ``accelerate`` and WSD checkpoints: a tiny MLP on random data, on CPU in seconds.

python docs/examples/accelerate_loop.py --run-dir runs/accelerate_example           # run again: it resumes
torchrun --nproc-per-node 2 docs/examples/accelerate_loop.py --run-dir runs/acc2     # 2 processes (gloo)
(not `accelerate launch --cpu --num_processes 2`: on CPU it starts one process, which the checkpointer refuses)
"""

from __future__ import annotations

import argparse
import logging
import math

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset

from wsd_pretrain import CheckpointConfig, WSDSchedule, WSDScheduler
from wsd_pretrain.integrations.accelerate import AccelerateCheckpointer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/accelerate_example")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--every-steps", type=int, default=None, help="also save every N updates")
    cli = p.parse_args(argv)

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    if accelerator.is_main_process:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(0)
    data = TensorDataset(torch.randn(40, 16), torch.randn(40, 1))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    # the schedule counts optimizer updates: per process, ceil(batches / accumulation) per epoch
    total = cli.epochs * math.ceil(len(loader) / accelerator.gradient_accumulation_steps)
    scheduler = WSDScheduler(optimizer.optimizer, WSDSchedule(total=total, warmup=3, decay_fraction=0.25))
    scheduler = accelerator.prepare(scheduler)  # an AcceleratedScheduler: the checkpointer sees through it

    ckpt = AccelerateCheckpointer(
        accelerator, cli.run_dir, model, optimizer, scheduler, config=CheckpointConfig(every_steps=cli.every_steps)
    )
    ckpt.resume()  # the newest checkpoint of run_dir, or a fresh start
    for epoch in ckpt.epochs(cli.epochs):
        for x, y in ckpt.batches(loader, epoch):
            with accelerator.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            ckpt.maybe_save()  # after every batch: it saves only after real optimizer updates
            if ckpt.should_stop:
                break
        if ckpt.should_stop:
            break
    ckpt.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
