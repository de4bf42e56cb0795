"""The main job's 3-D layout: the ``parallel:`` section, its validation, the DeviceMesh, tensor parallelism and
FSDP2 (HSDP) on it, pipeline stages, and the per-GPU memory of a layout.

A mesh is ``(pp, dp_replicate, dp_shard, tp)``, outermost first (torchtitan's order: tensor parallelism inside a
node, pipeline stages across nodes); rank ``r`` has coordinates in that order, row-major. The model is the
project's Llama (:class:`~wsd_pretrain.model.LlamaLM`) and keeps its Hugging Face names on every layout:
tensor parallelism is torchtitan's Llama plan (Colwise q/k/v and gate/up, Rowwise o_proj and down_proj, the
embedding cut on the vocabulary, the output layer Colwise, SequenceParallel norms), FSDP2's ``fully_shard`` per
decoder layer and at the root on the data-parallel dimensions (HSDP with ``dp_replicate > 1``), and a pipeline
stage is the whole model with the other stages' layers removed (``model.layers.<i>`` keeps its global index).
Everything a layout cannot run is refused when the config is read, each problem naming its fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import ConfigError

__all__ = ["Layout", "ParallelConfig", "check_parallel", "memory_per_gpu", "split_stage", "stage_layers"]

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """The ``parallel:`` section (engine ``fsdp2``; ``deepspeed`` takes data parallelism only). The product of the
    four degrees is the world size."""

    dp_shard: int = -1
    """FSDP2's sharding degree; -1: the world size divided by the other degrees."""
    dp_replicate: int = 1
    """Replicas of the sharded model (HSDP: ``fully_shard`` on a (dp_replicate, dp_shard) mesh)."""
    tp: int = 1
    """Tensor-parallel degree (torchtitan's Llama plan); keep it within a node."""
    pp: int = 1
    """Pipeline stages (torch.distributed.pipelining)."""
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """The pipeline schedule: ``gpipe`` (all forwards, then all backwards) or ``1f1b`` (less activation memory)."""
    microbatches: int | None = None
    """Pipeline microbatches per micro-step (null: ``pp``); ``train.micro_batch_size`` is split into them."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("dp_replicate", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r}: a whole number >= 1")
        if (
            not isinstance(self.dp_shard, int)
            or isinstance(self.dp_shard, bool)
            or not (self.dp_shard == -1 or self.dp_shard >= 1)
        ):
            problems.append(f"dp_shard={self.dp_shard!r}: a whole number >= 1, or -1 (the rest of the world size)")
        if self.pp_schedule not in ("gpipe", "1f1b"):
            problems.append(f"pp_schedule={self.pp_schedule!r}: 'gpipe' or '1f1b'")
        if self.microbatches is not None and (
            not isinstance(self.microbatches, int) or isinstance(self.microbatches, bool) or self.microbatches < 1
        ):
            problems.append(f"microbatches={self.microbatches!r}: a whole number >= 1, or null (pp)")
        if problems:
            raise ConfigError(problems, where="parallel config")

    @property
    def multi_dim(self) -> bool:
        """Anything beyond plain data parallelism (TP, PP or HSDP)."""
        return self.tp > 1 or self.pp > 1 or self.dp_replicate > 1

    def resolved(self, world: int) -> Layout:
        """The layout on ``world`` ranks (``dp_shard: -1`` filled in); raises ConfigError when they do not fit."""
        problems = _world_problems(self, world)
        if problems:
            raise ConfigError(problems, where="parallel config")
        rest = self.dp_replicate * self.tp * self.pp
        shard = world // rest if self.dp_shard == -1 else self.dp_shard
        return Layout(pp=self.pp, dp_replicate=self.dp_replicate, dp_shard=shard, tp=self.tp)


@dataclass(frozen=True)
class Layout:
    """Resolved degrees; ``world = pp * dp_replicate * dp_shard * tp``."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int

    @property
    def world(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def coords(self, rank: int) -> dict[str, int]:
        """Rank ``rank``'s coordinate on each mesh dimension (row-major, ``pp`` outermost)."""
        out, rest = {}, rank
        for name in reversed(MESH_DIMS):
            size = getattr(self, name)
            out[name] = rest % size
            rest //= size
        return {name: out[name] for name in MESH_DIMS}

    def dp_rank(self, rank: int) -> int:
        c = self.coords(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]


def _world_problems(cfg: ParallelConfig, world: int) -> list[str]:
    rest = cfg.dp_replicate * cfg.tp * cfg.pp
    degrees = f"dp_replicate {cfg.dp_replicate} x tp {cfg.tp} x pp {cfg.pp}"
    if cfg.dp_shard == -1:
        if world % rest:
            return [
                f"the world size {world} is not divisible by {degrees} = {rest}: launch a multiple of {rest} "
                "processes, or change the degrees"
            ]
        return []
    product = rest * cfg.dp_shard
    if product != world:
        return [
            f"dp_shard {cfg.dp_shard} x {degrees} = {product}, but the job has {world} processes: make the product "
            f"equal the world size (e.g. parallel.dp_shard={world // rest if world % rest == 0 else -1}), or launch "
            f"{product} processes"
        ]
    return []


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """The decoder layers of each pipeline stage: as even as can be, and where they cannot be, the first and the
    last stage (which also hold the embedding and the output layer) get the fewer layers (Llama 3 405B: 126 layers
    on 16 stages are 7, 8 x 14, 7)."""
    base, extra = divmod(num_layers, pp)
    counts = [base] * pp
    if extra:
        # the extra layers go to the middle stages first, then outwards
        order = sorted(range(pp), key=lambda s: (s in (0, pp - 1), abs(s - (pp - 1) / 2)))
        for s in order[:extra]:
            counts[s] += 1
    out, start = [], 0
    for n in counts:
        out.append(range(start, start + n))
        start += n
    return out


def check_parallel(job: Any, world: int | None) -> list[str]:
    """Every problem of the job's ``parallel:`` section against its engine, model and data (and ``world`` when
    known), each naming the fix; [] when it runs."""
    cfg: ParallelConfig = job.parallel
    engine = job.train.engine
    problems: list[str] = []
    if world is not None:
        problems += _world_problems(cfg, world)
    if engine == "ddp" and (cfg.multi_dim or cfg.dp_shard not in (-1, world)):
        problems.append(
            "parallel: tp, pp, dp_replicate and dp_shard are the FSDP2 engine's: set train.engine=fsdp2 (ddp "
            "replicates the whole model on every rank)"
        )
    if engine == "deepspeed":
        if cfg.tp > 1:
            problems.append(
                f"parallel.tp={cfg.tp} with engine=deepspeed is DeepSpeed AutoTP, which the checkpoint manager "
                "refuses today (docs/decisions.md, 96): train with train.engine=fsdp2 and parallel.tp, or without "
                "tensor parallelism"
            )
        if cfg.pp > 1 and job.model.num_layers % cfg.pp:
            problems.append(
                f"model.num_layers={job.model.num_layers} is not divisible by parallel.pp={cfg.pp}: DeepSpeed's "
                "PipelineModule gets the same number of decoder layers on every stage; choose a pp that divides "
                f"it ({_divisors_hint(job.model.num_layers, cfg.pp).replace('tp', 'pp')})"
            )
        if cfg.pp > 1 and cfg.pp_schedule != "1f1b":
            problems.append(
                f"parallel.pp_schedule={cfg.pp_schedule!r} with engine=deepspeed: DeepSpeed's PipelineEngine runs "
                "its own 1F1B schedule; set parallel.pp_schedule=1f1b (or use train.engine=fsdp2 for GPipe)"
            )
        if cfg.dp_replicate > 1:
            problems.append(
                f"parallel.dp_replicate={cfg.dp_replicate} with engine=deepspeed: ZeRO partitions over every rank; "
                "use train.engine=fsdp2 for HSDP, or parallel.dp_replicate=1"
            )
    model = job.model
    if cfg.tp > 1:
        for name, value in (
            ("num_heads", model.num_heads),
            ("num_kv_heads", model.num_kv_heads),
            ("intermediate_size", model.intermediate_size),
            ("vocab_size", model.vocab_size),
            ("hidden_size", model.hidden_size),
        ):
            if value % cfg.tp:
                problems.append(
                    f"model.{name}={value} is not divisible by parallel.tp={cfg.tp}: choose a tp that divides it "
                    f"({_divisors_hint(value, cfg.tp)})"
                )
        if model.tie_embeddings:
            problems.append(
                "model.tie_embeddings=true with parallel.tp > 1: the embedding is cut on the vocabulary by Rowwise "
                "and the output layer by Colwise, one weight cannot be both; set model.tie_embeddings=false"
            )
        for section in ("data", "decay_data"):
            data = getattr(job, section, None)
            if data is not None and data.seq_len % cfg.tp:
                problems.append(
                    f"{section}.seq_len={data.seq_len} is not divisible by parallel.tp={cfg.tp} (sequence parallelism "
                    "cuts the residual stream along the sequence): choose a seq_len that tp divides"
                )
    if cfg.pp > 1:
        if model.num_layers < cfg.pp:
            problems.append(
                f"model.num_layers={model.num_layers} is fewer than parallel.pp={cfg.pp} stages: every stage needs "
                f"a decoder layer; use parallel.pp <= {model.num_layers}"
            )
        if model.tie_embeddings and engine != "deepspeed":  # DeepSpeed ties them across stages (TiedLayerSpec)
            problems.append(
                "model.tie_embeddings=true with parallel.pp > 1: the embedding lives on the first stage and the "
                "output layer on the last; set model.tie_embeddings=false (or use train.engine=deepspeed, whose "
                "pipeline ties them across stages)"
            )
        micro = job.train.micro_batch_size
        n = cfg.microbatches or cfg.pp
        if micro % n:
            problems.append(
                f"train.micro_batch_size={micro} is not divisible by parallel.microbatches={n}: each pipeline "
                f"microbatch is micro_batch_size / microbatches sequences (e.g. train.micro_batch_size={n * max(1, micro // n)})"
            )
        if cfg.pp_schedule == "1f1b" and n < cfg.pp:
            problems.append(
                f"parallel.microbatches={n} is fewer than parallel.pp={cfg.pp} stages: 1F1B needs at least one "
                f"microbatch per stage (set parallel.microbatches >= {cfg.pp})"
            )
    return problems


def _divisors_hint(value: int, tp: int) -> str:
    options = [d for d in (1, 2, 4, 8, 16) if value % d == 0]
    return "tp in " + ", ".join(map(str, options)) + f" divides {value}" if options else f"{value} is odd"


def world_from_env() -> int | None:
    """The launcher's world size (torchrun's, srun's), if the process was started by one."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return None


# ---------------------------------------------------------------------------------------------- building


def build_mesh(layout: Layout, device: torch.device) -> Any:
    """The job's DeviceMesh: every dimension of the layout, named ``pp``, ``dp_replicate``, ``dp_shard``, ``tp``."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = tuple(getattr(layout, n) for n in MESH_DIMS)
    return init_device_mesh(device.type, shape, mesh_dim_names=MESH_DIMS)


def apply_tp(module: torch.nn.Module, tp_mesh: Any) -> None:
    """torchtitan's Llama plan on :class:`~wsd_pretrain.model.LlamaLM` (or one pipeline stage of it): each
    decoder layer's q/k/v and gate/up Colwise, o_proj and down_proj Rowwise, the embedding Rowwise (the vocabulary
    cut), the output layer Colwise with a replicated output (no loss parallelism: the loss is the model's own
    cross-entropy), and sequence parallelism: the norms (SequenceParallel) and the residual stream cut along the
    sequence, gathered before attention and the MLP. Every parameter ends on the TP mesh (the norms replicated),
    so FSDP2 then puts all of them on one (dp, tp) mesh."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan: dict[str, Any] = {}
    if module.model.embed_tokens is not None:
        plan["model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    else:  # a later pipeline stage: its input is the previous stage's residual stream, this rank's sequence slice
        module.seq_shards = tp_mesh.size()
    if module.model.norm is not None:
        plan["model.norm"] = SequenceParallel()
        plan["lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if plan:
        parallelize_module(module, tp_mesh, plan)
    for layer in _layers(module):
        parallelize_module(
            layer,
            tp_mesh,
            {
                "input_layernorm": SequenceParallel(),
                "self_attn": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
                ),
                "self_attn.q_proj": ColwiseParallel(),
                "self_attn.k_proj": ColwiseParallel(),
                "self_attn.v_proj": ColwiseParallel(),
                "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                "post_attention_layernorm": SequenceParallel(),
                "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "mlp.gate_proj": ColwiseParallel(),
                "mlp.up_proj": ColwiseParallel(),
                "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
            },
        )


def _layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    layers = module.model.layers
    return list(layers.values()) if isinstance(layers, torch.nn.ModuleDict) else list(layers)


def apply_fsdp(module: torch.nn.Module, dp_mesh: Any, mp_policy: Any) -> None:
    """``fully_shard`` each decoder layer, then the root (what is left: embedding, final norm, output layer)."""
    from torch.distributed.fsdp import fully_shard

    for layer in _layers(module):
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp_policy)
    fully_shard(module, mesh=dp_mesh, mp_policy=mp_policy)


def split_stage(module: torch.nn.Module, stage: int, pp: int) -> None:
    """Turn the whole :class:`~wsd_pretrain.model.LlamaLM` into pipeline stage ``stage`` of ``pp``, in place,
    torchtitan's way: the other stages' decoder layers removed (``model.layers`` becomes a ModuleDict keyed by the
    global layer index, so ``model.layers.5.mlp.up_proj.weight`` keeps its name), the embedding kept on the first
    stage only, the final norm and the output layer on the last only. Every rank builds the whole model from the
    same seed first, so a stage holds exactly the weights the unsplit model would."""
    keep = stage_layers(module.cfg.num_layers, pp)[stage]
    module.model.layers = torch.nn.ModuleDict({str(i): module.model.layers[i] for i in keep})
    if stage != 0:
        module.model.embed_tokens = None
    if stage != pp - 1:
        module.model.norm = None
        module.lm_head = None


def pipeline_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss of a microbatch: the model's own mean cross-entropy (the schedule averages the
    microbatches' gradients, ``scale_grads``)."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def build_pipeline(module: torch.nn.Module, mesh: Any, layout: Layout, cfg: ParallelConfig, device: torch.device):
    """This rank's ``PipelineStage`` of the (already split, TP'd and sharded) stage module and the schedule that
    steps it: GPipe or 1F1B over ``cfg.microbatches`` microbatches on the mesh's ``pp`` dimension."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    stage_index = mesh.get_local_rank("pp")
    stage = PipelineStage(module, stage_index, layout.pp, device, group=mesh["pp"].get_group())
    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[cfg.pp_schedule]
    return stage, kind(stage, n_microbatches=cfg.microbatches or layout.pp, loss_fn=pipeline_loss)


