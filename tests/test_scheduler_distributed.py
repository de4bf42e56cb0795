"""WSDScheduler in real 2-rank torch loops: DDP and FSDP2 (fully_shard), gloo on CPU."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_distributed
from wsd_pretrain import WSDSchedule, WSDScheduler

pytestmark = pytest.mark.distributed

SCHEDULE = dict(total=12, warmup=3, milestones=(6, 12), decay_length=(2, 3), decay_shape="linear")


def _train(rank: int, world: int, engine: str) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(
        [{"params": list(model.parameters())[:2], "lr": 0.01}, {"params": list(model.parameters())[2:], "lr": 0.001}]
    )
    schedule = WSDSchedule(**SCHEDULE)
    sched = WSDScheduler(opt, schedule)
    lrs, events = [], []
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(schedule.total):
        lrs.append([group["lr"] for group in opt.param_groups])
        x = torch.randn(4, 8, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        events += [[e.kind, e.position] for e in sched.events()]
    dist.barrier()
    return {"lrs": lrs, "events": events, "state": sched.state_dict()}


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_scheduler_in_a_two_rank_loop(engine):
    results = run_distributed(_train, world_size=2, args=(engine,))
    schedule = WSDSchedule(**SCHEDULE)
    expected = [[0.01 * schedule.factor(p), 0.001 * schedule.factor(p)] for p in range(schedule.total)]
    for res in results:
        assert [v for row in res["lrs"] for v in row] == pytest.approx([v for row in expected for v in row])
        assert res["events"] == [["pre-decay", 4], ["post-decay", 6], ["pre-decay", 9], ["post-decay", 12]]
    assert results[0]["state"] == results[1]["state"], "every rank holds the same scheduler state"
    # the state is enough to resume: a fresh scheduler continues from it
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.01}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3}])
    fresh = WSDScheduler(opt, schedule)
    fresh.load_state_dict(results[0]["state"])
    assert fresh.position == schedule.total and fresh.finished
