"""One seam for every engine: which tensors a job holds, where, and how they go back.

The writer, reader and manager never branch on the engine. An adapter answers, identically on every rank and
without communication:

* :meth:`~EngineAdapter.items`: every tensor of the training state (:class:`~.layout.Item`: group, name, full
  shape, dtype, and the :class:`~.layout.Partition` saying which ranks hold which elements): model weights and
  persistent buffers (in the model's own names and dtype), fp32 master weights when they differ from the model's
  (``master``), and optimizer state (``optimizer``, ``<param>/<key>``);
* :meth:`~EngineAdapter.local`: this rank's part of an item, taken from the engine's own storage with no copy and
  no collective (the only tensor traffic of a save, sending the parts of a partitioned model weight to the rank
  that writes its Hugging Face shard, is done by the writer);
* :meth:`~EngineAdapter.wants`: what this rank needs back on a resume (``hp``: the fp32 master, or the model
  weight when the checkpoint has no separate master; ``lp``: the model weight in its own dtype; ``optimizer``
  state), each a whole tensor or an element range, so a rank reads only its own part;
* :meth:`~EngineAdapter.restore`: put those tensors back, locally.

Implementations: :class:`TorchAdapter` (a plain module or DDP), :class:`FSDP2Adapter` (``fully_shard``, including
HSDP) and :class:`~.deepspeed_adapter.DeepSpeedAdapter` (ZeRO 0-3; fp32, bf16, fp16; DeepSpeed's own optimizers).
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .layout import Box, Grid, Item, Partition, fsdp_rows
from .names import canonical_name, inner_module, wrapper_attr

__all__ = ["EngineAdapter", "FSDP2Adapter", "TorchAdapter", "Want", "make_adapter"]


@dataclass(frozen=True)
class Want:
    """One tensor a rank needs on resume: ``kind`` is ``hp`` (fp32 master, else the model weight), ``lp`` (the
    model weight in ``dtype``), ``optimizer`` (state ``key`` of parameter ``name``) or ``buffer``; ``numel=None``
    means the whole tensor in its shape, else elements ``[start, start + numel)`` of its flattened form (1-D);
    ``box``: of that box of the tensor instead of the whole."""

    kind: str
    name: str
    key: str | None = None
    start: int = 0
    numel: int | None = None
    dtype: torch.dtype | None = None
    box: Box | None = None
    """A box of the tensor (format 3; a tensor-parallel shard): the range is then of the box's elements, and
    ``numel=None`` means the whole box in its shape."""

    @property
    def slot(self) -> str:
        """The key of this tensor in the dict :meth:`EngineAdapter.restore` receives."""
        return f"optimizer/{self.key}" if self.kind == "optimizer" else self.kind


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under the wrappers around its top (DDP, DataParallel, ``torch.compile``, activation
    checkpointing, FSDP1): :func:`.names.inner_module`."""
    return inner_module(model)  # type: ignore[no-any-return]


class _Buffers(Mapping[str, torch.Tensor]):
    """Persistent buffers by canonical name, each looked up in its module when asked (``model.to()`` after the
    manager was built replaces buffer tensors; the module's current one is what is saved and restored)."""

    def __init__(self) -> None:
        self._where: dict[str, tuple[torch.nn.Module, str]] = {}

    def add(self, name: str, module: torch.nn.Module, attr: str) -> None:
        self._where.setdefault(name, (module, attr))

    def pop(self, name: str) -> None:
        self._where.pop(name, None)

    def __getitem__(self, name: str) -> torch.Tensor:
        module, attr = self._where[name]
        return module._buffers[attr]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _named_tensors(
    module: torch.nn.Module,
) -> tuple[list[tuple[str, torch.nn.Parameter]], _Buffers, dict[str, str]]:
    """Unique parameters in order, persistent buffers, and tied aliases (alias -> the name saved), all under their
    canonical names (:func:`.names.canonical_name`: no wrapper's segment), each checked against ``state_dict``."""
    seen: dict[int, str] = {}
    params: list[tuple[str, torch.nn.Parameter]] = []
    tied: dict[str, str] = {}
    for raw, p in module.named_parameters(remove_duplicate=False):
        name = canonical_name(module, raw)
        key = id(p)
        if key in seen:
            if name != seen[key]:
                tied[name] = seen[key]
            continue
        seen[key] = name
        params.append((name, p))
    buffers = _Buffers()
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, b in sub._buffers.items():
            if b is not None and attr not in sub._non_persistent_buffers_set:
                buffers.add(canonical_name(module, f"{prefix}.{attr}" if prefix else attr), sub, attr)
    for name in [n for n, _ in params] + list(tied):
        buffers.pop(name)
    check_state_dict(module, params, tied, buffers)
    return params, buffers, tied


