"""pytorch_accelerated's Trainer with the seed-compatible scheduler and WSD checkpoints: a tiny MLP, on CPU.

python docs/examples/pytorch_accelerated_trainer.py --run-dir runs/pa_example    # run again: it resumes
ACCELERATE_USE_CPU=true torchrun --nproc-per-node 2 docs/examples/pytorch_accelerated_trainer.py --run-dir runs/pa2
(not `accelerate launch --cpu --num_processes 2`: on CPU it starts one process, which the callback refuses)
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from pytorch_accelerated import Trainer
from pytorch_accelerated.callbacks import MoveModulesToDeviceCallback
from torch.utils.data import TensorDataset

from wsd_pretrain import CheckpointConfig
from wsd_pretrain.compat import WSDCheckpointCallback, WSDLrScheduler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/pa_example")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--every-steps", type=int, default=None, help="also save every N updates")
    p.add_argument("--initial-checkpoint", default=None, help="start a new run from this checkpoint folder")
    p.add_argument("--weights-only", action="store_true", help="the seed's save_optimizer/save_scheduler=False")
    cli = p.parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 16), torch.randn(40, 1))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    trainer = Trainer(
        model,
        loss_func=torch.nn.MSELoss(),
        optimizer=optimizer,
        callbacks=(
            MoveModulesToDeviceCallback(),
            # the seed's callback arguments; our checkpoints, written after the optimizer step
            WSDCheckpointCallback(
                cli.run_dir,
                save_optimizer=not cli.weights_only,
                save_scheduler=not cli.weights_only,
                initial_checkpoint=cli.initial_checkpoint,
                config=CheckpointConfig(every_steps=cli.every_steps),
            ),
        ),
    )
    trainer.train(
        train_dataset=data,
        num_epochs=cli.epochs,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        create_scheduler_fn=WSDLrScheduler.create_scheduler_fn(
            num_warmup_epochs=1, decay_phase_ratio=0.25, lr_min=0.01, warmup_starting_lr=1e-4
        ),
    )


if __name__ == "__main__":
    main()
