"""One seam for every engine: full, named tensors out of a running job and into it.

The checkpoint manager never branches on the engine. An adapter tells it, identically on every rank, which tensors
exist (``plan``) and hands them over one parameter at a time (``fetch``), in the model's own parameter names and at
their full (unsharded) shapes, so a checkpoint's layout does not depend on the world size or the engine. When the
engine shards its state (``collective`` is True), every rank calls ``fetch``/``restore`` for every parameter in the
same order, and only one parameter's full state exists at a time on any rank.

Tensor keys inside a parameter's bundle: ``"model"`` (the weight in the model's dtype), ``"master"`` (fp32 master
weight, only when it differs from the model weight), ``"optimizer/<state key>"`` (e.g. ``exp_avg``; 0-d tensors
such as ``step`` included).

Implementations: :class:`TorchAdapter` (a plain module or DDP), :class:`FSDP2Adapter` (``fully_shard``) and
:class:`DeepSpeedAdapter` (ZeRO 0-3, fp32/bf16/fp16) in :mod:`.deepspeed_adapter`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["EngineAdapter", "FSDP2Adapter", "TensorSpec", "TorchAdapter", "make_adapter"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor that goes into a checkpoint: its group (model, master, optimizer), name, full shape and dtype."""

    group: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under DDP / DataParallel wrappers (whose names carry a ``module.`` prefix)."""
    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def _named_tensors(module: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Parameter]], list[str], dict[str, str]]:
    """Unique parameters in order, persistent buffer names, and tied aliases (alias -> the name saved)."""
    seen: dict[int, str] = {}
    params: list[tuple[str, torch.nn.Parameter]] = []
    tied: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        params.append((name, p))
    param_names = {n for n, _ in params} | set(tied)
    buffers = [k for k in module.state_dict(keep_vars=True) if k not in param_names]
    return params, buffers, tied


class EngineAdapter(ABC):
    """Named tensors out, named tensors in; see the module docstring."""

    engine: str = "?"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.module = unwrap(module)
        self.optimizer = optimizer
        self._params, self._buffers, self.tied = _named_tensors(self.module)
        self._by_name = dict(self._params)

    # ------------------------------------------------------------------ description

    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self._params]

    @property
    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    @property
    @abstractmethod
    def collective(self) -> bool:
        """True when fetch/restore are collectives that every rank must call in the same order."""

    @abstractmethod
    def layout(self) -> dict[str, Any]:
        """How the job is laid out (engine, stage, dtypes, world size): recorded in the manifest."""

    @abstractmethod
    def plan(self) -> list[TensorSpec]:
        """Every tensor ``fetch`` will return, in order, the same on every rank."""

    @abstractmethod
    def fetch(self, name: str) -> dict[str, torch.Tensor]:
        """Parameter ``name``'s full tensors, keyed as in the module docstring."""

    def fetch_buffer(self, name: str) -> torch.Tensor:
        return self.module.state_dict(keep_vars=True)[name].detach()

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """Plain-JSON state beside the tensors: optimizer hyperparameters per group, engine counters."""

    # ------------------------------------------------------------------ restoring

    def begin_restore(self, with_optimizer_state: bool) -> None:
        """Prepare the engine to receive state (e.g. create optimizer state that does not exist yet)."""

    @abstractmethod
    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Put parameter ``name``'s full tensors back (each rank keeps its part)."""

    def restore_buffer(self, name: str, tensor: torch.Tensor) -> None:
        target = self.module.state_dict(keep_vars=True)[name]
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


# ---------------------------------------------------------------------------------------------- plain torch / DDP