def check_state_dict(
    module: torch.nn.Module,
    params: list[tuple[str, torch.nn.Parameter]],
    tied: dict[str, str],
    buffers: Mapping[str, torch.Tensor],
) -> None:
    """Refuse, when the manager is built, a model whose ``state_dict`` does not hold exactly its parameters and
    persistent buffers under their canonical names (an overridden ``state_dict``, hooks that rename, add or replace
    entries, ``get_extra_state``): the checkpoint writes the tensors the optimizer trains, under the names resume
    and ``from_pretrained`` look for, and a state_dict that says otherwise would be written twice, under names
    nothing loads, or not at all. Names the keys."""
    by_name: dict[str, torch.Tensor] = {**dict(params), **buffers}
    by_name.update({alias: by_name[target] for alias, target in tied.items()})
    try:
        state = module.state_dict(keep_vars=True)
    except Exception as exc:
        raise CheckpointError(
            f"{type(module).__name__}.state_dict() raised {type(exc).__name__}: {exc}: the checkpoint checks the "
            "model's state_dict against its parameters when the manager is built"
        ) from exc
    keys: dict[str, Any] = {}
    for key, value in state.items():
        keys.setdefault(canonical_name(module, key), value)
    extra = [k for k in keys if k not in by_name]
    missing = [k for k in by_name if k not in keys]
    other = [k for k, v in keys.items() if k in by_name and v is not by_name[k]]
    problems = []
    if extra:
        problems.append(f"it has {len(extra)} entries that are no parameter or buffer: {_short(extra)}")
    if missing:
        problems.append(f"it lacks {len(missing)} parameters or buffers: {_short(missing)}")
    if other:
        problems.append(f"{len(other)} entries are not the module's own tensor: {_short(other)}")
    if problems:
        raise CheckpointError(
            f"{type(module).__name__}.state_dict() does not match its parameters and buffers ("
            + "; ".join(problems)
            + "): the checkpoint saves the module's parameters and persistent buffers under their own names, once "
            "each; remove the state_dict override or hooks (or extra state), or checkpoint the module they wrap"
        )


