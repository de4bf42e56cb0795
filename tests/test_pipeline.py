"""Pipeline-parallel stages (torch.distributed.pipelining) saved as one model (docs/manager.md, "Pipeline
parallelism"; wsd_pretrain/checkpoint/pipeline.py): GPipe with torchtitan-style names (each stage the full model
with the other layers deleted), 1F1B with stages renumbered from 0 and a name map, interleaved 1F1B with two virtual
stages per rank, an embedding tied to the output projection across the first and last stage. Each is saved,
verified, resumed on the same layout bit for bit (training continues identically) and in one plain process with
exact values; the model folder is the whole model under its real names."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_distributed

VOCAB, DIM, LAYERS = 24, 8, 4
KINDS = ("gpipe", "1f1b", "interleaved", "tied", "fsdp")


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(x))


class Tiny(torch.nn.Module):
    """A decoder in small, torchtitan's way: a stage is this model with the parts it does not run set to None."""

    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(VOCAB, DIM)
        self.layers = torch.nn.ModuleDict({str(i): Block() for i in range(LAYERS)})
        self.norm = torch.nn.LayerNorm(DIM)
        self.lm_head = torch.nn.Linear(DIM, VOCAB, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        for layer in self.layers.values():
            h = layer(h)
        if self.norm is not None:
            h = self.norm(h)
        return self.lm_head(h) if self.lm_head is not None else h


def stage_module(full: Tiny, index: int, count: int, renumber: bool = False) -> Tiny:
    """Stage ``index`` of ``count``: its layers only (torchtitan); ``renumber``: its layers keyed from 0."""
    m = copy.deepcopy(full)
    per = LAYERS // count
    keep = [str(i) for i in range(index * per, (index + 1) * per)]
    for k in list(m.layers.keys()):
        if k not in keep:
            del m.layers[k]
    if renumber:
        m.layers = torch.nn.ModuleDict({str(j): m.layers[k] for j, k in enumerate(keep)})
    if index > 0:
        m.embed_tokens = None
    if index < count - 1:
        m.norm = None
        m.lm_head = None
    return m


def renumbered(index: int, count: int):
    offset = index * (LAYERS // count)
    return lambda n: re.sub(r"^layers\.(\d+)\.", lambda g: f"layers.{int(g.group(1)) + offset}.", n)


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    tokens = torch.randint(0, VOCAB, (4, 6), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())


def training(params, schedule, first: bool, batch=_batch, sync=None):
    """The optimizer, the WSD scheduler and the step function of a pipeline job: one training step runs the
    schedule on ``batch(i)`` (the inputs on the first stage, the targets and losses on the others), then ``sync``
    (if any), the optimizer and the scheduler; it returns this rank's summed microbatch loss."""
    from wsd_pretrain import WSDSchedule, WSDScheduler

    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=40, warmup=2))

    def step(i: int) -> float:
        x, y = batch(i)
        losses: list[torch.Tensor] = []
        if first:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        if sync is not None:
            sync()
        opt.step()
        opt.zero_grad()
        sched.step()
        return float(sum(float(v) for v in losses))

    return opt, sched, step


