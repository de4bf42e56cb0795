"""The ranks agree on one plan when the manager is built (checkpoint/agreement.py): layouts the checkpoint cannot
hold (a tensor-parallel placement it does not understand, pipeline stages, stages renumbered from 0, a rank failing
alone) are refused on every rank with the same error naming the fix, before anything is written; nothing legitimate
is (tensor parallelism alone and with FSDP2, format 3; DDP over replicas that started different; FSDP2 and HSDP with
uneven shards, bf16 compute, CPU offload and a frozen parameter)."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_distributed


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(16, 32)
        self.w2 = torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.relu(self.w1(x)))


class Stages(torch.nn.Module):
    """A 4-layer model cut torchtitan-style: each stage keeps its layers under the whole model's names."""

    def __init__(self, keep: range) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleDict({str(i): torch.nn.Linear(16, 16) for i in range(4)})
        for i in range(4):
            if i not in keep:
                del self.layers[str(i)]


def _build(rank, world, case):
    """(model, optimizer) of one case on this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    plan = {"w1": ColwiseParallel(), "w2": RowwiseParallel()}  # torchtitan's MLP plan
    if case == "fsdp2+tp":  # (dp 2, tp 2): the TP plan first, then fully_shard over the dp submesh
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = parallelize_module(MLP(), mesh["tp"], plan)
        fully_shard(model, mesh=mesh["dp"])
    elif case == "tp":  # a 1-D tp mesh, no fully_shard
        model = parallelize_module(MLP(), init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), plan)
    elif case == "partial":  # a placement no checkpoint layout describes: a parameter held as a pending sum
        from torch.distributed.tensor import DTensor, Partial

        model = MLP()
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        local = model.w1.weight.detach()
        model.w1.weight = torch.nn.Parameter(DTensor.from_local(local, mesh, [Partial()], run_check=False))
    elif case == "stages":  # ranks 0-1 hold layers 0-1, ranks 2-3 layers 2-3
        stage = rank // 2
        model = Stages(range(2 * stage, 2 * stage + 2))
    elif case == "renumbered":  # each stage's layers named from 0: the same names and shapes, other values
        torch.manual_seed(rank // 2)
        model = Stages(range(2))
    elif case == "alone":  # rank 3 alone holds optimizer state the checkpoint cannot carry
        model = MLP()
    elif case == "ddp":  # different initial weights per rank: DDP broadcasts rank 0's, so the replicas agree
        torch.manual_seed(rank)
        model = torch.nn.parallel.DistributedDataParallel(MLP())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if case == "alone" and rank == 3:
        opt.state[model.w1.weight]["note"] = object()
    return model, opt


def _refusals(rank, world, root):
    from pathlib import Path

    from engines import assert_verified
    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    out = {}
    for case in ("fsdp2+tp", "tp", "partial", "stages", "renumbered", "alone"):
        model, opt = _build(rank, world, case)
        run = Path(root, case)
        try:
            CheckpointManager(run, model, opt, WSDScheduler(opt, WSDSchedule(total=8)), config=config).close()
            out[case] = {"refused": None}
        except CheckpointError as exc:
            out[case] = {"refused": str(exc)}
        # nothing written, and the run lock released: a job that fixes its layout starts in the same directory
        ckpts = run / "checkpoints"
        out[case]["left"] = sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else []
    # nothing legitimate refused: DDP over replicas that started different (it broadcasts rank 0's weights), whose
    # first save commits a checkpoint that verifies; built in a directory a refused job left
    model, opt = _build(rank, world, "ddp")
    sched = WSDScheduler(opt, WSDSchedule(total=8))
    mgr = CheckpointManager(Path(root, "stages"), model, opt, sched, config=config)
    path = mgr.save(["periodic"])
    if rank == 0:
        assert_verified([path])
    # a save's plan phase agrees on the items too: optimizer state on rank 0 alone (a step the others did not take)
    # is refused on every rank at the save, and nothing is committed
    if rank == 0:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    sched.step()
    try:
        mgr.save(["periodic"])
        out["save-differs"] = {"refused": None}
    except CheckpointError as exc:
        out["save-differs"] = {"refused": str(exc)}
    mgr.close()
    out["save-differs"]["left"] = sorted(p.name for p in Path(root, "stages", "checkpoints").iterdir())
    out["fsdp2"] = _fsdp2_builds_and_verifies(rank, Path(root, "fsdp2"), config)
    return out


def _fsdp2_builds_and_verifies(rank, run, config):
    """FSDP2 on 4 ranks and HSDP (2 replicas x 2 shards), each with uneven shards (5 rows: 2, 2, 1, 0 on 4 ranks; 3,
    2 on 2), bf16 compute, CPU offload and a frozen parameter: built, stepped and saved, each checkpoint verifies."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from engines import assert_verified
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import CheckpointManager

    paths = []
    for mesh in (None, init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 5), torch.nn.ReLU(), torch.nn.Linear(5, 16))
        model[0].bias.requires_grad_(False)
        policies = dict(
            mesh=mesh,
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16),
            offload_policy=CPUOffloadPolicy(pin_memory=False),
        )
        fully_shard(model[0], **policies)
        fully_shard(model, **policies)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        sched = WSDScheduler(opt, WSDSchedule(total=8))
        mgr = CheckpointManager(run / ("hsdp" if mesh is not None else "fsdp2"), model, opt, sched, config=config)
        model(torch.randn(4, 16)).float().pow(2).mean().backward()
        opt.step()
        sched.step()
        paths.append(mgr.save(["periodic"]))
        mgr.close()
    return assert_verified(paths) if rank == 0 else 2


