"""The Lightning integration with the real Trainer on CPU: docs/examples/lightning_module.py killed (SIGKILL) two
updates after its pre-decay checkpoint (mid-epoch), resumed, ends bit for bit where an uninterrupted run ends, with
Lightning's own counters restored; the checkpoint holds the inner model's names; the guard rails refuse a scheduler
interval other than "step" and a max_steps that disagrees with the schedule."""

from __future__ import annotations

import json
import sys

import pytest

from integration_helpers import (
    EXAMPLES,
    assert_same_checkpoint,
    checkpoints,
    finish,
    hang_cmd,
    preempt_cmd,
    start,
    torchrun,
    wait_and_kill,
)

pytest.importorskip("lightning")

pytestmark = pytest.mark.distributed

SCRIPT = EXAMPLES / "lightning_module.py"
PRE, POST = "step-000000018-pre-decay", "step-000000024-post-decay+final"


@pytest.mark.parametrize(
    ("nproc", "resumed"),
    [
        # 10 batches an epoch, accumulation 2: update 18 is 3 updates (6 batches) into the fourth epoch
        pytest.param(0, "loop at epoch 3, batch 6", id="1-process"),
        # DDP on 2 processes: 5 batches each, 3 updates an epoch: update 18 closes the sixth epoch
        pytest.param(2, "loop at epoch 5, batch 5", id="2-processes-ddp", marks=pytest.mark.slow),
    ],
)
def test_killed_after_pre_decay_resumes_bitwise(tmp_path, nproc, resumed):
    ref, cut, marker = tmp_path / "ref", tmp_path / "cut", tmp_path / "marker"
    launcher = torchrun(nproc) if nproc else [sys.executable]
    extra = ["--devices", str(nproc)] if nproc else []
    p_ref = start([*launcher, str(SCRIPT), "--run-dir", str(ref), *extra], tmp_path / "ref.log")
    p_cut = start(hang_cmd(marker, 2, SCRIPT, ["--run-dir", str(cut), *extra], nproc=nproc), tmp_path / "cut.log")
    wait_and_kill(p_cut, [tmp_path / f"marker.{r}" for r in range(max(nproc, 1))], tmp_path / "cut.log")
    finish(p_ref, tmp_path / "ref.log")
    assert checkpoints(ref) == [PRE, POST]
    assert checkpoints(cut) == [PRE]

    resume_log = tmp_path / "resume.log"
    log = finish(start([*launcher, str(SCRIPT), "--run-dir", str(cut), *extra], resume_log), resume_log)
    assert f"resumed at update 18 from {PRE} ({resumed})" in log
    assert "dataloader is not resumable" not in log
    assert checkpoints(cut) == [PRE, POST]
    for name in (PRE, POST):
        assert_same_checkpoint(ref / "checkpoints" / name, cut / "checkpoints" / name)
    trainer = json.loads((cut / "checkpoints" / POST / "train_state" / "trainer.json").read_text())
    fit_loop = trainer["extra"]["loop"]["framework"]["fit_loop"]
    assert fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] == 24 - 1  # Lightning's count, restored
    index = json.loads((cut / "checkpoints" / POST / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == ["0.bias", "0.weight", "3.bias", "3.weight"]  # no "model." prefix


def test_guard_rails(tmp_path):
    import lightning.pytorch as pl
    import torch

    from wsd_pretrain import ConfigError, WSDSchedule, WSDScheduler
    from wsd_pretrain.integrations.lightning import ResumableDataLoader, WSDCheckpoint

    class Module(pl.LightningModule):
        def __init__(self, interval: str, frequency: int = 1) -> None:
            super().__init__()
            self.interval, self.frequency = interval, frequency
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
            config = {"scheduler": sched, "interval": self.interval, "frequency": self.frequency}
            return {"optimizer": opt, "lr_scheduler": config}

    loader = ResumableDataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)

    def fit(interval: str, max_steps: int, run: str, frequency: int = 1):
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            callbacks=[WSDCheckpoint(tmp_path / run)],
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(interval, frequency), loader)
        return trainer

    with pytest.raises(ConfigError, match=r'interval="epoch": Lightning would step the schedule once per epoch'):
        fit("epoch", 8, "a")
    with pytest.raises(ConfigError, match=r"frequency=2: Lightning would step the schedule every 2 updates"):
        fit("step", 8, "f", frequency=2)
    with pytest.raises(ConfigError, match=r"max_steps=10 runs 2 updates past the schedule's end.*set max_steps=8"):
        fit("step", 10, "b")
    trainer = fit("step", 8, "c")  # 8 batches, one epoch: the schedule and the run end together
    assert trainer.global_step == 8
    assert checkpoints(tmp_path / "c") == ["step-000000006-pre-decay", "step-000000008-post-decay+final"]


def test_a_preempted_run_saves_and_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    log = finish(start(preempt_cmd(5, SCRIPT, ["--run-dir", str(run)]), tmp_path / "run.log"), tmp_path / "run.log")
    assert checkpoints(run) == ["step-000000006-preempt"], log[-2000:]
