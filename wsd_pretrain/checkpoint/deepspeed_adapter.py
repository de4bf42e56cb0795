"""DeepSpeed engines behind the adapter seam: every optimizer wrapper DeepSpeed 0.16-0.19 builds, or a clear refusal.

Each rank writes the master weights and optimizer state it holds, straight from DeepSpeed's own buffers (no
``safe_get_full_*``: those all-reduce a full fp32 copy of every tensor on every rank). What a wrapper holds:

* ``DeepSpeedZeroOptimizer`` (ZeRO-1/2) and ``BF16_Optimizer``: each param group is one flat buffer, cut into
  ``world`` equal partitions; each rank's fp32 master partition and optimizer state cover a contiguous range of the
  flat buffer, and each parameter's fragment of it is linked in ``param._hp_mapping``. The fragments of every rank
  are computed here from the flat layout (identical on every rank) and checked against this rank's own links. The
  model's low-precision weights are whole on every rank (replicated).
* ``DeepSpeedZeroOptimizer_Stage3``: every parameter is cut into ``ceil(numel / world)`` elements per rank, for the
  low-precision weight (``ds_tensor``), the fp32 master and each optimizer moment alike (read and written through the
  ``safe_*_local_*`` API).
* ZeRO-0: ``FP16_Optimizer`` (fused: one flat fp32 copy per group), ``FP16_UnfusedOptimizer`` (an fp32 copy per
  parameter) or the torch optimizer itself (fp32): every rank holds everything.

The optimizer's own state is taken as it is: tensors as slices (``exp_avg``...), 0-d tensors whole, numbers (the
``step`` of FusedAdam and DeepSpeedCPUAdam is a Python int) in ``engine.json``; anything else is refused when the
manager is built (:meth:`DeepSpeedAdapter.check_complete`), so a checkpoint is never silently missing state.
Refused: NVMe offload (state swapped out to disk), ZeRO++ hierarchical partitions / MiCS, DeepSpeed AutoTP
(``tensor_parallel.autotp_size`` > 1: each rank holds a slice of most weights; :func:`autotp_partition` says which,
and ``wsd-pretrain ckpt from-deepspeed`` imports DeepSpeed's own checkpoint of such a job), other data-parallel groups
smaller than the world (a Megatron ``mpu``, a model-parallel slice inside pipeline stages), MoE, a PipelineEngine with
ZeRO 2 or 3.

DeepSpeed's ``PipelineEngine`` (ZeRO-0/1) is :class:`DeepSpeedPipeAdapter`: the stages' union as one model, each
rank's ZeRO partitions cut over its stage's data-parallel group (``part_world``/``part_rank``).

A fresh engine has no optimizer state until its first step, and restoring needs the buffers: ``begin_restore`` runs
one optimizer step at LR 0 on zero gradients (weights unchanged bit for bit), whose state is then overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .adapters import (
    EngineAdapter,
    Want,
    _jsonable,
    is_json_scalar,
    restore_scalars,
)
from .layout import Item, Partition, zero3_chunks, zero12_fragments

__all__ = [
    "AUTOTP_FIX",
    "AutoTPPartition",
    "DeepSpeedAdapter",
    "DeepSpeedPipeAdapter",
    "autotp_partition",
    "pipeline_stages",
]

_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_factor", "scale_window")


class DeepSpeedAdapter(EngineAdapter):
    engine = "deepspeed"

    def __init__(self, engine: Any) -> None:
        self.ds = engine
        super().__init__(engine.module, engine.basic_optimizer)
        self.stage = int(engine.zero_optimization_stage())
        self.wrapper = engine.optimizer
        self.low_precision = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
        self.kind = self._kind()
        # the ranks a ZeRO partition is cut over: the world, or one pipeline stage's data-parallel group
        self.part_world, self.part_rank = self.world, self.rank
        self._refuse_unsupported()
        self._id_name = {id(p): n for n, p in self._params}
        self._layout_cache: dict[str, Any] | None = None

    # ------------------------------------------------------------------ which wrapper

    def _kind(self) -> str:
        name = type(self.wrapper).__name__
        if name == "DeepSpeedZeroOptimizer_Stage3":
            return "zero3"
        if name in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
            return "fragments"
        if name == "FP16_Optimizer":
            return "fused16"
        if name == "FP16_UnfusedOptimizer":
            return "unfused16"
        if self.wrapper is self.optimizer and self.stage == 0 and not self.low_precision:
            return "plain"
        raise CheckpointError(
            f"DeepSpeed optimizer wrapper {name} (ZeRO stage {self.stage}, {self._dtype_name()}) is not supported by "
            "the checkpoint manager: use ZeRO stage 0-3 with fp32, bf16 or fp16"
        )

    def _refuse_unsupported(self) -> None:
        cfg = getattr(self.ds, "_config", None)
        zc = getattr(cfg, "zero_config", None)
        problems = []
        for what in ("offload_optimizer", "offload_param"):
            off = getattr(zc, what, None)
            device = getattr(getattr(off, "device", None), "value", getattr(off, "device", None))
            if device is not None and str(device).lower() == "nvme":
                problems.append(
                    f"zero_optimization.{what}.device is nvme: its state is swapped out to disk, which the checkpoint "
                    "cannot read in place; use device 'cpu' (ZeRO-Offload) or none"
                )
        if getattr(zc, "zero_hpz_partition_size", 1) not in (None, 1):
            problems.append("zero_optimization.zero_hpz_partition_size > 1 (ZeRO++ hierarchical partitions)")
        if getattr(cfg, "mics_shard_size", -1) not in (None, -1, 0):
            problems.append("mics_shard_size is set (MiCS)")
        if "Muon" in type(self.optimizer).__name__:
            problems.append(
                f"the optimizer is DeepSpeed's Muon ({type(self.optimizer).__name__}): its momentum is kept outside "
                "the flat ZeRO state the checkpoint reads and writes; use AdamW (or FusedAdam, CPU Adam) from the "
                "ds_config"
            )
        if getattr(self.wrapper, "zenflow", False) is True:
            problems.append(
                "ZenFlow is on (zero_optimization.zenflow): it transposes the parameters and steps the optimizer in a "
                "process of its own"
            )
        if getattr(self.ds, "has_moe_layers", False):
            problems.append("the model has MoE layers (expert-parallel groups)")
        dp = int(getattr(self.ds, "dp_world_size", self.world))
        tp = int(self.ds.autotp_size() or 0) if hasattr(self.ds, "autotp_size") else 0
        pp = pipeline_stages(self.ds)
        if pp > 1 and self.stage > 1:
            problems.append(
                f"pipeline parallelism ({pp} stages) with ZeRO stage {self.stage}: DeepSpeed's PipelineEngine "
                "supports ZeRO stage 0 and 1 only; set zero_optimization.stage to 0 or 1"
            )
        if tp > 1:
            problems.append(self._autotp_problem(tp))
        elif pp > 1 and dp * pp != self.world:
            problems.append(
                f"the pipeline has {pp} stages of {dp} data-parallel ranks, {dp * pp} of the {self.world} ranks "
                "(a model-parallel slice inside each stage, from a Megatron mpu?): only pipeline stages times data "
                "parallelism is supported"
            )
        elif pp == 1 and dp != self.world:
            problems.append(
                f"the data-parallel group has {dp} ranks of {self.world} (tensor or pipeline parallelism): only pure "
                "data parallelism is supported"
            )
        if problems:
            raise CheckpointError(
                "this DeepSpeed configuration is not supported by the checkpoint manager: " + "; ".join(problems)
            )

    def _autotp_problem(self, tp: int) -> str:
        """What AutoTP did to this model, from DeepSpeed's own description of each parameter's split."""
        by_dim: dict[str, list[str]] = {}
        for name, p in self._params:
            try:
                entry = _live_autotp_map(p)
                part = autotp_partition(entry, name) if entry is not None else None
            except CheckpointError:
                by_dim.setdefault("other layouts", []).append(name)
                continue
            if part is not None and part.dim is not None:
                by_dim.setdefault(f"dim {part.dim}", []).append(name)
        shown = "; ".join(
            f"{k}: {', '.join(v[:3])}{f' (+{len(v) - 3} more)' if len(v) > 3 else ''}"
            for k, v in sorted(by_dim.items())
        )
        count = sum(len(v) for v in by_dim.values())
        return (
            f"DeepSpeed AutoTP is on (tensor_parallel.autotp_size = {tp}): it splits {count} of the model's "
            f"{len(self._params)} parameters over the tensor-parallel group ({shown}), so each rank holds a slice of "
            f"them, not the tensor; {AUTOTP_FIX}"
        )

    def _dtype_name(self) -> str:
        if self.ds.bfloat16_enabled():
            return "bf16"
        return "fp16" if self.ds.fp16_enabled() else "fp32"

    def layout(self) -> dict[str, Any]:
        return {
            "engine": "deepspeed",
            "zero_stage": self.stage,
            "dtype": self._dtype_name(),
            "optimizer": type(self.optimizer).__name__,
            "wrapper": type(self.wrapper).__name__,
            "world_size": self.world,
            "data_parallel": int(getattr(self.ds, "dp_world_size", self.world)),
            "gradient_accumulation_steps": int(self.ds.gradient_accumulation_steps()),
        }

    # ------------------------------------------------------------------ where each parameter's state lives

    def _flat_groups(self) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], list[torch.Tensor]]:
        """(low-precision params per group in flat order, the groups' flat lp buffers, this rank's fp32 partitions)."""
        w = self.wrapper
        if type(w).__name__ == "BF16_Optimizer":
            return w.bf16_groups, w.bf16_groups_flat, w.fp32_groups_flat_partition
        return w.bit16_groups, w.bit16_groups_flat, w.single_partition_of_fp32_groups

    def _fragment_layout(self) -> dict[str, Any]:
        """For ZeRO-1/2 and BF16_Optimizer: every parameter's fragments on every rank, its group and flat state."""
        if self._layout_cache is not None:
            return self._layout_cache
        w = self.wrapper
        lp_groups, lp_flats, hp_flats = self._flat_groups()
        parts: dict[str, Partition] = {}
        group_of: dict[str, int] = {}
        for i, params in enumerate(lp_groups):
            size = lp_flats[i].numel() // self.part_world
            if size != hp_flats[i].numel():
                raise CheckpointError(
                    f"DeepSpeed param group {i}: partition of {hp_flats[i].numel()} elements, expected {size}: this "
                    "DeepSpeed version lays partitions out differently than the checkpoint manager expects"
                )
            padding = getattr(w, "round_robin_bit16_padding", None)
            if padding is not None and any(padding[i]):
                by_id = {id(p): off for p, off in zip(w.round_robin_bit16_groups[i], w.round_robin_bit16_offsets[i])}
                offsets = [by_id[id(p)] for p in params]
            else:
                order = getattr(w, "round_robin_bit16_groups", None)
                order = order[i] if order is not None else params
                running, by_id = 0, {}
                for p in order:
                    by_id[id(p)] = running
                    running += p.numel()
                offsets = [by_id[id(p)] for p in params]
            for p, part in zip(params, zero12_fragments([p.numel() for p in params], offsets, size, self.part_world)):
                name = self._id_name.get(id(p))
                if name is None:
                    raise CheckpointError("a DeepSpeed param group holds a tensor that is not a module parameter")
                mine = part.local(self.part_rank, p.numel())
                link = getattr(p, "_hp_mapping", None)
                linked = (link.lp_fragment_address.start, link.lp_fragment_address.numel) if link is not None else None
                if mine != linked:
                    raise CheckpointError(
                        f"{name}: DeepSpeed links elements {linked} to this rank, the flat layout says {mine}: this "
                        "DeepSpeed version partitions differently than the checkpoint manager expects"
                    )
                parts[name] = part
                group_of[name] = i
        self._layout_cache = {"parts": parts, "group_of": group_of, "hp_flats": hp_flats}
        return self._layout_cache

    def _flat_state(self, name: str) -> dict[str, Any]:
        """The torch optimizer state of the flat tensor that holds ``name``'s master (empty before the first step)."""
        if self.kind == "fragments":
            lay = self._fragment_layout()
            if name not in lay["group_of"]:
                return {}
            return self.optimizer.state.get(lay["hp_flats"][lay["group_of"][name]], {})
        if self.kind == "zero3":
            p = self._by_name[name]
            if not p.requires_grad:
                return {}
            g = self.wrapper.grad_position[self.wrapper.get_param_id(p)][0]
            return self.optimizer.state.get(self.wrapper.fp32_partitioned_groups_flat[g], {})
        if self.kind == "fused16":
            g, _ = self._fused_position()[name]
            return self.optimizer.state.get(self.wrapper.fp32_groups_flat[g], {})
        hp = self._zero0_master(name)
        return self.optimizer.state.get(hp, {}) if hp is not None else {}

    def _fused_position(self) -> dict[str, tuple[int, int]]:
        """FP16_Optimizer (fused): ``{name: (group, element offset in the group's flat fp32 copy)}``."""
        if not hasattr(self, "_fused"):
            self._fused = {}
            for g, params in enumerate(self.wrapper.fp16_groups):
                offset = 0
                for p in params:
                    self._fused[self._id_name[id(p)]] = (g, offset)
                    offset += p.numel()
        return self._fused

    def _zero0_master(self, name: str) -> torch.Tensor | None:
        """The tensor the torch optimizer steps for ``name`` at ZeRO-0: its fp32 copy, or the parameter itself."""
        p = self._by_name[name]
        if self.kind == "plain":
            return p
        if self.kind == "unfused16":
            for lp_group, hp_group in zip(self.wrapper.fp16_groups, self.wrapper.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    if lp is p:
                        return hp
            return None
        g, offset = self._fused_position()[name]
        return self.wrapper.fp32_groups_flat[g].narrow(0, offset, p.numel()).view(p.shape)

    def _state_keys(self, name: str) -> tuple[list[str], list[str], dict[str, Any]]:
        """(per-element state keys, 0-d tensor keys, JSON scalars) of ``name``'s optimizer state."""
        state = self._flat_state(name)
        elem, zero_d, scalars = [], [], {}
        numel = self._hp_numel(name)
        for key, value in sorted(state.items()):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == numel:
                elem.append(key)
            elif isinstance(value, torch.Tensor) and value.dim() == 0:
                zero_d.append(key)
            elif not isinstance(value, torch.Tensor) and is_json_scalar(value):
                scalars[key] = _jsonable(value)
        return elem, zero_d, scalars

    def _hp_numel(self, name: str) -> int:
        """Elements of the flat tensor whose state holds ``name`` (what a per-element state tensor has)."""
        if self.kind == "fragments":
            lay = self._fragment_layout()
            return lay["hp_flats"][lay["group_of"][name]].numel() if name in lay["group_of"] else -1
        if self.kind == "zero3":
            p = self._by_name[name]
            if not p.requires_grad:
                return -1
            return self.wrapper.fp32_partitioned_groups_flat[
                self.wrapper.grad_position[self.wrapper.get_param_id(p)][0]
            ].numel()
        if self.kind == "fused16":
            return self.wrapper.fp32_groups_flat[self._fused_position()[name][0]].numel()
        hp = self._zero0_master(name)
        return hp.numel() if hp is not None else -1

    def check_complete(self) -> None:
        self._relink()
        for name, _ in self._params:
            numel = self._hp_numel(name)
            for key, value in self._flat_state(name).items():
                ok = (isinstance(value, torch.Tensor) and (value.dim() == 0 or value.numel() == numel)) or (
                    not isinstance(value, torch.Tensor) and is_json_scalar(value)
                )
                if not ok:
                    what = (
                        f"a tensor of {value.numel()} elements"
                        if isinstance(value, torch.Tensor)
                        else type(value).__name__
                    )
                    raise CheckpointError(
                        f"optimizer state {name}/{key} is {what}: neither per-element state of the parameter, a 0-d "
                        f"tensor nor a number, so {type(self.optimizer).__name__}'s state cannot be saved exactly; "
                        "use an optimizer whose state is per-element tensors and numbers (Adam, AdamW, SGD, Lion: "
                        "DeepSpeed's own or torch's)"
                    )

    # ------------------------------------------------------------------ the items

    def _partition(self, name: str) -> Partition:
        p = self._by_name[name]
        if self.kind == "zero3":
            numel = int(p.ds_numel)
            if p.ds_tensor.numel() != math.ceil(numel / self.world):
                raise CheckpointError(
                    f"{name}: ZeRO-3 holds {p.ds_tensor.numel()} elements per rank, expected ceil({numel} / "
                    f"{self.world}): an unsupported ZeRO-3 partitioning (hpZ, MiCS?)"
                )
            return zero3_chunks(numel, self.world)
        if self.kind == "fragments":
            return self._fragment_layout()["parts"].get(name, Partition(replicated=True))
        return Partition(replicated=True)

    def _full_shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)

    def items(self) -> list[Item]:
        self._relink()
        model, master, optim = [], [], []
        for name, p in self._params:
            shape = self._full_shape(p)
            part = self._partition(name)
            model.append(
                Item("model", name, shape, p.dtype, part if self.kind == "zero3" else Partition(replicated=True))
            )
            has_master = self._hp_numel(name) >= 0
            if self.low_precision and has_master:
                master.append(Item("master", name, shape, torch.float32, part))
            elem, zero_d, _ = self._state_keys(name)
            for key in elem:
                dtype = self._flat_state(name)[key].dtype
                optim.append(Item("optimizer", f"{name}/{key}", shape, dtype, part))
            for key in zero_d:
                dtype = self._flat_state(name)[key].dtype
                optim.append(Item("optimizer", f"{name}/{key}", (), dtype))
        return model + self.buffer_items() + master + optim

    def local(self, item: Item) -> torch.Tensor:
        if item.group == "model" and item.name not in self._by_name:
            return self._buffers[item.name].detach()
        name, key = (item.name, None) if item.group != "optimizer" else item.name.rsplit("/", 1)
        p = self._by_name[name]
        if key is not None and item.shape == ():  # a 0-d state tensor (written whole by one rank)
            return self._flat_state(name)[key].detach()
        if self.kind == "zero3":
            local = item.partition.local(self.rank, item.numel)
            n = local[1] if local is not None else 0
            if item.group == "model":
                return p.ds_tensor.detach().reshape(-1)[:n]
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            t = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            return t.detach().reshape(-1)[:n]
        if item.group == "model":
            return p.detach()
        if self.kind == "fragments":
            link = p._hp_mapping
            return (link.hp_fragment if key is None else link.get_optim_state_fragment(key)).detach()
        hp = self._zero0_master(name)
        if key is None:
            return hp.detach()
        if self.kind == "fused16":
            _, offset = self._fused_position()[name]
            return self._flat_state(name)[key].narrow(0, offset, p.numel()).view(p.shape).detach()
        return self._flat_state(name)[key].detach()

    @property
    def device(self) -> torch.device:
        return torch.device(self.ds.device) if getattr(self.ds, "device", None) is not None else super().device

    def meta(self) -> dict[str, Any]:
        groups = []
        for group in self.optimizer.param_groups:
            groups.append({k: _jsonable(v) for k, v in group.items() if k != "params"} | {"params": None})
        scalars = {}
        for name, _ in self._params:
            leaves = self._state_keys(name)[2]
            if leaves:
                scalars[name] = leaves
        engine = {
            "global_steps": int(self.ds.global_steps),
            "global_samples": int(self.ds.global_samples),
            "skipped_steps": int(self.ds.skipped_steps),
            "micro_steps": int(getattr(self.ds, "micro_steps", 0)),
        }
        scaler = getattr(self.wrapper, "loss_scaler", None)
        if scaler is not None:
            engine["loss_scaler"] = {f: _jsonable(getattr(scaler, f)) for f in _SCALER_FIELDS if hasattr(scaler, f)}
        return {
            "optimizer": {"class": type(self.optimizer).__name__, "param_groups": groups, "scalars": scalars},
            "engine": engine,
        }

    # ------------------------------------------------------------------ restoring

    def _relink(self) -> None:
        """ZeRO 1/2 link each parameter to its optimizer-state fragment once, after the first group's first step
        (``_optimizer_step``), when the other groups have no state yet: with several param groups, those stay
        unlinked. Linking again once every group has state fixes it (DeepSpeed 0.19)."""
        if self.kind != "fragments" or getattr(self, "_relinked", False):
            return
        if not hasattr(self.wrapper, "_hp_optimizer_states_linked"):
            return
        if len(self.optimizer.state) >= len(self._flat_groups()[2]):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()
            self._relinked = True

    def begin_restore(self, with_optimizer_state: bool) -> None:
        if not with_optimizer_state or self.optimizer.state:
            self._relink()
            return
        # A fresh engine has no optimizer state yet and restoring needs its buffers: one step at LR 0 on zero
        # gradients creates them without moving a weight (Adam/AdamW/SGD: the update is scaled by the LR).
        saved = [(g, g["lr"]) for g in self.optimizer.param_groups]
        for g, _ in saved:
            g["lr"] = 0.0
        try:
            # the gradients are put back as they were: ZeRO-Offload keeps its fp32 gradient buffers for good
            if self.kind == "zero3":
                for i, flat in enumerate(self.wrapper.fp32_partitioned_groups_flat):
                    kept = flat.grad
                    flat.grad = torch.zeros_like(flat)
                    self.wrapper._optimizer_step(i)
                    flat.grad = kept
            else:
                flats = self._stepped_tensors()
                kept = [flat.grad for flat in flats]
                for flat in flats:
                    flat.grad = torch.zeros_like(flat)
                self.optimizer.step()
                for flat, grad in zip(flats, kept):
                    flat.grad = grad
                self._relink()
        finally:
            for g, lr in saved:
                g["lr"] = lr

    def _stepped_tensors(self) -> list[torch.Tensor]:
        """The tensors the torch optimizer steps (it creates state for those with a gradient)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _range(self, name: str) -> tuple[int, int | None]:
        if self.kind in ("zero3", "fragments"):
            local = self._partition(name).local(
                self.part_rank, self._by_name[name].ds_numel if self.kind == "zero3" else self._by_name[name].numel()
            )
            return local if local is not None else (0, 0)
        return 0, None

    def wants(self, saved: dict[str, dict[str, tuple[int, ...]]]) -> dict[str, list[Want]]:
        out: dict[str, list[Want]] = {}
        for name, p in self._params:
            shape = self._full_shape(p)
            start, numel = self._range(name)
            has_master = self._hp_numel(name) >= 0 or (self.kind == "zero3" and p.requires_grad)
            wants = []
            if self.kind == "zero3":
                wants.append(Want("lp", name, start=start, numel=numel, dtype=p.dtype))
            else:
                wants.append(Want("lp", name, dtype=p.dtype))
            if has_master and (self.low_precision or self.kind in ("zero3", "fragments")):
                wants.append(Want("hp", name, start=start, numel=numel))
            if has_master:
                for key, kshape in saved.get(name, {}).items():
                    ranged = len(kshape) > 0 and tuple(kshape) == shape
                    wants.append(Want("optimizer", name, key, *((start, numel) if ranged else (0, None))))
            out[name] = wants
        return out

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self._by_name[name]
        lp = tensors["lp"]
        hp = tensors.get("hp")
        with torch.no_grad():
            if self.kind == "zero3":
                p.ds_tensor.reshape(-1)[: lp.numel()].copy_(lp.to(p.dtype))
            else:
                p.data.copy_(lp.to(p.dtype).view(p.shape))
        optim = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        if hp is None and not optim:
            return
        if self.kind == "zero3":
            from deepspeed.utils import (
                safe_get_local_fp32_param,
                safe_get_local_optimizer_state,
                safe_set_local_fp32_param,
                safe_set_local_optimizer_state,
            )

            if hp is not None:
                buf = safe_get_local_fp32_param(p).detach().clone().reshape(-1)
                buf[: hp.numel()] = hp.to(buf.dtype)
                safe_set_local_fp32_param(p, buf)
            state = self._flat_state(name)
            for key, value in optim.items():
                if value.dim() == 0 and key in state and not isinstance(state[key], torch.Tensor):
                    state[key] = type(state[key])(value.item())
                    continue
                if value.dim() == 0 and key in state and state[key].dim() == 0:
                    state[key].copy_(value)
                    continue
                buf = safe_get_local_optimizer_state(p, key).detach().clone().reshape(-1)
                buf[: value.numel()] = value.to(buf.dtype)
                safe_set_local_optimizer_state(p, buf, key)
            return
        if self.kind == "fragments":
            link = p._hp_mapping
            with torch.no_grad():
                if link is not None and hp is not None:
                    link.hp_fragment.copy_(hp.to(link.hp_fragment.dtype))
                state = self._flat_state(name)
                for key, value in optim.items():
                    if value.dim() == 0 and key in state and not isinstance(state[key], torch.Tensor):
                        state[key] = type(state[key])(value.item())  # a torch step tensor into FusedAdam's int
                    elif value.dim() == 0 and key in state and state[key].dim() == 0:
                        state[key].copy_(value)
                    elif link is not None:
                        frag = link.get_optim_state_fragment(key)
                        frag.copy_(value.to(frag.dtype))
            return
        # ZeRO-0: every rank holds everything
        master = self._zero0_master(name)
        state = self._flat_state(name)
        with torch.no_grad():
            if master is not None and master is not p and hp is not None:
                master.copy_(hp.to(master.dtype).view(master.shape))
            for key, value in optim.items():
                if self.kind == "fused16" and value.dim() > 0:
                    _, offset = self._fused_position()[name]
                    state[key].narrow(0, offset, p.numel()).copy_(value.reshape(-1))
                elif key in state and isinstance(state[key], torch.Tensor):
                    state[key].copy_(value.view(state[key].shape))
                else:
                    target = master if master is not None else p
                    state[key] = value.to(target.device).view(target.shape) if value.dim() else value.clone()

    def restore_meta(self, meta: dict[str, Any]) -> None:
        saved = meta.get("optimizer") or {}
        self._apply_group_meta(self.optimizer.param_groups, saved.get("param_groups", []), lambda g: None)
        for name, leaves in (saved.get("scalars") or {}).items():
            if name in self._by_name:
                restore_scalars(self._flat_state_for_write(name), leaves, name)
        self._replay_cpu_adam_steps()
        engine = meta.get("engine") or {}
        for field in ("global_steps", "global_samples", "skipped_steps", "micro_steps"):
            if field in engine and hasattr(self.ds, field):
                setattr(self.ds, field, engine[field])
        scaler = getattr(self.wrapper, "loss_scaler", None)
        for field, value in (engine.get("loss_scaler") or {}).items():
            if scaler is not None and hasattr(scaler, field):
                current = getattr(scaler, field)
                if isinstance(current, torch.Tensor):
                    current.fill_(value)
                else:
                    setattr(scaler, field, value)

    def _replay_cpu_adam_steps(self) -> None:
        """DeepSpeed's CPU Adam kernels (FusedAdam on the CPU accelerator; DeepSpeedCPUAdam, which ZeRO-Offload runs
        on the host of a GPU job) keep beta1^t and beta2^t in a process-wide float, multiplied by beta once per step;
        a process that starts at step t computes pow(beta, t) instead, which can differ in the last bit, so every
        update after a resume would differ from the uninterrupted run's by an ulp. Replaying the kernel's step
        counter from 1 to t (on a one-element dummy at LR 0: t kernel calls, about 10 us each) rebuilds the same
        products, and the resumed run stays bitwise equal."""
        opt = self.optimizer
        name = type(opt).__name__
        on_cpu_kernel = name == "DeepSpeedCPUAdam" or (name == "FusedAdam" and self.device.type == "cpu")
        if not on_cpu_kernel:
            return
        steps = [st.get("step") for st in opt.state.values() if isinstance(st.get("step"), int)]
        if not steps:
            return
        last = max(steps)
        dummy = [torch.zeros(1) for _ in range(4)]  # param, grad, exp_avg, exp_avg_sq
        groups = [g for g in opt.param_groups if g["params"]]
        if name == "DeepSpeedCPUAdam":
            for t in range(1, last + 1):
                for g in groups:
                    b1, b2 = g["betas"]
                    opt.ds_opt_adam.adam_update(
                        opt.opt_id, t, 0.0, b1, b2, g["eps"], g["weight_decay"], g["bias_correction"], *dummy
                    )
            return
        from deepspeed.ops.adam.fused_adam import multi_tensor_applier as apply

        p, grad, m, v = dummy
        for t in range(1, last + 1):
            for g in groups:
                b1, b2 = g["betas"]
                apply(
                    opt.multi_tensor_adam,
                    opt._dummy_overflow_buf,
                    [[grad], [p], [m], [v]],
                    0.0,
                    b1,
                    b2,
                    g["eps"],
                    t,
                    opt.adam_w_mode,
                    1 if g["bias_correction"] else 0,
                    g["weight_decay"],
                )

    def _flat_state_for_write(self, name: str) -> dict[str, Any]:
        state = self._flat_state(name)
        if state or self.kind not in ("plain", "unfused16"):
            return state
        target = self._zero0_master(name)
        return self.optimizer.state[target] if target is not None else state


# ---------------------------------------------------------------------------------------------- pipeline stages


def pipeline_stages(engine: Any) -> int:
    """How many pipeline stages a DeepSpeed engine runs (1 for anything but a ``PipelineEngine``)."""
    if not _is_pipeline(engine):
        return 1
    return int(getattr(engine, "num_stages", 1) or 1)


def _is_pipeline(engine: Any) -> bool:
    import sys

    pipe = sys.modules.get("deepspeed.runtime.pipe.engine")
    cls = getattr(pipe, "PipelineEngine", None) if pipe is not None else None
    return cls is not None and isinstance(engine, cls)


def _dtype(text: str) -> torch.dtype:
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"internal: a pipeline stage describes an unknown dtype {text!r}")
    return dtype


def _digest(ranks: list[int]) -> str:
    """A short fingerprint of a rank list: what the ranks of a stage compare instead of sending the list itself."""
    return hashlib.sha256(json.dumps(ranks).encode()).hexdigest()[:16]


class DeepSpeedPipeAdapter(DeepSpeedAdapter):
    """DeepSpeed's ``PipelineEngine`` (a ``PipelineModule`` of ``LayerSpec``/``TiedLayerSpec``, ZeRO-0/1): each rank
    holds one stage's layers, under the module's own names (``<layer index>.<name>``, a tied layer's
    ``tied_modules.<key>.<name>`` on every stage that uses it), and its ZeRO-1 partitions are cut over that stage's
    data-parallel group.

    The checkpoint is one model: when the adapter is built, each stage's first data-parallel rank describes its
    parameters (names, shapes, dtypes, ZeRO fragments within the stage) and sends that JSON alone, one broadcast
    per stage on the checkpoint's gloo group, after one all-gather of a few tens of bytes per rank (its error, its
    stage, whether it describes it, a digest of its data-parallel group); every rank then lists the union of all
    stages' tensors, each owned by the first stage that holds it. A tied weight is stored once, by its first stage
    (with that stage's master and optimizer state) and restored to every stage that holds it (each reads its own
    fragments of it by element range). Model weights are written by their stage's data-parallel ranks in turn;
    masters and optimizer state by their holders. The optimizer state keys of the other stages' parameters are
    this rank's own (every stage steps the same optimizer class at the same steps); a stage whose keys differ makes
    the ranks' descriptions differ, which the build-time agreement refuses.

    ``names``: a callable ``PipelineModule name -> name in the model`` (the manager's ``Pipeline(names=...)``), for
    layers that carry their model's names under the layer index (the main job's Llama: ``3.model.layers.2.mlp...``
    -> ``model.layers.2.mlp...``); None keeps the PipelineModule's names. Two parameters the map gives one name are
    refused unless they are the same tied weight (held by two stages)."""

    def __init__(self, engine: Any, names: Any = None) -> None:
        from .. import distributed as D
        from . import coord

        error, mine, head = None, None, {}
        stage = int(getattr(engine, "stage_id", 0))
        try:
            super().__init__(engine)
            if names is not None:
                self._rename(names)
            grid = engine.grid
            self.stage_id, self.num_stages = stage, pipeline_stages(engine)
            self.part_world = int(engine.dp_world_size)
            self.part_rank = int(grid.get_data_parallel_rank())
            dp_ranks = [int(r) for r in grid.get_data_parallel_group_ranks()]
            if len(dp_ranks) != self.part_world or dp_ranks[self.part_rank] != self.rank:
                raise CheckpointError(
                    f"DeepSpeed's pipeline grid puts rank {self.rank} at data-parallel rank {self.part_rank} of "
                    f"{dp_ranks}: a grid the checkpoint manager does not understand"
                )
            head = {"first": self.part_rank == 0, "group": _digest(dp_ranks)}
            if self.part_rank == 0:  # the stage's one sender
                mine = {"ranks": dp_ranks, "params": self._stage_params()}
                mine["buffers"] = [[n, list(t.shape), _dtext(t.dtype)] for n, t in self._buffers.items()]
                mine = json.loads(json.dumps(mine))  # as the other ranks will read it
        except Exception as exc:
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        # every rank takes part whatever happened before: a few tens of bytes each, then one description per stage
        heads = D.all_gather_object({"error": error, "stage": stage, **head}, group=coord.groups().coord)
        errors = [h["error"] for h in heads]
        if any(errors):
            raise CheckpointError(coord.describe_errors(errors))
        senders = self._senders(heads)
        described = {
            s: D.broadcast_object(mine if self.rank == src else None, src=src, group=coord.groups().coord)
            for s, src in sorted(senders.items())
        }
        self._global = self._union(described)

    def _rename(self, names: Any) -> None:
        """Every parameter, tied alias and persistent buffer under ``names(its PipelineModule name)``."""
        if not callable(names):
            raise CheckpointError(
                f"Pipeline(names=...) for a DeepSpeed pipeline must be a callable (PipelineModule name -> model name), "
                f"not {type(names).__name__}"
            )
        renamed: dict[str, str] = {}

        def new(name: str) -> str:
            out = str(names(name))
            if out in renamed and renamed[out] != name:
                raise CheckpointError(
                    f"the name map gives {renamed[out]!r} and {name!r} one name {out!r}: map each tensor of the stage "
                    "to its own name in the model"
                )
            renamed[out] = name
            return out

        self._params = [(new(n), p) for n, p in self._params]
        self._by_name = dict(self._params)
        self.tied = {str(names(a)): str(names(t)) for a, t in self.tied.items() if names(a) != names(t)}
        where = self._buffers._where
        self._buffers._where = {new(n): w for n, w in where.items()}
        self._id_name = {id(p): n for n, p in self._params}

    def _stage_params(self) -> list[list[Any]]:
        """``[name, shape, dtype, has master, fragments]`` of this stage's parameters (fragments: ``[start, numel,
        data-parallel rank]`` within the stage, or None: whole on every rank of the stage)."""
        self._relink()
        rows = []
        for name, p in self._params:
            part = self._partition(name)
            frags = None if part.replicated else [list(x) for x in part.iter_parts(p.numel(), self.part_world)]
            rows.append([name, list(self._full_shape(p)), _dtext(p.dtype), self._hp_numel(name) >= 0, frags])
        return rows

    def _senders(self, heads: list[dict[str, Any]]) -> dict[int, int]:
        """The rank that describes each stage (its first data-parallel rank), once every rank of a stage has given
        the same data-parallel group and every stage has its describer; the same answer (or error) on every rank."""
        groups: dict[int, set[str]] = {}
        senders: dict[int, int] = {}
        for r, h in enumerate(heads):
            s = int(h["stage"])
            groups.setdefault(s, set()).add(h["group"])
            if h["first"]:
                senders.setdefault(s, r)
        for s, seen in sorted(groups.items()):
            if len(seen) > 1:
                raise CheckpointError(f"pipeline stage {s}: its ranks disagree on its data-parallel group")
        if sorted(groups) != list(range(self.num_stages)) or sorted(senders) != sorted(groups):
            raise CheckpointError(
                f"DeepSpeed's pipeline has {self.num_stages} stages, the ranks describe stages {sorted(groups)}"
            )
        return senders

    def _union(self, stages: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Every stage's ranks and parameters (``stages``: each stage's description), each tensor with its owning
        (first) stage."""
        owner: dict[str, tuple[int, list[Any]]] = {}
        owned: dict[int, list[list[Any]]] = {s: [] for s in stages}
        for s in sorted(stages):
            for row in stages[s]["params"]:
                name = row[0]
                if name in owner:  # a tied weight (TiedLayerSpec): one tensor, stored by its first stage
                    first_stage, first = owner[name]
                    if first[1:3] != row[1:3]:
                        raise CheckpointError(
                            f"{name} is held by pipeline stages {first_stage} and {s} with different shapes or "
                            f"dtypes ({first[1:3]} vs {row[1:3]}): the stages' layers must not share a name"
                        )
                    continue
                owner[name] = (s, row)
                owned[s].append(row)
        buffers: dict[int, list[list[Any]]] = {s: [] for s in stages}
        seen: set[str] = set(owner)
        for s in sorted(stages):
            for row in stages[s]["buffers"]:
                if row[0] not in seen:
                    seen.add(row[0])
                    buffers[s].append(row)
        return {"ranks": {s: e["ranks"] for s, e in stages.items()}, "owned": owned, "buffers": buffers}

    def _template(self) -> tuple[list[tuple[str, torch.dtype]], list[tuple[str, torch.dtype]], dict[str, Any]]:
        """This stage's optimizer state keys (per-element, 0-d, JSON scalars): every stage's, see the class doc."""
        for name, _ in self._params:
            if self._hp_numel(name) < 0:
                continue
            elem, zero_d, scalars = self._state_keys(name)
            state = self._flat_state(name)
            return [(k, state[k].dtype) for k in elem], [(k, state[k].dtype) for k in zero_d], scalars
        return [], [], {}

    def items(self) -> list[Item]:
        self._relink()
        elem, zero_d, _ = self._template()
        model, buffers, master, optim = [], [], [], []
        for s, rows in sorted(self._global["owned"].items()):
            ranks = self._global["ranks"][s]
            for j, (name, shape, dtype, has_master, frags) in enumerate(rows):
                shape = tuple(shape)
                writer = ranks[j % len(ranks)]  # a stage's weights are written by its data-parallel ranks in turn
                whole = Partition.whole(writer, math.prod(shape))
                model.append(Item("model", name, shape, _dtype(dtype), whole))
                part = Partition(parts=tuple((a, n, ranks[r]) for a, n, r in frags)) if frags else whole
                if has_master and self.low_precision:
                    master.append(Item("master", name, shape, torch.float32, part))
                if has_master:
                    optim += [Item("optimizer", f"{name}/{k}", shape, dt, part) for k, dt in elem]
                    optim += [Item("optimizer", f"{name}/{k}", (), dt, Partition.whole(writer, 1)) for k, dt in zero_d]
            for j, (name, shape, dtype) in enumerate(self._global["buffers"][s]):
                whole = Partition.whole(ranks[j % len(ranks)], math.prod(shape))
                buffers.append(Item("model", name, tuple(shape), _dtype(dtype), whole))
        return model + buffers + master + optim

    def local(self, item: Item) -> torch.Tensor:
        t = super().local(item)
        return t.reshape(-1) if t.dim() > 1 else t  # a whole tensor of one holder is its flat range

    def meta(self) -> dict[str, Any]:
        out = super().meta()
        _, _, scalars = self._template()
        if scalars:  # the other stages' parameters step alike (their numbers are not on this rank)
            every = {row[0] for rows in self._global["owned"].values() for row in rows if row[3]}
            out["optimizer"]["scalars"] = {n: scalars for n in sorted(every)} | out["optimizer"]["scalars"]
        return out

    def layout(self) -> dict[str, Any]:
        return super().layout() | {"pipeline_stages": self.num_stages, "data_parallel": self.part_world}


