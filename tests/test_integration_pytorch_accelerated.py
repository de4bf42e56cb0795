"""pytorch_accelerated (the seed's framework) with wsd_pretrain.compat.WSDCheckpointCallback and the seed-compatible
WSDLrScheduler, the real Trainer on CPU: docs/examples/pytorch_accelerated_trainer.py killed (SIGKILL) two updates
after its pre-decay checkpoint (an epoch boundary), resumed, ends bit for bit where an uninterrupted run ends; the
seed's LRs are kept; the callback takes the seed callback's arguments."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from integration_helpers import (
    EXAMPLES,
    assert_same_checkpoint,
    checkpoints,
    child_env,
    finish,
    hang_cmd,
    preempt_cmd,
    start,
    torchrun,
    wait_and_kill,
)

pytest.importorskip("pytorch_accelerated")

pytestmark = pytest.mark.distributed

SCRIPT = EXAMPLES / "pytorch_accelerated_trainer.py"


@pytest.mark.parametrize(
    ("nproc", "pre", "post", "resumed"),
    [
        # 10 batches per epoch, accumulation 2: 5 updates an epoch, 40 in 8 epochs; decay_phase_ratio 0.25
        pytest.param(0, 30, 40, "loop at epoch 5, batch 10", id="1-process"),
        # 5 batches per process: 3 updates an epoch, 24 in all
        pytest.param(2, 18, 24, "loop at epoch 5, batch 5", id="2-processes", marks=pytest.mark.slow),
    ],
)
def test_killed_after_pre_decay_resumes_bitwise(tmp_path, nproc, pre, post, resumed):
    ref, cut, marker = tmp_path / "ref", tmp_path / "cut", tmp_path / "marker"
    launcher = torchrun(nproc) if nproc else [sys.executable]
    env = child_env(ACCELERATE_USE_CPU="true")
    p_ref = start([*launcher, str(SCRIPT), "--run-dir", str(ref)], tmp_path / "ref.log", env)
    p_cut = start(hang_cmd(marker, 2, SCRIPT, ["--run-dir", str(cut)], nproc=nproc), tmp_path / "cut.log", env)
    wait_and_kill(p_cut, [tmp_path / f"marker.{r}" for r in range(max(nproc, 1))], tmp_path / "cut.log")
    finish(p_ref, tmp_path / "ref.log")
    names = [f"step-{pre:09d}-pre-decay", f"step-{post:09d}-post-decay+final"]
    assert checkpoints(ref) == names
    assert checkpoints(cut) == names[:1]

    resume_log = tmp_path / "resume.log"
    log = finish(start([*launcher, str(SCRIPT), "--run-dir", str(cut)], resume_log, env), resume_log)
    # the pre-decay point closed an epoch: the resumed run starts the next one, with the RNG of the checkpoint
    assert f"resumed at update {pre} from {names[0]} ({resumed})" in log
    assert checkpoints(cut) == names
    for name in names:
        assert_same_checkpoint(ref / "checkpoints" / name, cut / "checkpoints" / name)


def test_the_seed_callbacks_arguments(tmp_path):
    env = child_env(ACCELERATE_USE_CPU="true")
    # initial_checkpoint that is not one of our checkpoints (the seed's Accelerate folders are pickles): refused
    seed_folder = tmp_path / "seed_pre_decay"
    seed_folder.mkdir()
    (seed_folder / "pytorch_model.bin").write_bytes(b"not read")
    log = tmp_path / "bad.log"
    proc = start(
        [sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "a"), "--initial-checkpoint", str(seed_folder)],
        log,
        env,
    )
    assert proc.wait(240) != 0
    assert f"initial_checkpoint={seed_folder}: not a wsd_pretrain checkpoint folder" in log.read_text()
    assert not (tmp_path / "a" / "checkpoints").exists() or checkpoints(tmp_path / "a") == []
    # save_optimizer/save_scheduler=False are accepted and said to be kept anyway; the run writes its checkpoints
    out = finish(
        start(
            [sys.executable, str(SCRIPT), "--run-dir", str(tmp_path / "b"), "--epochs", "2", "--weights-only"],
            tmp_path / "b.log",
            env,
        ),
        tmp_path / "b.log",
    )
    assert "save_optimizer/save_scheduler=False: wsd_pretrain checkpoints keep both" in out
    assert checkpoints(tmp_path / "b") == ["step-000000008-pre-decay", "step-000000010-post-decay+final"]


def test_a_preempted_run_saves_and_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    env = child_env(ACCELERATE_USE_CPU="true")
    log = finish(
        start(preempt_cmd(5, SCRIPT, ["--run-dir", str(run)]), tmp_path / "run.log", env), tmp_path / "run.log"
    )
    assert checkpoints(run) == ["step-000000006-preempt"], log[-2000:]


def test_accelerate_launch_cpu_with_two_processes_starting_one_is_refused_with_the_command_that_works(tmp_path):
    # accelerate 1.x's launcher starts several CPU processes only through MPI: this runs the script once
    log = tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    proc = start([*cmd, str(SCRIPT), "--run-dir", str(tmp_path / "run")], log, child_env())
    assert proc.wait(240) != 0
    text = log.read_text()
    assert "`accelerate launch --cpu --num_processes N` started this one process only" in text, text[-3000:]
    assert "ACCELERATE_USE_CPU=true torchrun --nproc-per-node N" in text
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused before training"


def _in_process_trainer(tmp_path, create_scheduler_fn, epochs=4):
    """The real pytorch_accelerated Trainer in this process: 40 samples, batches of 4, 10 updates an epoch."""
    from pytorch_accelerated import Trainer
    from torch.utils.data import TensorDataset

    from wsd_pretrain.compat import WSDCheckpointCallback

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    trainer = Trainer(
        model=model,
        loss_func=torch.nn.MSELoss(),
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        callbacks=[WSDCheckpointCallback(tmp_path)],
    )
    trainer.train(
        train_dataset=TensorDataset(torch.randn(40, 4), torch.randn(40, 1)),
        num_epochs=epochs,
        per_device_batch_size=4,
        create_scheduler_fn=create_scheduler_fn,
    )
    return trainer


def test_the_seeds_placement_warns_warmup_in_steps_inspect_says_where_the_run_ends(tmp_path, caplog, monkeypatch):
    from pytorch_accelerated.schedulers import CosineLrScheduler

    from wsd_pretrain import ConfigError
    from wsd_pretrain.checkpoint.tools import inspect_checkpoint
    from wsd_pretrain.compat import WSDLrScheduler

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    # a scheduler the manager cannot read: the fix is named in pytorch_accelerated's terms
    with pytest.raises(ConfigError, match=r"got CosineLrScheduler; pass trainer\.train\(\.\.\., create_scheduler_fn="):
        _in_process_trainer(tmp_path / "cosine", CosineLrScheduler.create_scheduler_fn())

    # the old integrations.md snippet: num_checkpoints=2 on a 40-update run decays at 10 and 20, then 20 at the floor
    run = tmp_path / "two"
    with caplog.at_level(logging.WARNING):
        trainer = _in_process_trainer(run, WSDLrScheduler.create_scheduler_fn(num_checkpoints=2, num_warmup_steps=4))
    assert trainer.scheduler.num_warmup_steps == 4 and trainer.scheduler.schedule.warmup == 4
    assert "the last decay ends at 20 of 40 steps: the remaining 20 (50% of the run) train at the minimum LR" in (
        caplog.text
    )
    assert "use num_checkpoints=1" in caplog.text
    final = checkpoints(run)[-1]
    assert final == "step-000000040-final"
    info = inspect_checkpoint(run / "checkpoints" / final)
    assert info["position"] == 40 and info["schedule"]["end"] == 40, "the run ended at 40 updates, not 41"

    # the corrected snippet: num_checkpoints=3 (a quarter, a half, the end): no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        WSDLrScheduler(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), total_steps=40, num_checkpoints=3)
    assert "minimum LR" not in caplog.text
    with pytest.raises(ConfigError, match="num_warmup_epochs=1 and num_warmup_steps=4: give one of them"):
        WSDLrScheduler.create_scheduler_fn(num_warmup_epochs=1, num_warmup_steps=4)
