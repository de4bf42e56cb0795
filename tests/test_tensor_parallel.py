"""Tensor-parallel jobs (format 3, docs/checkpoint-format.md "Boxes"): DTensor TP alone and FSDP2 + TP saved with
their shards as boxes of each tensor, resumed on the same mesh bitwise (training continues identically), and read
into other layouts by box intersection with exactly the values torch.distributed.checkpoint (the oracle: the same
state saved with ``dcp.save`` and loaded back whole) gives. The model folder is full tensors under the model's own
names (safetensors, ``from_pretrained`` style)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_distributed


class Net(torch.nn.Module):
    """torchtitan's shapes in small: an embedding, a norm, a Colwise/Rowwise MLP, an output projection. Odd sizes
    (vocab 30, hidden 22) give uneven shards on 2 and 4 ranks."""

    def __init__(self, vocab: int = 30, dim: int = 16, hidden: int = 22) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.w1 = torch.nn.Linear(dim, hidden)
        self.w2 = torch.nn.Linear(hidden, dim)
        self.out = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.w2(torch.relu(self.w1(self.norm(h))))
        return self.out(h)


def _plan(loss_parallel: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
    )

    return {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "w1": ColwiseParallel(input_layouts=Shard(1)),
        "w2": RowwiseParallel(output_layouts=Shard(1)),
        "out": ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(), use_local_output=False
        ),
    }


def _batch(i: int, dp_rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * i + dp_rank)
    return torch.randint(0, 30, (2, 9), generator=g)  # 8 positions in: sequence-parallel on 2


def _build(layout: str, seed: int = 0):
    """(model, optimizer, scheduler, step) for one layout on this rank: ``tp`` (a 1-D mesh of every rank),
    ``fsdp2+tp`` (dp 2 x tp 2), ``hsdp+tp`` (replicate 2 x shard 1 x tp 2), ``fsdp2`` (every rank), ``ddp``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module

    from wsd_pretrain import WSDSchedule, WSDScheduler

    torch.manual_seed(seed)
    model = Net()
    world = dist.get_world_size()
    dp_rank = 0
    lp = layout in ("tp", "fsdp2+tp")
    if layout == "tp":
        model = parallelize_module(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), _plan(lp))
    elif layout == "fsdp2+tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = parallelize_module(model, mesh["tp"], _plan(lp))
        fully_shard(model, mesh=mesh["dp"])
        dp_rank = mesh.get_local_rank("dp")
    elif layout == "hsdp+tp":
        mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("replicate", "shard", "tp"))
        model = parallelize_module(model, mesh["tp"], _plan(lp))
        fully_shard(model, mesh=mesh["replicate", "shard"])
        dp_rank = mesh.get_local_rank("replicate")
    elif layout == "fsdp2":
        fully_shard(model)
        dp_rank = dist.get_rank()
    elif layout == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
        dp_rank = dist.get_rank()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=20, warmup=2))

    def step(i: int) -> float:
        tokens = _batch(i, dp_rank)
        logits = model(tokens[:, :-1])
        target = tokens[:, 1:].reshape(-1)
        if isinstance(logits, DTensor) and lp:
            with loss_parallel():
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target)
                loss.backward()
        else:
            if isinstance(logits, DTensor):
                logits = logits.full_tensor()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target)
            loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        return float(loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach())

    return model, opt, sched, step


def _manager(run, model, opt, sched):
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    return CheckpointManager(run, model, opt, sched, config=config)


def _full(model, opt) -> dict[str, torch.Tensor]:
    from engines import full_state

    return full_state(model, opt)


def _dcp_full(dcp_dir: str, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The oracle: the tensors torch.distributed.checkpoint loads back, whole, from its own save of the same state."""
    import torch.distributed.checkpoint as dcp

    want: dict = {"model": {}, "optim": {"state": {}}}
    for key, t in like.items():
        name, _, what = key.partition(":")
        if what == "model":
            want["model"][name] = torch.empty(t.shape)
        else:
            want["optim"]["state"].setdefault(name, {})[what.split("/", 1)[1]] = torch.empty(t.shape)
    dcp.load(want, checkpoint_id=dcp_dir)
    out = {f"{n}:model": t for n, t in want["model"].items()}
    for n, keys in want["optim"]["state"].items():
        out.update({f"{n}:optimizer/{k}": t for k, t in keys.items()})
    return out


def _dcp_save(model, opt, dcp_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": {"state": osd["state"]}}, checkpoint_id=dcp_dir)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or not torch.equal(a[k].float(), b[k].float())]


def _four(rank, world, root):
    """FSDP2 + TP (dp 2 x tp 2): saved with ours and with dcp.save; resumed on the same mesh (training continues
    bit for bit, each rank reading only its own slices); loaded into FSDP2 on 4, DDP on 4, HSDP + TP and one
    process, each with exactly DCP's values."""
    import torch.distributed as dist

    root = Path(root)
    out: dict = {}
    model, opt, sched, step = _build("fsdp2+tp")
    mgr = _manager(root / "run", model, opt, sched)
    for i in range(3):
        step(i)
    path = mgr.save(["periodic"])
    _dcp_save(model, opt, str(root / "dcp"))
    saved = _full(model, opt)
    out["continued"] = [step(i) for i in range(3, 6)]
    mgr.close()
    dist.barrier()
    oracle = _dcp_full(str(root / "dcp"), saved)
    out["dcp_equal_live"] = _same(saved, oracle)

    # the same mesh: bitwise, reading only this rank's own slices of the optimizer state
    model, opt, sched, step = _build("fsdp2+tp", seed=1)
    mgr = _manager(root / "run", model, opt, sched)
    assert mgr.resume(path)
    out["same_mesh"] = _same(_full(model, opt), oracle)
    out["resumed"] = [step(i) for i in range(3, 6)]
    mgr.close()

    for layout in ("fsdp2", "ddp", "hsdp+tp"):
        model, opt, sched, step = _build(layout, seed=2)
        mgr = _manager(root / f"run-{layout}", model, opt, sched)
        mgr.resume(path)
        got = _full(model, opt)
        out[layout] = _same(got, oracle)
        if layout == "hsdp+tp":  # saved from HSDP + TP too: the first replica writes each box once
            out["hsdp_path"] = str(mgr.save(["periodic"]))
        step(3)  # and it trains on
        mgr.close()
    out["path"] = str(path)
    out["oracle"] = {k: v.tolist() for k, v in oracle.items()} if rank == 0 else None
    return out


def state_of(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every model and optimizer tensor of a checkpoint, read whole (what one process's resume reads)."""
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.store import CheckpointStore

    with CheckpointStore(ckpt, F.load_manifest(ckpt)) as store:
        out = {f"{n}:model": store.read("model", n) for n in store.names("model")}
        for k in store.names("optimizer"):
            pname, _, key = k.rpartition("/")
            out[f"{pname}:optimizer/{key}"] = store.read("optimizer", k)
    return out


def _tools_on_boxes(path: Path, oracle: dict[str, torch.Tensor], root: Path) -> None:
    """One process, after the job: verify, a whole read of every tensor, the model folder, inspect, to-dcp and
    from-dcp back, reshard (which keeps the boxes)."""
    from safetensors.torch import load_file

    from engines import assert_verified
    from wsd_pretrain.checkpoint import tools

    assert_verified([path])

    assert _same(state_of(path), oracle) == [], "one process reads every tensor whole, as DCP does"
    folder: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("model-*.safetensors")):
        folder.update(load_file(f))
    model_oracle = {k: v for k, v in oracle.items() if k.endswith(":model")}
    assert _same({f"{n}:model": t for n, t in folder.items()}, model_oracle) == [], "the model folder is whole"
    index = json.loads((path / "train_state" / "state.index.json").read_text())
    assert index["format_version"] == 3
    tensors = index["tensors"]
    # Colwise w1 (dim 0 cut by tp, then by dp inside each tp piece: FSDP2's _StridedShard), Rowwise w2 (dim 1 by tp,
    # dim 0 by dp), the norm (replicated over tp: dim 0 by dp only, written by tp rank 0), all O(1) rules
    assert tensors["optimizer/w1.weight/exp_avg"]["partition"] == {"grid": {"mesh": [2, 2], "dims": [[1, 0], []]}}
    assert tensors["optimizer/w2.weight/exp_avg"]["partition"] == {"grid": {"mesh": [2, 2], "dims": [[0], [1]]}}
    assert tensors["optimizer/norm.weight/exp_avg"]["partition"] == {"grid": {"mesh": [2, 2], "dims": [[0]]}}
    # every element of the training state is stored once: a TP-replicated norm by tp rank 0 of each dp row only
    from safetensors import safe_open

    stored, holders = 0, set()
    for f in sorted((path / "train_state").glob("state-r*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                stored += math.prod(h.get_slice(key).get_shape())
                if key == "optimizer/norm.weight/exp_avg":
                    holders.add(f.name[: len("state-r00000")])
    assert stored == sum(math.prod(t["shape"]) for t in tensors.values()), "a box written more than once"
    assert holders == {"state-r00000", "state-r00002"}
    info = tools.inspect_checkpoint(path)
    assert info["layout"]["mesh"] == [2, 2] and info["layout"]["mesh_dims"] == ["dp", "tp"]
    assert info["partitions"]["optimizer/w2.weight/exp_avg"].startswith("boxes on mesh [2, 2]")
    # to-dcp and back: the model folder from DCP's files equals ours bit for bit
    tools.to_dcp(path, root / "to-dcp")
    back = tools.from_dcp(root / "to-dcp", root / "from-dcp", prefix="model.")
    again: dict[str, torch.Tensor] = {}
    for f in sorted(Path(back).glob("model-*.safetensors")):
        again.update(load_file(f))
    assert sorted(again) == sorted(folder) and all(torch.equal(folder[n], again[n]) for n in folder)
    resharded = tools.reshard(path, root / "resharded", max_shard_size=2000)
    assert tools.verify_checkpoint_files(resharded) == []
    assert _same(state_of(resharded), oracle) == []


@pytest.mark.distributed
def test_fsdp2_tp_resumes_bitwise_and_loads_into_every_layout_as_dcp_does(tmp_path, capsys):
    results = run_distributed(_four, world_size=4, args=(str(tmp_path),), timeout=600)
    for r in results:
        assert r["dcp_equal_live"] == [], "the oracle itself: DCP loads back what the job held"
        assert r["resumed"] == r["continued"], "training on the same mesh continues bit for bit"
        for layout in ("same_mesh", "fsdp2", "ddp", "hsdp+tp"):
            assert r[layout] == [], f"{layout}: differs from DCP's values: {r[layout]}"
    oracle = {k: torch.tensor(v) for k, v in results[0]["oracle"].items()}
    _tools_on_boxes(Path(results[0]["path"]), oracle, tmp_path)
    from wsd_pretrain.cli import main

    hsdp = Path(results[0]["hsdp_path"])
    assert _same(state_of(hsdp), oracle) == [], "saved from HSDP + TP"
    index = json.loads((hsdp / "train_state" / "state.index.json").read_text())
    assert index["tensors"]["optimizer/w2.weight/exp_avg"]["partition"] == {
        "grid": {"mesh": [2, 1, 2], "dims": [[1], [2]]}
    }, "replicas (mesh dim 0) write nothing"
    capsys.readouterr()
    assert main(["ckpt", "inspect", results[0]["path"]]) == 0
    text = capsys.readouterr().out
    assert "mesh=[2, 2], mesh_dims=['dp', 'tp']" in text and "boxes on mesh [2, 2]" in text


def _two(rank, world, root):
    """TP alone on 2 ranks: Colwise, Rowwise, a SequenceParallel norm, a loss-parallel output: saved, resumed on
    the same mesh bit for bit; the norm (replicated) written once; the model folder whole."""
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.store import CheckpointStore

    root = Path(root)
    model, opt, sched, step = _build("tp")
    mgr = _manager(root / "run", model, opt, sched)
    for i in range(2):
        step(i)
    path = mgr.save(["periodic"])
    saved = _full(model, opt)
    out: dict = {"continued": [step(i) for i in range(2, 5)]}
    mgr.close()
    model, opt, sched, step = _build("tp", seed=3)
    mgr = _manager(root / "run", model, opt, sched)
    assert mgr.resume(path)
    out["same"] = _same(_full(model, opt), saved)
    # the state files a same-mesh resume opens: its own, and only those holding a tensor written once (a
    # TP-replicated norm's state, a 0-d step) of another rank's
    files = mgr.load(path)["stats"]["files_read"]
    index = json.loads((Path(path) / "train_state" / "state.index.json").read_text())["tensors"]
    once = {p["partition"]["parts"][0][2] for p in index.values() if len(p["partition"].get("parts", [1, 2])) == 1}
    others = {int(f.split("state-r")[1][:5]) for f in files if "state-r" in f} - {rank}
    out["state_files"] = sorted(f for f in files if "state-r" in f)
    out["foreign"] = sorted(others - once)
    out["resumed"] = [step(i) for i in range(2, 5)]
    mgr.close()
    if rank == 0:
        with CheckpointStore(path, F.load_manifest(path)) as store:
            whole = {f"{n}:model": store.read("model", n) for n in store.names("model")}
            whole.update(
                {
                    f"{k.rsplit('/', 1)[0]}:optimizer/{k.rsplit('/', 1)[1]}": store.read("optimizer", k)
                    for k in store.names("optimizer")
                }
            )
            out["whole"] = _same(whole, saved)
        index = json.loads((Path(path) / "train_state" / "state.index.json").read_text())
        out["norm"] = index["tensors"]["optimizer/norm.weight/exp_avg"]["partition"]
        out["embed"] = index["tensors"]["optimizer/embed.weight/exp_avg"]["partition"]
    return out


@pytest.mark.distributed
def test_tensor_parallel_alone_resumes_bitwise(tmp_path):
    results = run_distributed(_two, world_size=2, args=(str(tmp_path),), timeout=600)
    for rank, r in enumerate(results):
        assert r["resumed"] == r["continued"] and r["same"] == []
        # a same-mesh resume reads its optimizer boxes from its own state files, no other rank's but the holders
        # of the tensors written once
        assert r["foreign"] == [] and any(f"state-r{rank:05d}-" in f for f in r["state_files"]), r["state_files"]
    r0 = results[0]
    assert r0["whole"] == []
    assert "parts" in r0["norm"] and len(r0["norm"]["parts"]) == 1, "a TP-replicated tensor is written once"
    assert r0["embed"] == {"grid": {"mesh": [2], "dims": [[0], []]}}


def _save_fsdp2_tp(rank, world, root):
    """The (dp 2, tp 2) state saved with ours and with dcp.save; then loaded into DeepSpeed ZeRO-3 on 4 ranks."""
    import torch.distributed as dist

    from engines import ds_config
    from wsd_pretrain import WSDSchedule, WSDScheduler, deepspeed_initialize

    root = Path(root)
    model, opt, sched, step = _build("fsdp2+tp")
    mgr = _manager(root / "run", model, opt, sched)
    for i in range(3):
        step(i)
    path = mgr.save(["periodic"])
    _dcp_save(model, opt, str(root / "dcp"))
    saved = _full(model, opt)
    mgr.close()
    dist.barrier()
    oracle = _dcp_full(str(root / "dcp"), saved)
    torch.manual_seed(5)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=20, warmup=2))
    engine, *_ = deepspeed_initialize(model=net, optimizer=opt, lr_scheduler=sched, config=ds_config(3, "fp32"))
    mgr = _manager(root / "run-ds3", engine, opt, sched)
    mgr.resume(path)
    got = _full(engine, opt)
    mgr.close()
    return {"path": str(path), "ds3": _same(got, oracle)}


def _load_tp2(rank, world, path, dcp_dir, root):
    model, opt, sched, step = _build("tp", seed=4)
    mgr = _manager(Path(root) / "run-tp2", model, opt, sched)
    mgr.resume(path)
    got = _full(model, opt)
    step(3)
    mgr.close()
    return _same(got, _dcp_full(dcp_dir, got))


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_tp_loads_into_deepspeed_zero3_and_tp_alone(tmp_path):
    """The other targets of item 3 (their read paths, flat ranges and boxes of grid parts, run in the default test
    above through FSDP2 on 4 and the same-mesh resume)."""
    results = run_distributed(_save_fsdp2_tp, world_size=4, args=(str(tmp_path),), timeout=900)
    assert all(r["ds3"] == [] for r in results), results[0]["ds3"]
    path = results[0]["path"]
    loaded = run_distributed(_load_tp2, world_size=2, args=(path, str(tmp_path / "dcp"), str(tmp_path)), timeout=600)
    assert loaded == [[], []]
