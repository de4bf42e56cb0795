"""Pipeline-parallel stages saved as one model (torch.distributed.pipelining: GPipe, 1F1B, interleaved).

Each rank holds one or more **stages** (``nn.Module`` s, or ``PipelineStage`` objects whose ``submod`` is one), a
part of the model. The checkpoint still holds **one model**: the plan is the union of every stage's tensors, each
owned by exactly one stage, written by that stage's ranks (and read back by whichever rank needs it, on any layout).

**Names.** A stage module that keeps the full model's names (torchtitan: the full model with the other layers
deleted or set to None) is saved as it is. A stage renumbered from 0 (``nn.Sequential`` pieces) declares a name
map, :attr:`Pipeline.names`: a dict ``{local name: global name}`` or a callable ``local -> global`` (one for every
stage module of this rank, or a list of them in the order of the stage modules). Two stages that name the same
tensor are refused when the manager is built (stages renumbered from 0 without a map), unless the name is declared
tied.

**Tied weights** across stages (the embedding on the first stage, the output projection on the last):
:attr:`Pipeline.tied` ``{alias: name}``; the tensor is stored once, under ``name``, by the stage that holds ``name``
first (the lowest stage index), with ``alias`` in the manifest's ``tied`` (``from_pretrained`` ties them); a resume
restores it (and its optimizer state) to every stage holding either name. The copies must hold the same values when
the manager is built (the job all-reduces their gradients, as Megatron does): it is checked.

**The agreement** (:meth:`PipelineAdapter.exchange`), with bounded collective bytes:

* when the manager is built, once: every rank's pipeline-group members (``pp`` ints per rank, one all-gather on
  the checkpoint's gloo group: ``world x pp`` ints, 64 KB at 1,024 ranks, PP 16) make one gloo group per pipeline
  group (the ranks holding one stage are those at the same position in each pipeline group);
* when the manager is built and at each save: one all-gather **inside each pipeline group** of every stage's
  description (its tensors' rows, fingerprints of its stage-replicated weights, its optimizer's hyperparameters):
  each rank receives every stage's description once, about the whole model's description (rows of ~100-400 bytes
  per tensor: ~1.5 MB for a 70B Llama with Adam, whatever the world size; DCP exchanges O(tensors x ranks));
* then the existing 136-byte all-reduce of digests across all ranks (:mod:`.agreement`): the pipeline groups
  (one per data-parallel/tensor-parallel coordinate) computed the same union, so the replicas of each stage hold the
  same structure and values.

A stage's tensor replicated over its own data-parallel ranks (no FSDP) is written once, by one of those ranks
(alternating over them by tensor, to spread the bytes); a sharded one (FSDP2, FSDP2 + TP) keeps its partition on the
stage's sub-mesh (global ranks), so every rank writes only what it holds, as without pipelining.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import distributed as D
from ..errors import CheckpointError
from .adapters import (
    EngineAdapter,
    Want,
    _jsonable,
    make_adapter,
    restore_group_settings,
    restore_scalars,
    step_tensor,
)
from .layout import Item, Partition

__all__ = ["Pipeline", "PipelineAdapter"]

NAME_MAP_FIX = (
    "stages renumbered from 0 name different tensors alike: give CheckpointManager(pipeline=Pipeline(group, "
    "names=...)) a name map from each stage module's names to the full model's (a dict or a callable, one per stage "
    "module of the rank), or keep the full model's names in each stage (torchtitan: delete the other layers); a "
    "tensor that two stages really share (tied embeddings) is declared in Pipeline(tied={alias: name})"
)


@dataclass(frozen=True)
class Pipeline:
    """How a pipeline-parallel job's stages make one model (the manager's ``pipeline=`` argument, given on every
    rank).

    Args:
        group: the pipeline-parallel process group (or a 1-D ``DeviceMesh``, e.g. ``mesh["pp"]``) this rank's stages
            send activations on; None takes it from the ``PipelineStage`` objects passed as the model (whose own
            default, and this one's, is the whole world: a pipeline-only job).
        names: the name map of stages renumbered from 0: None (stages keep the full model's names), a dict
            ``{local: global}`` or a callable ``local -> global`` for every stage module of this rank, or a list of
            those, one per stage module in the order given.
        tied: ``{alias: name}``: tensors two stages hold as one (the output projection tied to the embedding).
        stages: each stage module's stage index (None: ``PipelineStage.stage_index``, else ``pp_rank + k * pp``,
            the looped placement of torch's interleaved schedules).
    """

    group: Any = None
    names: Any = None
    tied: Mapping[str, str] = field(default_factory=dict)
    stages: Sequence[int] | None = None


def _mapper(names: Any, k: int, count: int) -> Callable[[str], str]:
    if isinstance(names, (list, tuple)):
        if len(names) != count:
            raise CheckpointError(
                f"Pipeline(names=...) lists {len(names)} name maps for {count} stage modules on this rank: give one per "
                "stage module, in the order of the modules"
            )
        names = names[k]
    if names is None:
        return lambda n: n
    if isinstance(names, Mapping):
        table = dict(names)

        def lookup(n: str) -> str:
            if n not in table:
                raise CheckpointError(
                    f"the name map of stage module {k} has no entry for {n!r}: map every parameter and persistent "
                    "buffer of the stage to its name in the full model"
                )
            return str(table[n])

        return lookup
    if callable(names):
        return lambda n: str(names(n))
    raise CheckpointError(f"Pipeline(names=...) must be None, a dict, a callable or a list of them, not {names!r}")


def _group_ranks(group: Any) -> tuple[list[int], Any]:
    """(global ranks of the pipeline group in its own order, the ProcessGroup)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise CheckpointError(
                f"Pipeline(group=...) is a {group.ndim}-D mesh: give the pipeline dimension, mesh['pp']"
            )
        group = group.get_group()
    if group is None:  # PipelineStage's default: the whole world is one pipeline
        if not D.is_distributed():
            return [0], None
        group = dist.group.WORLD
    return [int(r) for r in dist.get_process_group_ranks(group)], group


class PipelineAdapter(EngineAdapter):
    """See the module docstring. Wraps one engine adapter per stage module (plain torch, DDP over the stage's
    data-parallel ranks, FSDP2, FSDP2 + TP) and renames, unites and places their items."""

    engine = "pipeline"

    def __init__(self, model: Any, optimizer: torch.optim.Optimizer | None, pipeline: Pipeline) -> None:
        mods = list(model) if isinstance(model, (list, tuple)) else [model]
        if not mods:
            raise CheckpointError("pipeline: no stage module given: pass this rank's stages as the model")
        group = pipeline.group
        modules, indices = [], []
        for m in mods:
            sub = getattr(m, "submod", None)
            if sub is not None and hasattr(m, "stage_index"):  # torch.distributed.pipelining.PipelineStage
                modules.append(sub)
                indices.append(int(m.stage_index))
                if group is None:
                    group = m.group
            else:
                modules.append(m)
                indices.append(None)
        self.pp_ranks, self._pp_group = _group_ranks(group)
        self.world, self.rank = D.get_world_size(), D.get_rank()
        if self.rank not in self.pp_ranks:
            raise CheckpointError(f"pipeline: rank {self.rank} is not in its own pipeline group {self.pp_ranks}")
        self.pp = len(self.pp_ranks)
        self.pp_pos = self.pp_ranks.index(self.rank)
        if pipeline.stages is not None:
            if len(pipeline.stages) != len(modules):
                raise CheckpointError(
                    f"Pipeline(stages=...) lists {len(pipeline.stages)} indices for {len(modules)} stages"
                )
            indices = [int(s) for s in pipeline.stages]
        self.stage_indices = [s if s is not None else self.pp_pos + k * self.pp for k, s in enumerate(indices)]
        self.stages = [make_adapter(m, optimizer) for m in modules]
        for a in self.stages:
            if a.engine == "deepspeed":
                raise CheckpointError("pipeline: DeepSpeed engines are pipelined by DeepSpeed's PipelineModule")
        self.maps = [_mapper(pipeline.names, k, len(modules)) for k in range(len(modules))]
        self.declared_tied = {str(a): str(b) for a, b in dict(pipeline.tied).items()}
        self.optimizer = optimizer
        self.module = torch.nn.ModuleList([a.module for a in self.stages])
        self.gathers = True
        # global name -> (stage adapter, local name); the stored name (a tied alias: its target)
        self._params: list[tuple[str, Any]] = []
        self._where: dict[str, tuple[EngineAdapter, str]] = {}
        self._buffers_where: dict[str, tuple[EngineAdapter, str]] = {}
        local_tied: dict[str, str] = {}
        for a, f in zip(self.stages, self.maps):
            for n in a.param_names:
                g = f(n)
                if g in self._where:
                    raise CheckpointError(f"pipeline: two stage modules of rank {self.rank} hold {g!r}: {NAME_MAP_FIX}")
                self._where[g] = (a, n)
                self._params.append((g, a._by_name[n]))
            for n in a.buffer_names:
                self._buffers_where[f(n)] = (a, n)
            for alias, target in a.tied.items():
                local_tied[f(alias)] = f(target)
        self._by_name = dict(self._params)
        self.tied = {**local_tied, **{a: t for a, t in self.declared_tied.items() if a != t}}
        self._union: list[Item] | None = None
        self._local: dict[tuple[str, str], tuple[EngineAdapter, Item]] = {}
        self._values: dict[str, str] = {}
        self._meta: dict[str, Any] = {}
        self._replicas: list[int] | None = None
        self._gloo: Any = None
        self._setup_problem: str | None = None

    # ------------------------------------------------------------------ names

    def source(self, name: str) -> str:
        """The name a tensor is stored under (a tied alias: its target)."""
        return self.declared_tied.get(name, name)

    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._params]

    @property
    def buffer_names(self) -> list[str]:
        return list(self._buffers_where)

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    # ------------------------------------------------------------------ the agreement

    def _setup_groups(self) -> None:
        """Once: every rank's pipeline group, one gloo group per pipeline group, this stage's replicas."""
        import datetime

        import torch.distributed as dist

        from . import coord

        if not D.is_distributed():
            self._replicas = [self.rank]
            return
        everyone = D.all_gather_object(self.pp_ranks, group=coord.groups().coord)
        distinct: list[list[int]] = []
        for g in everyone:
            if g not in distinct:
                distinct.append(g)
        sizes = {len(g) for g in distinct}
        covered = sorted(r for g in distinct for r in g)
        problem = None
        if len(sizes) != 1 or covered != list(range(self.world)):
            problem = (
                f"pipeline: the pipeline groups {distinct[:4]} do not split the {self.world} ranks into groups of one "
                "size: give every rank its own pipeline group (mesh['pp'])"
            )
        pos = self.pp_pos
        self._replicas = sorted(g[pos] for g in distinct if len(g) > pos)
        if problem is None:
            timeout = datetime.timedelta(seconds=coord._TIMEOUT_S)
            for g in distinct:  # every rank makes every group, in the same order
                made = dist.new_group(ranks=g, backend="gloo", timeout=timeout) if len(g) > 1 else None
                if self.rank in g:
                    self._gloo = made
        self._setup_problem = problem

    def _describe_stages(self, with_meta: bool) -> dict[str, Any]:
        """This rank's stages, in plain JSON (local; raises for a layout an adapter does not understand)."""
        from .agreement import fingerprints

        assert self._replicas is not None
        out: list[dict[str, Any]] = []
        for a, f, s in zip(self.stages, self.maps, self.stage_indices):
            rows, prints = [], {}
            replicated: dict[str, torch.Tensor] = {}
            params = set(a.param_names)
            for i, it in enumerate(a.items()):
                if it.group == "optimizer":
                    pname, _, key = it.name.rpartition("/")
                    gname = f"{self.source(f(pname))}/{key}"
                else:
                    gname = self.source(f(it.name))
                if it.partition.replicated:
                    placement = {"parts": [[0, it.numel, self._replicas[i % len(self._replicas)]]]}
                    if it.group == "model" and it.name in params:
                        replicated[gname] = a.local(it)
                else:
                    placement = it.partition.to_json()
                rows.append([it.group, gname, list(it.shape), str(it.dtype).removeprefix("torch."), placement, it.name])
            if replicated:
                prints = fingerprints(replicated)
            out.append({"stage": s, "rows": rows, "values": prints})
        return {"stages": out, "meta": self._local_meta() if with_meta else None}

    def exchange(self, *, with_meta: bool = True) -> str | None:
        """Collective on every rank (never raises): every stage's description to every rank of its pipeline group,
        then the union. Returns this rank's error, or None. The manager calls it when it is built and at each save."""
        error = None
        if self._replicas is None:
            try:
                self._setup_groups()
            except Exception as exc:  # group creation is collective: a failure here is everyone's
                return f"pipeline: {type(exc).__name__}: {exc}"
            if self._setup_problem:
                return self._setup_problem
        try:
            mine: dict[str, Any] = self._describe_stages(with_meta)
        except Exception as exc:
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            mine = {"error": error}
        everyone = D.all_gather_object(mine, group=self._gloo) if self._gloo is not None else [mine]
        errors = [e["error"] for e in everyone if "error" in e]
        if errors:
            return error or f"another stage of this pipeline group failed: {errors[0]}"
        try:
            self._unite(everyone)
        except Exception as exc:
            return str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        return None

    def _unite(self, everyone: list[dict[str, Any]]) -> None:
        stages = sorted((st for e in everyone for st in e["stages"]), key=lambda st: st["stage"])
        seen_stage: set[int] = set()
        for st in stages:
            if st["stage"] in seen_stage:
                raise CheckpointError(
                    f"pipeline: two ranks of the pipeline group {self.pp_ranks} hold stage {st['stage']}: give each "
                    "stage module its stage index (PipelineStage.stage_index or Pipeline(stages=...))"
                )
            seen_stage.add(st["stage"])
        tied_names = set(self.declared_tied.values())
        owner: dict[tuple[str, str], int] = {}
        rows_by_group: dict[str, list[tuple[list[Any], int]]] = {"model": [], "master": [], "optimizer": []}
        values: dict[str, str] = {}
        for st in stages:
            for row in st["rows"]:
                group, gname = row[0], row[1]
                key = (group, gname)
                param = gname.rpartition("/")[0] if group == "optimizer" else gname
                if key in owner:
                    if param in tied_names:
                        continue  # a tied copy: stored once, by the first stage that holds it
                    raise CheckpointError(
                        f"pipeline: stages {owner[key]} and {st['stage']} both hold {group} tensor {gname!r}: "
                        + NAME_MAP_FIX
                    )
                owner[key] = st["stage"]
                rows_by_group.setdefault(group, []).append((row, st["stage"]))
            for name, fp in st["values"].items():
                if name in values and values[name] != fp:
                    raise CheckpointError(
                        f"pipeline: the stages hold different values of the tied weight {name!r} (declared in "
                        "Pipeline(tied=...)): initialise the copies alike and all-reduce their gradients across the "
                        "stages that hold them, as Megatron does for tied embeddings"
                    )
                values.setdefault(name, fp)
        missing = [t for a, t in self.declared_tied.items() if ("model", t) not in owner]
        if missing:
            raise CheckpointError(
                f"pipeline: the tied weights {missing} are held by no stage: Pipeline(tied=...) names them"
            )
        union: list[Item] = []
        local: dict[tuple[str, str], tuple[EngineAdapter, Item]] = {}
        mine = set(self.stage_indices)
        for group in ("model", "master", "optimizer"):
            for row, stage in rows_by_group.get(group, []):
                _, gname, shape, dtype, placement, _ = row
                numel = math.prod(shape)
                part = Partition.from_json(placement, numel, f"pipeline {group}/{gname}", shape)
                it = Item(group, gname, tuple(shape), getattr(torch, dtype), part)
                union.append(it)
                if stage in mine:
                    a = self.stages[self.stage_indices.index(stage)]
                    local[(group, gname)] = (a, self._inner_item(a, row, part))
        metas = [e["meta"] for e in everyone if e.get("meta") is not None]
        self._union, self._local, self._values = union, local, values
        self._meta = self._merge_meta(metas, union) if metas else {}

    def _inner_item(self, a: EngineAdapter, row: list[Any], part: Partition) -> Item:
        group, _, shape, dtype, _, local_name = row
        return Item(group, local_name, tuple(shape), getattr(torch, dtype))

    # ------------------------------------------------------------------ the engine seam

    def layout(self) -> dict[str, Any]:
        inner = self.stages[0].layout()
        return {
            "engine": "pipeline",
            "stage_engine": inner.get("engine"),
            "world_size": self.world,
            "pipeline_parallel": self.pp,
            "stages": len({*self.stage_indices}) * self.pp,
            "data_parallel": self.world // max(1, self.pp),
        } | {k: v for k, v in inner.items() if k in ("mesh", "mesh_dims")}

    def items(self) -> list[Item]:
        if self._union is None:
            raise CheckpointError("internal: the pipeline's stages were not exchanged yet")
        return self._union

    def values_description(self) -> dict[str, str]:
        return dict(self._values)

    def local(self, item: Item) -> torch.Tensor:
        a, inner = self._local[(item.group, item.name)]
        t = a.local(inner)
        return t if item.group == "model" or item.shape == () else t.reshape(-1)

    def check_complete(self) -> None:
        for a in self.stages:
            a.check_complete()

    def optimizer_state_keys(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for a, f in zip(self.stages, self.maps):
            for n, keys in a.optimizer_state_keys().items():
                out[self.source(f(n))] = keys
        return out

    # ------------------------------------------------------------------ optimizer metadata

    def _global_of(self, p: torch.Tensor) -> str:
        for a, f in zip(self.stages, self.maps):
            n = getattr(a, "_name_of", {}).get(id(p))
            if n is not None:
                return self.source(f(n))
        return "?"

    def _local_meta(self) -> dict[str, Any] | None:
        if self.optimizer is None:
            return None
        scalars: dict[str, Any] = {}
        for g, p in self._params:
            state = self.optimizer.state.get(p, {})
            leaves = {k: _jsonable(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
            if leaves:
                scalars[self.source(g)] = leaves
        groups = []
        for group in self.optimizer.param_groups:
            hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
            hyper["params"] = [self._global_of(p) for p in group["params"]]
            groups.append(hyper)
        return {"class": type(self.optimizer).__name__, "param_groups": groups, "scalars": scalars}

    def _merge_meta(self, metas: list[dict[str, Any]], union: list[Item]) -> dict[str, Any]:
        """Every rank's optimizer metadata as one optimizer's: group ``i`` of every stage is one group when their
        hyperparameters agree (the usual case: then a plain process resumes it), its names in the model's order,
        each tensor once."""
        order = {it.name: i for i, it in enumerate(it for it in union if it.group == "model")}
        classes = {m["class"] for m in metas}
        if len(classes) > 1:
            raise CheckpointError(f"pipeline: the stages use different optimizers {sorted(classes)}: use one class")
        counts = {len(m["param_groups"]) for m in metas}
        scalars: dict[str, Any] = {}
        for m in metas:
            scalars.update(m["scalars"])
        strip = lambda g: {k: v for k, v in g.items() if k != "params"}
        alike = len(counts) == 1 and all(
            strip(m["param_groups"][i]) == strip(metas[0]["param_groups"][i])
            for m in metas
            for i in range(len(m["param_groups"]))
        )
        if alike:
            groups = []
            for i in range(counts.pop()):
                names = sorted(
                    {n for m in metas for n in m["param_groups"][i]["params"]}, key=lambda n: order.get(n, 1 << 60)
                )
                groups.append({**strip(metas[0]["param_groups"][i]), "params": names})
        else:  # every group as it is (a resume on another pipeline layout then needs the same grouping)
            groups = [g for m in metas for g in m["param_groups"]]
        return {"optimizer": {"class": metas[0]["class"], "param_groups": groups, "scalars": scalars}}

    def meta(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"optimizer": None}
        if not self._meta:  # one process: nothing was exchanged with meta yet
            m = self._local_meta()
            self._meta = self._merge_meta([m], self.items()) if m is not None else {"optimizer": None}
        return self._meta

    def restore_meta(self, meta: dict[str, Any]) -> None:
        saved = meta.get("optimizer")
        if self.optimizer is None or saved is None:
            return
        by_name: dict[str, int] = {}
        for i, g in enumerate(saved["param_groups"]):
            for n in g.get("params") or []:
                by_name.setdefault(n, i)
        for j, group in enumerate(self.optimizer.param_groups):
            names = [self._global_of(p) for p in group["params"]]
            found = {by_name.get(n) for n in names}
            if None in found or len(found) != 1:
                raise CheckpointError(
                    f"param group {j} of this rank's optimizer holds {names[:3]}...: the checkpoint's optimizer groups "
                    "them otherwise; build the optimizer's param groups as the run that wrote it did"
                )
            restore_group_settings(group, saved["param_groups"][found.pop()])
        torch_native = type(self.optimizer).__module__.startswith("torch.optim")
        for g, p in self._params:
            leaves = saved.get("scalars", {}).get(self.source(g))
            if not leaves:
                continue
            group = next((x for x in self.optimizer.param_groups if any(q is p for q in x["params"])), {})

            def as_tensor(key: str, value: Any, p: torch.Tensor = p, group: Any = group) -> torch.Tensor | None:
                if torch_native and key == "step" and isinstance(value, (int, float)):
                    return step_tensor(torch.tensor(float(value)), p, group)
                return None

            restore_scalars(self.optimizer.state[p], leaves, g, as_tensor)

    # ------------------------------------------------------------------ restoring

    def wants(self, saved: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Want]]:
        out: dict[str, list[Want]] = {}
        for a, f in zip(self.stages, self.maps):
            names = {n: f(n) for n in a.param_names}
            local_saved = {n: saved[self.source(g)] for n, g in names.items() if self.source(g) in saved}
            for n, wants in a.wants(local_saved).items():
                g = names[n]
                out[g] = [dataclasses.replace(w, name=self.source(g)) for w in wants]
        return out

    def begin_restore(self, with_optimizer_state: bool) -> None:
        for a in self.stages:
            a.begin_restore(with_optimizer_state)

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        a, n = self._where[name]
        a.restore(n, tensors)

    def restore_buffer(self, name: str, tensor: torch.Tensor) -> None:
        a, n = self._buffers_where[name]
        a.restore_buffer(n, tensor)

    def end_restore(self) -> None:
        for a in self.stages:
            a.end_restore()
