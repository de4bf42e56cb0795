"""DeepSpeed engines (ZeRO 0-3; fp32, bf16, fp16) behind the adapter seam.

ZeRO 1-3 partition the fp32 master weights and the optimizer state in flat buffers. Full per-parameter tensors
come from DeepSpeed's public per-parameter API (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``
and their ``safe_set_`` twins, collectives that every rank calls), one parameter at a time. Two things that API
does not do are done here, pinned to DeepSpeed 0.16-0.19 and covered by the resume tests for every stage:

* a fresh engine has no optimizer state until its first step, and the setters need it: ``begin_restore`` runs one
  optimizer step at LR 0 on zero gradients (weights unchanged bit for bit), whose state is then overwritten;
* the setters write the fp32 master only: the model's low-precision weights are refreshed from it (ZeRO-3 through
  ``GatheredParameters``).

ZeRO-0 keeps the state in the torch optimizer itself: with fp32 the optimizer steps the model's parameters; with
bf16/fp16 DeepSpeed's wrapper keeps fp32 copies (``fp32_groups``) beside the model's (``fp16_groups``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CheckpointError
from .adapters import EngineAdapter, TensorSpec, _jsonable

__all__ = ["DeepSpeedAdapter"]

_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis", "scale_factor", "scale_window")


class DeepSpeedAdapter(EngineAdapter):
    engine = "deepspeed"

    def __init__(self, engine: Any) -> None:
        self.ds = engine
        super().__init__(engine.module, engine.basic_optimizer)
        self.stage = int(engine.zero_optimization_stage())
        self.wrapper = engine.optimizer  # DeepSpeed's optimizer wrapper (or the torch optimizer at ZeRO-0 fp32)
        self.low_precision = bool(engine.bfloat16_enabled() or engine.fp16_enabled())
        self._zero0_master: dict[str, torch.Tensor] = {}
        if self.stage == 0 and self.low_precision:
            fp16_groups = getattr(self.wrapper, "fp16_groups", None)
            fp32_groups = getattr(self.wrapper, "fp32_groups", None) or getattr(self.wrapper, "fp32_groups_flat", None)
            if fp16_groups is None or fp32_groups is None:
                raise CheckpointError(
                    f"ZeRO-0 with {self._dtype_name()} and optimizer wrapper {type(self.wrapper).__name__} is not "
                    "supported: use ZeRO stage 1-3 for mixed precision"
                )
            by_id = {id(p): n for n, p in self._params}
            for lp_group, hp_group in zip(fp16_groups, fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    self._zero0_master[by_id[id(lp)]] = hp

    # ------------------------------------------------------------------ description

    @property
    def collective(self) -> bool:
        return self.stage > 0

    def _dtype_name(self) -> str:
        if self.ds.bfloat16_enabled():
            return "bf16"
        return "fp16" if self.ds.fp16_enabled() else "fp32"

    def layout(self) -> dict[str, Any]:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        return {
            "engine": "deepspeed",
            "zero_stage": self.stage,
            "dtype": self._dtype_name(),
            "world_size": world,
            "data_parallel": int(getattr(self.ds, "dp_world_size", world)),
            "gradient_accumulation_steps": int(self.ds.gradient_accumulation_steps()),
        }

    def _full_shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)

    def _hp_state(self, name: str) -> dict[str, Any]:
        """The torch optimizer state that holds a parameter's master (ZeRO-0) or its flat partition (ZeRO 1-3)."""
        opt = self.optimizer
        if self.stage == 0:
            return opt.state.get(self._zero0_master.get(name, self._by_name[name]), {})
        flats = self._flat_params()
        return opt.state.get(flats[self._flat_index()[name]], {}) if flats else {}

    def _flat_index(self) -> dict[str, int]:
        """Which flat partition (param group for ZeRO 1/2, sub-group for ZeRO-3) holds each parameter."""
        if not hasattr(self, "_flat_of"):
            groups = getattr(self.wrapper, "fp16_groups", None) if self.stage == 3 else self.wrapper.bit16_groups
            by_id = {id(p): n for n, p in self._params}
            self._flat_of = {by_id[id(p)]: i for i, group in enumerate(groups or []) for p in group if id(p) in by_id}
        return self._flat_of

    def _flat_params(self) -> list[torch.Tensor]:
        if hasattr(self.wrapper, "fp32_partitioned_groups_flat"):  # ZeRO-3
            return list(self.wrapper.fp32_partitioned_groups_flat)
        if hasattr(self.wrapper, "single_partition_of_fp32_groups"):  # ZeRO 1/2
            return list(self.wrapper.single_partition_of_fp32_groups)
        return []

    def _optim_keys(self) -> tuple[list[str], list[str]]:
        """(per-element state keys, scalar state keys) of the optimizer, the same for every parameter."""
        if self.stage == 0:
            state = self._hp_state(self._params[0][0]) if self._params else {}
            elem = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
            scal = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
            return elem, scal
        flats = self._flat_params()
        state = self.optimizer.state.get(flats[0], {}) if flats else {}
        elem = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.numel() == flats[0].numel()]
        scal = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() == 0]
        return elem, scal

    def _relink(self) -> None:
        """ZeRO 1/2 link each parameter to its optimizer-state fragment once, after the first group's first step
        (``_optimizer_step``), when the other groups have no state yet: with several param groups, those stay
        unlinked and the per-parameter getters and setters fail. Linking again once every group has state fixes
        it (DeepSpeed 0.19)."""
        if getattr(self, "_relinked", False) or not hasattr(self.wrapper, "_hp_optimizer_states_linked"):
            return
        if len(self.optimizer.state) >= len(self._flat_params()):
            self.wrapper._hp_optimizer_states_linked = False
            self.wrapper._lazy_init_hp_params_optimizer_state()
            self._relinked = True

    def plan(self) -> list[TensorSpec]:
        self._relink()
        elem, scal = self._optim_keys()
        specs = []
        for name, p in self._params:
            shape = self._full_shape(p)
            specs.append(TensorSpec("model", name, shape, p.dtype))
            if self.low_precision:
                specs.append(TensorSpec("master", name, shape, torch.float32))
            for key in elem:
                specs.append(TensorSpec("optimizer", f"{name}/{key}", shape, torch.float32))
            for key in scal:
                dtype = self._hp_state(name)[key].dtype
                specs.append(TensorSpec("optimizer", f"{name}/{key}", (), dtype))
        return specs

    # ------------------------------------------------------------------ out

    def fetch(self, name: str) -> dict[str, torch.Tensor]:
        self._relink()
        p = self._by_name[name]
        elem, scal = self._optim_keys()
        out: dict[str, torch.Tensor] = {}
        if self.stage == 0:
            hp = self._zero0_master.get(name, p)
            out["model"] = p.detach()
            if self.low_precision:
                out["master"] = hp.detach()
            state = self.optimizer.state.get(hp, {})
            for key in elem + scal:
                out[f"optimizer/{key}"] = state[key].detach()
            return out
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        master = safe_get_full_fp32_param(p)
        out["model"] = master.to(p.dtype) if self.low_precision else master
        if self.low_precision:
            out["master"] = master
        for key in elem:
            out[f"optimizer/{key}"] = safe_get_full_optimizer_state(p, key)
        flat_state = self._hp_state(name)
        for key in scal:
            out[f"optimizer/{key}"] = flat_state[key].detach().clone()
        return out

    def meta(self) -> dict[str, Any]:
        groups = []
        for group in self.optimizer.param_groups:
            groups.append({k: _jsonable(v) for k, v in group.items() if k != "params"} | {"params": None})
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
            "optimizer": {"class": type(self.optimizer).__name__, "param_groups": groups, "scalars": {}},
            "engine": engine,
        }

    # ------------------------------------------------------------------ in

    def begin_restore(self, with_optimizer_state: bool) -> None:
        if self.stage == 0 or self.optimizer.state or not with_optimizer_state:
            return
        # A fresh ZeRO engine has no optimizer state yet and the setters need it: one step at LR 0 on zero
        # gradients creates it without moving a weight (Adam/AdamW/SGD: the update is scaled by the LR).
        saved = [(g, g["lr"]) for g in self.optimizer.param_groups]
        for g, _ in saved:
            g["lr"] = 0.0
        try:
            if hasattr(self.wrapper, "fp32_partitioned_groups_flat"):
                for i, flat in enumerate(self.wrapper.fp32_partitioned_groups_flat):
                    flat.grad = torch.zeros_like(flat)
                    self.wrapper._optimizer_step(i)
                    flat.grad = None
            else:
                flats = self.wrapper.single_partition_of_fp32_groups
                for flat in flats:
                    flat.grad = torch.zeros_like(flat)
                self.optimizer.step()
                for flat in flats:
                    flat.grad = None
                self._relink()
        finally:
            for g, lr in saved:
                g["lr"] = lr

    def restore(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        p = self._by_name[name]
        master = tensors.get("master", tensors["model"]).to(torch.float32)
        optim = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        if self.stage == 0:
            hp = self._zero0_master.get(name, p)
            with torch.no_grad():
                hp.copy_(master.to(hp.dtype))
                if hp is not p:
                    p.copy_(tensors["model"].to(p.dtype))
            state = self.optimizer.state[hp]
            for key, value in optim.items():
                state[key] = value.to(hp.device)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        safe_set_full_fp32_param(p, master)
        flat_state = self._hp_state(name)
        for key, value in optim.items():
            if value.dim() == 0:
                if key in flat_state:
                    flat_state[key].copy_(value)
                else:
                    flat_state[key] = value.clone()
            else:
                safe_set_full_optimizer_state(p, value.to(torch.float32), key)
        low = tensors["model"].to(p.dtype)
        with torch.no_grad():
            if self.stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(low)
            else:
                p.data.copy_(low)

    def restore_meta(self, meta: dict[str, Any]) -> None:
        saved = meta.get("optimizer") or {}
        groups = saved.get("param_groups", [])
        self._apply_group_meta(self.optimizer.param_groups, groups, lambda g: None)
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
