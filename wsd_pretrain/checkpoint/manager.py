"""When to save, apart from how: the checkpoint manager the training loop calls once per optimizer update.

::

    manager = CheckpointManager(run_dir, engine_or_model, optimizer, scheduler, config=CheckpointConfig(...),
                                data=sampler)
    manager.resume("auto")                 # newest complete checkpoint, or a fresh start
    for batch in loader:
        ...; optimizer.step(); scheduler.step()
        manager.maybe_save()               # pre/post-decay points, every N steps / M minutes, end, preemption
        if manager.should_stop: break      # a preemption checkpoint was written
    manager.close()

The schedule says where the pre-decay and post-decay points are (``scheduler.events()``) and, in branching mode,
where to rewind; the manager does no schedule arithmetic. Time-based and preemption triggers are agreed by all
ranks (one small all-reduce), so every rank saves the same step. Sub-classing is not needed: the engine differs
behind :func:`~wsd_pretrain.checkpoint.adapters.make_adapter`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from .. import distributed as D
from ..errors import CheckpointError, ConfigError, WSDError
from ..scheduler import WSDScheduler
from . import coord
from . import format as F
from . import guards as _guards
from . import lora as _lora
from . import scaler as _scaler
from . import storage as _storage
from .adapters import EngineAdapter, make_adapter
from .agreement import agree_on_plan
from .load import load_checkpoint
from .lock import RunLock
from .pipeline import Pipeline, PipelineAdapter
from .resume_checks import Change, decide, hyperparameter_changes
from .save import HostArena, PendingSave, SaveRequest, start_save

__all__ = ["CheckpointConfig", "CheckpointManager", "Stateful", "parse_size"]

log = logging.getLogger(__name__)

_OBJECT_STORAGE_FIX = (
    "give a local or shared-filesystem run directory (or file:///path), and copy checkpoints to and from object "
    "storage with `wsd-pretrain ckpt cp RUN s3://bucket/prefix` (and back before a resume)"
)


class Stateful(Protocol):
    """Anything whose position is part of the checkpoint (a data sampler): plain-JSON state."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def parse_size(value: int | str) -> int:
    """``"2GB"`` -> 2_000_000_000 (decimal units, as Hugging Face's ``max_shard_size``); ``"512MiB"``; ints pass."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"size {value!r}: give bytes or a string like '2GB'", where="checkpoint")
    text = value.strip().upper().replace(" ", "")
    if text.isdigit():
        return int(text)  # plain bytes
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    for suffix, mult in units.items():
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * mult)
            except ValueError:
                break
    raise ConfigError(f"size {value!r}: give bytes or a string like '2GB', '512MiB'", where="checkpoint")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When and how checkpoints are written (the ``checkpoint:`` section of a config file)."""

    at_milestones: bool = True
    """Save at every pre-decay and post-decay point of the schedule (required in branching mode)."""
    every_steps: int | None = None
    """Also save every N optimizer updates (periodic)."""
    every_minutes: float | None = None
    """Also save every M minutes of wall time (periodic; rank 0's clock, agreed by all ranks)."""
    at_end: bool = True
    """Save when the schedule ends (final)."""
    on_preemption: bool = True
    """Save and stop on SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before killing a job)."""
    signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    keep_last: int = 2
    """Periodic and preemption checkpoints to keep (the newest K); the newest complete one is never deleted."""
    keep_milestones: bool = True
    """Keep every pre-decay, post-decay and final checkpoint (False: they count as periodic)."""
    async_save: bool = False
    """Write in the background while training goes on; the next save waits for the previous one."""
    async_snapshot: Literal["overlap", "blocking"] = "overlap"
    """How an async save copies the state into host memory: "overlap" copies the parameters, master weights and
    optimizer state while the next forward and backward pass run, and the next optimizer step waits for the copy
    (buffers are copied at once); "blocking" copies everything before the save returns. Use "blocking" only when
    the loop changes parameters outside an optimizer step (docs/decisions.md)."""
    write_mode: Literal["parallel", "rank0"] = "parallel"
    """parallel: every rank writes its shards (shared filesystem); rank0: everything goes through rank 0."""
    max_shard_size: int | str = "2GB"
    """Largest safetensors shard (bytes or '2GB'); also bounds the extra memory of a save."""
    verify: Literal["checksum", "size", "none"] = "checksum"
    """What resume checks: every file's checksum, only sizes, or nothing."""
    checksum: Literal["xxh3_128", "sha256"] = "xxh3_128"
    """The files' checksum in the manifest: xxh3_128 (about 20 GB/s: free at disk speed) or sha256 (cryptographic,
    about 1.5 GB/s per core: it slows saves down on fast disks)."""
    fsync: bool = True
    """fsync every file and directory before the commit (turn off only for throwaway runs)."""
    decide_every: int = 1
    """How often (in updates) ranks agree on time-based and preemption saves: one all-reduce of two integers on the
    checkpoint's gloo group (CPU, no device synchronisation). A signal is acted on at most ``decide_every`` updates
    after it arrives."""
    timeout_minutes: float = 60.0
    """How long a rank waits for the others inside a save or a resume (the checkpoint's own gloo groups, apart from
    the training group's timeout) before the job fails."""
    on_save_error: Literal["stop", "continue"] = "stop"
    """A save that fails (a full disk, a lost rank) raises on every rank ("stop"), or is logged and dropped while
    training carries on ("continue"; the next save tries again). Older checkpoints are untouched either way."""
    fallback: bool = False
    """When resuming the newest checkpoint fails (a corrupt file), try the next older complete one instead."""
    snapshot_every: int | None = None
    """Also write a model-only snapshot (the Hugging Face folder, no optimizer state) every N updates of the stable
    phase, into ``<run>/snapshots/``: the window ``wsd-pretrain ckpt merge`` averages (WSM, docs/schedules.md).
    Async like the checkpoints when ``async_save`` is on; never resumed from."""
    snapshot_keep: int = 8
    """Snapshots to keep (the newest K); older ones are deleted after each snapshot. Full checkpoints' retention is
    apart (``keep_last``)."""
    staging_dir: str | None = None
    """A run on object storage (``s3://bucket/prefix``): the local folder (a filesystem every rank of the job
    sees, like a run directory) where each save is written at disk speed before rank 0 uploads it in the
    background (objstore_tier.py). Required for an ``s3://`` run directory; unused otherwise."""
    staging_keep: int = 1
    """Checkpoints (and snapshots) kept in ``staging_dir`` after their upload (the newest K; at least 1)."""
    storage_timeout_s: float | None = None
    """A run on object storage: how long the store may stay silent on one try of a request (connecting, or no byte
    sent or received) before the try is abandoned; a request has 3 tries, so a store that stops answering fails the
    save on every rank after about 3x this, with an error naming the object. None: ``$WSD_STORAGE_TIMEOUT_S``, else
    60 (the S3 and Azure SDKs' own default; a 64 MiB part is never silent that long on a working store)."""
    storage_save_minutes: float = 30.0
    """A run on object storage: the most one save (or one background upload) may spend on the store on a rank;
    past it no new request is sent and the save fails on every rank. It must leave room in ``timeout_minutes``
    (how long ranks wait for each other inside a save), checked when the manager is built."""

    def __post_init__(self) -> None:
        problems = []
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps <= 0):
            problems.append(f"every_steps={self.every_steps!r}: a whole number > 0, or null")
        if self.every_minutes is not None and not (
            isinstance(self.every_minutes, (int, float)) and self.every_minutes > 0
        ):
            problems.append(f"every_minutes={self.every_minutes!r}: a number > 0, or null")
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            problems.append(f"keep_last={self.keep_last!r}: keep at least 1")
        if self.snapshot_every is not None and (
            isinstance(self.snapshot_every, bool) or not isinstance(self.snapshot_every, int) or self.snapshot_every < 1
        ):
            problems.append(f"snapshot_every={self.snapshot_every!r}: a whole number > 0, or null")
        if isinstance(self.snapshot_keep, bool) or not isinstance(self.snapshot_keep, int) or self.snapshot_keep < 1:
            problems.append(f"snapshot_keep={self.snapshot_keep!r}: keep at least 1 (the merge window)")
        if self.async_snapshot not in ("overlap", "blocking"):
            problems.append(f"async_snapshot={self.async_snapshot!r}: 'overlap' or 'blocking'")
        if self.write_mode not in ("parallel", "rank0"):
            problems.append(f"write_mode={self.write_mode!r}: 'parallel' or 'rank0'")
        if self.checksum not in ("xxh3_128", "sha256"):
            problems.append(f"checksum={self.checksum!r}: 'xxh3_128' or 'sha256'")
        if self.verify not in ("checksum", "size", "none"):
            problems.append(f"verify={self.verify!r}: 'checksum', 'size' or 'none'")
        if not isinstance(self.decide_every, int) or self.decide_every < 1:
            problems.append(f"decide_every={self.decide_every!r}: a whole number >= 1")
        for name in ("timeout_minutes", "storage_save_minutes"):
            minutes = getattr(self, name)
            if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
                problems.append(f"{name}={minutes!r}: a number of minutes > 0")
        bad = [s for s in self.signals if not hasattr(signal, s)]
        if bad:
            problems.append(f"signals={list(self.signals)}: {bad} are not signal names")
        try:
            if parse_size(self.max_shard_size) < 1:
                problems.append(f"max_shard_size={self.max_shard_size!r}: must be positive")
        except ConfigError as exc:
            problems += exc.problems
        if self.staging_dir is not None and (
            not isinstance(self.staging_dir, str) or _storage.is_url(self.staging_dir)
        ):
            problems.append(f"staging_dir={self.staging_dir!r}: a local folder (the run itself may be s3://)")
        if isinstance(self.staging_keep, bool) or not isinstance(self.staging_keep, int) or self.staging_keep < 1:
            problems.append(f"staging_keep={self.staging_keep!r}: keep at least 1")
        if self.storage_timeout_s is not None:
            problems += _storage.timeout_problems(self.storage_timeout_s, "storage_timeout_s")
        if problems:
            raise ConfigError(problems, where="checkpoint config")


