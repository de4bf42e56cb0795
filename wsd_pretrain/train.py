"""The training entry point: ``wsd-pretrain train`` / ``python -m wsd_pretrain.train``.

One plain process, ``torchrun`` (one or several nodes) or the ``deepspeed`` launcher; engine from the config
(DDP, FSDP2, DeepSpeed ZeRO 0-3). Modes: a fresh run; ``--resume auto|PATH``; a continuation from a pre-decay
(WSD) or post-decay (WSD-S) checkpoint with a new total (``--continue-from``); a cooldown branch from a stable
checkpoint (``--cooldown-from`` with ``--cooldown-steps``); branching WSD from the schedule's ``mode``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from . import distributed as D
from .checkpoint import coord, objstore
from .checkpoint import format as F
from .checkpoint.manager import CheckpointConfig, CheckpointManager
from .checkpoint.rng import seed_everything
from .checkpoint.storage import ObjectURL, parse_location, store_for
from .config import apply_overrides, build, dump_config, load_config
from .data import DataConfig, PhasedSampler, ShardedSampler, TokenData, describe
from .deepspeed_scheduler import SCHEDULER_TYPE
from .errors import ConfigError, WSDError
from .model import LlamaLM, ModelConfig
from .parallel import Layout, ParallelConfig, check_parallel, world_from_env
from .schedule import WSDSchedule
from .scheduler import WSDScheduler
from .tracking import Tracker, TrackingConfig, check_available
from .wsm import MERGED, WSMConfig, WSMPlan

__all__ = ["DeepSpeedPlan", "JobConfig", "OptimizerConfig", "TrainConfig", "deepspeed_plan", "main", "resolve_job"]

log = logging.getLogger("wsd_pretrain")

DEFAULT_SCHEDULE: dict[str, Any] = {
    "total": 300,
    "warmup": 30,
    "milestones": "end",
    "decay_fraction": 0.2,
    "decay_shape": "1-sqrt",
    "min_lr_ratio": 0.0,
}


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The ``optimizer:`` section (AdamW)."""

    lr: float = 3e-3
    """Base (peak) learning rate; the schedule multiplies it."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    eps: float = 1e-8

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr={self.lr!r}: a number > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas!r}: two numbers in [0, 1)")
        if not self.weight_decay >= 0:
            problems.append(f"weight_decay={self.weight_decay!r}: >= 0")
        if problems:
            raise ConfigError(problems, where="optimizer config")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The ``train:`` section."""

    engine: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    """ddp (also a single plain process), fsdp2 (fully_shard), or deepspeed (ZeRO from ds_config)."""
    ds_config: str | None = None
    """DeepSpeed config JSON (engine: deepspeed), relative to the job config file. Its optimizer section runs as
    written (DeepSpeed builds the optimizer) and its ``"type": "WSD"`` scheduler section is the schedule; batch
    sizes, precision and clipping come from this section (docs/training.md)."""
    zero_stage: int | None = None
    """Override the ds_config's ZeRO stage (0-3)."""
    micro_batch_size: int = 16
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer update."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16 autocast for DDP, mixed precision for FSDP2, DeepSpeed's bf16/fp16)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0: off)."""
    seed: int = 0
    log_every: int = 10
    eval_every: int | None = 100
    """Validation every N updates (null: only at the end)."""
    eval_batches: int = 8
    progress: bool = True
    """Show a progress bar on rank 0."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward (keeps only each layer's input)."""

    def __post_init__(self) -> None:
        problems = []
        if self.engine not in ("ddp", "fsdp2", "deepspeed"):
            problems.append(f"engine={self.engine!r}: 'ddp', 'fsdp2' or 'deepspeed'")
        if self.engine == "deepspeed" and not self.ds_config:
            problems.append("engine=deepspeed needs ds_config (e.g. configs/ds_zero2.json)")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            problems.append(f"zero_stage={self.zero_stage!r}: 0, 1, 2 or 3")
        for name in ("micro_batch_size", "grad_accum", "log_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r}: a whole number >= 1")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            problems.append(f"eval_every={self.eval_every!r}: a whole number >= 1, or null")
        if self.dtype == "fp16" and self.engine != "deepspeed":
            problems.append("dtype=fp16 needs engine=deepspeed (its loss scaler); use bf16 with ddp or fsdp2")
        if problems:
            raise ConfigError(problems, where="train config")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole job: one dataclass per section of the config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    decay_data: DataConfig | None = None
    """The ``decay_data:`` section: the data the decays read (its keys over the ``data:`` section's), or None."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: WSDSchedule = field(default_factory=lambda: WSDSchedule(**DEFAULT_SCHEDULE))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wsm: WSMConfig = field(default_factory=WSMConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """The ``parallel:`` section: the FSDP2 engine's (pp, dp_replicate, dp_shard, tp) mesh (parallel.py)."""

    def to_dict(self) -> dict[str, Any]:
        names = ("model", "data", "optimizer", "checkpoint", "train", "wsm", "tracking", "parallel")
        out = {name: asdict(getattr(self, name)) for name in names}
        out["schedule"] = self.schedule.to_dict()
        if self.decay_data is not None:
            out["decay_data"] = asdict(self.decay_data)
        return out


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "decay_data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": WSDSchedule,
    "checkpoint": CheckpointConfig,
    "train": TrainConfig,
    "wsm": WSMConfig,
    "tracking": TrackingConfig,
    "parallel": ParallelConfig,
}


def _with_schedule_defaults(section: Any) -> Any:
    """A config's schedule section over the tiny default's (a length given one way drops the other default)."""
    if section is None:
        return dict(DEFAULT_SCHEDULE)
    if not isinstance(section, dict):
        return section
    base = dict(DEFAULT_SCHEDULE)
    if "decay_length" in section:
        base.pop("decay_fraction")
    return {**base, **section}


