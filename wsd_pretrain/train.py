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
from .checkpoint import format as F
from .checkpoint.manager import CheckpointConfig, CheckpointManager
from .checkpoint.rng import seed_everything
from .config import apply_overrides, build, dump_config, load_config
from .data import DataConfig, ShardedSampler, TokenData
from .errors import ConfigError, WSDError
from .model import LlamaLM, ModelConfig
from .schedule import WSDSchedule
from .scheduler import WSDScheduler

__all__ = ["JobConfig", "OptimizerConfig", "TrainConfig", "main", "resolve_job"]

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
    """DeepSpeed config JSON (engine: deepspeed), relative to the job config file; batch sizes, precision and
    clipping come from this section, the LR schedule from the schedule section."""
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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: WSDSchedule = field(default_factory=lambda: WSDSchedule(**DEFAULT_SCHEDULE))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {name: asdict(getattr(self, name)) for name in ("model", "data", "optimizer", "checkpoint", "train")}
        out["schedule"] = self.schedule.to_dict()
        return out


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "schedule": WSDSchedule,
    "checkpoint": CheckpointConfig,
    "train": TrainConfig,
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


def resolve_job(config: dict[str, Any], *, total_steps: int | None = None, save_every: int | None = None) -> JobConfig:
    """Turn a config mapping (file + overrides) into a validated :class:`JobConfig`."""
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; sections: {sorted(SECTIONS)}", where="config")
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        section = config.get(name)
        if name == "schedule":
            section = _with_schedule_defaults(section)
        try:
            parts[name] = build(cls, section, where=f"{name} section")
        except ConfigError as exc:
            problems += [f"{name}: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems, where="job config")
    job = JobConfig(**parts)
    if total_steps is not None:
        job = replace(job, schedule=job.schedule.rescaled(total_steps))
    if save_every is not None:
        job = replace(job, checkpoint=replace(job.checkpoint, every_steps=save_every))
    if job.model.max_seq_len < job.data.seq_len:
        raise ConfigError(
            f"data.seq_len={job.data.seq_len} is longer than model.max_seq_len={job.model.max_seq_len}",
            where="job config",
        )
    return job


# ---------------------------------------------------------------------------------------------- building


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (
        cfg.device == "auto" and torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    ):
        return torch.device("cuda", D.get_local_rank())
    return torch.device("cpu")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms, biases): two param groups, each with its own base LR."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _ds_config(job: JobConfig) -> dict[str, Any]:
    path = Path(job.train.ds_config or "")
    if not path.is_file():
        raise ConfigError(f"train.ds_config={str(path)!r} does not exist", where="train config")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}", where="train config") from None
    if "scheduler" in cfg:
        log.info("the job's schedule section drives the LR; the ds_config's scheduler section is not used here")
        del cfg["scheduler"]
    cfg.pop("optimizer", None)  # the client optimizer, built from the optimizer section
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = job.train.micro_batch_size
    cfg["gradient_accumulation_steps"] = job.train.grad_accum
    cfg["gradient_clipping"] = job.train.grad_clip
    cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    cfg["bf16"] = {"enabled": job.train.dtype == "bf16"}
    cfg["fp16"] = {**cfg.get("fp16", {}), "enabled": job.train.dtype == "fp16"}
    if job.train.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = job.train.zero_stage
    return cfg


@dataclass
class Built:
    model: Any  # what forward/backward run on (DDP/FSDP2 module or DeepSpeed engine)
    module: LlamaLM
    optimizer: torch.optim.Optimizer
    scheduler: WSDScheduler
    engine: Any = None


def build_engine(job: JobConfig, schedule: WSDSchedule, device: torch.device, tokens_per_step: int) -> Built:
    torch.manual_seed(job.train.seed)
    module = LlamaLM(job.model).to(device)
    opt_cfg = job.optimizer
    optimizer = torch.optim.AdamW(
        _param_groups(module, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), eps=opt_cfg.eps
    )
    scheduler = WSDScheduler(optimizer, schedule, tokens_per_step=tokens_per_step)
    engine = job.train.engine
    if engine == "deepspeed":
        from .deepspeed_scheduler import deepspeed_initialize

        if job.train.dtype == "fp16":
            from deepspeed.accelerator import get_accelerator

            if device.type == "cpu":
                get_accelerator().is_fp16_supported = lambda: True  # torch runs fp16 on any CPU (docs/decisions.md)
        ds_engine, *_ = deepspeed_initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=_ds_config(job)
        )
        return Built(ds_engine, module, optimizer, scheduler, engine=ds_engine)
    model: Any = module
    if engine == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if job.train.dtype == "bf16" else MixedPrecisionPolicy()
        for layer in module.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
    elif D.get_world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Built(model, module, optimizer, scheduler)


# ---------------------------------------------------------------------------------------------- the loop


class Trainer:
    """The loop: micro-steps, the optimizer update, the scheduler, metrics, evaluation and ``maybe_save``."""

    def __init__(
        self,
        job: JobConfig,
        run_dir: Path,
        built: Built,
        data: TokenData,
        sampler: ShardedSampler,
        manager: CheckpointManager,
        device: torch.device,
    ) -> None:
        self.job, self.run_dir, self.b, self.data, self.sampler = job, run_dir, built, data, sampler
        self.manager, self.device = manager, device
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.metrics_path = run_dir / "metrics.jsonl"
        self.autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if job.train.dtype == "bf16" and job.train.engine == "ddp"
            else nullcontext()
        )

    def _log(self, record: dict[str, Any]) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _micro_step(self) -> float:
        inputs, targets = self.data.train_batch(self.sampler.next_indices())
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        if self.b.engine is not None:
            loss = self.b.engine(inputs, targets)
            self.b.engine.backward(loss)
            self.b.engine.step()
            return float(loss.detach())
        with self.autocast:
            loss = self.b.model(inputs, targets)
        (loss / self.job.train.grad_accum).backward()
        return float(loss.detach())

    def _update(self) -> float:
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
            if self.job.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.job.train.grad_clip)
            self.b.optimizer.step()
            self.b.optimizer.zero_grad(set_to_none=True)
            self.b.scheduler.step()
        loss = torch.tensor(sum(losses) / len(losses), dtype=torch.float64)
        if D.is_distributed():
            import torch.distributed as dist

            loss = loss.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(loss)
            loss = loss.cpu() / self.world
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
            idx = [(b * micro * self.world + self.rank * micro + j) % n for j in range(micro)]
            inputs, targets = self.data.valid_batch(idx)
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
        t_last, last_loss, eval_loss = time.perf_counter(), float("nan"), None
        steps_since, tok_s, eval_at = 0, 0.0, None
        while not sched.finished and not self.manager.should_stop:
            phase = sched.phase.name
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
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last_loss:.3f}", lr=f"{lr:.2e}", phase=phase, tok_s=f"{tok_s:.0f}", refresh=False
                )
            saved = self.manager.maybe_save()
            if saved is not None:
                self._log({"position": sched.position, "checkpoint": saved.name})
        if bar is not None:
            bar.close()
        final_eval = eval_loss if eval_at == sched.position else self.evaluate()
        if eval_at != sched.position:
            self._log({"position": sched.position, "eval_loss": final_eval, "final": True})
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
    p.add_argument("--run-dir", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--total-steps", type=int, default=None, help="rescale the schedule to this many updates")
    p.add_argument("--save-every", type=int, default=None, help="also save every N updates")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto (newest complete checkpoint in the run dir, else fresh), none, or a checkpoint path",
    )
    p.add_argument(
        "--continue-from",
        type=Path,
        default=None,
        help="continue a finished or stopped run from this checkpoint to the (new) schedule total: no "
        "re-warmup; from a pre-decay checkpoint this is WSD, from a post-decay one WSD-S",
    )
    p.add_argument("--cooldown-from", type=Path, default=None, help="branch a cooldown from this stable checkpoint")
    p.add_argument("--cooldown-steps", type=int, default=None, help="length of the cooldown branch")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p


def _schedule_for(job: JobConfig, args: argparse.Namespace) -> tuple[WSDSchedule, Path | None]:
    """The schedule of this run and the checkpoint to start from (continuation and cooldown modes)."""
    if args.continue_from and args.cooldown_from:
        raise ConfigError("give --continue-from or --cooldown-from, not both", where="arguments")
    source = args.continue_from or args.cooldown_from
    if source is None:
        if args.cooldown_steps is not None:
            raise ConfigError("--cooldown-steps goes with --cooldown-from", where="arguments")
        return job.schedule, None
    ckpt = F.resolve_checkpoint(source)
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
    job = resolve_job(config, total_steps=args.total_steps, save_every=args.save_every)
    if job.train.ds_config and args.config is not None and not Path(job.train.ds_config).is_absolute():
        # a ds_config named in a config file is relative to that file
        job = replace(job, train=replace(job.train, ds_config=str(args.config.parent / job.train.ds_config)))
    if args.dry_run:
        print(dump_config(job.to_dict()))
        return {}
    info = D.init_distributed()
    logging.basicConfig(
        level=logging.INFO if info.rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        result = _train(job, args, config)
    except BaseException:
        D.teardown(barrier=False)  # another rank may never reach a barrier
        raise
    D.teardown()
    return result


def _train(job: JobConfig, args: argparse.Namespace, raw_config: dict[str, Any]) -> dict[str, Any]:
    rank, world = D.get_rank(), D.get_world_size()
    run_dir = Path(args.run_dir)
    device = _device(job.train)
    schedule, start_from = _schedule_for(job, args)
    data = TokenData(job.data)
    if data.min_vocab > job.model.vocab_size:
        raise ConfigError(
            f"the data has token ids up to {data.min_vocab - 1}; model.vocab_size={job.model.vocab_size} is too small",
            where="job config",
        )
    tokens_per_step = job.train.micro_batch_size * job.train.grad_accum * world * job.data.seq_len
    built = build_engine(job, schedule, device, tokens_per_step)
    # the same initial weights on every rank (build_engine seeds torch with the job's seed), then every stream of
    # every rank its own: dropout masks differ across ranks as the data does
    seed_everything(job.train.seed + rank)
    sampler = ShardedSampler(
        data.num_train, job.train.micro_batch_size, rank, world, seed=job.data.seed, shuffle=job.data.shuffle
    )
    manager = CheckpointManager(
        run_dir,
        built.engine or built.model,
        built.optimizer,
        built.scheduler,
        config=job.checkpoint,
        data=sampler,
        hf_config=job.model.hf_config(),
    )
    try:
        resumed = False
        if args.resume != "none":
            resumed = manager.resume("auto" if args.resume == "auto" else args.resume)
        elif any(i.state == "complete" for i in F.list_checkpoints(run_dir)):
            raise ConfigError(
                f"{run_dir} has checkpoints and --resume none was given: use another --run-dir", where="arguments"
            )
        if not resumed and start_from is not None:
            manager.load(start_from)  # the scheduler accepts the state: the schedule was built at its position
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(dump_config(job.to_dict()))
            log.info(
                "run %s: %d rank(s), engine %s, %s; schedule %d %s (%s), %.2fM parameters, %d tokens/update",
                run_dir,
                world,
                job.train.engine,
                "resumed" if resumed else ("from " + start_from.name if start_from else "fresh"),
                schedule.end,
                schedule.units,
                schedule.mode,
                job.model.num_parameters() / 1e6,
                tokens_per_step,
            )
        trainer = Trainer(job, run_dir, built, data, sampler, manager, device)
        result = trainer.run()
    finally:
        manager.close()
    if rank == 0:
        result["checkpoints"] = [i.name for i in F.list_checkpoints(run_dir) if i.state == "complete"]
        _plot(run_dir, built.scheduler.schedule, job.optimizer.lr)
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
