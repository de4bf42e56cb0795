"""One rank fails in one phase of a save or a resume: every rank raises that error, none waits in a collective
for a rank that is gone, and nothing committed is lost (2 ranks, FSDP2: the fetch phase gathers weights)."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.fault]

# (operation, rank that fails, the protocol step where it fails: wsd_pretrain.checkpoint.faults)
CASES = [
    ("save", 1, "save-begin"),  # plan: one rank cannot describe its state (the others go on to the staging name)
    ("save", 0, "staging-created"),  # open: rank 0 cannot make the staging directory
    ("save", 1, "fetch:"),  # fetch: one rank cannot hand over a tensor (the others are in gathers)
    ("save", 1, "fetch-end"),  # fetch: one rank fails after its tensors (capturing its RNG state, say)
    ("save", 1, "shard-begin:"),  # write: one rank's file fails (a full disk)
    ("save", 1, "range-write:"),  # write: one rank's range of a model file it shares with the others fails
    ("save", 1, "report"),  # report: one rank fails in the background thread, rank 0 waits for its report
    ("save", 0, "manifest-written"),  # commit: rank 0 fails after writing the manifest, before the rename
    ("async", 1, "snapshot:"),  # an async save's copy, while training goes on: raised at the next wait
    # an async save's fetch fails after some of its copies were queued for the snapshot thread, which never starts:
    # the writer waiting for them is released and the save fails at once (it used to wait forever)
    ("async", 1, "fetch:optimizer/#2"),
    ("load", 0, "load-open"),  # open: rank 0 cannot read the manifest
    ("load", 1, "load-verify"),  # verify: one rank's share of the files
    ("load", 1, "load-plan"),  # plan: one rank cannot match the checkpoint to its engine
    ("load", 1, "load-read:"),  # read: one rank's slice
    ("load", 0, "load-restore:"),  # restore: one rank cannot put a tensor back
]


def _scenarios(rank, world, run_dir):
    import dataclasses
    import time

    from engines import build, full_state
    from wsd_pretrain import CheckpointError, WSDSchedule
    from wsd_pretrain.checkpoint import faults
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    model, opt, sched, step = build("fsdp2", WSDSchedule(total=10, decay_length=2), rank)
    cfg = CheckpointConfig(at_milestones=False, max_shard_size=4096, timeout_minutes=5)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=cfg)
    step(0)
    good = mgr.save(["periodic"])
    reference = {k: v.tolist() for k, v in full_state(model, opt).items()}
    step(1)
    outcomes = []
    for i, (op, victim, where) in enumerate(CASES):

        def hook(point: str, victim=victim, where=where, tag=f"injected failure {i}", seen=[0]) -> None:  # noqa: B006
            prefix, _, nth = where.partition("#")  # "#n": at the n-th point of that kind
            if rank == victim and point.startswith(prefix):
                seen[0] += 1
                if seen[0] >= int(nth or 1):
                    raise RuntimeError(tag)

        faults.fault_hook = hook
        t0 = time.monotonic()
        try:
            if op == "save":
                step(2 + i)  # a new position: a new name for every attempt
                mgr.save(["periodic"])
            elif op == "async":
                mgr.config = dataclasses.replace(cfg, async_save=True)
                step(2 + i)
                try:
                    mgr.save(["periodic"])
                    step(100 + i)  # training goes on; its optimizer step waits for the copies
                    mgr.wait()
                finally:
                    mgr.config = cfg
            else:
                mgr.load(good)
            outcome = "no error"
        except CheckpointError as exc:
            outcome = str(exc)
        finally:
            faults.fault_hook = None
        outcomes.append({"case": [op, victim, where], "error": outcome, "seconds": time.monotonic() - t0})
    # nothing committed was lost: the good checkpoint is the only one, and it still loads exactly
    names = [i.name for i in F.list_checkpoints(run_dir)]
    mgr.load(good)
    restored = {k: v.tolist() for k, v in full_state(model, opt).items()}
    mgr.close()
    return {"outcomes": outcomes, "names": names, "same": restored == reference, "good": good.name}


def test_a_failure_on_one_rank_in_any_phase_raises_on_every_rank(tmp_path):
    results = run_distributed(_scenarios, args=(str(tmp_path),), timeout=600)
    for i, (op, victim, where) in enumerate(CASES):
        for rank, res in enumerate(results):
            outcome = res["outcomes"][i]
            assert f"injected failure {i}" in outcome["error"], f"rank {rank}, {op} failing at {where}: {outcome}"
            # every rank hears of it at once: nobody waits out the checkpoint groups' timeout (5 minutes here)
            assert outcome["seconds"] < 30, f"rank {rank}, {op} failing at {where}: {outcome['seconds']:.0f} s"
            assert f"rank {victim}" in outcome["error"] or (op, where) in (
                ("save", "staging-created"),
                ("load", "load-open"),
            )
    for res in results:
        assert res["names"] == [res["good"]], "a failed save left a checkpoint (or removed the good one)"
        assert res["same"], "the good checkpoint no longer restores the same state"
        assert not list((tmp_path / "checkpoints").glob(".staging-*"))
