"""The accelerate integration on 2 real processes (torchrun, gloo on CPU): docs/examples/accelerate_loop.py, whose
prepared AcceleratedScheduler would step twice per update, killed (SIGKILL) three updates after its pre-decay
checkpoint, resumed mid-epoch from its newest checkpoint, ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import pytest

from integration_helpers import (
    EXAMPLES,
    assert_same_checkpoint,
    checkpoints,
    final_checkpoint,
    finish,
    hang_cmd,
    start,
    torchrun,
    wait_and_kill,
)

pytest.importorskip("accelerate")

pytestmark = pytest.mark.distributed

SCRIPT = EXAMPLES / "accelerate_loop.py"


def test_two_processes_killed_after_pre_decay_resume_bitwise(tmp_path):
    ref, cut, marker = tmp_path / "ref", tmp_path / "cut", tmp_path / "marker"
    args = ["--every-steps", "4"]
    p_ref = start([*torchrun(2), str(SCRIPT), "--run-dir", str(ref), *args], tmp_path / "ref.log")
    p_cut = start(hang_cmd(marker, 3, SCRIPT, ["--run-dir", str(cut), *args], nproc=2), tmp_path / "cut.log")
    wait_and_kill(p_cut, [tmp_path / "marker.0", tmp_path / "marker.1"], tmp_path / "cut.log")
    log = finish(p_ref, tmp_path / "ref.log")
    assert "steps once per optimizer update (not 2 times)" in log
    # 8 epochs of 3 updates per process (5 batches, accumulation 2): the schedule's 24 updates, its milestones at
    # 18 and 24; without the fix accelerate steps the schedule twice per update and reaches 24 at update 12
    assert checkpoints(ref) == [
        "step-000000016-periodic",
        "step-000000018-pre-decay",
        "step-000000020-periodic",
        "step-000000024-post-decay+periodic+final",
    ]
    assert checkpoints(cut)[-2:] == ["step-000000018-pre-decay", "step-000000020-periodic"]

    resume_log = tmp_path / "resume.log"
    log = finish(start([*torchrun(2), str(SCRIPT), "--run-dir", str(cut), *args], resume_log), resume_log)
    # update 20 is the second of epoch 6's three: 4 of its 5 batches were trained and are skipped
    assert "resumed at update 20 from step-000000020-periodic (loop at epoch 6, batch 4)" in log
    assert checkpoints(cut) == checkpoints(ref)
    for name in checkpoints(ref):
        assert_same_checkpoint(ref / "checkpoints" / name, cut / "checkpoints" / name)
    assert final_checkpoint(cut).name == "step-000000024-post-decay+periodic+final"