def resolve_job(
    config: dict[str, Any],
    *,
    total_steps: int | None = None,
    save_every: int | None = None,
    config_dir: str | os.PathLike[str] | None = None,
) -> JobConfig:
    """Turn a config mapping (file + overrides) into a validated :class:`JobConfig`.

    ``config_dir``: the config file's folder, against which a relative ``train.ds_config`` is read. With
    ``engine: deepspeed`` and a ds_config whose scheduler section is ``"type": "WSD"``, that section is the
    schedule (the job's own ``schedule:`` settings must agree with it); ``total_steps`` rescales whichever it is.
    """
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; sections: {sorted(SECTIONS)}", where="config")
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        if name == "schedule":
            continue  # after the train section, which may name a ds_config that defines it
        if name == "decay_data":
            section = config.get(name)
            if section is None:
                continue
            if not isinstance(section, dict):
                problems.append(f"decay_data: expected a mapping of data settings, got {type(section).__name__}")
                continue
            base = config.get("data") if isinstance(config.get("data"), dict) else {}
            try:
                parts[name] = build(cls, {**base, **section}, where="decay_data section (over the data section)")
            except ConfigError as exc:
                problems += [f"decay_data: {p}" for p in exc.problems]
            continue
        try:
            parts[name] = build(cls, config.get(name), where=f"{name} section")
        except ConfigError as exc:
            problems += [f"{name}: {p}" for p in exc.problems]
    train = parts.get("train")
    if train is not None and train.ds_config and config_dir is not None and not Path(train.ds_config).is_absolute():
        # a ds_config named in a config file is relative to that file
        parts["train"] = train = replace(train, ds_config=str(Path(config_dir) / train.ds_config))
    try:
        if train is not None and train.engine == "deepspeed" and train.ds_config:
            path = Path(train.ds_config)
            ds_schedule, _ = _ds_schedule(_read_ds_config(path).get("scheduler"), config.get("schedule"), path)
            if ds_schedule is not None:
                parts["schedule"] = ds_schedule
        if "schedule" not in parts:
            parts["schedule"] = build(
                WSDSchedule, _with_schedule_defaults(config.get("schedule")), where="schedule section"
            )
    except ConfigError as exc:
        problems += [f"schedule: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems, where="job config")
    job = JobConfig(**parts)
    if total_steps is not None:
        job = replace(job, schedule=job.schedule.rescaled(total_steps))
    if save_every is not None:
        job = replace(job, checkpoint=replace(job.checkpoint, every_steps=save_every))
    for name in ("data", "decay_data"):
        section = getattr(job, name)
        if section is not None and job.model.max_seq_len < section.seq_len:
            raise ConfigError(
                f"{name}.seq_len={section.seq_len} is longer than model.max_seq_len={job.model.max_seq_len}",
                where="job config",
            )
    if job.wsm.enabled:
        if job.decay_data is not None:
            raise ConfigError(
                "decay_data is what the decays read, and wsm.enabled trains without decays: drop one of them",
                where="job config",
            )
        WSMPlan.build(job.wsm, job.schedule, job.checkpoint)  # refused now (and by --dry-run), naming each fix
    # the layout against the engine, the model and the data, and the launcher's world size when there is one
    problems = check_parallel(job, world_from_env())
    if problems:
        raise ConfigError(problems, where="job config")
    check_available(job.tracking)  # a tracker whose package is missing: refused before any work
    return job


# ---------------------------------------------------------------------------------------------- building


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    ):
        # one rule for every launcher: the device init_distributed made current (distributed.choose_cuda_device)
        index = D.device_index()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _param_groups(model: torch.nn.Module, weight_decay: float | None) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases): two param groups, each with its own base LR.
    ``weight_decay=None``: the matrices take the optimizer's own (a ds_config optimizer section's)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    first: dict[str, Any] = (
        {"params": decay} if weight_decay is None else {"params": decay, "weight_decay": weight_decay}
    )
    return [first, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class DeepSpeedPlan:
    """What the job takes from its ds_config: the config DeepSpeed gets, and the sections that run as written."""

    config: dict[str, Any]
    """The ds_config for ``deepspeed.initialize``: the user's, with its scheduler section taken out (the job builds
    the WSD scheduler) and batch sizes, clipping and precision from the ``train:`` section."""
    optimizer: dict[str, Any] | None
    """The ds_config's optimizer section, or None (then the job's ``optimizer:`` section: a torch AdamW)."""
    schedule: WSDSchedule | None
    """The ds_config's ``"type": "WSD"`` scheduler section, or None (then the job's ``schedule:`` section)."""
    scheduler_args: dict[str, Any]
    """``warmup_start_lr`` / ``tokens_per_step`` from that section."""


def _read_ds_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"train.ds_config={str(path)!r} does not exist (a relative path is read against the job config file's "
            "folder)",
            where="train config",
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}", where="train config") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(cfg).__name__}", where="train config")
    return cfg


def _ds_schedule(section: Any, explicit: Any, path: Path) -> tuple[WSDSchedule | None, dict[str, Any]]:
    """The ds_config's scheduler section as a WSD schedule (None without one), checked against the keys the job's
    own ``schedule:`` section sets explicitly (the job's defaults do not count)."""
    if section is None:
        return None, {}
    where = f"{path} scheduler section"
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        raise ConfigError('expected {"type": "WSD", "params": {...}}', where=where)
    if section["type"].upper() != SCHEDULER_TYPE:
        raise ConfigError(
            f"type {section['type']!r} is not a WSD schedule. This job's learning rate and its checkpoints (at each "
            "pre-decay and post-decay point) follow a WSD schedule: remove the section (the job's schedule: "
            'section then drives the LR) or write it as "type": "WSD" with WSDSchedule\'s fields (docs/training.md)',
            where=where,
        )
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"params must be an object, got {type(params).__name__}", where=where)
    params = dict(params)
    scheduler_args = {k: params.pop(k) for k in ("warmup_start_lr", "tokens_per_step") if k in params}
    schedule = build(WSDSchedule, params, where=where)
    if explicit:
        theirs = schedule.to_dict()
        try:
            merged = build(WSDSchedule, {**params, **explicit}, where="schedule").to_dict()
            differ = [k for k in explicit if merged.get(k) != theirs.get(k)]
        except ConfigError:
            differ = list(explicit)
        if differ:
            both = ", ".join(f"{k} ({explicit[k]!r} in the job, {theirs.get(k)!r} in the ds_config)" for k in differ)
            raise ConfigError(
                f"the job's schedule section and the ds_config's WSD scheduler section disagree: {both}. Define the "
                "schedule in one place: drop those schedule settings from the job, or the scheduler section from "
                "the ds_config",
                where="job config",
            )
    return schedule, scheduler_args