def build(kind: str, seed: int = 0):
    """This rank's stages, optimizer, scheduler, step function and the manager's Pipeline, for ``kind``: ``gpipe``
    (torchtitan names), ``1f1b`` (renumbered + name map), ``interleaved`` (2 virtual stages per rank), ``tied``
    (GPipe, embedding tied to the output across the first and last stage)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    from wsd_pretrain.checkpoint import Pipeline

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    full = Tiny(tie=kind == "tied")
    count = 2 * world if kind == "interleaved" else world
    indices = [rank + k * world for k in range(count // world)]
    renumber = kind == "1f1b"
    mods = [stage_module(full, s, count, renumber) for s in indices]
    stages = [PipelineStage(m, s, count, torch.device("cpu")) for m, s in zip(mods, indices)]
    if kind == "interleaved":
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=4, loss_fn=_loss)
    else:
        schedule = (Schedule1F1B if kind == "1f1b" else ScheduleGPipe)(stages[0], n_microbatches=2, loss_fn=_loss)
    names = [renumbered(s, count) for s in indices] if renumber else None
    tied = {"lm_head.weight": "embed_tokens.weight"} if kind == "tied" else {}
    pipeline = Pipeline(names=names, tied=tied)

    def sum_tied() -> None:  # the tied copies' gradients summed across the stages that hold them (Megatron's way)
        p = mods[0].embed_tokens.weight if rank == 0 else mods[0].lm_head.weight
        dist.all_reduce(p.grad)

    params = [p for m in mods for p in m.parameters()]
    opt, sched, step = training(params, schedule, rank == 0, sync=sum_tied if kind == "tied" else None)
    return stages, mods, opt, sched, step, pipeline


def state(mods, opt, names=None) -> dict[str, torch.Tensor]:
    """Every stage's parameters and optimizer state under the full model's names."""
    out = {}
    for k, m in enumerate(mods):
        f = names[k] if names else (lambda n: n)
        for n, p in m.named_parameters():
            out[f(n)] = p.detach().clone()
            for key, v in opt.state.get(p, {}).items():
                out[f"{f(n)}::{key}"] = v.detach().clone()
    return out


def _manager(run, stages, opt, sched, pipeline):
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    return CheckpointManager(run, stages, opt, sched, config=config, pipeline=pipeline)


def _pp2(rank, world, root):
    """Every kind on the same two ranks: save after 3 steps, 2 more steps; a fresh job (another seed) resumes and
    takes the same 2 steps; the saved and continued state and losses must be equal bit for bit."""
    from safetensors.torch import save_file

    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    out = {}
    for kind in KINDS:
        make = build_fsdp if kind == "fsdp" else (lambda seed=0, kind=kind: build(kind, seed))
        stages, mods, opt, sched, step, pipeline = make()
        mgr = _manager(Path(root) / kind, stages, opt, sched, pipeline)
        for i in range(3):
            step(i)
        path = mgr.save(["periodic"])
        names = pipeline.names
        saved = _full_state(mods, opt, names)
        save_file(saved, str(Path(root) / f"{kind}-r{rank}.safetensors"))
        losses = [step(i) for i in range(3, 5)]
        after = _full_state(mods, opt, names)
        mgr.close()
        stages, mods, opt, sched, step, pipeline = make(seed=7)
        mgr = _manager(Path(root) / kind, stages, opt, sched, pipeline)
        assert mgr.resume(path)
        restored = _full_state(mods, opt, names)
        again = [step(i) for i in range(3, 5)]
        resumed = _full_state(mods, opt, names)
        mgr.close()
        out[kind] = {
            "path": str(path),
            "restored": sorted(n for n in saved if not torch.equal(saved[n], restored[n])),
            "continued": sorted(n for n in after if not torch.equal(after[n], resumed[n])),
            "losses": [losses, again],
            "problems": verify_checkpoint_files(path) if rank == 0 else [],
        }
    out["hf"] = _hf_stages(rank, root)
    # stages renumbered from 0 without their name map: the same names on both ranks, refused when the manager is
    # built, on every rank, before anything is written
    from wsd_pretrain.checkpoint import CheckpointError, Pipeline

    stages, mods, opt, sched, step, _ = build("1f1b")
    try:
        _manager(Path(root) / "no-map", stages, opt, sched, Pipeline()).close()
        out["refused"] = None
    except CheckpointError as exc:
        out["refused"] = str(exc)
    out["no-map-left"] = sorted(p.name for p in (Path(root) / "no-map").glob("checkpoints/*"))
    return out


def _hf_stages(rank: int, root: str) -> list[str]:
    """A Hugging Face Llama (embedding tied to the output) cut into 2 stages as a user of HF models does: each
    stage keeps its slice of ``model.layers`` (a ModuleList: renumbered from 0, hence the name map), the first the
    embedding, the last the norm and the tied output. The committed folder loads with ``from_pretrained`` into the
    whole model with the stages' values. Returns the names whose values differ (rank 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import Pipeline

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    full = LlamaForCausalLM(config)
    stage = copy.deepcopy(full)
    keep = [0, 1] if rank == 0 else [2, 3]
    stage.model.layers = torch.nn.ModuleList([stage.model.layers[i] for i in keep])
    if rank == 0:
        stage.model.norm = None
        stage.lm_head = None
    else:
        stage.model.embed_tokens = None
    offset = keep[0]
    names = lambda n: re.sub(r"^model\.layers\.(\d+)\.", lambda g: f"model.layers.{int(g.group(1)) + offset}.", n)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=10, warmup=1))
    pipeline = Pipeline(names=names, tied={"lm_head.weight": "model.embed_tokens.weight"})
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    mgr = CheckpointManager(
        Path(root) / "hf", [stage], opt, sched, config=CheckpointConfig(at_milestones=False, at_end=False,
        on_preemption=False), hf_config=config.to_dict(), pipeline=pipeline,
    )  # fmt: skip
    path = mgr.save(["periodic"])
    mgr.close()
    if rank != 0:
        return []
    loaded = LlamaForCausalLM.from_pretrained(str(path))
    want = full.state_dict()
    got = loaded.state_dict()
    return sorted(n for n in want if n not in got or not torch.equal(want[n], got[n])) + sorted(set(got) - set(want))


