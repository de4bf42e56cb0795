"""The Hugging Face Trainer integration, with the real Trainer on CPU: docs/examples/hf_trainer.py killed (SIGKILL)
two updates after its pre-decay checkpoint, resumed with resume_from_checkpoint, ends bit for bit where an
uninterrupted run ends, on one process and on two (DDP under torchrun, gloo); every checkpoint loads with
from_pretrained."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from integration_helpers import (
    EXAMPLES,
    assert_same_checkpoint,
    checkpoints,
    final_checkpoint,
    finish,
    hang_cmd,
    preempt_cmd,
    start,
    torchrun,
    wait_and_kill,
)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.distributed

SCRIPT = EXAMPLES / "hf_trainer.py"
PRE, POST = "step-000000018-pre-decay", "step-000000024-post-decay+final"


# 2 processes under -m slow: the 1-process run takes the Trainer's path, and accelerate's 2-process DDP resume runs in
# tests/test_integration_accelerate.py
@pytest.mark.parametrize(
    "nproc", [pytest.param(0, id="1-process"), pytest.param(2, id="2-processes-ddp", marks=pytest.mark.slow)]
)
def test_trainer_killed_after_pre_decay_resumes_bitwise_and_every_checkpoint_loads(tmp_path, nproc):
    ref, cut, marker = tmp_path / "ref", tmp_path / "cut", tmp_path / "marker"
    launcher = torchrun(nproc) if nproc else [sys.executable]
    p_ref = start([*launcher, str(SCRIPT), "--run-dir", str(ref)], tmp_path / "ref.log")
    p_cut = start(hang_cmd(marker, 2, SCRIPT, ["--run-dir", str(cut)], nproc=nproc), tmp_path / "cut.log")
    wait_and_kill(p_cut, [tmp_path / f"marker.{r}" for r in range(max(nproc, 1))], tmp_path / "cut.log")
    finish(p_ref, tmp_path / "ref.log")
    assert checkpoints(cut) == [PRE], "killed two updates after the pre-decay checkpoint"
    assert (cut / "checkpoints" / PRE / "trainer_state.json").is_file()

    log = finish(
        start([*launcher, str(SCRIPT), "--run-dir", str(cut)], tmp_path / "resume.log"), tmp_path / "resume.log"
    )
    # one process: 5 updates an epoch, 3 into the fourth; two: 40 sequences split in two, 3 updates an epoch
    # where the Trainer's loop goes on, in its own counters (it said "epoch 0, batch 0" before)
    where = "epoch 6, batch 0" if nproc else "epoch 3, batch 6"
    assert f"resumed at update 18 from {PRE} (the Trainer goes on at {where})" in log
    if nproc:
        assert len(list((cut / "checkpoints" / PRE / "train_state" / "rng").glob("rank-*.json"))) == nproc
    assert checkpoints(ref) == checkpoints(cut) == [PRE, POST]
    # weights, optimizer state, LRs, scheduler and RNG: the same bits as the uninterrupted run
    assert_same_checkpoint(final_checkpoint(ref), final_checkpoint(cut))
    assert_same_checkpoint(ref / "checkpoints" / PRE, cut / "checkpoints" / PRE)
    state = json.loads((cut / "checkpoints" / POST / "trainer_state.json").read_text())
    assert state["global_step"] == 24 and state["max_steps"] == 24

    from safetensors.torch import load_file

    for name in checkpoints(cut):
        folder = cut / "checkpoints" / name
        model = transformers.LlamaForCausalLM.from_pretrained(folder)
        saved = load_file(folder / "model-00001-of-00001.safetensors")
        assert set(saved) <= set(model.state_dict())
        for key, value in saved.items():
            assert torch.equal(model.state_dict()[key], value), key


def test_a_preempted_trainer_saves_and_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    log = finish(start(preempt_cmd(5, SCRIPT, ["--run-dir", str(run)]), tmp_path / "run.log"), tmp_path / "run.log")
    # SIGUSR1 after update 5: the next update's agreement saves a preempt checkpoint, the Trainer stops there
    assert checkpoints(run) == ["step-000000006-preempt"], log[-2000:]
    state = json.loads((run / "checkpoints" / "step-000000006-preempt" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