def world_and_rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EngineAdapter(ABC):
    """See the module docstring."""

    engine: str = "?"
    gathers = True
    """A running job: each rank holds its own parts, and a partitioned model weight is sent to its writer. (Converters
    reading a checkpoint set this False and hand every part over themselves, through ``part(item, holder)``.)"""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.module = unwrap(module)
        self.optimizer = optimizer
        self._params, self._buffers, self.tied = _named_tensors(self.module)
        self._by_name = dict(self._params)
        self.world, self.rank = world_and_rank()

    # ------------------------------------------------------------------ description

    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._params]

    @property
    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    @abstractmethod
    def layout(self) -> dict[str, Any]:
        """How the job is laid out (engine, stage, dtypes, world size): recorded in the manifest."""

    @abstractmethod
    def items(self) -> list[Item]:
        """Every tensor of the state, in order (model weights, buffers, masters, optimizer state), the same on every
        rank."""

    def buffer_items(self) -> list[Item]:
        return [Item("model", b, tuple(t.shape), t.dtype) for b, t in self._buffers.items()]

    @abstractmethod
    def local(self, item: Item) -> torch.Tensor:
        """This rank's part of ``item``: the whole tensor for a replicated item, else its slice as a 1-D tensor of
        ``item.partition.local(rank)`` elements. A view of the engine's storage (callers copy when they must)."""

    @property
    def device(self) -> torch.device:
        p = next(iter(self._by_name.values()), None)
        return p.device if p is not None else torch.device("cpu")

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """Plain-JSON state beside the tensors: optimizer hyperparameters per group, non-tensor optimizer state
        (``scalars``: ``{param: {key: value}}``), engine counters."""

    def check_complete(self) -> None:
        """Raise when the engine holds optimizer state that neither :meth:`items` nor :meth:`meta` carries."""

    def optimizer_state_keys(self) -> dict[str, list[str]]:
        """The optimizer state keys this engine holds now, per parameter name (empty before the first step): what a
        checkpoint's state must fit on resume."""
        return {}

    # ------------------------------------------------------------------ restoring

    @abstractmethod
    def wants(self, saved: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Want]]:
        """What this rank needs back, per parameter (and per buffer): ``saved`` is the checkpoint's optimizer
        state, ``{param: {key: shape}}``."""

    def begin_restore(self, with_optimizer_state: bool) -> None:
        """Prepare the engine to receive state (e.g. create optimizer state that does not exist yet)."""

    @abstractmethod
    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put parameter ``name``'s tensors back (keys: the wants' :attr:`Want.slot`)."""

    def restore_buffer(self, name: str, tensor: torch.Tensor) -> None:
        target = self._buffers[name]
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))

    @abstractmethod
    def restore_meta(self, meta: dict[str, Any]) -> None:
        """Put the JSON state back."""

    def end_restore(self) -> None:
        """Finish a restore (e.g. refresh low-precision copies)."""

    # ------------------------------------------------------------------ shared helpers

    def _group_meta(self, groups: list[dict[str, Any]], names_of: Any) -> list[dict[str, Any]]:
        out = []
        for group in groups:
            hyper = {k: _jsonable(v) for k, v in group.items() if k != "params"}
            hyper["params"] = names_of(group)
            out.append(hyper)
        return out

    def _apply_group_meta(self, groups: list[dict[str, Any]], saved: list[dict[str, Any]], names_of: Any) -> None:
        if len(saved) != len(groups):
            raise CheckpointError(
                f"the checkpoint's optimizer has {len(saved)} param groups, this one has {len(groups)}: build the "
                "optimizer with the same param groups as the run that wrote it"
            )
        for i, (group, data) in enumerate(zip(groups, saved)):
            mine = names_of(group)
            if mine is not None and data.get("params") is not None and mine != data["params"]:
                raise CheckpointError(
                    f"param group {i} holds {_short(data['params'])} in the checkpoint and {_short(mine)} here"
                )
            restore_group_settings(group, data)


def restore_group_settings(group: dict[str, Any], data: dict[str, Any]) -> None:
    """Put a saved param group's settings (lr, betas, ...; everything but ``params``) into ``group``, in place: a
    tensor setting (a capturable lr) keeps its tensor, a tuple setting comes back a tuple (JSON made it a list)."""
    for key, value in data.items():
        if key == "params":
            continue
        current = group.get(key)
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        elif isinstance(current, tuple) and isinstance(value, list):
            group[key] = tuple(value)
        else:
            group[key] = value


def _short(names: list[str]) -> str:
    return str(names if len(names) <= 4 else [*names[:3], f"... {len(names) - 3} more"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def is_json_scalar(value: Any) -> bool:
    """A non-tensor optimizer state value that JSON carries exactly (FusedAdam's and CPU Adam's int ``step``)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(is_json_scalar(v) for v in value)
    return False