def _check_storage_limits(cfg: CheckpointConfig) -> None:
    """A run on object storage: set this process's limits (storage.py) from the config, refusing a pair that could
    not fail a save before the checkpoint groups' own timeout: a rank that stops at its deadline still waits out
    one stalled request and one try of the cleanup, and the others wait for it in a collective bounded by
    ``timeout_minutes``; if that ran out first they would fail with the transport's error, not this one."""
    timeout = cfg.storage_timeout_s if cfg.storage_timeout_s is not None else _storage.request_timeout()
    worst = cfg.storage_save_minutes * 60 + _storage.request_bound(timeout) + 2 * timeout
    if worst >= cfg.timeout_minutes * 60:
        raise ConfigError(
            f"storage_save_minutes={cfg.storage_save_minutes:g} with storage_timeout_s={timeout:g}: a failing save "
            f"may take {worst / 60:.1f} minutes on object storage, not less than timeout_minutes="
            f"{cfg.timeout_minutes:g} (how long ranks wait for each other inside a save); lower "
            "storage_save_minutes or storage_timeout_s, or raise timeout_minutes",
            where="checkpoint config",
        )
    _storage.configure_timeouts(cfg.storage_timeout_s, cfg.storage_save_minutes)


def _checked(adapter: EngineAdapter) -> EngineAdapter:
    adapter.check_complete()
    return adapter