def _dtext(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- AutoTP

AUTOTP_FIX = (
    "the checkpoint cannot record tensor-parallel slices yet (issue 19's format 3 adds them). Until then save this "
    "job with DeepSpeed's own engine.save_checkpoint(dir) and import that with `wsd-pretrain ckpt from-deepspeed dir "
    "RUN_DIR` (full tensors: a Hugging Face folder and the whole training state, resumable by a job without tensor "
    "parallelism), or train without tensor_parallel.autotp_size"
)


@dataclass(frozen=True)
class AutoTPPartition:
    """How DeepSpeed AutoTP splits one parameter over its tensor-parallel group: the global ``shape``, the ``dim`` it
    is cut on (None: every TP rank holds the whole tensor) and each TP rank's box of the global tensor,
    ``boxes[tp_rank] = (offsets, lengths)`` per dimension (a rank that holds none of an uneven split has an empty
    box). Column-parallel weights (q/k/v, gate/up, the LM head) are cut on dim 0, row-parallel ones (o_proj,
    down_proj) on dim 1; norms, embeddings and row-parallel biases are whole on every rank."""

    shape: tuple[int, ...]
    dim: int | None
    boxes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]

    def index(self, tp_rank: int) -> tuple[slice, ...]:
        """``tp_rank``'s box as an index of the global tensor (``full[part.index(r)]`` is rank r's shard)."""
        offsets, lengths = self.boxes[tp_rank]
        return tuple(slice(o, o + n) for o, n in zip(offsets, lengths))