def step_tensor(value: torch.Tensor, param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """A restored 0-d ``step`` placed as torch's ``Optimizer.load_state_dict`` places it: on the parameter's device
    in fp32 for fused or capturable Adam/AdamW (their kernels read it there), else as saved, on the CPU."""
    if group.get("fused") or group.get("capturable"):
        return value.to(dtype=torch.float32, device=param.device)
    return value.to("cpu").clone()


def restore_scalars(state: dict[str, Any], leaves: dict[str, Any], name: str, as_tensor: Any = None) -> None:
    """Non-tensor optimizer state back into ``state``. A number saved by an optimizer that keeps it as a Python
    value (FusedAdam's int ``step``) goes into a 0-d tensor where this optimizer keeps one (``as_tensor(key, value)``
    makes it when the state is still empty)."""
    for key, value in leaves.items():
        current = state.get(key)
        if isinstance(current, torch.Tensor):
            if current.dim() != 0 or not isinstance(value, (int, float)):
                raise CheckpointError(
                    f"optimizer state {name}/{key} is {value!r} in the checkpoint and a tensor here: a different optimizer"
                )
            current.fill_(value)
        elif current is None and as_tensor is not None and (made := as_tensor(key, value)) is not None:
            state[key] = made
        else:
            state[key] = value


# ---------------------------------------------------------------------------------------------- plain torch / DDP


class TorchAdapter(EngineAdapter):
    """A plain module or DDP with any torch optimizer: every rank holds everything (replicated items); each tensor
    is written once, by the rank the plan picks, and read back whole by every rank."""

    engine = "torch"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.ddp = _has_ddp(module)
        super().__init__(module, optimizer)
        self._name_of = {id(p): n for n, p in self._params}

    def layout(self) -> dict[str, Any]:
        return {"engine": "ddp" if self.ddp else "torch", "world_size": self.world, "data_parallel": self.world} | (
            self._mesh_layout()
        )

    def _mesh_layout(self) -> dict[str, Any]:
        """The device mesh of a tensor-parallel job, for the manifest (``inspect`` shows it): its shape and dimension
        names, from the first parameter placed on it."""
        from torch.distributed.tensor import DTensor

        for _, p in self._params:
            if isinstance(p, DTensor) and self._partition(p).grid is not None:
                mesh = p.device_mesh
                return {
                    "mesh": [int(n) for n in mesh.mesh.shape],
                    "mesh_dims": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
                }
        return {}

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        return self.optimizer.state.get(p, {}) if self.optimizer is not None else {}

    def _partition(self, p: torch.Tensor) -> Partition:
        # a DTensor sharded by a tensor-parallel plan (parallelize_module): each rank holds a box of it
        grid = dtensor_partition(p, self._name_of.get(id(p), "?"))
        if grid is not None:
            return grid
        if getattr(p, "ds_is_replaced_module", False):
            # DeepSpeed AutoTP's slice of a tensor (a module taken out of its engine): not a replica either
            from .deepspeed_adapter import AUTOTP_FIX

            raise CheckpointError(
                f"parameter {self._name_of.get(id(p), '?')} of shape {list(p.shape)} is DeepSpeed AutoTP's slice of "
                f"a tensor-parallel weight: {AUTOTP_FIX}"
            )
        return Partition(replicated=True)

    def _box(self, p: torch.Tensor) -> Box | None:
        """This rank's box of a tensor-parallel parameter (None: not one)."""
        part = self._partition(p)
        if part.grid is None:
            return None
        from torch.distributed.tensor import DTensor

        assert isinstance(p, DTensor)
        return part.grid.box(tuple(p.device_mesh.get_coordinate() or ()))

    def items(self) -> list[Item]:
        model, optim = [], []
        for name, p in self._params:
            part = self._partition(p)
            model.append(Item("model", name, tuple(p.shape), p.dtype, part))
            for key, value in sorted(self._state(p).items()):  # sorted: the same bytes after a resume
                if isinstance(value, torch.Tensor):
                    vpart = (
                        part if value.dim() > 0 and tuple(value.shape) == tuple(p.shape) else Partition(replicated=True)
                    )
                    optim.append(Item("optimizer", f"{name}/{key}", tuple(value.shape), value.dtype, vpart))
        return model + self.buffer_items() + optim

    def local(self, item: Item) -> torch.Tensor:
        if item.group == "model":
            t = self._by_name[item.name] if item.name in self._by_name else self._buffers[item.name]
        else:
            pname, _, key = item.name.rpartition("/")
            t = self._state(self._by_name[pname])[key]
        return _local_of(t.detach())

    def meta(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"optimizer": None}
        scalars = {}
        for name, p in self._params:
            leaves = {k: _jsonable(v) for k, v in self._state(p).items() if not isinstance(v, torch.Tensor)}
            if leaves:
                scalars[name] = leaves
        return {
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "param_groups": self._group_meta(self.optimizer.param_groups, self._group_names),
                "scalars": scalars,
            }
        }

    def check_complete(self) -> None:
        for name, p in self._params:
            for key, value in self._state(p).items():
                if not isinstance(value, torch.Tensor) and not is_json_scalar(value):
                    raise CheckpointError(
                        f"optimizer state {name}/{key} is a {type(value).__name__}: neither a tensor nor a JSON value, "
                        "so it cannot be checkpointed without pickling; use an optimizer whose state is tensors and numbers"
                    )
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and tuple(value.shape) != tuple(p.shape)
                    and self._partition(p).grid is not None
                ):
                    raise CheckpointError(
                        f"optimizer state {name}/{key} has shape {list(value.shape)}, its tensor-parallel parameter "
                        f"{list(p.shape)}: the checkpoint saves per-element optimizer state (sharded as the parameter) "
                        "and 0-d values; use an optimizer with per-element state (AdamW, SGD, Lion) with tensor "
                        "parallelism"
                    )

    def optimizer_state_keys(self) -> dict[str, list[str]]:
        return {name: sorted(self._state(p)) for name, p in self._params if self._state(p)}

    def _group_names(self, group: dict[str, Any]) -> list[str]:
        return [self._name_of.get(id(p), "?") for p in group["params"]]

    def _group_of(self, p: torch.Tensor) -> dict[str, Any]:
        for group in self.optimizer.param_groups if self.optimizer is not None else []:
            if any(q is p for q in group["params"]):
                return group
        return {}

    def _range(self, p: torch.Tensor) -> tuple[int, int | None]:
        return 0, None

    def wants(self, saved: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Want]]:
        out: dict[str, list[Want]] = {}
        for name, p in self._params:
            start, numel = self._range(p)
            box = self._box(p)
            if box is not None:
                for key, shape in saved.get(name, {}).items() if self.optimizer is not None else ():
                    if len(shape) > 0 and tuple(shape) != tuple(p.shape):
                        raise CheckpointError(
                            f"optimizer state {name}/{key} has shape {list(shape)} in the checkpoint, the parameter "
                            f"{list(p.shape)}: state of another shape (factored moments) cannot be placed on a "
                            "tensor-parallel shard; resume it with one process or DDP"
                        )
            wants = [Want("hp", name, start=start, numel=numel, box=box)]
            if self.optimizer is not None:
                for key, shape in saved.get(name, {}).items():
                    ranged = len(shape) > 0 and tuple(shape) == tuple(p.shape)
                    wants.append(
                        Want(
                            "optimizer",
                            name,
                            key,
                            *((start, numel) if ranged else (0, None)),
                            box=box if ranged else None,
                        )
                    )
            out[name] = wants
        return out

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self._by_name[name]
        with torch.no_grad():
            _local_of(p).copy_(tensors["hp"].to(p.dtype).view(_local_of(p).shape))
        optim = {slot.split("/", 1)[1]: v for slot, v in tensors.items() if slot.startswith("optimizer/")}
        if self.optimizer is None or not optim:
            return  # a parameter the optimizer does not hold (frozen) gets no state entry: state_dict() would fail
        state = self.optimizer.state[p]
        group = self._group_of(p)
        for key, value in optim.items():
            state[key] = self._state_value(p, key, value, group)

    def _state_value(self, p: torch.Tensor, key: str, value: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        if value.dim() == 0:
            return step_tensor(value, p, group)
        if isinstance(p, DTensor):  # per-element state of a sharded parameter: a DTensor placed as the parameter
            local = _local_of(p)
            return DTensor.from_local(
                value.to(local.device).view(local.shape).clone(),
                p.device_mesh,
                p.placements,
                shape=p.shape,
                stride=p.stride(),
                run_check=False,
            )
        # read whole, in its saved shape: the parameter's for per-element state, its own for any other (Adafactor's
        # factored row and column variances)
        return value.to(p.device)

    def restore_meta(self, meta: dict[str, Any]) -> None:
        saved = meta.get("optimizer")
        if self.optimizer is None or saved is None:
            return
        self._apply_group_meta(self.optimizer.param_groups, saved["param_groups"], self._group_names)
        torch_native = type(self.optimizer).__module__.startswith("torch.optim")
        for name, leaves in saved.get("scalars", {}).items():
            if name in self._by_name:
                p = self._by_name[name]

                def as_tensor(key: str, value: Any, p: torch.Tensor = p) -> torch.Tensor | None:
                    # torch's own optimizers keep ``step`` as a 0-d tensor: an int from FusedAdam becomes one
                    if torch_native and key == "step" and isinstance(value, (int, float)):
                        return step_tensor(torch.tensor(float(value)), p, self._group_of(p))
                    return None

                restore_scalars(self.optimizer.state[p], leaves, name, as_tensor)


def _has_ddp(module: Any) -> bool:
    while (attr := wrapper_attr(module)) is not None:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return True
        module = getattr(module, attr)
    return False


UNDERSTOOD = (
    "the checkpoint understands DTensor placements Shard, _StridedShard (FSDP2 over tensor parallelism) and Replicate, "
    "cut as torch.chunk cuts (DTensor's own rule); a layout it cannot describe is refused rather than saved wrong: "
    "use torchtitan-style plans (ColwiseParallel, RowwiseParallel, SequenceParallel, fully_shard over the dp mesh), "
    "or checkpoint this job with torch.distributed.checkpoint"
)


def dtensor_partition(p: Any, name: str) -> Partition | None:
    """The format-3 partition of a DTensor sharded on its mesh (tensor parallelism, FSDP2 + TP, HSDP + TP): a
    :class:`~.layout.Grid` rule, O(1) whatever the mesh. None for a tensor that is not a DTensor or is replicated on
    every mesh dimension. The rule is checked against DTensor's own arithmetic
    (``compute_local_shape_and_global_offset``) and the local tensor for this rank's coordinate, and refused when
    they differ: every rank checks its own box when the manager is built, so the rule is checked for the whole mesh
    before anything is written."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(p, DTensor) or all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    shape = tuple(p.shape)
    outer: list[list[int]] = [[] for _ in shape]
    inner: list[list[int]] = [[] for _ in shape]
    for m, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if not isinstance(pl, (Shard, _StridedShard)) or not shape:
            raise CheckpointError(
                f"parameter {name} has placements {tuple(p.placements)} on {_mesh_text(p)}: {UNDERSTOOD}"
            )
        d = pl.dim % len(shape)
        # _StridedShard: this mesh dimension cuts the piece that a later one cut first (FSDP2 over TP)
        (inner if isinstance(pl, _StridedShard) else outer)[d].append(m)
    mesh = p.device_mesh
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    grid = Grid(
        shape,
        tuple(int(n) for n in mesh.mesh.shape),
        None if ranks == tuple(range(len(ranks))) else ranks,
        tuple(tuple(a + b) for a, b in zip(outer, inner)),
    )
    coord = mesh.get_coordinate()
    if coord is not None:
        offsets, lengths = grid.box(tuple(coord))
        local = tuple(p.to_local().shape)
        api_shape, api_offsets = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        if lengths != local or lengths != tuple(api_shape) or (math.prod(local) and offsets != tuple(api_offsets)):
            raise CheckpointError(
                f"parameter {name} of shape {list(shape)} has placements {tuple(p.placements)} on {_mesh_text(p)}: "
                f"this rank holds {list(local)} at {list(api_offsets)}, nested torch.chunk pieces give "
                f"{list(lengths)} at {list(offsets)} (uneven pieces of a _StridedShard); make the sharded dimension "
                f"divisible by the mesh dimensions that cut it. {UNDERSTOOD}"
            )
    return Partition(grid=grid)


def _mesh_text(p: Any) -> str:
    mesh = p.device_mesh
    names = f" {tuple(mesh.mesh_dim_names)}" if mesh.mesh_dim_names else ""
    return f"a {mesh.ndim}-D mesh{names} of shape {tuple(mesh.mesh.shape)}"


def _local_of(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------- FSDP2


class FSDP2Adapter(TorchAdapter):
    """``fully_shard`` modules: parameters and their optimizer state are DTensors sharded on dim 0, chunked as
    ``torch.chunk`` cuts (``ceil(rows / shards)`` rows per rank). Each rank writes its own rows of the optimizer
    state; a weight travels to the one rank that writes its model shard. HSDP (a 2-D mesh, ``Replicate`` then
    ``Shard(0)``) is written by the first replica and read back by every replica."""

    engine = "fsdp2"

    def layout(self) -> dict[str, Any]:
        return {"engine": "fsdp2", "world_size": self.world, "data_parallel": self.world} | self._mesh_layout()

    def _mesh_info(self, p: torch.Tensor) -> tuple[list[int], int] | None:
        """(global ranks holding chunks 0..n-1 in the first replica, this rank's shard index) of FSDP2's own layouts
        (format 2's flat chunks), or None for a tensor that is not sharded or is tensor-parallel as well."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        if not isinstance(p, DTensor):
            return None
        mesh, placements = p.device_mesh, p.placements
        if len(placements) == 1 and placements[0] == Shard(0):
            return mesh.mesh.flatten().tolist(), mesh.get_local_rank(0)
        if len(placements) == 2 and placements[0] == Replicate() and placements[1] == Shard(0):
            return mesh.mesh[0].tolist(), mesh.get_local_rank(1)
        return None  # replicated everywhere, or a tensor-parallel layout (a grid: TorchAdapter._partition)

    def _partition(self, p: torch.Tensor) -> Partition:
        info = self._mesh_info(p)
        if info is None:
            return super()._partition(p)
        ranks = info[0]
        return fsdp_rows(tuple(p.shape), len(ranks), ranks=None if ranks == list(range(len(ranks))) else ranks)

    def _range(self, p: torch.Tensor) -> tuple[int, int | None]:
        info = self._mesh_info(p)
        if info is None:
            return 0, None
        _, index = info
        part = fsdp_rows(tuple(p.shape), len(info[0]))
        start = min(index * part.chunk, p.numel())
        return start, _local_of(p).numel()

    def local(self, item: Item) -> torch.Tensor:
        t = super().local(item)
        return t if item.shape == () or item.group == "model" else t.reshape(-1)

    def check_complete(self) -> None:
        super().check_complete()
        for name, p in self._params:
            if self._mesh_info(p) is None:
                continue
            for key, value in self._state(p).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"optimizer state {name}/{key} has shape {list(value.shape)}, its sharded parameter "
                        f"{list(p.shape)}: under FSDP2 the checkpoint saves per-element optimizer state (sharded as "
                        "the parameter) and 0-d values; state of another shape (factored moments) has no layout it "
                        "can restore. Use an optimizer with per-element state (AdamW, SGD, Lion) under FSDP2"
                    )

    def wants(self, saved: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Want]]:
        for name, p in self._params:
            for key, shape in saved.get(name, {}).items() if self._mesh_info(p) is not None else ():
                if len(shape) > 0 and tuple(shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"optimizer state {name}/{key} has shape {list(shape)} in the checkpoint, the parameter "
                        f"{list(p.shape)}: state of another shape (factored moments) cannot be placed on an FSDP2 "
                        "shard; resume it with one process or DDP"
                    )
        return super().wants(saved)


# ---------------------------------------------------------------------------------------------- choosing one


def make_adapter(model: Any, optimizer: torch.optim.Optimizer | None = None) -> EngineAdapter:
    """The adapter for ``model``: a DeepSpeed engine, an FSDP2 module, or a plain/DDP module."""
    ds = sys.modules.get("deepspeed")  # a DeepSpeed engine means DeepSpeed is imported; importing it costs seconds
    DeepSpeedEngine = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    if DeepSpeedEngine is not None and isinstance(model, DeepSpeedEngine):
        from .deepspeed_adapter import DeepSpeedAdapter, DeepSpeedPipeAdapter, _is_pipeline

        return DeepSpeedPipeAdapter(model) if _is_pipeline(model) else DeepSpeedAdapter(model)
    if _is_fsdp2(model):
        return FSDP2Adapter(model, optimizer)
    if isinstance(model, torch.nn.Module):
        return TorchAdapter(model, optimizer)
    raise CheckpointError(f"cannot checkpoint a {type(model).__name__}: pass a torch module, DDP, FSDP2 or DeepSpeed")


def _is_fsdp2(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module) and any(isinstance(m, FSDPModule) for m in _modules(model))


def _modules(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    yield from model.modules()
