"""The training group of a cluster job is NCCL: it refuses CPU tensors, and each of its collectives costs a
host-device synchronisation. The checkpoint's coordination (the per-update preemption and time agreement, the
staging name, every phase's agreement, the commit) and rank-0 writing (slices sent to rank 0) must run on the
checkpoint's own gloo groups, never on the training group.

On this CPU machine the stand-in is a training group made with a device-only backend map, "cuda:gloo": like
"cuda:nccl" it refuses every CPU tensor ("No backend type associated with device type cpu"), so any checkpoint
message sent on the training group fails the test."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed
from wsd_pretrain.distributed import backend_device_type

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("gloo", "cpu"),
        ("nccl", "cuda"),
        ("cpu:gloo,cuda:nccl", "cpu"),  # FSDP2 with CPUOffloadPolicy: torch asks for both
        ("cuda:nccl,cpu:gloo", "cpu"),
        ("cuda:nccl", "cuda"),  # a device-only map takes device tensors only
        ("CUDA:NCCL", "cuda"),
    ],
)
def test_the_device_a_backend_takes(backend, device):
    assert backend_device_type(backend) == device


def _train_save_resume(rank, world, run_dir, write_mode):
    import torch
    import torch.distributed as dist

    from engines import TinyLM, batch
    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler

    assert dist.get_backend() == "cuda:gloo"
    try:  # the stand-in refuses CPU tensors, as NCCL does
        dist.all_reduce(torch.ones(1))
        refuses_cpu = False
    except RuntimeError:
        refuses_cpu = True

    def build():
        torch.manual_seed(0)
        model = TinyLM()  # the same replica on both ranks (same seed, same batches): what DDP keeps in sync
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = WSDScheduler(opt, WSDSchedule(total=6, warmup=1, decay_length=2))
        cfg = CheckpointConfig(write_mode=write_mode, every_steps=2, decide_every=1, at_end=False)
        return model, opt, sched, CheckpointManager(run_dir, model, opt, sched, config=cfg)

    def train(model, opt, sched, mgr, steps):
        for i in steps:
            model(batch(i, 0)).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            mgr.maybe_save()  # the per-update agreement on preemption and time saves runs every update here

    model, opt, sched, mgr = build()
    train(model, opt, sched, mgr, range(4))
    mgr.close()
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    model, opt, sched, mgr = build()  # a fresh start, as after a restart
    resumed = mgr.resume("latest")
    position = sched.position
    same = all(a.equal(b) for a, b in zip(weights, model.parameters()))
    same_moments = all(m.equal(opt.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    mgr.close()
    return {"refuses_cpu": refuses_cpu, "resumed": resumed, "position": position, "same": same, "moments": same_moments}


@pytest.mark.parametrize("write_mode", ["parallel", "rank0"])
def test_checkpoints_never_use_the_training_group(tmp_path, write_mode):
    results = run_distributed(
        _train_save_resume, args=(str(tmp_path), write_mode), env={"WSD_TEST_BACKEND": "cuda:gloo"}, timeout=300
    )
    for res in results:
        assert res["refuses_cpu"], "the stand-in training group took a CPU tensor: it proves nothing"
        assert res["resumed"] and res["position"] == 4
        assert res["same"] and res["moments"], "the resumed state differs from the saved one"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-000000002-periodic",
        "step-000000004-pre-decay+periodic",
    ]