@pytest.mark.distributed
def test_layouts_the_plan_cannot_hold_are_refused_at_build_on_every_rank(tmp_path):
    results = run_distributed(_refusals, world_size=4, args=(str(tmp_path),), timeout=600)
    for case in ("fsdp2+tp", "tp"):  # format 3 holds tensor parallelism: built, nothing written yet
        assert all(r[case] == {"refused": None, "left": []} for r in results), results[0][case]
    for case in ("partial", "stages", "renumbered", "alone", "save-differs"):
        texts = {r[case]["refused"] for r in results}
        assert len(texts) == 1 and None not in texts, f"{case}: not refused alike on every rank: {texts}"
        (text,) = texts
        expected_left = ["latest", "step-000000000-periodic"] if case == "save-differs" else []
        assert all(r[case]["left"] == expected_left for r in results), f"{case}: {results[0][case]['left']}"
        if case == "partial":
            assert "this job cannot be checkpointed: ranks 0-3: parameter w1.weight has placements (Partial(" in text
            assert "1-D mesh ('tp',) of shape (4,)" in text and "torch.distributed.checkpoint" in text
    stages = results[0]["stages"]["refused"]
    assert (
        "ranks 0-1 hold model tensors that ranks 2-3 do not: layers.0.weight, layers.0.bias, layers.1.weight" in stages
    )
    assert "ranks 2-3 hold model tensors that ranks 0-1 do not: layers.2.weight" in stages
    assert "pipeline=Pipeline(group=mesh['pp'])" in stages  # the fix: tell the manager (tests/test_pipeline.py)
    renumbered = results[0]["renumbered"]["refused"]
    assert "ranks 0-1 and ranks 2-3 hold different values of layers.0.weight, layers.0.bias" in renumbered
    assert "wrap the model in DDP" in renumbered and "with a name map (Pipeline(names=...))" in renumbered
    alone = results[0]["alone"]["refused"]
    assert alone.startswith("this job cannot be checkpointed: rank 3: optimizer state w1.weight/note is a object")
    assert [r["fsdp2"] for r in results] == [2, 2, 2, 2], "FSDP2 or HSDP (uneven, bf16, CPU offload, frozen) refused"
    differs = results[0]["save-differs"]["refused"]
    assert differs.startswith("cannot save checkpoint step-000000001-periodic: the ranks hold different")
    assert "rank 0 holds optimizer tensors that ranks 1-3 do not: w1.weight/exp_avg" in differs


def test_value_fingerprints_are_exact_and_see_every_element():
    from wsd_pretrain.checkpoint import agreement

    g = torch.Generator().manual_seed(0)
    tensors = {
        "fp32": torch.randn(40, 3, generator=g),
        "bf16": torch.randn(33, generator=g).bfloat16(),
        "int": torch.arange(10),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
    }
    base = agreement.fingerprints(tensors)
    assert base == agreement.fingerprints({k: v.clone() for k, v in tensors.items()}), "equal values, equal prints"
    assert len(set(base.values())) == len(base)
    for name in ("fp32", "bf16", "int", "bool"):
        changed = tensors[name].clone().reshape(-1)
        changed[-1] = ~changed[-1] if changed.dtype == torch.bool else changed[-1] + 1
        assert agreement.fingerprints({name: changed.view(tensors[name].shape)})[name] != base[name], name
    swapped = tensors["fp32"].clone().reshape(-1)
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values in another order
    assert agreement.fingerprints({"fp32": swapped.view(40, 3)})["fp32"] != base["fp32"]
    rows = torch.randn(8, 1024, generator=g)  # two rows swapped: the weights have no period of a row's length
    assert agreement.fingerprints({"r": rows})["r"] != agreement.fingerprints({"r": rows[[1, 0, *range(2, 8)]]})["r"]
    # a meta tensor (a model not materialised yet) has nothing to compare
    assert agreement.fingerprints({"meta": torch.empty(3, device="meta")}) == {}


def test_chunked_fingerprints_see_every_chunk(monkeypatch):
    from wsd_pretrain.checkpoint import agreement

    monkeypatch.setattr(agreement, "_CHUNK", 8)
    t = torch.randn(30)
    base = agreement.fingerprints({"t": t})["t"]
    for i in (0, 7, 8, 29):  # first and last element of the first chunk, the second chunk's first, the last
        u = t.clone()
        u[i] += 1
        assert agreement.fingerprints({"t": u})["t"] != base, i
    # chunks swapped whole: the chunk's place counts too
    assert agreement.fingerprints({"t": torch.cat([t[8:16], t[:8], t[16:]])})["t"] != base


def test_a_single_process_describes_and_refuses_locally(tmp_path):
    """One process: the same description twice gives the same digests; a layout the adapter does not understand is
    refused by the adapter while describing (no collective: a single process answers locally)."""
    from wsd_pretrain import CheckpointError
    from wsd_pretrain.checkpoint.adapters import make_adapter
    from wsd_pretrain.checkpoint.agreement import agree_on_plan, describe

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters())
    a, b = describe(make_adapter(model, opt)), describe(make_adapter(model, opt))
    assert a.structure_digest() == b.structure_digest() and a.values_digest() == b.values_digest()
    with torch.no_grad():
        model.w1.bias[0] += 1
    c = describe(make_adapter(model, opt))
    assert c.structure_digest() == a.structure_digest() and c.values_digest() != a.values_digest()

    def refuse():
        raise CheckpointError("parameter x: not understood")

    with pytest.raises(CheckpointError, match="this job cannot be checkpointed: parameter x: not understood"):
        agree_on_plan(refuse, "this job cannot be checkpointed")