class TorchAdapter(EngineAdapter):
    """A plain module or DDP with any torch optimizer: every rank holds everything, nothing is collective."""

    engine = "torch"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.ddp = isinstance(module, torch.nn.parallel.DistributedDataParallel)
        super().__init__(module, optimizer)
        self._name_of = {id(p): n for n, p in self._params}

    @property
    def collective(self) -> bool:
        return False

    def layout(self) -> dict[str, Any]:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"engine": "ddp" if self.ddp else "torch", "world_size": world, "data_parallel": world}

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        return self.optimizer.state.get(p, {}) if self.optimizer is not None else {}

    def plan(self) -> list[TensorSpec]:
        specs = []
        for name, p in self._params:
            specs.append(TensorSpec("model", name, tuple(p.shape), p.dtype))
            for key, value in sorted(self._state(p).items()):  # sorted: the same bytes after a resume
                if isinstance(value, torch.Tensor):
                    specs.append(TensorSpec("optimizer", f"{name}/{key}", tuple(value.shape), value.dtype))
        return specs

    def fetch(self, name: str) -> dict[str, torch.Tensor]:
        p = self._by_name[name]
        out = {"model": p.detach()}
        for key, value in self._state(p).items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer/{key}"] = value.detach()
        return out

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

    def _group_names(self, group: dict[str, Any]) -> list[str]:
        return [self._name_of.get(id(p), "?") for p in group["params"]]

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self._by_name[name]
        with torch.no_grad():  # the fp32 master, where the checkpoint has one, is the more precise source
            p.copy_(tensors.get("master", tensors["model"]).to(p.dtype))
        if self.optimizer is None:
            return
        state = self.optimizer.state[p]
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                state[key.split("/", 1)[1]] = value.to(p.device) if value.dim() else value

    def restore_meta(self, meta: dict[str, Any]) -> None:
        saved = meta.get("optimizer")
        if self.optimizer is None or saved is None:
            return
        self._apply_group_meta(self.optimizer.param_groups, saved["param_groups"], self._group_names)
        for name, leaves in saved.get("scalars", {}).items():
            if name in self._by_name:
                self.optimizer.state[self._by_name[name]].update(leaves)


# ---------------------------------------------------------------------------------------------- FSDP2


class FSDP2Adapter(TorchAdapter):
    """``fully_shard`` modules: parameters and optimizer state are DTensors; full tensors are gathered (a
    collective) one parameter at a time and scattered back the same way."""

    engine = "fsdp2"

    @property
    def collective(self) -> bool:
        return True

    def layout(self) -> dict[str, Any]:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        return {"engine": "fsdp2", "world_size": world, "data_parallel": world}

    def plan(self) -> list[TensorSpec]:
        specs = []
        for name, p in self._params:
            specs.append(TensorSpec("model", name, tuple(p.shape), p.dtype))  # a DTensor's shape is the global one
            for key, value in sorted(self._state(p).items()):
                if isinstance(value, torch.Tensor):
                    specs.append(TensorSpec("optimizer", f"{name}/{key}", tuple(value.shape), value.dtype))
        return specs

    def fetch(self, name: str) -> dict[str, torch.Tensor]:
        return {k: _full(v) for k, v in super().fetch(name).items()}

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        p = self._by_name[name]
        with torch.no_grad():
            source = tensors.get("master", tensors["model"]).to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(source, p.device_mesh, p.placements).to_local())
            else:
                p.copy_(source)
        if self.optimizer is None:
            return
        state = self.optimizer.state[p]
        for key, value in tensors.items():
            if not key.startswith("optimizer/"):
                continue
            k = key.split("/", 1)[1]
            if isinstance(p, DTensor) and value.dim() > 0 and tuple(value.shape) == tuple(p.shape):
                state[k] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            else:
                state[k] = value.clone()


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------- choosing one


def make_adapter(model: Any, optimizer: torch.optim.Optimizer | None = None) -> EngineAdapter:
    """The adapter for ``model``: a DeepSpeed engine, an FSDP2 module, or a plain/DDP module."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        DeepSpeedEngine = None
    if DeepSpeedEngine is not None and isinstance(model, DeepSpeedEngine):
        from .deepspeed_adapter import DeepSpeedAdapter

        return DeepSpeedAdapter(model)
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
