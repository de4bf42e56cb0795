"""Tiny real training setups for checkpoint tests, built inside the ranks run_distributed starts.

``build(engine, schedule)`` returns ``(model_or_engine, optimizer, scheduler, step_fn)`` for: ``torch`` (one
process), ``ddp``, ``fsdp2``, ``ds0`` / ``ds1`` / ``ds2`` / ``ds3`` with a dtype suffix (``ds2-bf16``). ``step_fn(i)``
runs optimizer update ``i`` on data that depends only on ``i`` and the rank, and returns the loss.

``build(..., stochastic=True)``: training that draws from every random stream of the process, as real training
does: dropout (torch's CPU generator) and a data augmentation that shifts the tokens by a draw from python's
``random`` and one from numpy's global generator; each rank is seeded differently after the model is built. An exact
resume of such a run needs every stream of every rank restored. :func:`rng_digests` fingerprints the streams.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np
import torch

from wsd_pretrain import WSDSchedule, WSDScheduler


class TinyLM(torch.nn.Module):
    """Embedding, two blocks and a tied head: parameters of several shapes, a buffer and a tied weight."""

    def __init__(self, vocab: int = 32, dim: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.embed = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(
                torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
            )
            for _ in range(2)
        )
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.tensor([1.0, 0.5]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            out = block(h)
            if self.dropout:
                out = torch.nn.functional.dropout(out, self.dropout, self.training)
            h = h + out * self.scale[0]
        logits = self.head(h).float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))


def batch(i: int, rank: int, vocab: int = 32, augment: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * i + rank)
    tokens = torch.randint(0, vocab, (4, 12), generator=g)
    if augment:  # a draw from python's and one from numpy's global generator
        tokens = (tokens + random.randrange(vocab) + int(np.random.randint(vocab))) % vocab
    return tokens


def rng_digests() -> dict[str, str]:
    """A fingerprint of each random stream of this process, read directly from python, numpy and torch."""

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": digest(json.dumps(random.getstate()).encode()),
        "numpy": digest(key.tobytes() + json.dumps([kind, int(pos), int(has_gauss), float(cached)]).encode()),
        "torch": digest(torch.get_rng_state().numpy().tobytes()),
    }


def ds_config(stage: int, dtype: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": 1.0,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups, as real recipes use (weight decay on matrices only): catches per-group bugs."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build(
    engine: str, schedule: WSDSchedule, rank: int = 0, lr: float = 3e-3, stochastic: bool = False
) -> tuple[Any, Any, WSDScheduler, Any]:
    torch.manual_seed(0)
    model = TinyLM(dropout=0.1 if stochastic else 0.0)
    if stochastic:  # the same initial weights everywhere, then every stream of every rank its own
        random.seed(100 + rank)
        np.random.seed(200 + rank)
        torch.manual_seed(300 + rank)
    if engine.startswith("ds"):
        from wsd_pretrain import deepspeed_initialize

        spec, *flags = engine[2:].split("+")
        stage, _, dtype = spec.partition("-")
        if dtype == "fp16":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().is_fp16_supported = lambda: True  # see docs/decisions.md: torch runs fp16 on any CPU
        if "frozen" in flags:
            model.blocks[0][0].weight.requires_grad_(False)  # a frozen parameter: no master, no optimizer state
        config = ds_config(int(stage), dtype or "fp32")
        if "fused" in flags or "cpuadam" in flags:
            # DeepSpeed builds its own optimizer from the ds_config: FusedAdam, or DeepSpeedCPUAdam with offload
            config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.1}}
        if "cpuadam" in flags:
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if "muon" in flags:  # DeepSpeed's Muon (matrices) with its own Adam (the rest), from the ds_config
            config["optimizer"] = {"type": "Muon", "params": {"lr": lr, "weight_decay": 0.1}}
            for p in model.parameters():
                p.use_muon = p.ndim == 2
        if "paramoffload" in flags:  # ZeRO-3 keeps each rank's parameter partition in host memory
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        if "bf16opt" in flags:  # ZeRO-1 bf16 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer
            config["data_types"] = {"grad_accum_dtype": "fp32"}
        if "optimizer" in config:
            ds_engine, _, _, sched = deepspeed_initialize(
                model=model,
                model_parameters=param_groups(model),
                lr_scheduler=lambda o: WSDScheduler(o, schedule),
                config=config,
            )
            opt = ds_engine.basic_optimizer
        else:
            opt = torch.optim.AdamW(param_groups(model), lr=lr)
            sched = WSDScheduler(opt, schedule)
            ds_engine, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)

        def ds_step(i: int) -> float:
            loss = ds_engine(batch(i, rank, augment=stochastic))
            ds_engine.backward(loss)
            ds_engine.step()
            return float(loss.item())

        return ds_engine, opt, sched, ds_step
    if engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(param_groups(model), lr=lr)
    sched = WSDScheduler(opt, schedule)

    def torch_step(i: int) -> float:
        loss = model(batch(i, rank, augment=stochastic))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        return float(loss.item())

    return model, opt, sched, torch_step


def full_state(model: Any, optimizer: Any) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint holds, as fp32 CPU copies keyed ``<param>:model``, ``<param>:master`` (DeepSpeed
    with bf16/fp16) and ``<param>:optimizer/<key>``, read through each engine's own public API (DeepSpeed's
    ``safe_get_full_*``, DTensor's ``full_tensor``: collectives, every rank calls this), not through our adapters,
    so that the tests compare our checkpoints against an independent oracle."""
    out: dict[str, torch.Tensor] = {}
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        DeepSpeedEngine = None
    if DeepSpeedEngine is not None and isinstance(model, DeepSpeedEngine):
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        engine = model
        low = engine.bfloat16_enabled() or engine.fp16_enabled()
        stage = engine.zero_optimization_stage()
        opt = engine.basic_optimizer
        wrapper = engine.optimizer
        if getattr(wrapper, "_hp_optimizer_states_linked", None) and len(opt.state) == len(opt.param_groups):
            # DeepSpeed links each parameter to its optimizer-state fragment after the first group's first step,
            # when later groups have no state yet; linking again (its own method) makes the getters see them all
            wrapper._hp_optimizer_states_linked = False
            wrapper._lazy_init_hp_params_optimizer_state()
        steps = [st.get("step") for st in opt.state.values()]
        for name, p in _unique_params(engine.module):
            if stage == 3:
                with deepspeed.zero.GatheredParameters([p]):
                    out[f"{name}:model"] = p.detach().float().cpu().clone()
            else:
                out[f"{name}:model"] = p.detach().float().cpu().clone()
            if stage == 0:
                hp, state = p, opt.state.get(p, {})
                for lp_group, hp_group in zip(getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups", [])):
                    for lp, h in zip(lp_group, hp_group):  # FP16_UnfusedOptimizer: an fp32 copy per parameter
                        if lp is p:
                            hp, state = h, opt.state.get(h, {})
                for lp_group, flat in zip(
                    getattr(wrapper, "fp16_groups", []), getattr(wrapper, "fp32_groups_flat", [])
                ):
                    offset = 0  # FP16_Optimizer: one flat fp32 copy per group, the parameters in order
                    for lp in lp_group:
                        if lp is p:
                            hp = flat.narrow(0, offset, p.numel())
                            state = {
                                k: (v.narrow(0, offset, p.numel()) if isinstance(v, torch.Tensor) and v.dim() else v)
                                for k, v in opt.state.get(flat, {}).items()
                            }
                        offset += lp.numel()
                if low:
                    out[f"{name}:master"] = hp.detach().float().cpu().clone()
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        out[f"{name}:optimizer/{key}"] = value.detach().float().cpu().clone()
                continue
            fp32 = safe_get_full_fp32_param(p)
            if fp32 is None:
                continue
            if low:
                out[f"{name}:master"] = fp32.detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                if steps:
                    out[f"{name}:optimizer/{key}"] = (
                        safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
                    )
            if steps and steps[0] is not None:
                out[f"{name}:optimizer/step"] = torch.tensor(float(steps[0]))
        return out
    from torch.distributed.tensor import DTensor

    def full(t: torch.Tensor) -> torch.Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().cpu().clone()

    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    for name, p in _unique_params(module):
        out[f"{name}:model"] = full(p)
        for key, value in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{name}:optimizer/{key}"] = full(value)
    return out


def _unique_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in module.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def assert_verified(paths: Any) -> int:
    """The invariant every engine's saves keep: each committed checkpoint passes ``ckpt verify`` (the library's
    verify: manifest, sizes, checksums, headers, every index against its shards). Paths retention has deleted since
    are skipped; at least one must remain. Called on rank 0 inside the multi-engine tests' own processes."""
    from pathlib import Path

    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    checked = 0
    for p in paths:
        if Path(p).exists():
            problems = verify_checkpoint_files(p)
            assert problems == [], f"a committed checkpoint fails verify: {p}: {problems}"
            checked += 1
    assert checked, "no committed checkpoint left to verify"
    return checked