def _plain_resume(path: str, tie: bool, root: Path) -> dict[str, torch.Tensor]:
    """One plain process (no torch.distributed) resumes the pipeline checkpoint into the full model."""
    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    torch.manual_seed(11)
    model = Tiny(tie=tie)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=40, warmup=2))
    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    mgr = CheckpointManager(root, model, opt, sched, config=config)
    assert mgr.resume(path)
    got = state([model], opt)
    mgr.close()
    return got


@pytest.mark.distributed
def test_pipeline_stages_save_as_one_model_and_resume_on_any_layout(tmp_path):
    from safetensors.torch import load_file

    results = run_distributed(_pp2, world_size=2, args=(str(tmp_path),), timeout=600)
    assert results[0]["hf"] == [], results[0]["hf"]
    refused = {r["refused"] for r in results}
    assert len(refused) == 1 and None not in refused, refused
    (text,) = refused
    assert "stages 0 and 1 both hold model tensor 'layers.0.lin.weight'" in text, text
    assert "Pipeline(group, names=...)" in text and results[0]["no-map-left"] == []
    for kind in KINDS:
        for r in results:
            got = r[kind]
            assert got["restored"] == [], (kind, got)
            assert got["continued"] == [], (kind, got)
            assert got["losses"][0] == got["losses"][1], (kind, got)
        assert results[0][kind]["problems"] == [], results[0][kind]
        path = Path(results[0][kind]["path"])
        # the model folder: the whole model under its real names, once each (a tied weight once, its alias in the
        # manifest), with the values the stages held
        saved = {
            **load_file(str(tmp_path / f"{kind}-r0.safetensors")),
            **load_file(str(tmp_path / f"{kind}-r1.safetensors")),
        }
        index = json.loads((path / "model.safetensors.index.json").read_text())
        full = Tiny(tie=kind == "tied")
        expected = {n for n, _ in full.named_parameters()}
        assert set(index["weight_map"]) == expected, (kind, sorted(index["weight_map"]))
        folder = {}
        for f in set(index["weight_map"].values()):
            folder.update(load_file(str(path / f)))
        for n, t in folder.items():
            assert torch.equal(t, saved[n]), (kind, n)
        if kind == "tied":
            manifest = json.loads((path / "manifest.json").read_text())
            assert manifest["tied"] == {"lm_head.weight": "embed_tokens.weight"}, manifest["tied"]
            assert torch.equal(saved["lm_head.weight"], saved["embed_tokens.weight"])
        # another layout: one plain process, exact values (parameters and every optimizer moment)
        plain = _plain_resume(str(path), kind == "tied", tmp_path / f"plain-{kind}")
        for n, t in plain.items():
            assert torch.equal(t, saved[n]), (kind, n)
        tied_copy = {n for n in saved if n.startswith("lm_head.weight")} if kind == "tied" else set()
        assert set(plain) == set(saved) - tied_copy, (kind, sorted(set(plain) ^ set(saved)))