def deepspeed_plan(job: JobConfig, raw_config: dict[str, Any]) -> DeepSpeedPlan:
    """Read ``train.ds_config`` once and decide which of its sections run (see docs/training.md).

    * ``optimizer``: DeepSpeed builds it as written (FusedAdam, DeepSpeedCPUAdam under ZeRO-Offload, ...); a job
      config that also has an ``optimizer:`` section is refused (two definitions of one optimizer).
    * ``scheduler``: ``"type": "WSD"`` defines the schedule (a job ``schedule:`` setting that disagrees with it is
      refused); any other type is refused, because the job's checkpoints follow the WSD schedule's decay points.
    * batch sizes, gradient clipping and precision come from the ``train:`` section, as before.

    ``raw_config`` is the job config as given (file and overrides), to tell explicit settings from defaults.
    """
    path = Path(job.train.ds_config or "")
    cfg = _read_ds_config(path)
    autotp = cfg.get("tensor_parallel", {}).get("autotp_size", 1) if isinstance(cfg.get("tensor_parallel"), dict) else 1
    if isinstance(autotp, int) and autotp > 1:
        raise ConfigError(
            f"the ds_config {path} sets tensor_parallel.autotp_size={autotp}: DeepSpeed AutoTP, which the checkpoint "
            "manager refuses today (docs/decisions.md, 96): train with train.engine=fsdp2 and parallel.tp, or "
            "remove the tensor_parallel section",
            where="job config",
        )
    schedule, scheduler_args = _ds_schedule(cfg.pop("scheduler", None), raw_config.get("schedule"), path)
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, dict) or not isinstance(optimizer.get("type"), str):
            raise ConfigError(
                'the optimizer section must be {"type": "AdamW", "params": {...}}', where=f"{path} optimizer section"
            )
        if raw_config.get("optimizer") is not None:
            raise ConfigError(
                f"the ds_config {path} has an optimizer section (type {optimizer['type']!r}) and the job config an "
                "optimizer: section: remove one (with the ds_config's, DeepSpeed builds its own optimizer; with the "
                "job's, a torch AdamW is the client optimizer)",
                where="job config",
            )
    else:
        cfg["zero_allow_untested_optimizer"] = True  # the client torch AdamW
    _check_ds_train_settings(cfg, job, path)
    cfg["train_micro_batch_size_per_gpu"] = job.train.micro_batch_size
    cfg["gradient_accumulation_steps"] = job.train.grad_accum
    cfg["gradient_clipping"] = job.train.grad_clip
    cfg.setdefault("steps_per_print", 10**9)
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": job.train.dtype == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": job.train.dtype == "fp16"}
    if job.train.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = job.train.zero_stage
    if job.parallel.pp > 1:
        _pipeline_ds_config(cfg, job, path)
    return DeepSpeedPlan(config=cfg, optimizer=optimizer, schedule=schedule, scheduler_args=scheduler_args)


def _pipeline_ds_config(cfg: dict[str, Any], job: JobConfig, path: Path) -> None:
    """``parallel.pp > 1`` on DeepSpeed: ZeRO 0/1 only, and each micro-step's ``train.micro_batch_size`` sequences
    cut into ``parallel.microbatches`` pipeline microbatches (DeepSpeed's micro batch and accumulation steps)."""
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, 1):
        raise ConfigError(
            f"ZeRO stage {stage} (from {'train.zero_stage' if job.train.zero_stage is not None else path}) with "
            f"parallel.pp={job.parallel.pp}: DeepSpeed's PipelineEngine runs ZeRO 0 or 1 only (stage 2 partitions the "
            "gradients the pipeline accumulates over its microbatches); set train.zero_stage=1 or use "
            "configs/ds_zero1.json",
            where="job config",
        )
    n = job.parallel.microbatches or job.parallel.pp
    cfg["train_micro_batch_size_per_gpu"] = job.train.micro_batch_size // n
    cfg["gradient_accumulation_steps"] = job.train.grad_accum * n


def _check_ds_train_settings(cfg: dict[str, Any], job: JobConfig, path: Path) -> None:
    """The loop and the data sampler run on the ``train:`` section's batch sizes, clipping and precision, so a
    ds_config that says otherwise is refused, naming both values ("auto" agrees with anything). Silently replacing
    the ds_config's value would train another job than the file describes. ``train_batch_size`` stays in the
    config: DeepSpeed checks it against micro batch x accumulation x world size itself."""
    pairs: list[tuple[str, Any, Any, str]] = [
        (
            "train_micro_batch_size_per_gpu",
            cfg.get("train_micro_batch_size_per_gpu"),
            job.train.micro_batch_size,
            "train.micro_batch_size",
        ),
        (
            "gradient_accumulation_steps",
            cfg.get("gradient_accumulation_steps"),
            job.train.grad_accum,
            "train.grad_accum",
        ),
        ("gradient_clipping", cfg.get("gradient_clipping"), job.train.grad_clip, "train.grad_clip"),
    ]
    for dtype in ("bf16", "fp16"):
        section = cfg.get(dtype)
        enabled = section.get("enabled") if isinstance(section, dict) else None
        if enabled is not None and enabled != "auto":
            pairs.append(
                (f"{dtype}.enabled", bool(enabled), job.train.dtype == dtype, f"train.dtype ({job.train.dtype!r})")
            )
    differ = [
        f"{key} is {theirs!r} in the ds_config, {ours!r} from {where}"
        for key, theirs, ours, where in pairs
        if theirs is not None and theirs != "auto" and theirs != ours
    ]
    if differ:
        raise ConfigError(
            f"the ds_config {path} and the job's train: section disagree: " + "; ".join(differ) + ". The training "
            "loop and the data sampler use the train: section: make the two agree, or drop the keys from the "
            "ds_config (the job fills them in)",
            where="job config",
        )


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and each param group's hyperparameters (plain JSON), for the run log."""
    groups = []
    for g in optimizer.param_groups:
        groups.append(
            {
                k: (list(v) if isinstance(v, (tuple, list)) else v)
                for k, v in sorted(g.items())
                if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))
            }
        )
    out: dict[str, Any] = {"class": type(optimizer).__name__, "param_groups": groups}
    if isinstance(getattr(optimizer, "adam_w_mode", None), (bool, int)):  # DeepSpeed's Adams: AdamW or Adam+L2
        out["adam_w_mode"] = bool(optimizer.adam_w_mode)
    return out


@dataclass
class Built:
    model: Any  # what forward/backward run on (DDP/FSDP2 module or DeepSpeed engine)
    module: LlamaLM
    optimizer: torch.optim.Optimizer
    scheduler: WSDScheduler
    engine: Any = None
    layout: Layout | None = None
    """The (pp, dp_replicate, dp_shard, tp) degrees; None: plain data parallelism over every rank."""
    pipeline: Any = None
    """With pp > 1: the schedule (GPipe or 1F1B) that steps this rank's stage; ``model`` is then the stage module."""
    pp_group: Any = None
    pp_stage: int = 0
    checkpoint_pipeline: Any = None
    """The manager's ``pipeline=`` argument (checkpoint.Pipeline) with pp > 1."""
    ds_pipe_microbatches: int = 0
    """DeepSpeed's PipelineEngine (engine deepspeed, pp > 1): pipeline microbatches per micro-step; 0: not one."""

    @property
    def last_stage(self) -> bool:
        return self.layout is None or self.pp_stage == self.layout.pp - 1