def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _live_autotp_map(p: torch.Tensor) -> dict[str, Any] | None:
    """The affine map DeepSpeed (0.19+) keeps on a parameter AutoTP replaced; None for one it left whole."""
    meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None)
    if not meta:
        return None
    conversion = meta.get("conversion") or {}
    if conversion.get("unsupported_reason"):
        raise CheckpointError(f"DeepSpeed cannot describe its split: {conversion['unsupported_reason']}")
    entry = conversion.get("affine_map")
    if entry is None:
        raise CheckpointError("DeepSpeed records no affine map for it (a DeepSpeed older than 0.19?)")
    return entry


def autotp_partition(entry: dict[str, Any], name: str, tp: int | None = None) -> AutoTPPartition:
    """One parameter's AutoTP split from DeepSpeed's affine map of it (``ParamAffineMap.to_dict()``: the live
    parameter's ``ds_autotp_universal_checkpoint_meta["conversion"]["affine_map"]``, or the checkpoint's
    ``universal_checkpoint_info["affine_map"]["params"][pattern]``); ``tp``, when given, is the number of TP ranks
    it must name. Accepted: one piece per rank, unscaled, that is the rank's whole shard and a box of the global
    tensor (row-major on both sides), either held by every rank and the whole tensor (replicated) or held by its
    rank alone, the split ranks' boxes tiling one dimension. Anything else (fused sub-parameters cut piece by piece,
    segmented or block layouts, a scaled replica) raises :class:`CheckpointError` naming it."""
    shape = tuple(int(d) for d in entry["logical_shape"])
    strides = _row_major(shape)
    ranks = {int(r): v for r, v in entry["ranks"].items()}
    if tp is not None and sorted(ranks) != list(range(tp)):
        raise CheckpointError(f"{name}: DeepSpeed's AutoTP map names TP ranks {sorted(ranks)}, the job has {tp}")
    boxes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    shared = 0
    for r, value in sorted(ranks.items()):
        pieces = value["pieces"]
        shard = tuple(int(d) for d in value["shard_shape"])
        if len(pieces) != 1:
            raise CheckpointError(
                f"{name}: AutoTP gives TP rank {r} {len(pieces)} pieces of the tensor (fused sub-parameters or a "
                "segmented layout), not one slice"
            )
        piece = pieces[0]
        (src, src_strides), (dst, dst_strides) = piece["source"], piece["dest"]
        lengths = tuple(int(d) for d in piece["shape"])
        holders = sorted(int(x) for x in piece["locations"])
        if float(piece.get("scale", 1.0)) != 1.0:
            raise CheckpointError(f"{name}: AutoTP holds it scaled by {piece['scale']} on TP rank {r}")
        if lengths != shard or len(shard) != len(shape):
            raise CheckpointError(f"{name}: TP rank {r}'s piece {list(lengths)} is not its shard {list(shard)}")
        if math.prod(lengths) == 0:  # a rank that holds none of an uneven split
            boxes[r] = ((0,) * len(shape), lengths)
            continue
        if tuple(src_strides) != strides or int(dst) != 0 or tuple(dst_strides) != _row_major(shard):
            raise CheckpointError(f"{name}: TP rank {r}'s piece is not a box of the tensor (strided or offset)")
        offsets, rest = [], int(src)
        for s in strides:
            offsets.append(rest // s)
            rest %= s
        if any(o + n > d for o, n, d in zip(offsets, lengths, shape)):
            raise CheckpointError(f"{name}: TP rank {r}'s box {offsets} + {list(lengths)} leaves the shape {shape}")
        boxes[r] = (tuple(offsets), lengths)
        if len(ranks) > 1 and holders == sorted(ranks):
            if lengths != shape:
                raise CheckpointError(f"{name}: every TP rank holds the same slice of it, not the whole tensor")
            shared += 1
        elif holders != [r]:
            raise CheckpointError(f"{name}: TP rank {r}'s slice is listed as held by TP ranks {holders}")
    if shared:
        if shared != len(ranks):
            raise CheckpointError(f"{name}: some TP ranks hold the whole tensor, others a slice")
        return AutoTPPartition(shape, None, boxes)
    cut = set()
    for off, n in boxes.values():
        empty = math.prod(n) == 0
        cut |= {d for d in range(len(shape)) if (n[d] == 0 if empty else (off[d], n[d]) != (0, shape[d]))}
    if len(cut) != 1:
        raise CheckpointError(f"{name}: AutoTP cuts it on dimensions {sorted(cut)}, not on one")
    dim = cut.pop()
    pos = 0
    for off, n in sorted((off[dim], n[dim]) for off, n in boxes.values() if math.prod(n)):
        if off != pos:
            raise CheckpointError(
                f"{name}: the TP ranks' slices of dim {dim} do not tile it (a gap or overlap at {pos})"
            )
        pos += n
    if pos != shape[dim]:
        raise CheckpointError(f"{name}: the TP ranks' slices cover {pos} of dim {dim}'s {shape[dim]}")
    return AutoTPPartition(shape, dim, boxes)