def _full_state(mods, opt, names=None) -> dict[str, torch.Tensor]:
    """:func:`state` with FSDP2's shards put together (collective over each stage's dp ranks)."""
    from torch.distributed.tensor import DTensor

    got = state(mods, opt, names)
    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in got.items()}


def build_fsdp(seed: int = 0):
    """pp 2 x dp (world / 2): each stage FSDP2-sharded over its dp ranks, GPipe, torchtitan names."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    from wsd_pretrain.checkpoint import Pipeline

    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("pp", "dp"))
    pp, dp = mesh.get_local_rank("pp"), mesh.get_local_rank("dp")
    torch.manual_seed(seed)
    m = stage_module(Tiny(), pp, 2)
    fully_shard(m, mesh=mesh["dp"])
    stage = PipelineStage(m, pp, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = ScheduleGPipe(stage, n_microbatches=2, loss_fn=_loss)
    opt, sched, step = training(m.parameters(), schedule, pp == 0, batch=lambda i: _batch(10 * i + dp))

    return [stage], [m], opt, sched, step, Pipeline(group=mesh["pp"])


def _pp2_dp2(rank, world, root):
    from safetensors.torch import save_file

    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    stages, mods, opt, sched, step, pipeline = build_fsdp()
    mgr = _manager(Path(root) / "run", stages, opt, sched, pipeline)
    for i in range(3):
        step(i)
    path = mgr.save(["periodic"])
    saved = _full_state(mods, opt)
    if rank in (0, 2):
        save_file(saved, str(Path(root) / f"fsdp-r{rank}.safetensors"))
    losses = [step(i) for i in range(3, 5)]
    after = _full_state(mods, opt)
    mgr.close()
    stages, mods, opt, sched, step, pipeline = build_fsdp(seed=5)
    mgr = _manager(Path(root) / "run", stages, opt, sched, pipeline)
    assert mgr.resume(path)
    restored = _full_state(mods, opt)
    again = [step(i) for i in range(3, 5)]
    resumed = _full_state(mods, opt)
    mgr.close()
    index = json.loads((Path(path) / "train_state" / "state.index.json").read_text())
    return {
        "path": str(path),
        "restored": sorted(n for n in saved if not torch.equal(saved[n], restored[n])),
        "continued": sorted(n for n in after if not torch.equal(after[n], resumed[n])),
        "losses": [losses, again],
        "problems": verify_checkpoint_files(path) if rank == 0 else [],
        "partition": index["tensors"]["optimizer/layers.2.lin.weight/exp_avg"]["partition"],
    }


def _dp2_resume(rank, world, path, root):
    """pp 1 x dp 2: the whole model FSDP2-sharded over two ranks resumes the pp 2 x dp 2 checkpoint."""
    from torch.distributed.fsdp import fully_shard

    from wsd_pretrain import WSDSchedule, WSDScheduler

    torch.manual_seed(9)
    model = Tiny()
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=40, warmup=2))
    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    mgr = CheckpointManager(Path(root) / "dp2", model, opt, sched, config=config)
    assert mgr.resume(path)
    got = _full_state([model], opt)
    mgr.close()
    if rank == 0:
        from safetensors.torch import save_file

        save_file(got, str(Path(root) / "dp2.safetensors"))
    return True


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_dp2_fsdp2_resumes_bitwise_and_on_other_layouts(tmp_path):
    from safetensors.torch import load_file

    results = run_distributed(_pp2_dp2, world_size=4, args=(str(tmp_path),), timeout=900)
    for r in results:
        assert r["restored"] == [] and r["continued"] == [], r
    assert results[2]["losses"][0] == results[2]["losses"][1]
    assert results[0]["problems"] == []
    # stage 1's optimizer state: FSDP2 rows of its dp ranks 2 and 3 (global ranks of the stage's sub-mesh)
    assert results[0]["partition"] == {"chunk": 32, "ranks": [2, 3]}, results[0]["partition"]
    saved = {**load_file(str(tmp_path / "fsdp-r0.safetensors")), **load_file(str(tmp_path / "fsdp-r2.safetensors"))}
    path = results[0]["path"]
    plain = _plain_resume(path, False, tmp_path / "plain")
    assert set(plain) == set(saved) and all(torch.equal(plain[n], saved[n]) for n in saved)
    run_distributed(_dp2_resume, world_size=2, args=(path, str(tmp_path)), timeout=600)
    dp2 = load_file(str(tmp_path / "dp2.safetensors"))
    assert set(dp2) == set(saved) and all(torch.equal(dp2[n], saved[n]) for n in saved)


def build_tp(seed: int = 0):
    """pp 2 x tp 2 on 4 ranks: each stage's Linear layers column-parallel on its tp ranks (outputs replicated), the
    embedding a plain replica of the tp ranks, 1F1B, torchtitan names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from wsd_pretrain.checkpoint import Pipeline

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    pp = mesh.get_local_rank("pp")
    torch.manual_seed(seed)
    m = stage_module(Tiny(), pp, 2)
    plan = {f"layers.{k}.lin": ColwiseParallel(output_layouts=Replicate()) for k in m.layers.keys()}
    if m.lm_head is not None:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    parallelize_module(m, mesh["tp"], plan)
    stage = PipelineStage(m, pp, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    schedule = Schedule1F1B(stage, n_microbatches=2, loss_fn=_loss)
    opt, sched, step = training(m.parameters(), schedule, pp == 0)

    return [stage], [m], opt, sched, step, Pipeline(group=mesh["pp"])


def _pp2_tp2(rank, world, root):
    from safetensors.torch import save_file

    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    stages, mods, opt, sched, step, pipeline = build_tp()
    mgr = _manager(Path(root) / "run", stages, opt, sched, pipeline)
    for i in range(3):
        step(i)
    path = mgr.save(["periodic"])
    saved = _full_state(mods, opt)
    if rank in (0, 2):
        save_file(saved, str(Path(root) / f"tp-r{rank}.safetensors"))
    losses = [step(i) for i in range(3, 5)]
    after = _full_state(mods, opt)
    mgr.close()
    stages, mods, opt, sched, step, pipeline = build_tp(seed=5)
    mgr = _manager(Path(root) / "run", stages, opt, sched, pipeline)
    assert mgr.resume(path)
    restored = _full_state(mods, opt)
    again = [step(i) for i in range(3, 5)]
    resumed = _full_state(mods, opt)
    mgr.close()
    index = json.loads((Path(path) / "train_state" / "state.index.json").read_text())
    return {
        "path": str(path),
        "restored": sorted(n for n in saved if not torch.equal(saved[n], restored[n])),
        "continued": sorted(n for n in after if not torch.equal(after[n], resumed[n])),
        "losses": [losses, again],
        "problems": verify_checkpoint_files(path) if rank == 0 else [],
        "partition": index["tensors"]["optimizer/layers.2.lin.weight/exp_avg"]["partition"],
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_tp2_resumes_bitwise_and_in_one_process(tmp_path):
    from safetensors.torch import load_file

    results = run_distributed(_pp2_tp2, world_size=4, args=(str(tmp_path),), timeout=900)
    for r in results:
        assert r["restored"] == [] and r["continued"] == [], r
    assert results[2]["losses"][0] == results[2]["losses"][1]
    assert results[0]["problems"] == []
    # stage 1's column-parallel weight: a grid on its tp sub-mesh, global ranks 2 and 3
    assert results[0]["partition"] == {"grid": {"mesh": [2], "dims": [[0], []], "ranks": [2, 3]}}, results[0]
    saved = {**load_file(str(tmp_path / "tp-r0.safetensors")), **load_file(str(tmp_path / "tp-r2.safetensors"))}
    plain = _plain_resume(results[0]["path"], False, tmp_path / "plain")
    assert set(plain) == set(saved) and all(torch.equal(plain[n], saved[n]) for n in saved)
