"""Exact resume with real engines on 2 ranks (gloo, CPU): 2N steps straight versus N steps, stop, resume, N more
must give the same losses, bitwise-equal final weights and optimizer state, and every random stream of every rank
(python, numpy, torch CPU) in the same state at every step from the resume on. The training draws from every stream
(dropout, a random data augmentation), so without the RNG restore the losses differ too."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytestmark = pytest.mark.distributed

SCHEDULE = dict(total=12, warmup=2, milestones=(6, 12), decay_length=(2, 3), decay_shape="1-sqrt")


def _run(rank: int, world: int, engine: str, run_dir: str, stop: int | None, resume: bool) -> dict:
    from engines import assert_verified, build, full_state, rng_digests
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    schedule = WSDSchedule(**SCHEDULE)
    model, opt, sched, step = build(engine, schedule, rank, stochastic=True)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=CheckpointConfig(every_steps=5, max_shard_size=4096))
    if resume:
        assert mgr.resume("auto")
    losses, rng = {}, {sched.position: rng_digests()}
    while not sched.finished:
        i = sched.position
        losses[i] = step(i)
        mgr.maybe_save()
        rng[sched.position] = rng_digests()
        if stop is not None and sched.position == stop:
            break
    mgr.close()
    if rank == 0:  # the invariant: a committed checkpoint always passes verify, on every engine
        assert_verified(mgr.saves)
    state = full_state(model, opt)
    return {
        "losses": losses,
        "rng": rng,
        "state": {k: v.flatten().tolist() for k, v in state.items()},
        "saves": [p.name for p in mgr.saves],
    }


# Marked slow for the default suite's time, each covered there by another test: ZeRO-0 (fp32, bf16), ZeRO-1 bf16,
# ZeRO-3 fp32 and CPU Adam resume bitwise in tests/test_deepspeed_optimizers.py (one pair of ranks for all; ZeRO-1
# shares ZeRO-2's optimizer, which ds2 and ds2-fp16 run here), and ZeRO-3 bf16 stays here
ENGINES = [
    "ddp",
    "fsdp2",
    pytest.param("ds0", marks=pytest.mark.slow),
    pytest.param("ds0-bf16", marks=pytest.mark.slow),
    pytest.param("ds1-bf16", marks=pytest.mark.slow),
    "ds2",
    pytest.param("ds3", marks=pytest.mark.slow),
    "ds3-bf16",
    "ds2-fp16",
    pytest.param("ds2+cpuadam", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_and_resume_equals_straight(engine, tmp_path):
    straight = run_distributed(_run, args=(engine, str(tmp_path / "straight"), None, False), timeout=600)
    first = run_distributed(_run, args=(engine, str(tmp_path / "resumed"), 5, False), timeout=600)
    assert first[0]["saves"] == ["step-000000004-pre-decay", "step-000000005-periodic"]
    second = run_distributed(_run, args=(engine, str(tmp_path / "resumed"), None, True), timeout=600)
    for rank in range(2):
        # the training draws from every stream: the losses and the weights come out the same only if the resume
        # restored each of them
        resumed_losses = {**first[rank]["losses"], **second[rank]["losses"]}
        assert resumed_losses == straight[rank]["losses"], f"rank {rank}: losses differ after resume"
        assert second[rank]["state"].keys() == straight[rank]["state"].keys()
        for key, values in straight[rank]["state"].items():
            assert second[rank]["state"][key] == values, f"rank {rank}: {key} differs"
        # and every stream of this rank itself, from the moment the checkpoint is loaded (position 5) to the end
        assert second[rank]["rng"].keys() == {str(p) for p in range(5, 13)}
        for position, streams in second[rank]["rng"].items():
            assert streams == straight[rank]["rng"][position], f"rank {rank}: RNG differs at position {position}"
    # the invariant over every engine (tests/test_model_wrappers.py adds the wrapped models): each committed
    # checkpoint verifies, and its model folder holds each parameter and buffer exactly once, under its own name
    from pathlib import Path

    from test_model_wrappers import check_invariant

    ckpts = sorted(p for p in Path(tmp_path / "straight" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert ckpts
    for ckpt in ckpts:
        inv = check_invariant(ckpt)
        assert inv["verify"] == [] and inv["names_once"] and inv["index"], (ckpt.name, inv)
    if engine in ("fsdp2", "ds3-bf16"):  # partitioned model weights: written in place by their holders
        from test_range_writes import check_ranges

        check_ranges(ckpts[-1], tmp_path / "scratch")
    ends = [straight[r]["rng"]["12"] for r in range(2)]
    assert all(ends[0][k] != ends[1][k] for k in ("python", "numpy", "torch")), "each rank has its own streams"
