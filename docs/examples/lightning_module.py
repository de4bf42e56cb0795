"""A Lightning run with WSD checkpoints: a LightningModule around a tiny MLP, on CPU in seconds.

python docs/examples/lightning_module.py --run-dir runs/lightning_example     # run again: it resumes
torchrun --nproc-per-node 2 docs/examples/lightning_module.py --devices 2 --run-dir runs/lightning_ddp
"""

from __future__ import annotations

import argparse
import logging
import os

import lightning.pytorch as pl
import torch
from torch.utils.data import TensorDataset

from wsd_pretrain import CheckpointConfig, WSDSchedule, WSDScheduler
from wsd_pretrain.integrations.lightning import ResumableDataLoader, WSDCheckpoint


class Regression(pl.LightningModule):
    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        # the checkpoints hold this module's names ("0.weight", ...), not "model.0.weight"
        self.model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=3e-3)
        scheduler = WSDScheduler(optimizer, WSDSchedule(total=self.total_steps, warmup=3, decay_fraction=0.25))
        # "interval": "step": once per optimizer update (Lightning's default, "epoch", is refused)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/lightning_example")
    p.add_argument("--steps", type=int, default=24, help="optimizer updates (the schedule's total)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--every-steps", type=int, default=None, help="also save every N updates")
    cli = p.parse_args(argv)
    if os.environ.get("RANK", "0") == "0":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(40, 16), torch.randn(40, 1))
    loader = ResumableDataLoader(data, batch_size=4, shuffle=True)  # resumes mid-epoch at the right batch
    trainer = pl.Trainer(
        max_steps=cli.steps,  # the schedule's total: WSDCheckpoint refuses a mismatch
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=cli.devices,
        strategy="ddp" if cli.devices > 1 else "auto",
        callbacks=[WSDCheckpoint(cli.run_dir, config=CheckpointConfig(every_steps=cli.every_steps))],
        enable_checkpointing=False,  # Lightning's own checkpoints are pickles; ours resume the run
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Regression(cli.steps), loader)


if __name__ == "__main__":
    main()
