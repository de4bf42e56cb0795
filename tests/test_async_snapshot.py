"""Async saves copy the state while training goes on (``checkpoint.async_snapshot: overlap``, the default): the save
returns before the parameters, master weights and optimizer state are copied, the next optimizer step waits for the
copy, and the checkpoint holds the state at the save, never a mix with the updates that follow it. Tried on every
kind of engine a user trains with, DeepSpeed's own optimizer (CPU Adam from the ds_config) included: each steps
through a torch optimizer's step, which is where the fence is."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytestmark = pytest.mark.distributed


def _save_then_train(rank, world, engine, run_dir, mode):
    import time

    from engines import assert_verified, build, full_state
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint import faults
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    def tolist(state):
        return {k: v.flatten().tolist() for k, v in state.items()}

    config = CheckpointConfig(
        async_save=True, async_snapshot=mode, at_milestones=False, at_end=False, on_preemption=False
    )
    schedule = WSDSchedule(total=20, warmup=1, milestones="none")
    model, opt, sched, step = build(engine, schedule, rank, stochastic=True)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=config)
    for i in range(2):
        step(i)
    at_save = tolist(full_state(model, opt))
    copies: list[float] = []

    def slow_copies(point: str) -> None:  # each copy of the snapshot takes a while: training has started by then
        if point.startswith("snapshot:"):
            time.sleep(0.02)
            copies.append(time.monotonic())

    faults.fault_hook = slow_copies
    try:
        path = mgr.save(["periodic"])
        returned = time.monotonic()
        for i in range(2, 4):  # straight on: the forward and backward pass run while the copies are made
            step(i)
        mgr.wait()
    finally:
        faults.fault_hook = None
    after = tolist(full_state(model, opt))
    mgr.close()
    if rank == 0:  # the invariant: a committed checkpoint always passes verify (an async save too)
        assert_verified([path])
    model2, opt2, sched2, _ = build(engine, schedule, rank)
    mgr2 = CheckpointManager(run_dir, model2, opt2, sched2, config=config)
    mgr2.load(path)
    loaded = tolist(full_state(model2, opt2))
    mgr2.close()
    return {
        "at_save": at_save,
        "after": after,
        "loaded": loaded,
        "copies_after_return": sum(t > returned for t in copies),
        "copies": len(copies),
    }


@pytest.mark.parametrize(
    ("engine", "world"),
    [
        ("torch", 1),
        ("fsdp2", 2),
        ("ds2-bf16+cpuadam", 2),
        # ZeRO-3 and ZeRO-1 add no path of the snapshot's own (their optimizer tensors are copied as ZeRO-2's are,
        # ZeRO-3's partitioned weights travel as FSDP2's do): they run under `-m slow`, for the suite's time
        pytest.param("ds3-bf16", 2, marks=pytest.mark.slow),
        pytest.param("ds1-bf16", 2, marks=pytest.mark.slow),
    ],
)
def test_an_async_save_holds_the_state_at_the_save_while_training_goes_on(tmp_path, engine, world):
    for r in run_distributed(_save_then_train, world, args=(engine, str(tmp_path), "overlap"), timeout=600):
        assert r["after"] != r["at_save"], "training changed the state after the save (else this proves nothing)"
        assert r["copies"] > 0 and r["copies_after_return"] > 0, "the copies ran after the save returned"
        assert r["loaded"].keys() == r["at_save"].keys()
        for key in r["at_save"]:
            assert r["loaded"][key] == r["at_save"][key], f"{key}: the checkpoint is not the state at the save"


def test_a_blocking_snapshot_copies_before_the_save_returns(tmp_path):
    (r,) = run_distributed(_save_then_train, 1, args=("torch", str(tmp_path), "blocking"), timeout=300)
    assert r["copies"] == 0, "no copy is left for later"
    assert r["after"] != r["at_save"]
    assert r["loaded"] == r["at_save"]


def test_buffers_are_copied_before_the_save_returns(tmp_path):
    """A forward pass changes buffers (batch-norm running statistics here; DDP broadcasts them): they cannot wait
    for the next optimizer step, so the save copies them before it returns."""
    import time

    import torch
    from safetensors.torch import load_file

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import faults
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=10, milestones="none"))
    config = CheckpointConfig(async_save=True, at_milestones=False, at_end=False, on_preemption=False)
    mgr = CheckpointManager(tmp_path, model, opt, sched, config=config)

    def step() -> None:
        model(torch.randn(8, 16)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()

    step()
    at_save = {k: v.clone() for k, v in model.state_dict().items()}
    faults.fault_hook = lambda point: time.sleep(0.05) if point.startswith("snapshot:") else None
    try:
        path = mgr.save(["periodic"])
        model(torch.randn(8, 16))  # running statistics move before any copy of the parameters is made
        step()
        mgr.wait()
    finally:
        faults.fault_hook = None
    mgr.close()
    assert not torch.equal(model[1].running_mean, at_save["1.running_mean"])
    saved = {}
    for f in sorted(path.rglob("model*.safetensors")):
        saved.update(load_file(f))
    assert set(at_save) <= set(saved)
    for key, value in at_save.items():
        assert torch.equal(saved[key], value), key


def test_an_async_save_of_many_small_tensors_fits_its_buffer(tmp_path):
    """Every tensor in the host buffer starts at an aligned offset: the buffer makes room for each one's padding.
    A torch AdamW on a model of many small tensors (each 0-d step pads 60 bytes) used to overflow the buffer, and
    the save then waited forever for copies that were never made."""
    import threading
    from dataclasses import replace

    import torch
    from safetensors.torch import load_file

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(7, 7) for _ in range(100)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=10, milestones="none"))
    model(torch.randn(2, 7)).sum().backward()
    opt.step()
    sched.step()
    config = CheckpointConfig(async_save=True, at_milestones=False, at_end=False, on_preemption=False)
    for mode in ("overlap", "blocking"):
        mgr = CheckpointManager(tmp_path / mode, model, opt, sched, config=replace(config, async_snapshot=mode))
        saved: list = []
        worker = threading.Thread(
            target=lambda mgr=mgr, saved=saved: saved.append((mgr.save(["periodic"]), mgr.wait()))
        )
        worker.start()
        worker.join(120)
        assert not worker.is_alive(), f"{mode}: the save hangs"
        assert saved, f"{mode}: the save failed (see the log)"
        mgr.close()
        path = saved[0][0]
        weights = {}
        for f in sorted(path.glob("model*.safetensors")):
            weights.update(load_file(f))
        assert weights.keys() == dict(model.named_parameters()).keys()
        for name, p in model.named_parameters():
            assert torch.equal(weights[name], p.detach()), f"{mode}: {name}"