class CheckpointManager:
    """Saves at the schedule's decay points, periodically, at the end and on preemption; resumes; rewinds.

    Args:
        run_dir: the run directory (checkpoints go to ``<run_dir>/checkpoints``).
        model: a DeepSpeed engine, an FSDP2 module, a DDP module or a plain module.
        optimizer: the torch optimizer (ignored for DeepSpeed, whose engine knows it).
        scheduler: the :class:`WSDScheduler` whose position, events and state are saved.
        config: :class:`CheckpointConfig`.
        data: the data sampler (``state_dict``/``load_state_dict`` in plain JSON), restored on resume and rewind.
        extra_state: returns plain-JSON user state to save; ``load_extra_state`` receives it back.
        hf_config: a Hugging Face ``config.json`` dict, written beside the model so the folder loads with
            ``from_pretrained``.
        pipeline: a pipeline-parallel job's :class:`~.pipeline.Pipeline` (its group, a name map for stages
            renumbered from 0, tied weights across stages), given on every rank; ``model`` is then this rank's stage
            module(s) or ``PipelineStage`` object(s) (docs/manager.md, "Pipeline parallelism"). With a DeepSpeed
            ``PipelineEngine`` only ``names`` applies (a callable: PipelineModule name -> name in the model).
        scaler: the loss scaler of an fp16 run (``torch.amp.GradScaler``, FSDP2's ``ShardedGradScaler``, anything
            with a plain-JSON ``state_dict``/``load_state_dict``): its scale and growth tracker are saved and restored
            (DeepSpeed's own fp16 scaler is saved with its engine).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        model: Any,
        optimizer: torch.optim.Optimizer | None,
        scheduler: WSDScheduler,
        *,
        config: CheckpointConfig | None = None,
        data: Stateful | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
        hf_config: dict[str, Any] | None = None,
        adapter: EngineAdapter | None = None,
        scaler: Any = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.config = config or CheckpointConfig()
        # an s3:// run: every rank streams its files straight to the bucket (save.py), or, with a staging_dir, saves
        # into a local staging run that is uploaded in the background (objstore_tier.py); never a local ./s3:/
        # tree (storage.py)
        location = _storage.parse_location(run_dir)
        self._remote: Any = None
        self._direct = False
        self.loaded_from: Path | None = None
        """The checkpoint the last :meth:`load` restored (an s3:// run's: its path in the staging run, which a
        resume read in place from the bucket never created)."""
        if isinstance(location, _storage.ObjectURL):
            from .objstore_tier import RemoteTier

            _check_storage_limits(self.config)  # every rank, before any request: limits a save can keep
            _storage.store_for(location)  # boto3 is installed (or a clear error, on every rank)
            self._direct = self.config.staging_dir is None
            # direct: a local folder only caches what a resume fetches from the bucket (node-local temp)
            self.run_dir = Path(self.config.staging_dir or _storage.cache_dir(location))
            self._remote = RemoteTier(location, self.run_dir, self.config.staging_keep, direct=self._direct)
        else:
            self.run_dir = location
        # guard rails (guards.py): see through framework wrappers, refuse what cannot be read safely
        self.scheduler = scheduler = _guards.resolve_scheduler(scheduler, how_to_build=_guards.how_to_build_for(model))
        if isinstance(scheduler, WSDScheduler):  # (the seed-compatible scheduler warns when it is built)
            _guards.warn_floor_tail(
                scheduler.schedule,
                scheduler.schedule.end,
                what="the WSD schedule",
                fix="End the run with a milestone at total, or use after_last='stable' (cool down later)",
            )
        self._step_guard = _guards.StepGuard(scheduler)
        coord.set_timeout(self.config.timeout_minutes * 60)
        self.data = data
        self.extra_state = extra_state
        self.load_extra_state = load_extra_state
        # a PEFT model's folder holds PEFT's names: its base's config.json would load it wrong (lora.py)
        self.hf_config, self._extra_json = _lora.peft_files(model, hf_config)
        self.scaler = _scaler.check_scaler(scaler)
        if scheduler.schedule.mode == "branching" and not self.config.at_milestones:
            raise ConfigError(
                "a branching schedule rewinds to its pre-decay checkpoints: keep checkpoint.at_milestones=true",
                where="checkpoint config",
            )
        # rank 0 takes the run lock; every rank learns the outcome, so all raise together instead of ranks 1..N
        # going on into a collective that rank 0 never reaches
        self._lock: RunLock | None = None
        self._closed = True  # until built: a half-built manager refuses everything
        coord.acquire()  # every rank makes the checkpoint's gloo groups here, at the same point
        try:
            # the engine's adapter, refusing state the checkpoint could not carry now, not after hours; then every
            # rank describes what it holds and all agree on one plan, or all raise the same error (agreement.py)
            if pipeline is not None and _is_deepspeed_pipe(model):
                # DeepSpeed's own grid places the stages; its adapter gathers their union itself
                self.adapter = agree_on_plan(
                    lambda: _checked(adapter or _deepspeed_pipe_adapter(model, pipeline)),
                    "this job cannot be checkpointed",
                )
            elif pipeline is not None:  # given on every rank: the stages' union is exchanged (pipeline.py)
                self.adapter = agree_on_plan(
                    lambda: _checked(adapter or PipelineAdapter(model, optimizer, pipeline)),
                    "this job cannot be checkpointed",
                    exchange=True,
                )
            else:
                self.adapter = agree_on_plan(
                    lambda: _checked(adapter or make_adapter(model, optimizer)), "this job cannot be checkpointed"
                )
        except CheckpointError:
            coord.release()
            raise
        try:
            _guards.refuse_unusable_model(self.adapter, self.adapter.optimizer)  # every rank raises together
        except ConfigError:
            coord.release()
            raise
        lock_error = None
        if D.get_rank() == 0:
            try:
                self._lock = RunLock(self.run_dir)
                if self._remote is not None:
                    self._remote.start()  # the lease, then an interrupted run's leftovers on the bucket
            except CheckpointError as exc:
                lock_error = str(exc)
                if self._lock is not None:
                    self._lock.release()
                    self._lock = None
                if self._remote is not None:
                    self._remote.close()
        lock_error = coord.broadcast(lock_error)
        if lock_error is not None:
            coord.release()
            raise CheckpointError(lock_error)  # the same error on every rank
        if self._lock is not None:
            self._remove_leftovers()
        self._closed = False
        self._pending: PendingSave | None = None
        self._arena: HostArena | None = None  # async saves reuse one host buffer (made by the first)
        self._retention: Any = None  # rank 0's retention thread (off the critical path of a save)
        self._last_save_time = time.monotonic()
        self._preempt_flag = 0
        self._old_handlers: dict[int, Any] = {}
        self.should_stop = False
        self._final_done = False
        self.last_saved: Path | None = None
        self.saves: list[Path] = []
        self.snapshots: list[Path] = []
        if self.config.on_preemption:
            self._install_signal_handlers()

    def _remove_leftovers(self) -> None:
        """Staging directories and half-deleted checkpoints (and snapshots) of a run that crashed (we hold the run
        lock, so no other run is writing them)."""
        for root in (F.checkpoints_dir(self.run_dir), F.snapshots_dir(self.run_dir)):
            if root.is_dir():
                self._remove_leftovers_in(root)

    def _remove_leftovers_in(self, root: Path) -> None:
        for entry in root.iterdir():
            if entry.name.startswith((F.STAGING_PREFIX, ".deleting-", ".latest-")):
                log.info("removing %s, left by an interrupted run", entry.name)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            log.warning("checkpoint manager not created in the main thread: preemption signals are not caught")
            return
        for name in self.config.signals:
            signum = getattr(signal, name)
            old = signal.getsignal(signum)
            self._old_handlers[signum] = old
            # the handler holds the manager weakly, so a manager dropped without close() is garbage collected (and
            # its run lock released); a signal arriving after that goes to the handler that was there before
            signal.signal(signum, _SignalRelay(weakref.ref(self), old))

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._preempt_flag = 1
        log.warning(
            "received %s: a preemption checkpoint will be written at the next step", signal.Signals(signum).name
        )

    def request_preemption(self) -> None:
        """What a caught signal does: save at the next :meth:`maybe_save` and set :attr:`should_stop`."""
        self._check_open("request_preemption")
        self._preempt_flag = 1

    def _check_open(self, method: str) -> None:
        """Every method but :meth:`close` refuses once the manager is closed: its run lock is released, so another
        run (or another manager in this process) may be writing to the directory now."""
        if self._closed:
            raise CheckpointError(
                f"CheckpointManager.{method}() after close(): this manager of {self.run_dir} has released its run "
                "lock (another manager or run may use the directory now); build a new CheckpointManager to save or "
                "resume"
            )

    # ------------------------------------------------------------------ saving

    def _trainer_state(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "position": s.position,
            "trajectory_position": s.schedule.trajectory_position(s.position),
            "step": s.last_epoch,
            "tokens": s.tokens,
            "scheduler": s.state_dict(),
            "data": self.data.state_dict() if self.data is not None else None,
            "extra": self.extra_state() if self.extra_state is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def maybe_save(self) -> Path | None:
        """Call once after each ``scheduler.step()``. Saves if this step is a decay point, periodic, the end or a
        preemption; in branching mode, after a branch's post-decay save, restores its pre-decay state. Returns the
        checkpoint written (it may still be in flight with async saves), or None."""
        self._check_open("maybe_save")
        if not self._step_guard.advanced(self.scheduler):  # guards.py: no update since the last call, or refused
            return None
        s = self.scheduler
        kinds: list[str] = []
        rewind_to = None
        if self.config.at_milestones:
            for event in s.events():
                kinds.append(event.kind)
                if event.kind == "post-decay" and event.milestone.rewind:
                    rewind_to = event.milestone
        cfg = self.config
        if cfg.every_steps and s.last_epoch % cfg.every_steps == 0:
            kinds.append("periodic")
        if cfg.at_end and s.finished and not self._final_done:
            kinds.append("final")
            self._final_done = True
        if s.last_epoch % cfg.decide_every == 0 or kinds:
            time_due = int(
                cfg.every_minutes is not None and time.monotonic() - self._last_save_time >= cfg.every_minutes * 60
            )
            preempt, time_due = coord.all_reduce_max([self._preempt_flag, time_due if D.get_rank() == 0 else 0])
            if time_due:
                kinds.append("periodic")
            if preempt:
                kinds.append("preempt")
                self.should_stop = True
        snap = self._snapshot_due()
        if not kinds:
            if snap:
                self.snapshot()
            return None
        path = self.save(sorted(set(kinds), key=F.KINDS.index))
        if snap:
            self.snapshot()
        if rewind_to is not None:
            self._rewind(rewind_to)
        return path

    def _snapshot_due(self) -> bool:
        """A model-only snapshot is due: every ``snapshot_every`` updates, when the update just done was in the
        stable phase (the same answer on every rank: a pure function of the scheduler's position)."""
        every, s = self.config.snapshot_every, self.scheduler
        if not every or s.last_epoch % every != 0 or s.position <= s.schedule.origin:
            return False
        return s.schedule.phase_at(s.position - 1).name == "stable"

    def snapshot(self) -> Path:
        """Write a model-only snapshot of the current weights now (every rank calls it): ``<run>/snapshots/
        step-<position>-snapshot``, the Hugging Face folder with a manifest, no optimizer state or RNG. Async when
        ``async_save`` is on; waits for the previous save first. Keeps the newest ``snapshot_keep``."""
        self._check_open("snapshot")
        self.wait()
        s = self.scheduler
        position = s.position
        trajectory = s.schedule.trajectory_position(position)
        request = SaveRequest(
            position=position,
            step=s.last_epoch,
            tokens=s.tokens,
            kinds=[F.SNAPSHOT_KIND],
            trainer={"position": position, "trajectory_position": trajectory, "step": s.last_epoch, "snapshot": True},
            schedule=s.schedule.to_dict(),
            hf_config=self.hf_config,
            extra_manifest={"trajectory_position": trajectory},
        )
        dest: Any = F.snapshots_dir(self.run_dir) / F.checkpoint_name(position, [F.SNAPSHOT_KIND])
        if self._direct:  # a committed one of the same name is replaced by the claim (RemoteTier.claim_prefix)
            dest = self._remote.url / F.SNAPSHOTS / dest.name
        elif D.get_rank() == 0 and dest.is_dir() and not dest.is_symlink():
            # left by this run before a resume went back past it: the replayed weights replace it
            log.info("replacing snapshot %s, written before the run resumed from an earlier checkpoint", dest.name)
            trash = dest.parent / f".deleting-{dest.name}"
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        t0 = time.monotonic()
        pending = self._start_save(
            _ModelOnly(self.adapter), request, self._retain_snapshots_in_background, dest=dest, with_rng=False
        )
        self.snapshots.append(pending.final)
        if self.config.async_save:
            self._pending = pending
        else:
            self._finish(pending)
            _log_rank0("snapshot %s written in %.2fs", pending.name, time.monotonic() - t0)
        return pending.final

    def save(self, kinds: list[str]) -> Path:
        """Save now with these kinds (every rank calls it). Waits for the previous async save first."""
        self._check_open("save")
        self.wait()
        s = self.scheduler
        request = SaveRequest(
            position=s.position,
            step=s.last_epoch,
            tokens=s.tokens,
            kinds=list(kinds),
            trainer=self._trainer_state(),
            schedule=s.schedule.to_dict(),
            hf_config=self.hf_config,
            extra_json=self._extra_json,
            extra_manifest={
                "trajectory_position": s.schedule.trajectory_position(s.position),
                "run_end": _guards.schedule_end(s),  # where the run ends (the seed's total_steps for its scheduler)
            },
        )
        t0 = time.monotonic()
        pending = self._start_save(self.adapter, request, self._retain_in_background)
        self._last_save_time = time.monotonic()
        self.last_saved = pending.final
        self.saves.append(pending.final)
        if self.config.async_save:
            self._pending = pending
            _log_rank0(
                "checkpoint %s: state fetched in %.2fs, writing in the background", pending.name, time.monotonic() - t0
            )
        else:
            self._finish(pending)
            _log_rank0("checkpoint %s written in %.2fs", pending.name, time.monotonic() - t0)
        return pending.final

    def _start_save(
        self, adapter: Any, request: SaveRequest, retain: Callable[[Path], None], **kwargs: Any
    ) -> PendingSave:
        """start_save with this manager's settings; ``retain`` runs on rank 0 after the commit."""
        if self.config.async_save and self._arena is None:
            self._arena = HostArena()
        direct = self._remote if self._direct else None
        return start_save(
            adapter,
            direct.url if direct is not None else self.run_dir,
            request,
            max_shard_bytes=parse_size(self.config.max_shard_size),
            rank0_only=self.config.write_mode == "rank0",
            fsync=self.config.fsync,
            arena=self._arena if self.config.async_save else None,
            overlap=self.config.async_snapshot == "overlap",
            # rank 0's retention; through the staging tier every rank uploads its own files (_upload_in_background)
            after_commit=retain if D.get_rank() == 0 or (self._remote is not None and not self._direct) else None,
            checksum=self.config.checksum,
            claim=direct.claim_prefix if direct is not None and D.get_rank() == 0 else None,
            **kwargs,
        )

    @property
    def pending(self) -> PendingSave | None:
        """The async save in flight, if any: its ``snapshot`` tells how long the copy took (``copy_s``) and how long
        training waited for it at the next optimizer step (``fence_wait_s``)."""
        return self._pending

    def _finish(self, pending: PendingSave) -> None:
        try:
            pending.wait()
            if pending.snapshot is not None:
                _log_rank0(
                    "checkpoint %s: state copied in %.2fs while training went on; training waited %.3fs for it",
                    pending.name,
                    pending.snapshot.copy_s,
                    pending.snapshot.fence_wait_s,
                )
        except CheckpointError as exc:
            if pending.final in self.saves:
                self.saves.remove(pending.final)
            if self.config.on_save_error == "stop":
                raise
            log.error("%s; training carries on (checkpoint.on_save_error=continue)", exc)

    def wait(self) -> None:
        """Wait for an async save in flight, and the retention after it (every rank calls it); raises if the save
        failed on any rank."""
        self._check_open("wait")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._finish(pending)
        self._join_retention()
        self._agree_on_upload()

    def _agree_on_upload(self) -> None:
        """A run on object storage: every rank learns whether the last upload failed on any rank, and all raise
        together (or log it, with ``on_save_error: continue``): one small all-reduce, the errors gathered only
        when one failed."""
        if self._remote is None:
            return
        error, self._remote.error = self._remote.error, None
        if D.get_world_size() > 1:
            try:
                (failed,) = coord.all_reduce_max([1 if error else 0])
                if not failed:
                    return
                errors = D.all_gather_object(error, group=coord.groups().coord)
            except Exception as exc:  # a rank is gone (killed mid-upload): say what this rank knows, never a bare
                # transport error; the job cannot go on without it, whatever on_save_error says
                known = error or "the last checkpoint upload: its outcome could not be agreed"
                raise CheckpointError(
                    f"{known}; the other ranks cannot be reached ({type(exc).__name__}: {exc})"
                ) from exc
            error = next(e for e in errors if e)  # rank 0's outcome names every failed rank when it has one
        if error is not None:
            if self.config.on_save_error == "stop":
                raise CheckpointError(error)
            log.error("%s; training carries on (checkpoint.on_save_error=continue)", error)

    # ------------------------------------------------------------------ retention

    def _retain_snapshots_in_background(self, newest: Path) -> None:
        self._retain_in_background(newest, snapshots=True)

    def _retain_in_background(self, newest: Path, snapshots: bool = False) -> None:
        """Rank 0, after a commit: apply retention in a thread of its own, so a synchronous save returns as soon as
        its checkpoint is committed (the next save, listing or close waits for it). On object storage every rank
        comes here and uploads its own files (:meth:`_upload_in_background`)."""
        import threading

        if self._remote is not None and not self._direct:
            self._upload_in_background(newest, snapshots)
            return
        cfg = self.config

        def run() -> None:
            try:
                if self._direct:  # committed on the bucket by save.py: retention there
                    keep = cfg.snapshot_keep if snapshots else cfg.keep_last
                    self._remote.retain(newest.name, snapshots, keep, cfg.keep_milestones and not snapshots)
                else:
                    self._retain_snapshots(newest) if snapshots else self._retain(newest)
            except Exception as exc:  # retention never fails a save
                log.warning("retention after %s failed: %s", newest.name, exc)

        self._retention = threading.Thread(target=run, name="wsd-ckpt-retention", daemon=True)
        self._retention.start()

    def _upload_in_background(self, newest: Path, snapshots: bool) -> None:
        """Every rank, in the save's commit thread once the local commit is visible: rank 0 claims the name on the
        bucket and tells every rank (one broadcast on the commit group); then each rank uploads the files it wrote
        in a thread of its own while training goes on, and rank 0 commits once every rank reported
        (:meth:`.RemoteTier.upload_rank`). A failure on any rank is told to every rank at the next ``wait()``."""
        import threading

        remote, rank, world = self._remote, D.get_rank(), D.get_world_size()
        group = coord.groups().commit if world > 1 else None
        failed = None
        if rank == 0:
            try:
                remote.claim(newest, snapshots)
            except Exception as exc:
                failed = f"{type(exc).__name__}: {exc}"
        if world > 1:
            failed = D.broadcast_object(failed, src=0, group=group)
        if failed is not None:
            remote.error = f"uploading {newest.name} to {remote.url} failed: {failed}"
            return
        cfg = self.config
        keep = cfg.snapshot_keep if snapshots else cfg.keep_last

        def run() -> None:
            try:
                error = remote.upload_rank(
                    newest, snapshots, keep, cfg.keep_milestones and not snapshots, rank, world, group
                )
            except Exception as exc:  # a collective failed (a rank died): this rank's own error
                error = f"{type(exc).__name__}: {exc}"
            if error is not None:
                remote.error = f"uploading {newest.name} to {remote.url} failed: {error}"

        self._retention = threading.Thread(target=run, name="wsd-ckpt-upload", daemon=True)
        self._retention.start()

    def _join_retention(self) -> None:
        if self._retention is not None:
            self._retention.join()
            self._retention = None

    def _retain(self, newest: Path) -> None:
        from .retention import checkpoints_to_delete  # the rule, as a pure function (retention.py)

        complete = [i for i in F.list_checkpoints(self.run_dir) if i.state == "complete"]
        doomed = checkpoints_to_delete(
            complete,
            keep_last=self.config.keep_last,
            keep_milestones=self.config.keep_milestones,
            just_written=newest.name,
        )
        self._delete(doomed)

    def _retain_snapshots(self, newest: Path) -> None:
        from .retention import checkpoints_to_delete

        complete = [i for i in F.list_snapshots(self.run_dir) if i.state == "complete"]
        # snapshots are all of one kind: the rule keeps the newest snapshot_keep (and the one just written)
        self._delete(
            checkpoints_to_delete(
                complete, keep_last=self.config.snapshot_keep, keep_milestones=False, just_written=newest.name
            )
        )

    def _delete(self, doomed: list[Any]) -> None:
        for info in doomed:
            trash = info.path.parent / f".deleting-{info.name}"
            try:
                os.rename(info.path, trash)  # gone from listings at once; a crash mid-delete leaves only trash
                shutil.rmtree(trash, ignore_errors=True)
                log.info("retention: removed %s", info.name)
            except OSError as exc:
                log.warning("retention: could not remove %s: %s", info.name, exc)

    # ------------------------------------------------------------------ resuming

    def resume(
        self,
        which: str | os.PathLike[str] = "auto",
        *,
        verify: str | None = None,
        allow_changes: bool | Sequence[str] = False,
    ) -> bool:
        """Restore everything from a checkpoint: ``"auto"`` (the newest complete one in the run, or a fresh start
        when there is none: returns False), ``"latest"`` (the same, but none is an error), a checkpoint name or a
        path. Returns True when a checkpoint was loaded. ``allow_changes``: see :meth:`load`."""
        self._check_open("resume")
        if isinstance(which, str) and _storage.is_url(which):  # a checkpoint (or a run's newest) on object storage
            self.wait()
            self.load(which, verify=verify, allow_changes=allow_changes)
            return True
        if not isinstance(which, str):
            which = _storage.require_local(which, "CheckpointManager.resume()", _OBJECT_STORAGE_FIX)
        target = str(which)
        self.wait()
        if target in ("auto", "latest"):
            # committed checkpoints, newest last, as rank 0 sees them; one that turns out damaged is an error (it was
            # committed, so skipping it silently would resume from older state than the user expects) unless
            # fallback is on. Every rank walks the same list, and a failed load raises on every rank at once.
            infos = self._listing() if D.get_rank() == 0 else None
            infos = coord.broadcast(infos)
            if isinstance(infos, dict):
                raise CheckpointError(infos["error"])
            if not infos:
                if target == "auto":
                    return False
                raise CheckpointError(f"{self.run_dir}: no complete checkpoint to resume from")
            for i, info in enumerate(reversed(infos)):
                try:
                    source = self._ensure_local(info["name"])
                    if info["state"] == "corrupt":
                        raise CheckpointError(
                            f"{info['path']} is damaged: {info['problem']} (set checkpoint.fallback=true to resume from "
                            "the previous checkpoint instead, or remove this one)"
                        )
                    self.load(info["path"], verify=verify, allow_changes=allow_changes, source=source)
                    return True
                except CheckpointError as exc:
                    if not self.config.fallback or i == len(infos) - 1:
                        raise
                    log.warning(
                        "cannot resume from %s (%s); trying the previous checkpoint (checkpoint.fallback=true)",
                        info["name"],
                        exc,
                    )
            raise AssertionError("unreachable")
        found: Any = None
        source = None
        if os.sep not in target and F.parse_name(target) is not None:
            source = self._ensure_local(target)
        if source is not None:
            found = str(F.checkpoints_dir(self.run_dir) / target)
        elif D.get_rank() == 0:
            try:
                if os.sep in target or Path(target).is_dir():
                    found = str(F.resolve_checkpoint(target))
                else:
                    found = str(F.resolve_checkpoint(self.run_dir, target))
            except CheckpointError as exc:
                found = {"error": str(exc)}
        found = coord.broadcast(found)
        if isinstance(found, dict):
            raise CheckpointError(found["error"])
        self.load(found, verify=verify, allow_changes=allow_changes, source=source)
        return True

    def _open_url(self, text: str) -> tuple[str, Any]:
        """:meth:`load` of a checkpoint on object storage (another run's, e.g. a continuation's or a cooldown's
        start): rank 0 resolves it (a run prefix: its newest complete checkpoint; a damaged newest one is an error)
        and validates its manifest; every rank then reads it in place, as a resume from the bucket does."""
        if self.config.write_mode == "rank0":
            raise ConfigError(
                f"{text}: loading a checkpoint on object storage with write_mode: rank0 is not supported (rank 0 "
                "would read every object); copy it to a local folder with `wsd-pretrain ckpt cp` and load that",
                where="CheckpointManager.load()",
            )
        from . import objstore

        opened: Any = None
        if D.get_rank() == 0:
            try:
                location = _storage.parse_location(text)
                if not isinstance(location, _storage.ObjectURL):
                    raise ConfigError(f"{text}: not a URL", where="CheckpointManager.load()")
                ckpt = objstore.resolve(location, damaged="error")
                opened = {"url": str(ckpt), "manifest": objstore.load_manifest(_storage.store_for(ckpt), ckpt)[0]}
            except (OSError, WSDError) as exc:
                opened = {"error": f"cannot load {text}: {exc}"}
        opened = coord.broadcast(opened)
        if "error" in opened:
            raise CheckpointError(opened["error"])
        from .objread import RemoteCheckpoint

        url = _storage.parse_location(opened["url"])
        return opened["url"], RemoteCheckpoint(url, opened["manifest"])  # type: ignore[arg-type]

    def _ensure_local(self, name: str) -> Any:
        """A run on object storage: checkpoint ``name`` when the staging run lacks it. Read in place (returned: a
        :class:`.objread.RemoteCheckpoint` for :meth:`load`): rank 0 reads and checks the bucket's manifest and
        sends it to every rank, which then fetches only the byte ranges its restore needs and its verification
        share, with ranged GETs (:mod:`.objread`). A ``write_mode: rank0`` job (rank 0 reads everything) brings it
        into the staging run instead: rank 0 opens a staging
        folder with the bucket's manifest; every rank downloads its share (verified on the way); one agreement;
        rank 0 checks the range-written files and commits the local copy. Every rank raises together if any step
        fails. None: the staging run has it (or the run is local)."""
        if self._remote is None:
            return None
        rank, world = D.get_rank(), D.get_world_size()
        where = f"cannot fetch {name} from {self._remote.url}"
        opened: Any = None
        if rank == 0:
            try:
                opened = self._remote.open_remote(name, in_place=self.config.write_mode != "rank0")
            except (OSError, CheckpointError) as exc:
                opened = {"error": f"{where}: {exc}"}
        opened = coord.broadcast(opened)
        if opened is None:
            return None
        if "error" in opened:
            raise CheckpointError(opened["error"])
        if "manifest" in opened:
            from .objread import RemoteCheckpoint

            return RemoteCheckpoint(self._remote.url / F.CHECKPOINTS / name, opened["manifest"])
        staging = Path(opened["staging"])
        error = None
        try:
            problems = self._remote.fetch_rank(name, staging, rank, world)
            error = "damaged objects: " + "; ".join(problems) if problems else None
        except (OSError, CheckpointError) as exc:
            error = str(exc)
        done: Any = None
        try:
            coord.agree(error, where)
            if rank == 0:
                try:
                    self._remote.end_fetch(name, staging)
                except (OSError, CheckpointError) as exc:
                    done = f"{where}: {exc}"
        except CheckpointError:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        done = coord.broadcast(done)
        if done is not None:
            raise CheckpointError(done)
        return None

    def _listing(self) -> Any:
        """Rank 0: the run's committed checkpoints (and damaged ones), oldest first, as plain JSON for the others."""
        self._join_retention()
        if self._remote is not None:
            try:
                return self._remote.listing()
            except (OSError, CheckpointError) as exc:
                return {"error": f"{self._remote.url}: cannot list checkpoints: {exc}"}
        try:
            return F.resume_candidates(F.list_checkpoints(self.run_dir))
        except (OSError, CheckpointError) as exc:
            return {"error": f"{self.run_dir}: cannot list checkpoints: {exc}"}

    def load(
        self,
        path: str | os.PathLike[str],
        *,
        verify: str | None = None,
        scheduler: bool = True,
        allow_changes: bool | Sequence[str] = False,
        source: Any = None,
    ) -> dict[str, Any]:
        """Load one checkpoint into the engine, optimizer, RNG, data sampler and (with ``scheduler``) scheduler.

        The optimizer's class and state keys must fit the checkpoint's, and its hyperparameters (each group's
        betas, eps, weight_decay, ... and the scheduler's base LRs) are compared with the checkpoint's before
        anything is restored: a changed ``eps`` is applied and logged (old -> new); any other change is refused,
        naming both values, unless ``allow_changes`` is True (apply every change) or names the fields to apply."""
        self._check_open("load")
        self.wait()
        if source is None and isinstance(path, str) and _storage.is_url(path):
            path, source = self._open_url(path)
        optimizer = self.adapter.optimizer
        live_groups = [dict(g) for g in optimizer.param_groups] if optimizer is not None else []
        # a compat view (pytorch_accelerated's scheduler) has no base LRs of its own: its LR check is skipped
        base_lrs = getattr(self.scheduler, "base_lrs", None)
        live_base_lrs = [float(b) for b in base_lrs] if base_lrs is not None else None
        applied: list[Change] = []

        def check(opened: dict[str, Any]) -> None:
            saved_groups = (opened["engine"].get("optimizer") or {}).get("param_groups") or []
            saved_lrs = (opened["trainer"].get("scheduler") or {}).get("base_lrs")
            if optimizer is None:
                saved_groups = []
            changes = hyperparameter_changes(saved_groups, saved_lrs, live_groups, live_base_lrs)
            applied.extend(decide(changes, allow_changes))

        out = load_checkpoint(
            self.adapter,
            path,
            verify=verify or self.config.verify,
            rank0_only=self.config.write_mode == "rank0",
            check=check if scheduler else None,
            source=source,  # on object storage: read in place by ranged GETs  # a branching rewind reloads this run's own state
        )
        trainer = out["trainer"]
        if scheduler and trainer.get("scheduler") is not None:
            self.scheduler.load_state_dict(trainer["scheduler"])
        elif scheduler:
            log.warning(
                "the checkpoint has no scheduler state (imported): the schedule continues at position %d",
                trainer["position"],
            )
            self.scheduler.start_at(
                int(trainer["position"]),
                updates=int(trainer.get("step", trainer["position"])),
                tokens=int(trainer.get("tokens", 0)),
            )
        else:
            self.scheduler.refresh()  # the optimizer state brought back its saved LRs; the position decides
        for change in applied:
            if change.field == "lr" and base_lrs is not None:
                self.scheduler.base_lrs[change.group] = change.new  # the list the scheduler's state load made
            elif optimizer is not None and change.group is not None:
                optimizer.param_groups[change.group][change.field] = live_groups[change.group][change.field]
            log.info("resume: %s (checkpoint -> this job) applied", change.describe())
        if applied:
            self.scheduler.refresh()
        if self.data is not None and trainer.get("data") is not None:
            self.data.load_state_dict(trainer["data"])
        _scaler.restore_scaler(self.scaler, trainer.get("scaler"), Path(path).name)
        if self.load_extra_state is not None and trainer.get("extra") is not None:
            self.load_extra_state(trainer["extra"])
        _log_rank0("loaded checkpoint %s (position %s)", Path(path).name, trainer.get("position"))
        self.loaded_from = Path(path)
        self._step_guard.reset(self.scheduler)  # guards.py: the loaded position's saves are done, nothing re-fires
        if scheduler:
            _guards.warn_later_checkpoints(self.run_dir, self.scheduler.position)
        return out

    def _rewind(self, milestone: Any) -> None:
        """Branching mode: back to the pre-decay state of ``milestone``; the scheduler keeps its position."""
        self.wait()
        infos = self._listing() if D.get_rank() == 0 else None
        infos = coord.broadcast(infos)
        if isinstance(infos, dict):
            raise CheckpointError(infos["error"])
        candidates = [
            i
            for i in infos
            if i["state"] == "complete" and i["position"] == milestone.pre_decay and "pre-decay" in i["kinds"]
        ]
        if not candidates:
            raise CheckpointError(
                f"branching: the pre-decay checkpoint at position {milestone.pre_decay} is missing, cannot rewind"
            )
        self.load(candidates[-1]["path"], scheduler=False, verify="size")
        _log_rank0(
            "branch %d done: rewound to its pre-decay state (%d trained)",
            milestone.index,
            milestone.trajectory_pre_decay,
        )

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Wait for any save in flight, restore signal handlers, release the run lock (every rank calls it). A
        second call does nothing; every other method refuses after it. A manager dropped without ``close()``
        releases its run lock when it is garbage collected (``with CheckpointManager(...) as manager:`` closes it
        at the end of the block)."""
        if self._closed:
            return
        try:
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._finish(pending)
            self._join_retention()
            self._agree_on_upload()
        finally:
            if self._remote is not None:
                self._remote.close()
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            self._old_handlers.clear()
            if self._lock is not None:
                self._lock.release()
                self._lock = None
            if not self._closed:
                self._closed = True
                coord.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_rank0(msg: str, *args: Any) -> None:
    """The per-checkpoint lines ("written", "loaded"): one per job, from rank 0, not one per rank."""
    if D.get_rank() == 0:
        log.info(msg, *args)


class _SignalRelay:
    """A preemption signal handler that holds its manager weakly (see ``_install_signal_handlers``)."""

    def __init__(self, manager: weakref.ReferenceType[CheckpointManager], previous: Any) -> None:
        self.manager = manager
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        manager = self.manager()
        if manager is not None and not manager._closed:
            manager._on_signal(signum, frame)
            return
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # what the signal would have done without us (SIGTERM: end the process)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class _ModelOnly:
    """An adapter seen through for a snapshot: only its model items (the Hugging Face folder) are saved."""

    def __init__(self, adapter: EngineAdapter) -> None:
        self._adapter = adapter

    def items(self) -> list[Any]:
        return [item for item in self._adapter.items() if item.group == "model"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._adapter, name)


def _is_deepspeed_pipe(model: Any) -> bool:
    import sys

    if "deepspeed" not in sys.modules:
        return False
    from .deepspeed_adapter import _is_pipeline

    return _is_pipeline(model)


def _deepspeed_pipe_adapter(model: Any, pipeline: Pipeline) -> EngineAdapter:
    """A DeepSpeed ``PipelineEngine`` under ``Pipeline(names=...)``: its grid gives the group, the stages and the
    tied weights (TiedLayerSpec), so only the name map applies."""
    from .deepspeed_adapter import DeepSpeedPipeAdapter

    given = [f for f in ("group", "stages") if getattr(pipeline, f) is not None] + (["tied"] if pipeline.tied else [])
    if given:
        raise CheckpointError(
            f"Pipeline({', '.join(given)}=...) with a DeepSpeed PipelineEngine: DeepSpeed's grid decides its group, "
            "stages and tied weights (TiedLayerSpec); give only Pipeline(names=...)"
        )
    return DeepSpeedPipeAdapter(model, names=pipeline.names)