def build_engine(
    job: JobConfig,
    schedule: WSDSchedule,
    device: torch.device,
    tokens_per_step: int,
    ds_plan: DeepSpeedPlan | None = None,
) -> Built:
    torch.manual_seed(job.train.seed)
    engine = job.train.engine
    # the FSDP2 engine builds on the meta device, cuts (stage, TP, fully_shard), then materialises and initialises
    # each rank's own shards (docs/decisions.md): a rank never holds the whole model; the values are the same as a
    # whole model built in one process (wsd_pretrain.init: a function of the seed, the name and the index)
    meta_init = engine == "fsdp2"
    if meta_init:
        with torch.device("meta"):
            module = LlamaLM(job.model, seed=job.train.seed)
    else:
        module = LlamaLM(job.model, seed=job.train.seed).to(device)
    for layer in module.model.layers:
        layer.checkpointing = job.train.activation_checkpointing
    opt_cfg = job.optimizer
    if engine == "deepspeed":
        ds_plan = ds_plan or deepspeed_plan(job, {})
        scheduler_args = dict(ds_plan.scheduler_args)
        given = scheduler_args.pop("tokens_per_step", None)
        if given is not None and given != tokens_per_step:
            raise ConfigError(
                f"the ds_config's scheduler section says tokens_per_step={given!r}, but an update of this job is "
                f"{tokens_per_step} tokens (micro batch x accumulation x ranks x sequence length): remove it",
                where="job config",
            )
        return _build_deepspeed(job, module, schedule, device, tokens_per_step, ds_plan, scheduler_args)
    model: Any = module
    layout = None
    extra: dict[str, Any] = {}
    if engine == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from .parallel import apply_fsdp, apply_tp, build_mesh, build_pipeline, materialize, split_stage

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if job.train.dtype == "bf16" else MixedPrecisionPolicy()
        layout = job.parallel.resolved(D.get_world_size())
        if job.parallel.multi_dim:
            mesh = build_mesh(layout, device)
            if layout.pp > 1:  # this rank's stage of the whole model (on meta: nothing allocated yet)
                extra["pp_stage"] = mesh.get_local_rank("pp")
                split_stage(module, extra["pp_stage"], layout.pp)
            if layout.tp > 1:
                apply_tp(module, mesh["tp"])
            apply_fsdp(module, mesh["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else mesh["dp_shard"], mp)
            materialize(module, device)
            if layout.pp > 1:
                from .checkpoint.pipeline import Pipeline

                _, extra["pipeline"] = build_pipeline(module, mesh, layout, job.parallel, device)
                extra["pp_group"] = mesh["pp"].get_group()
                extra["checkpoint_pipeline"] = Pipeline(group=mesh["pp"])
        else:
            apply_fsdp(module, None, mp)
            materialize(module, device)
    elif D.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    # after fully_shard, which replaces each parameter by its DTensor shard: the optimizer steps those
    optimizer = torch.optim.AdamW(
        _param_groups(module, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps
    )
    scheduler = WSDScheduler(optimizer, schedule, tokens_per_step=tokens_per_step)
    return Built(model, module, optimizer, scheduler, layout=layout, **extra)


def _build_deepspeed(
    job: JobConfig,
    module: LlamaLM,
    schedule: WSDSchedule,
    device: torch.device,
    tokens_per_step: int,
    plan: DeepSpeedPlan,
    scheduler_args: dict[str, Any],
) -> Built:
    from .deepspeed_scheduler import deepspeed_initialize

    if job.train.dtype == "fp16" and device.type == "cpu":
        from deepspeed.accelerator import get_accelerator

        get_accelerator().is_fp16_supported = lambda: True  # torch runs fp16 on any CPU (docs/decisions.md)
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        # DeepSpeed would pick cuda:<LOCAL_RANK>; with one GPU per task (srun --gpus-per-task=1) that is cuda:0
        kwargs["args"] = argparse.Namespace(device_rank=device.index)
    factory = WSDScheduler.factory(schedule, tokens_per_step=tokens_per_step, **scheduler_args)
    model: torch.nn.Module = module
    if job.parallel.pp > 1:  # DeepSpeed's PipelineEngine: this rank's stage of the whole model (ds_pipe.py)
        from .ds_pipe import build_pipeline_module

        model = build_pipeline_module(module, job.parallel.pp, job.train.activation_checkpointing)
    if plan.optimizer is not None:
        # DeepSpeed builds the ds_config's optimizer on these groups: the matrices take its weight_decay, norms
        # and biases none (as with the job's own AdamW); the scheduler is built on the optimizer DeepSpeed steps
        kwargs.update(model_parameters=_param_groups(model, None))
    else:
        opt_cfg = job.optimizer
        client = torch.optim.AdamW(
            _param_groups(model, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps
        )
        kwargs.update(optimizer=client)
    try:
        ds_engine, _, _, scheduler = deepspeed_initialize(
            model=model, lr_scheduler=factory, config=plan.config, **kwargs
        )
    except WSDError:
        raise
    except (ValueError, AssertionError, NotImplementedError) as exc:
        what = f"its optimizer section (type {plan.optimizer['type']!r})" if plan.optimizer else "it"
        raise ConfigError(
            f"DeepSpeed refused {what}: {type(exc).__name__}: {exc}", where=f"ds_config {job.train.ds_config}"
        ) from exc
    if job.parallel.pp > 1:
        return _ds_pipe_built(job, module, ds_engine, scheduler)
    return Built(ds_engine, module, scheduler.optimizer, scheduler, engine=ds_engine)


def _ds_pipe_built(job: JobConfig, module: LlamaLM, ds_engine: Any, scheduler: WSDScheduler) -> Built:
    """The PipelineEngine as the loop's engine: its layout (stages outermost, as DeepSpeed's grid and the FSDP2
    mesh order ranks) and the manager's name map to the model's own names."""
    from .checkpoint.pipeline import Pipeline
    from .ds_pipe import hf_name

    world, rank, pp = D.get_world_size(), D.get_rank(), job.parallel.pp
    layout = Layout(pp=pp, dp_replicate=1, dp_shard=world // pp, tp=1)
    stage, dp_rank = int(ds_engine.stage_id), int(ds_engine.grid.get_data_parallel_rank())
    if stage != layout.coords(rank)["pp"] or dp_rank != layout.dp_rank(rank):
        raise ConfigError(
            f"DeepSpeed's pipeline grid puts rank {rank} at stage {stage}, data-parallel rank {dp_rank}; the job "
            f"expects stage {layout.coords(rank)['pp']}, data-parallel rank {layout.dp_rank(rank)}",
            where="DeepSpeed pipeline",
        )
    return Built(
        ds_engine,
        module,
        scheduler.optimizer,
        scheduler,
        engine=ds_engine,
        layout=layout,
        pp_stage=stage,
        checkpoint_pipeline=Pipeline(names=hf_name),
        ds_pipe_microbatches=job.parallel.microbatches or pp,
    )


# ---------------------------------------------------------------------------------------------- the loop


class Trainer:
    """The loop: micro-steps, the optimizer update, the scheduler, metrics, evaluation and ``maybe_save``."""

    def __init__(
        self,
        job: JobConfig,
        run_dir: Path,
        built: Built,
        data: TokenData,
        sampler: PhasedSampler,
        manager: CheckpointManager,
        device: torch.device,
        *,
        decay_data: TokenData | None = None,
    ) -> None:
        self.job, self.run_dir, self.b, self.data, self.sampler = job, run_dir, built, data, sampler
        self.decay_data = decay_data
        self.manager, self.device = manager, device
        self.wsm: WSMPlan | None = None  # the decay-free mode: a merged model at each milestone (wsm.py)
        self.rank, self.world = D.get_rank(), D.get_world_size()
        layout = built.layout or Layout(1, 1, self.world, 1)
        self.dp_rank, self.dp_size = layout.dp_rank(self.rank), layout.dp
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tracker = Tracker(job.tracking, run_dir, active=False)  # _train sets rank 0's
        self._saves: list[tuple[int, Path, Any, float, float]] = []  # (step, path, pending, started, blocked)
        self.after_save: Any = None  # rank 0 of an object-storage run: copy metrics.jsonl to the bucket
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if job.train.dtype == "bf16" and job.train.engine == "ddp"
            else nullcontext()
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def report_saves(self, *, final: bool = False) -> None:
        """Hand each committed checkpoint to the tracker once: a synchronous save at once, an async one when its
        writer has committed it (``final``: after ``manager.close()``, which waited for every save)."""
        if not self._saves or not self.tracker.active:
            self._saves.clear()
            return
        left = []
        for step, path, pending, started, blocked in self._saves:
            if pending is not None and not (final or pending.done()):
                left.append((step, path, pending, started, blocked))
                continue
            if pending is not None and (pending.error or "committed_s" not in pending.stats):
                continue  # not committed: the manager has logged why
            if isinstance(path, Path) and not path.is_dir():
                continue  # a failed save (checkpoint.on_save_error=continue) or already removed by retention
            seconds = pending.stats["committed_s"] - started if pending is not None else blocked
            parsed = F.parse_name(path.name)
            kinds = parsed[1] if parsed is not None else []
            self.tracker.log_checkpoint(step, path, kinds, seconds, blocked)
        self._saves = left

    def _micro_step(self) -> float:
        data = self.decay_data if self.sampler.active == "decay" and self.decay_data is not None else self.data
        inputs, targets = data.train_batch(self.sampler.next_indices())
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if self.b.pipeline is not None:  # the schedule runs every microbatch's forward and backward of this stage
            losses: list[torch.Tensor] = []
            args = (inputs,) if self.b.pp_stage == 0 else ()
            if self.b.last_stage:
                self.b.pipeline.step(*args, target=targets, losses=losses)
                return float(torch.stack([x.detach().float() for x in losses]).mean())
            self.b.pipeline.step(*args)
            return 0.0  # only the last stage has the loss; _update averages it over the last stage's ranks
        if self.b.engine is not None:
            loss = self.b.engine(inputs, targets)
            self.b.engine.backward(loss)
            self.b.engine.step()
            return float(loss.detach())
        with self.autocast:
            loss = self.b.model(inputs, targets)
        (loss / self.job.train.grad_accum).backward()
        return float(loss.detach())

    def _ds_pipe_update(self) -> float:
        """One update of DeepSpeed's PipelineEngine: every rank draws the micro-steps' batches (the sampler moves
        alike on every stage), cut into the pipeline's microbatches; ``train_batch`` runs them (the first stage
        reads the inputs, the last the targets), steps the optimizer and the WSD scheduler, and returns the loss
        the last stage averaged over its data-parallel ranks, broadcast to every stage."""
        from .ds_pipe import pipe_batches

        data = self.decay_data if self.sampler.active == "decay" and self.decay_data is not None else self.data
        inputs, targets = [], []
        for _ in range(self.job.train.grad_accum):
            x, y = data.train_batch(self.sampler.next_indices())
            inputs.append(x.to(self.device))
            targets.append(y.to(self.device))
        loss = self.b.engine.train_batch(iter(pipe_batches(inputs, targets, self.b.ds_pipe_microbatches)))
        return float(loss.detach().double().cpu())

    def _update(self) -> float:
        if self.b.ds_pipe_microbatches:
            return self._ds_pipe_update()
        accum = self.job.train.grad_accum
        if self.b.engine is not None:
            losses = [self._micro_step() for _ in range(accum)]  # DeepSpeed steps the scheduler at the boundary
        else:
            model = self.b.model
            losses = []
            for i in range(accum):
                sync = nullcontext() if (i == accum - 1 or not hasattr(model, "no_sync")) else model.no_sync()
                with sync:
                    losses.append(self._micro_step())
            if self.job.train.grad_clip > 0 and self.b.pp_group is not None:
                from .parallel import clip_grad_norm_pp

                clip_grad_norm_pp(list(model.parameters()), self.job.train.grad_clip, self.b.pp_group)
            elif self.job.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.job.train.grad_clip)
            self.b.optimizer.step()
            self.b.optimizer.zero_grad(set_to_none=True)
            self.b.scheduler.step()
        loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        if D.is_distributed():
            import torch.distributed as dist

            loss = loss.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(loss)
            # with pipeline stages only the last stage's ranks (world / pp of them) contributed a loss
            loss = loss.cpu() / (self.world // (self.b.layout.pp if self.b.layout is not None else 1))
        return float(loss)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        n = self.data.num_valid
        if n == 0:
            return None
        micro = self.job.train.micro_batch_size
        model = self.b.engine if self.b.engine is not None else self.b.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for b in range(self.job.train.eval_batches):
            idx = [(b * micro * self.dp_size + self.dp_rank * micro + j) % n for j in range(micro)]
            inputs, targets = self.data.valid_batch(idx)
            if self.b.ds_pipe_microbatches:  # every stage gets the loss of the last (averaged over its dp ranks)
                from .ds_pipe import pipe_batches

                k = self.b.ds_pipe_microbatches
                batches = pipe_batches([inputs.to(self.device)], [targets.to(self.device)], k)
                total += float(self.b.engine.eval_batch(iter(batches), num_micro_batches=k).double().cpu())
                count += 1
                continue
            if self.b.pipeline is not None:  # forward only, through every stage; the last one has the loss
                losses: list[torch.Tensor] = []
                args = (inputs.to(self.device),) if self.b.pp_stage == 0 else ()
                if self.b.last_stage:
                    self.b.pipeline.eval(*args, target=targets.to(self.device), losses=losses)
                    total += float(torch.stack([x.float() for x in losses]).mean())
                    count += 1
                else:
                    self.b.pipeline.eval(*args)
                continue
            with self.autocast:
                total += float(model(inputs.to(self.device), targets.to(self.device)))
            count += 1
        model.train(was_training)
        value = torch.tensor([total, count], dtype=torch.float64)
        if D.is_distributed():
            import torch.distributed as dist

            value = value.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(value)
            value = value.cpu()
        return float(value[0] / value[1])

    def run(self) -> dict[str, Any]:
        """Train to the schedule's end (or a preemption); ``loss`` in the result is None when no update ran."""
        sched, job = self.b.scheduler, self.job
        bar = None
        if self.rank == 0 and job.train.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=sched.schedule.end,
                initial=sched.position if sched.schedule.units == "steps" else 0,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
                file=sys.stderr,
            )
        tokens_per_step = sched.tokens_per_step or 0
        t_last, last_loss, eval_loss = time.perf_counter(), None, None
        if sched.finished:
            log.info("the run is already finished at position %d: nothing to train", sched.position)
        steps_since, tok_s, eval_at = 0, 0.0, None
        while not sched.finished and not self.manager.should_stop:
            phase = sched.phase.name
            source = self.sampler.use("decay" if phase == "decay" else "main")
            lr = self.b.optimizer.param_groups[0]["lr"]
            last_loss = self._update()
            steps_since += 1
            record = {
                "position": sched.position,
                "step": sched.last_epoch,
                "trajectory": sched.schedule.trajectory_position(sched.position),
                "loss": last_loss,
                "lr": lr,
                "phase": phase,
                "tokens": sched.tokens,
            }
            if self.decay_data is not None:
                record["data"] = source  # which data this update read: "main" or "decay"
            if sched.last_epoch % job.train.log_every == 0 or sched.finished:
                now = time.perf_counter()
                tok_s = record["tokens_per_s"] = tokens_per_step * steps_since / max(now - t_last, 1e-9)
                t_last, steps_since = now, 0
            if job.train.eval_every and sched.last_epoch % job.train.eval_every == 0:
                eval_loss, eval_at = self.evaluate(), sched.position
                record["eval_loss"] = eval_loss
            events = [f"{e.kind}@{e.position}" for e in sched.events()]
            if events:
                record["events"] = events
            self._log(record)
            self.tracker.log_update(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", phase=phase, tok_s=f"{tok_s:.0f}", refresh=False
                )
            started = time.monotonic()
            saved = self.manager.maybe_save()
            if saved is not None:
                self._log({"position": sched.position, "checkpoint": saved.name})
                pending = self.manager.pending
                pending = pending if pending is not None and pending.final == saved else None
                self._saves.append((sched.last_epoch, saved, pending, started, time.monotonic() - started))
                if self.after_save is not None:
                    self.after_save()
            self.report_saves()
            merged = self.wsm.after_step(self.manager, sched.position) if self.wsm is not None else None
            if merged is not None:
                self._log({"position": sched.position, "merged": f"{MERGED}/{merged.name}"})
        if bar is not None:
            bar.close()
        final_eval = eval_loss if eval_at == sched.position else self.evaluate()
        if eval_at != sched.position:
            self._log({"position": sched.position, "eval_loss": final_eval, "final": True})
            self.tracker.log_eval(sched.last_epoch, final_eval)
        return {
            "position": sched.position,
            "step": sched.last_epoch,
            "loss": last_loss,
            "eval_loss": final_eval,
            "preempted": self.manager.should_stop and not sched.finished,
        }


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wsd-pretrain train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON job config (default: the tiny CPU default)")
    p.add_argument(
        "--run-dir",
        default="runs/tiny",
        help="run directory (default: runs/tiny): a local path, file:// or s3://bucket/prefix (az://container/prefix): "
        "checkpoints stream straight to the bucket and resume in place there (see --log-dir)",
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="local folder for the job's own files (metrics.jsonl, config.yaml, curves.png, tensorboard/): default "
        "the run directory; on an s3:// or az:// run checkpoint.staging_dir if set, else runs/<scheme>/<bucket>/"
        "<prefix>, and rank 0 also copies config.yaml and metrics.jsonl to the run's prefix on the bucket",
    )
    p.add_argument("--total-steps", type=int, default=None, help="rescale the schedule to this many updates")
    p.add_argument("--save-every", type=int, default=None, help="also save every N updates")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in the run dir, else fresh), none, a checkpoint name, or a checkpoint "
        "path or URL (s3:// or az://: read in place)",
    )
    p.add_argument(
        "--continue-from",
        default=None,
        help="continue a finished or stopped run from this checkpoint to the (new) schedule total: no "
        "re-warmup; from a pre-decay checkpoint this is WSD, from a post-decay one WSD-S (a local path, or s3:// / "
        "az://: read in place)",
    )
    p.add_argument(
        "--cooldown-from",
        default=None,
        help="branch a cooldown from this stable checkpoint (a local path, or s3:// / az://: read in place)",
    )
    p.add_argument("--cooldown-steps", type=int, default=None, help="length of the cooldown branch")
    p.add_argument(
        "--allow-optimizer-change",
        action="store_true",
        help="on resume, apply optimizer settings that differ from the checkpoint's (lr, betas, weight_decay); "
        "without it they are refused (eps and train.grad_clip are always applied, and logged)",
    )
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="on resume, read data other than the checkpoint's (data: or decay_data:); each changed source starts "
        "at its beginning. Without it a change is refused",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def _schedule_for(job: JobConfig, args: argparse.Namespace) -> tuple[WSDSchedule, Path | ObjectURL | None]:
    """The schedule of this run and the checkpoint to start from (continuation and cooldown modes)."""
    if args.continue_from and args.cooldown_from:
        raise ConfigError("give --continue-from or --cooldown-from, not both", where="arguments")
    source = args.continue_from or args.cooldown_from
    if source is None:
        if args.cooldown_steps is not None:
            raise ConfigError("--cooldown-steps goes with --cooldown-from", where="arguments")
        return job.schedule, None
    location = parse_location(source)
    if isinstance(location, ObjectURL):  # another run's checkpoint on the bucket: its manager reads it in place
        ckpt: Path | ObjectURL = objstore.resolve(location, damaged="error")
        manifest = objstore.load_manifest(store_for(ckpt), ckpt)[0]
    else:
        ckpt = F.resolve_checkpoint(location, damaged="error")
        manifest = F.load_manifest(ckpt)
    at = int(manifest.get("trajectory_position", manifest["position"]))
    saved = WSDSchedule.from_dict(manifest["schedule"]) if manifest.get("schedule") else job.schedule
    if args.cooldown_from:
        if not args.cooldown_steps:
            raise ConfigError("--cooldown-from needs --cooldown-steps N", where="arguments")
        return saved.cooldown(
            at=at,
            length=args.cooldown_steps,
            decay_shape=job.schedule.decay_shape,
            min_lr_ratio=job.schedule.min_lr_ratio,
        ), ckpt
    total = job.schedule.total
    if total <= at:
        raise ConfigError(
            f"--continue-from {ckpt.name} is at {at}; give a larger total (--total-steps or "
            f"schedule.total), now {total}",
            where="arguments",
        )
    decay = (
        {"decay_length": job.schedule.decay_length}
        if job.schedule.decay_length is not None
        else {"decay_fraction": job.schedule.decay_fraction}
    )
    return saved.continued(
        at=at,
        total=total,
        milestones="end",
        decay_shape=job.schedule.decay_shape,
        min_lr_ratio=job.schedule.min_lr_ratio,
        **decay,
    ), ckpt


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    config = apply_overrides(load_config(args.config, []), args.overrides)
    job = resolve_job(
        config,
        total_steps=args.total_steps,
        save_every=args.save_every,
        config_dir=args.config.parent if args.config is not None else None,
    )
    plan = deepspeed_plan(job, config) if job.train.engine == "deepspeed" else None
    if args.dry_run:
        print(_dump_job(job, plan))
        return {}
    info = D.init_distributed()
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = _train(job, args, plan)
    except BaseException:
        D.teardown(barrier=False)  # another rank may never reach a barrier
        raise
    D.teardown()
    return result


def _dump_job(job: JobConfig, plan: DeepSpeedPlan | None) -> str:
    """The resolved config as YAML; with a ds_config optimizer the job's optimizer section is not used: say so."""
    if plan is None or plan.optimizer is None:
        return dump_config(job.to_dict())
    data = job.to_dict()
    del data["optimizer"]
    return (
        f"# optimizer: the ds_config's optimizer section, built by DeepSpeed: {json.dumps(plan.optimizer)}\n"
        + dump_config(data)
    )


def _note_grad_clip(saved: dict[str, Any], now: float) -> None:
    """A resume applies the job's ``train.grad_clip`` (docs/training.md): say so when it differs."""
    old = saved.get("grad_clip") if isinstance(saved, dict) else None
    if old is not None and float(old) != float(now):
        log.info("resume: grad_clip: %r -> %r (checkpoint -> this job) applied", old, now)


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot hold checkpoints before any work is done (not at the first save)."""
    for path, what in ((run_dir, "the run directory"), (F.checkpoints_dir(run_dir), "its checkpoints folder")):
        if path.exists() and not path.is_dir():
            raise ConfigError(
                f"{path} ({what}) is a file, not a folder: move it away or give another --run-dir", where="arguments"
            )


def _listed(location: Path | ObjectURL) -> list[F.CheckpointInfo]:
    """The run's checkpoints, on disk or on the bucket."""
    return objstore.list_run(location) if isinstance(location, ObjectURL) else F.list_checkpoints(location)


def _resume_problem(
    run_dir: Path | ObjectURL, schedule: WSDSchedule, start_from: Path | ObjectURL | None, total_flag: bool
) -> str | None:
    """Rank 0, before ``resume("auto")``: why the run directory's newest checkpoint cannot be resumed under this
    schedule, with the command-line fix, or None (no checkpoint, or the same schedule)."""
    try:
        infos = [i for i in _listed(run_dir) if i.state == "complete"]
    except (OSError, WSDError):
        return None  # resume reports it
    if not infos or infos[-1].manifest is None or not infos[-1].manifest.get("schedule"):
        return None
    newest, saved = infos[-1], infos[-1].manifest["schedule"]
    mine = schedule.to_dict()
    if saved == mine:
        return None
    changed = ", ".join(
        f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}"
        for k in sorted(set(saved) | set(mine))
        if saved.get(k) != mine.get(k)
    )
    if start_from is not None:
        return (
            f"{run_dir} already holds checkpoints of another run (newest: {newest.name}, a schedule of total "
            f"{saved.get('total')}); --continue-from and --cooldown-from start a new run: give it a new --run-dir "
            f"(e.g. --run-dir {run_dir}-{start_from.name})"
        )
    return (
        f"{run_dir}'s newest checkpoint {newest.name} ran under another schedule ({changed}). To resume it, run "
        f"with its settings{' (drop --total-steps or give its total)' if total_flag else ''}. To train it to a new "
        f"total, continue it into a new run directory: --continue-from {newest.path} --total-steps N --run-dir "
        f"NEW_DIR; for a cooldown branch: --cooldown-from {newest.path} --cooldown-steps N --run-dir NEW_DIR"
    )


class _RunFiles:
    """Rank 0 of a run on object storage: the job's own files (config.yaml, metrics.jsonl, curves.png) are written
    in the local log folder and copied beside the run's checkpoints on the bucket (``<url>/<name>``, one PUT each):
    at the start, after each save and at the end. They are a record, not a commit: a failed copy is logged and the
    job goes on (the checkpoints are what resume reads)."""

    def __init__(self, url: ObjectURL, log_dir: Path) -> None:
        self.url, self.log_dir = url, log_dir
        self.store = store_for(url)

    def put(self, name: str) -> None:
        path = self.log_dir / name
        if not path.is_file():
            return
        try:
            self.store.put((self.url / name).key, path.read_bytes())
        except (OSError, WSDError) as exc:
            log.warning("could not copy %s to %s: %s (the job goes on)", path, self.url / name, exc)

    def fetch_missing(self, name: str) -> None:
        """A resume into an empty log folder (another node, a new machine): the run's copy on the bucket first."""
        path = self.log_dir / name
        if path.exists():
            return
        try:
            data, _ = self.store.get((self.url / name).key)
        except FileNotFoundError:
            return
        except (OSError, WSDError) as exc:
            log.warning("could not read %s: %s (the log folder starts empty)", self.url / name, exc)
            return
        path.write_bytes(data)
        log.info("%s: copied from %s (%d bytes)", path, self.url / name, len(data))


def _drop_replayed_metrics(path: Path, position: int) -> None:
    """Rank 0 after a resume at ``position``: records past it were written by the run that died and will be
    written again by the replay; keep each step once."""
    if not path.is_file():
        return
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1  # a line cut short by the kill
            continue
        if isinstance(rec, dict) and isinstance(rec.get("position"), int) and rec["position"] > position:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d record(s) after position %d (they are trained again)", dropped, position)


def _train(job: JobConfig, args: argparse.Namespace, plan: DeepSpeedPlan | None) -> dict[str, Any]:
    rank, world = D.get_rank(), D.get_world_size()
    # an s3:// (az://) run: every rank streams its checkpoints straight to the bucket (or through
    # checkpoint.staging_dir) and resumes in place; the job's own files (metrics.jsonl, config.yaml, curves.png,
    # tensorboard/) are written in a local log folder (--log-dir; default: the staging folder, else
    # runs/<scheme>/<bucket>/<prefix>) and rank 0 copies config.yaml and metrics.jsonl beside the run's checkpoints
    # on the bucket (never a local ./s3:/ tree)
    location = parse_location(args.run_dir)
    if isinstance(location, ObjectURL):
        if args.log_dir is not None:
            run_dir = args.log_dir
        elif job.checkpoint.staging_dir is not None:
            run_dir = Path(job.checkpoint.staging_dir)
        else:
            run_dir = Path("runs", location.scheme, location.bucket, location.key)
        run_files: _RunFiles | None = _RunFiles(location, run_dir) if rank == 0 else None
    else:
        run_dir = location if args.log_dir is None else args.log_dir
        run_files = None
        _check_run_dir(location)
    device = _device(job.train)
    schedule, start_from = _schedule_for(job, args)
    wsm = None
    if job.wsm.enabled:  # decay-free: train at the stable LR, merge snapshots at the milestones (wsm.py)
        if args.cooldown_from:
            raise ConfigError("--cooldown-from runs a decay: leave wsm.enabled off for it", where="arguments")
        wsm = WSMPlan.build(job.wsm, schedule, job.checkpoint)
        schedule = wsm.schedule
    data = TokenData(job.data)
    decay_data = TokenData(job.decay_data) if job.decay_data is not None else None
    for name, d in (("data", data), ("decay_data", decay_data)):
        if d is not None and d.min_vocab > job.model.vocab_size:
            raise ConfigError(
                f"the {name} has token ids up to {d.min_vocab - 1}; model.vocab_size={job.model.vocab_size} is too "
                "small",
                where="job config",
            )
    # the data-parallel ranks read different data; the ranks of one TP group (and of one pipeline) the same
    problems = check_parallel(job, world)
    if problems:
        raise ConfigError(problems, where="job config")
    layout = (
        job.parallel.resolved(world)
        if job.train.engine == "fsdp2" or job.parallel.pp > 1  # DeepSpeed's pipeline: pp x (world / pp)
        else Layout(1, 1, world, 1)
    )
    dp_rank, dp_size = layout.dp_rank(rank), layout.dp
    tokens_per_step = job.train.micro_batch_size * job.train.grad_accum * dp_size * job.data.seq_len
    built = build_engine(job, schedule, device, tokens_per_step, plan)
    log.info(
        "optimizer: %s",
        json.dumps(
            describe_optimizer(built.optimizer)
            | {"from": "ds_config" if plan is not None and plan.optimizer is not None else "job optimizer section"}
        ),
    )
    # the same initial weights on every rank (build_engine seeds torch with the job's seed), then every stream of
    # every rank its own: dropout masks differ across ranks as the data does
    seed_everything(job.train.seed + rank)
    micro = job.train.micro_batch_size
    sampler = PhasedSampler(
        ShardedSampler(data.num_train, micro, dp_rank, dp_size, seed=job.data.seed, shuffle=job.data.shuffle),
        describe(job.data, data.num_train),
    )
    if decay_data is not None and job.decay_data is not None:
        cfg = job.decay_data
        sampler.decay = ShardedSampler(
            decay_data.num_train, micro, dp_rank, dp_size, seed=cfg.seed, shuffle=cfg.shuffle
        )
        sampler.decay_data = describe(cfg, decay_data.num_train)
    sampler.allow_data_change = args.allow_data_change
    manager = CheckpointManager(
        location,
        built.engine or built.model,
        built.optimizer,
        built.scheduler,
        config=job.checkpoint,
        data=sampler,
        hf_config=job.model.hf_config(),
        extra_state=lambda: {"grad_clip": job.train.grad_clip},
        load_extra_state=lambda saved: _note_grad_clip(saved, job.train.grad_clip),
        **({"pipeline": built.checkpoint_pipeline} if built.checkpoint_pipeline is not None else {}),
    )
    tracker: Tracker | None = None
    trainer: Trainer | None = None
    ok = False
    try:
        resumed = False
        if args.resume == "auto":
            problem = (
                _resume_problem(location, schedule, start_from, args.total_steps is not None) if rank == 0 else None
            )
            problem = coord.broadcast(problem)  # every rank raises the same error
            if problem is not None:
                raise ConfigError(problem, where="arguments")
        if args.resume != "none":
            resumed = manager.resume(
                "auto" if args.resume == "auto" else args.resume, allow_changes=args.allow_optimizer_change
            )
        elif any(i.state == "complete" for i in _listed(location)):
            raise ConfigError(
                f"{location} has checkpoints and --resume none was given: use another --run-dir", where="arguments"
            )
        if resumed and wsm is not None:  # a merge a killed job left unfinished, at or before the resumed position
            wsm.catch_up(manager, built.scheduler.position)
        if not resumed and start_from is not None:
            sampler.new_decay_data = True  # a new run: its decay data may differ from the checkpoint's
            # the scheduler accepts the state: the schedule was built at its position
            manager.load(str(start_from), allow_changes=args.allow_optimizer_change)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resumed:
                if run_files is not None:  # resumed from the bucket into an empty log folder: its metrics so far
                    run_files.fetch_missing("metrics.jsonl")
                _drop_replayed_metrics(run_dir / "metrics.jsonl", built.scheduler.position)
            (run_dir / "config.yaml").write_text(_dump_job(job, plan))
            if run_files is not None:
                run_files.put("config.yaml")
            log.info(
                "run %s%s: %d rank(s), engine %s, %s; schedule %d %s (%s), %.2fM parameters, %d tokens/update",
                location,
                f" (metrics, config and curves in {run_dir})" if run_dir != location else "",
                world,
                job.train.engine,
                "resumed" if resumed else ("from " + start_from.name if start_from else "fresh"),
                schedule.end,
                schedule.units,
                schedule.mode,
                job.model.num_parameters() / 1e6,
                tokens_per_step,
            )
        # rank 0's trackers (TensorBoard, W&B) beside metrics.jsonl; the others' do nothing
        tracker = Tracker(
            job.tracking, run_dir, active=rank == 0, config=json.loads(json.dumps(job.to_dict(), default=str))
        )
        trainer = Trainer(job, run_dir, built, data, sampler, manager, device, decay_data=decay_data)
        trainer.tracker = tracker
        trainer.wsm = wsm
        if run_files is not None:
            trainer.after_save = lambda: run_files.put("metrics.jsonl")
        result = trainer.run()
        ok = True
    finally:
        try:
            manager.close()
            if trainer is not None:
                trainer.report_saves(final=True)  # the async saves close() waited for
        finally:
            if tracker is not None:
                tracker.close(failed=not ok)
    if rank == 0:
        listed = _listed(location)
        result["checkpoints"] = [i.name for i in listed if i.state == "complete"]
        _plot(run_dir, built.scheduler.schedule, float(built.scheduler.base_lrs[0]))
        if run_files is not None:
            for name in ("metrics.jsonl", "curves.png"):
                run_files.put(name)
        log.info("done: %s", json.dumps(result))
    return result


def _plot(run_dir: Path, schedule: WSDSchedule, lr: float) -> None:
    try:
        from .plotting import plot_schedule
    except ImportError:  # pragma: no cover
        return
    losses, evals = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses.append((rec["position"] - 1, rec["loss"]))
        if rec.get("eval_loss") is not None:
            evals.append((rec["position"], rec["eval_loss"]))
    try:
        plot_schedule(
            schedule,
            run_dir / "curves.png",
            base_lr=lr,
            losses=losses,
            eval_losses=evals,
            title=f"{run_dir.name}: training loss and learning rate",
        )
    except WSDError as exc:  # matplotlib missing: the run itself succeeded
        log.warning("no plot: %s", exc)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        result = run(argv)
    except WSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.get("preempted"):
        print("preempted: a checkpoint was written; run the same command again to resume", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
