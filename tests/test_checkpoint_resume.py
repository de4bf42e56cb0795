"""Exact resume with real engines on 2 ranks (gloo, CPU): 2N steps straight versus N steps, stop, resume, N more
must give the same losses and bitwise-equal final weights and optimizer state."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytestmark = pytest.mark.distributed

SCHEDULE = dict(total=12, warmup=2, milestones=(6, 12), decay_length=(2, 3), decay_shape="1-sqrt")


def _run(rank: int, world: int, engine: str, run_dir: str, stop: int | None, resume: bool) -> dict:
    from engines import build, full_state
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    schedule = WSDSchedule(**SCHEDULE)
    model, opt, sched, step = build(engine, schedule, rank)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=CheckpointConfig(every_steps=5, max_shard_size=4096))
    if resume:
        assert mgr.resume("auto")
    losses = {}
    while not sched.finished:
        i = sched.position
        losses[i] = step(i)
        mgr.maybe_save()
        if stop is not None and sched.position == stop:
            break
    mgr.close()
    state = full_state(model, opt)
    return {
        "losses": losses,
        "state": {k: v.flatten().tolist() for k, v in state.items()},
        "saves": [p.name for p in mgr.saves],
    }


ENGINES = ["ddp", "fsdp2", "ds0", "ds0-bf16", "ds1-bf16", "ds2", "ds3", "ds3-bf16", "ds2-fp16", "ds2+cpuadam"]


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_and_resume_equals_straight(engine, tmp_path):
    straight = run_distributed(_run, args=(engine, str(tmp_path / "straight"), None, False), timeout=600)
    first = run_distributed(_run, args=(engine, str(tmp_path / "resumed"), 5, False), timeout=600)
    assert first[0]["saves"] == ["step-000000004-pre-decay", "step-000000005-periodic"]
    second = run_distributed(_run, args=(engine, str(tmp_path / "resumed"), None, True), timeout=600)
    for rank in range(2):
        resumed_losses = {**first[rank]["losses"], **second[rank]["losses"]}
        assert resumed_losses == straight[rank]["losses"], f"rank {rank}: losses differ after resume"
        assert second[rank]["state"].keys() == straight[rank]["state"].keys()
        for key, values in straight[rank]["state"].items():
            assert second[rank]["state"][key] == values, f"rank {rank}: {key} differs"
