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
    params = list(model.parameters())
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
        import deepspeed

        from wsd_pretrain import deepspeed_initialize

        stage, _, dtype = engine[2:].partition("-")
        if dtype == "fp16":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().is_fp16_supported = lambda: True  # see docs/decisions.md: torch runs fp16 on any CPU
        opt = torch.optim.AdamW(param_groups(model), lr=lr)
        sched = WSDScheduler(opt, schedule)
        ds_engine, *_ = deepspeed_initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(int(stage), dtype or "fp32")
        )
        del deepspeed

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
    """Every tensor the checkpoint holds, gathered (a collective for sharded engines), as fp32 CPU copies."""
    from wsd_pretrain.checkpoint.adapters import make_adapter

    adapter = make_adapter(model, optimizer)
    out = {}
    for name in adapter.param_names:
        for key, t in adapter.fetch(name).items():
            out[f"{name}:{key}"] = t.detach().float().cpu().clone()
    return out