def clip_grad_norm_pp(params: list[torch.nn.Parameter], max_norm: float, pp_group: Any) -> float:
    """Clip the gradient norm of the whole model when each rank holds one pipeline stage's (DTensor) gradients:
    each stage's norm over its mesh, squared, summed over the pipeline group, as torchtitan does."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0) if grads else torch.zeros(())
    if isinstance(total, DTensor):
        total = total.full_tensor()
    total = total.float().pow(2)
    dist.all_reduce(total, group=pp_group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm


# ---------------------------------------------------------------------------------------------- memory


GiB = 2**30


def memory_per_gpu(
    model: Any,
    layout: Layout,
    *,
    micro_batch_size: int,
    seq_len: int,
    microbatches: int | None = None,
    activation_checkpointing: bool = False,
) -> dict[str, float]:
    """Bytes per GPU of a Llama (``model``: a :class:`~wsd_pretrain.model.ModelConfig`) trained by the FSDP2
    engine on ``layout`` in bf16 mixed precision, for the busiest pipeline stage (the first).

    ``state``: fp32 parameters, fp32 gradients and AdamW's two fp32 moments, each rank's share as the checkpoint
    cost model (:func:`wsd_pretrain.checkpoint.costs.engine_items`, the partitions FSDP2 + TP give) counts it
    (the gradients are the parameters' partition); ``gathered``: the bf16 TP-local weights of two decoder layers
    unsharded at once (the one computing and the one prefetched); ``activations``: what a decoder layer keeps for
    its backward with flash attention and sequence parallelism (34 x seq x batch x hidden / tp bytes in bf16,
    Korthikanti et al. 2022) for every layer of the stage and every microbatch in flight (1F1B: up to ``pp`` on
    the first stage), or, with activation checkpointing, each layer's bf16 input plus one layer's activations;
    ``logits``: the fp32 logits and their gradient on the last stage's output (Colwise: vocab / tp per rank).
    """
    from .checkpoint.costs import engine_items

    shapes = _stage_shapes(model, layout.pp, stage=0)
    world = layout.dp_shard * layout.tp  # a stage's state is sharded over its (dp_shard, tp) ranks
    items = engine_items("fsdp2", shapes, world, tp=layout.tp)
    import numpy as np

    per_rank = np.zeros(world, dtype=np.float64)
    for item in items:
        if item.numel == 0:
            continue
        # the gradients: fp32, the parameters' own partition (FSDP2 reduce-scatters them into it)
        times = 2 if item.group == "model" else 1
        if item.partition.replicated:
            per_rank += times * item.nbytes
        else:
            size = item.nbytes // item.numel
            per_rank += times * item.partition.bytes_by_rank(item.numel, world, size)
    state = float(per_rank.max())
    h, layers = model.hidden_size, len(stage_layers(model.num_layers, layout.pp)[0])
    per_layer = (model.num_parameters() - model.vocab_size * h * 2 - h) / model.num_layers
    gathered = 2 * per_layer / layout.tp * 2
    in_flight = (microbatches or layout.pp) if layout.pp > 1 else 1
    mb = micro_batch_size // in_flight if layout.pp > 1 else micro_batch_size
    sbh = seq_len * mb * h
    layer_acts = 34 * sbh / layout.tp
    if activation_checkpointing:
        activations = in_flight * layers * 2 * sbh / layout.tp + layer_acts
    else:
        activations = in_flight * layers * layer_acts
    logits = 2 * 4 * seq_len * mb * model.vocab_size / layout.tp
    total = state + gathered + activations + logits
    return {"state": state, "gathered": gathered, "activations": activations, "logits": logits, "total": total}


def _stage_shapes(model: Any, pp: int, stage: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv, v = model.hidden_size, model.intermediate_size, model.num_kv_heads * model.head_dim, model.vocab_size
    layers = stage_layers(model.num_layers, pp)[stage]
    shapes: list[tuple[str, tuple[int, ...]]] = []
    if stage == 0:
        shapes.append(("model.embed_tokens.weight", (v, h)))
    for n in layers:
        p = f"model.layers.{n}."
        shapes += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    if stage == pp - 1:
        shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes
