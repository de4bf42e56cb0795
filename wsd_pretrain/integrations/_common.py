"""What every integration does the same way: build the manager from a framework's objects, keep the loop's
position in the checkpoint, resume with the RNG put back at the right moment.

Frameworks hand out wrapped objects (DDP and ``torch.compile`` modules, accelerate's and Lightning's optimizer
wrappers, scheduler wrappers); :class:`FrameworkCheckpointer` unwraps them (the schedulers through
:func:`wsd_pretrain.checkpoint.guards.resolve_scheduler`) and builds one :class:`CheckpointManager`.

**The RNG on resume.** The manager restores each rank's RNG streams as they were when the checkpoint was written,
right after the optimizer update. A framework's loop does two things with the RNG between that point and the next
forward pass: a new epoch's data iterator draws its shuffling seed (``iter(DataLoader)``), and nothing else; a
resumed run has to build that iterator too, and skip batches, before the next forward. So
:meth:`FrameworkCheckpointer.resume` loads everything, then puts the RNG back as it was before the load and holds
the checkpoint's streams until :meth:`~FrameworkCheckpointer.apply_rng`, which the integration calls where the
uninterrupted run stood when it saved: before the epoch's iterator when the checkpoint closed an epoch, after the
skipped iterator is built when it was mid-epoch (what transformers does with its own RNG files).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..checkpoint.manager import CheckpointConfig, CheckpointManager, Stateful
from ..checkpoint.names import wrapper_attr
from ..checkpoint.rng import capture_rng, restore_rng

__all__ = [
    "FrameworkCheckpointer",
    "LoopPosition",
    "hf_config_of",
    "inner_model",
    "inner_optimizer",
    "order_state",
    "restore_order_state",
]

log = logging.getLogger(__name__)


def inner_model(model: Any) -> Any:
    """The user's module under ``torch.compile`` and activation checkpointing at its top, by the checkpoint's one
    rule (checkpoint/names.py; the names inside drop every wrapper's segment there too); DDP stays, for the adapter
    to see the data-parallel job."""
    while (attr := wrapper_attr(model)) not in (None, "module"):
        model = getattr(model, attr)
    return model


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` or Lightning's ``LightningOptimizer``."""
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("torch"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            return optimizer
        optimizer = inner
    return optimizer


def scaler_of(optimizer: Any) -> Any:
    """The loss scaler a framework's optimizer wrapper steps through (accelerate's ``AcceleratedOptimizer.scaler``,
    a ``torch.amp.GradScaler`` when the run is fp16 without DeepSpeed), or None."""
    scaler = getattr(optimizer, "scaler", None)
    return scaler if callable(getattr(scaler, "state_dict", None)) else None


def hf_config_of(model: Any) -> dict[str, Any] | None:
    """A Hugging Face model's ``config.json`` as a dict (with ``architectures``), so every checkpoint's model
    folder loads with ``from_pretrained``; None for other modules."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    data: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
    if not data.get("architectures"):
        data["architectures"] = [type(model).__name__]
    return data


def check_world(framework_processes: int, framework: str, fix: str) -> None:
    """Refuse a run where torch.distributed has more processes than the framework trains with: each process would
    train on its own and the checkpoint would mix their states."""
    from ..errors import ConfigError

    world = D.get_world_size()
    if world != framework_processes:
        raise ConfigError(
            f"torch.distributed runs {world} processes but {framework} trains with {framework_processes}: each process "
            f"would train on its own; {fix}",
            where=framework,
        )


# what `accelerate launch` puts in the environment of the processes it starts (every launcher of accelerate 1.x)
_ACCELERATE_LAUNCH_ENV = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")
_LAUNCHED_WORLD_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE")


def check_launch(framework_processes: int, framework: str) -> None:
    """Refuse a run whose launcher asked for another number of processes than the framework trains with.

    * ``accelerate launch --cpu --num_processes N`` (N > 1) starts one process: accelerate's launcher starts
      several CPU processes only through MPI (``--mpirun_hostfile``); without it, it runs the script once, with
      ``MASTER_ADDR``/``MASTER_PORT`` set (for N > 1 only) and no ``WORLD_SIZE``. That one process would train
      alone, on 1/N of the batch the run was planned with.
    * A launcher's world size (``WORLD_SIZE``, MPI's) that differs from the framework's process count.
    """
    from ..errors import ConfigError

    env = os.environ
    for key in _LAUNCHED_WORLD_ENV:
        value = env.get(key, "")
        if value.isdigit() and int(value) != framework_processes:
            raise ConfigError(
                f"the launcher started {value} processes ({key}={value}) but {framework} trains with "
                f"{framework_processes}: each process would train on its own; on CPU, build Accelerator(cpu=True) "
                "or set ACCELERATE_USE_CPU=true",
                where=framework,
            )
    if framework_processes != 1 or any(k in env for k in _LAUNCHED_WORLD_ENV) or "RANK" in env:
        return
    by_accelerate = all(k in env for k in _ACCELERATE_LAUNCH_ENV)
    cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")
    if by_accelerate and cpu and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        raise ConfigError(
            "`accelerate launch --cpu --num_processes N` started this one process only (accelerate starts several "
            "CPU processes only through MPI, with --mpirun_hostfile): it would train alone, on 1/N of the planned "
            "batch. Start N CPU processes with torchrun: `ACCELERATE_USE_CPU=true torchrun --nproc-per-node N "
            "script.py ...`; to train on one process, launch without --num_processes",
            where=framework,
        )


def log_rank0(level: int, msg: str, *args: Any) -> None:
    if D.get_rank() == 0:
        log.log(level, msg, *args)


def order_state(loader: Any) -> dict[str, Any] | None:
    """What decides the order of the epoch a data loader is about to start, when it is random state that a resume
    does not rebuild: accelerate's generator shared by all processes (``synchronized_generator``, the sampler's on
    rank 0), or, on a single process, the global torch generator that ``iter(DataLoader)`` draws from. Taken just
    before ``iter()``; None when the order does not depend on such state (a seeded sampler with ``set_epoch``)."""
    from ..checkpoint.rng import _b64

    generator = getattr(loader, "synchronized_generator", None)
    if isinstance(generator, torch.Generator):
        return {"generator": _b64(generator.get_state())}
    if D.get_world_size() == 1:
        return {"torch": _b64(torch.get_rng_state())}
    return None


def restore_order_state(loader: Any, state: dict[str, Any] | None) -> None:
    """Put back what :func:`order_state` took, so that a resumed epoch is drawn in the same order."""
    from ..checkpoint.rng import _unb64

    if not state:
        return
    generator = getattr(loader, "synchronized_generator", None)
    if "generator" in state and isinstance(generator, torch.Generator):
        generator.set_state(_unb64(state["generator"]))
    elif "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))


class LoopPosition:
    """Where a framework's loop stands (plain JSON, saved with every checkpoint): the epoch, the micro-batches
    trained in it, and the framework's own counters (``framework``)."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batch = 0
        self.framework: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch": self.batch, "framework": self.framework}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.batch = int(state.get("batch", 0))
        self.framework = dict(state.get("framework") or {})

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = int(epoch), 0

    def normalized(self, batches_per_epoch: int | None) -> tuple[int, int]:
        """(epoch, batches to skip in it): a checkpoint that closed an epoch resumes at the next one's start."""
        if batches_per_epoch is not None and self.batch >= batches_per_epoch > 0:
            return self.epoch + 1, 0
        return self.epoch, self.batch


class FrameworkCheckpointer:
    """One :class:`CheckpointManager` built from a framework's objects, with the loop position in its state and a
    resume that defers the RNG (see the module docstring). The integrations are thin layers over this; a custom
    loop can use it directly.

    Args:
        run_dir: the run directory (checkpoints under ``<run_dir>/checkpoints``): a local path, or
            ``s3://bucket/prefix`` / ``az://`` (streamed to the bucket, or through ``config.staging_dir`` when
            set; docs/manager.md, "Object storage").
        config: :class:`CheckpointConfig`.
        data: a resumable sampler or data source (``state_dict``/``load_state_dict`` in plain JSON), if the
            framework's loader is not the data position's keeper.
        extra_state / load_extra_state: plain-JSON user state saved with every checkpoint and given back.
        framework: a name for messages.
        scheduler_fix: what an error about a scheduler the manager cannot read tells the user to do, in this
            framework's terms (default: build a ``WSDScheduler``).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: CheckpointConfig | None = None,
        data: Stateful | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
        framework: str = "framework",
        scheduler_fix: str | None = None,
    ) -> None:
        from ..checkpoint.storage import parse_location

        # a local path, or a URL on object storage (s3://): the manager's run on the bucket (streamed, or through
        # checkpoint.staging_dir), exactly as in a user's own loop
        self.run_dir = parse_location(run_dir)
        self.scheduler_fix = scheduler_fix
        self.config = config or CheckpointConfig()
        self.data = data
        self.user_extra_state = extra_state
        self.user_load_extra_state = load_extra_state
        self.framework = framework
        self.loop = LoopPosition()
        self.manager: CheckpointManager | None = None
        self.loader: Any = None  # the framework's training loader, whose order state goes with each checkpoint
        self.framework_state: Callable[[], dict[str, Any]] | None = None  # the framework's counters, taken at a save
        self.resumed_from: Path | None = None
        self._pending_rng: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building

    def build(
        self,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        *,
        hf_config: dict[str, Any] | None = None,
        scaler: Any = None,
    ) -> Any:
        """Make the manager (every rank, once): unwrapped model and optimizer, the WSD scheduler behind the
        framework's wrapper, the Hugging Face config when the model has one, the framework's loss scaler
        (``scaler``, or the one accelerate's prepared optimizer holds: HF Trainer, accelerate, pytorch_accelerated)."""
        if self.manager is not None:
            return self.manager
        module = inner_model(model)
        if self.scheduler_fix is not None:  # a wrong scheduler is refused in the framework's terms
            from ..checkpoint.guards import resolve_scheduler

            resolve_scheduler(scheduler, how_to_build=self.scheduler_fix)
        self.manager = CheckpointManager(
            self.run_dir,
            module,
            inner_optimizer(optimizer) if optimizer is not None else None,
            scheduler,
            config=self.config,
            data=self.data,
            extra_state=self._extra_state,
            load_extra_state=self._load_extra_state,
            hf_config=hf_config if hf_config is not None else hf_config_of(module),
            scaler=scaler if scaler is not None else scaler_of(optimizer),
        )
        return self.manager

    def _extra_state(self) -> dict[str, Any]:
        # accelerate's shared generator as it is now: what the next epoch will draw from (a resume at an epoch
        # boundary starts there)
        generator = getattr(self.loader, "synchronized_generator", None)
        if isinstance(generator, torch.Generator):
            from ..checkpoint.rng import _b64

            self.loop.framework["next_order"] = {"generator": _b64(generator.get_state())}
        if self.framework_state is not None:
            self.loop.framework.update(self.framework_state())
        user = self.user_extra_state() if self.user_extra_state is not None else None
        return {"loop": self.loop.state_dict(), "user": user}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state.get("loop") or {})
        if self.user_load_extra_state is not None and state.get("user") is not None:
            self.user_load_extra_state(state["user"])

    @property
    def scheduler(self) -> Any:
        """The scheduler the manager reads (a ``WSDScheduler``, or the view of ``compat.WSDLrScheduler``)."""
        return self._manager.scheduler

    @property
    def _manager(self) -> CheckpointManager:
        if self.manager is None:
            raise RuntimeError(f"{self.framework}: the checkpoint manager is built when training starts")
        return self.manager

    # ------------------------------------------------------------------ resuming

    def resume(self, which: str | os.PathLike[str] = "auto", *, log_loop: bool = True) -> bool:
        """Load a checkpoint (``manager.resume(which)``); the checkpoint's RNG is held back until
        :meth:`apply_rng`. Returns True when one was loaded. ``log_loop=False``: the integration logs where its loop
        resumes itself (the Hugging Face Trainer keeps its own counters)."""
        before = capture_rng()
        loaded = self._manager.resume(which)
        if loaded:
            self._pending_rng = capture_rng()
            restore_rng(before)
            last = self._manager.scheduler
            # what the manager loaded: in the local run, or (an s3:// run) its name in the staging run
            loaded = getattr(self._manager, "loaded_from", None)
            self.resumed_from = loaded if loaded is not None else _newest_at(self._manager.run_dir, int(last.position))
            if not log_loop:
                return loaded
            log_rank0(
                logging.INFO,
                "%s: resumed at update %d from %s (loop at epoch %d, batch %d)",
                self.framework,
                last.last_epoch,
                self.resumed_from.name if self.resumed_from else "?",
                self.loop.epoch,
                self.loop.batch,
            )
        return loaded

    def has_checkpoints(self) -> bool:
        """Whether the run already holds a complete checkpoint (on the bucket for an ``s3://`` run)."""
        from ..checkpoint import format as F
        from ..checkpoint.storage import ObjectURL

        if isinstance(self.run_dir, ObjectURL):
            from ..checkpoint import objstore

            return any(i.state == "complete" for i in objstore.list_run(self.run_dir))
        return any(i.state == "complete" for i in F.list_checkpoints(self.run_dir))

    def apply_rng(self) -> None:
        """Put back the resumed checkpoint's RNG streams (once; nothing when there is none pending)."""
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    @property
    def rng_pending(self) -> bool:
        return self._pending_rng is not None

    def before_epoch(self, loader: Any, *, mid_epoch: bool) -> None:
        """Call just before an epoch's iterator is built. A mid-epoch resume gets the epoch's order state back (its
        RNG comes back after the skipped iterator is built: call :meth:`apply_rng` at the first batch); otherwise
        a resume at an epoch boundary gets the checkpoint's RNG and generator now, and the epoch's order state is
        recorded for a later resume."""
        self.loader = loader
        if mid_epoch:
            restore_order_state(loader, self.loop.framework.get("order"))
            return
        if self.rng_pending:
            restore_order_state(loader, self.loop.framework.get("next_order"))
            self.apply_rng()
        self.loop.framework["order"] = order_state(loader)

    # ------------------------------------------------------------------ training

    def maybe_save(self) -> Path | None:
        return self._manager.maybe_save()

    @property
    def should_stop(self) -> bool:
        """A preemption checkpoint was written, or the schedule has ended: stop training."""
        return self.manager is not None and (self.manager.should_stop or bool(self.manager.scheduler.finished))

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def _newest_at(run_dir: Path, position: int) -> Path | None:
    from ..checkpoint import format as F

    found = [i.path for i in F.list_checkpoints(run_dir) if i.state == "complete" and i.position == position]
    return found[-1] if found else None
