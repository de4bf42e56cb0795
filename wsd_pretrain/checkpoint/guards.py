"""Guard rails between the checkpoint manager and the training loops people already use.

The manager reads one thing from a loop: the scheduler's position, once per optimizer update. Frameworks get that
wrong in quiet ways (a wrapper that steps once per process, a scheduler stepped once per epoch, a callback called
before the optimizer step, a ``max_steps`` that stops before the last decay), and each mistake costs a milestone
checkpoint without a word. This module turns each into a clear error, or handles it where that is safe:

* :func:`resolve_scheduler`: the :class:`~wsd_pretrain.WSDScheduler` behind a framework's wrapper (accelerate's
  ``AcceleratedScheduler``, Lightning's ``LRSchedulerConfig``) or a view of ``compat.WSDLrScheduler``; anything else
  is refused with what to pass instead.
* :class:`StepGuard`: between two ``maybe_save()`` calls the position moves by exactly one update. No move (a hook
  called before the optimizer step, on a micro-batch, or right after a resume): nothing fires. More than one update
  (double stepping): a :class:`~wsd_pretrain.errors.ConfigError`.
* :func:`check_total`: the framework's step budget and the schedule's end agree.
* :func:`warn_later_checkpoints`: a resume from an older checkpoint while newer ones exist.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import distributed as D
from ..errors import ConfigError
from ..schedule import Event, WSDSchedule
from ..scheduler import WSDScheduler

__all__ = [
    "CompatSchedulerView",
    "StepGuard",
    "check_total",
    "resolve_scheduler",
    "schedule_end",
    "warn_later_checkpoints",
]

log = logging.getLogger(__name__)

_HOW_TO_BUILD = (
    "build one with wsd_pretrain.WSDScheduler(optimizer, wsd_pretrain.WSDSchedule(total=..., ...)); with the "
    "Hugging Face Trainer, wsd_pretrain.integrations.hf.wsd_scheduler(optimizer, training_args)"
)
_HOW_TO_BUILD_DEEPSPEED = (
    'give the ds_config a "scheduler": {"type": "WSD", "params": {"total": ..., "warmup": ..., '
    '"decay_fraction": ...}} section and build the engine with wsd_pretrain.deepspeed_scheduler.'
    "deepspeed_initialize(model=..., config=ds_config, ...) (DeepSpeed itself refuses that type), then pass "
    "engine.lr_scheduler"
)


def how_to_build_for(model: Any) -> str | None:
    """The fix a wrong-scheduler error names for this engine (None: the generic one)."""
    import sys

    ds = sys.modules.get("deepspeed")
    engine = getattr(ds, "DeepSpeedEngine", None) if ds is not None else None
    if engine is not None and isinstance(model, engine):
        return _HOW_TO_BUILD_DEEPSPEED
    return None


class CompatSchedulerView:
    """:class:`wsd_pretrain.compat.WSDLrScheduler` as the manager sees a :class:`WSDScheduler`.

    The compat class keeps the seed's step counter (``get_current_step()`` is updates done minus one) and sets the
    seed's exact LRs; this view reads its position from that counter and changes nothing about its stepping, so the
    LRs stay the seed's (wrapping its schedule in a ``WSDScheduler`` instead would read every LR one update late:
    the compat schedule uses ``progress="start"``). Position ``p`` is "``p`` updates done", the seed callback's
    ``total_steps``: its pre-decay checkpoint is at ``p == pre_decay_step`` and its post-decay one at
    ``p == period_end``, the same points as the schedule's events.
    """

    def __init__(self, compat: Any) -> None:
        self.compat = compat
        self.optimizer = compat.optimizer

    @property
    def schedule(self) -> WSDSchedule:
        return self.compat.schedule  # type: ignore[no-any-return]

    @property
    def position(self) -> int:
        return int(self.compat.get_current_step()) + 1

    @property
    def previous_position(self) -> int:
        return max(0, self.position - 1)

    @property
    def last_epoch(self) -> int:
        return self.position

    @property
    def tokens(self) -> int:
        return 0

    @property
    def end(self) -> int:
        """The seed's ``total_steps`` (its schedule object runs one past it, holding the floor)."""
        return int(self.compat.total_steps)

    @property
    def finished(self) -> bool:
        return self.position >= self.end

    def events(self) -> list[Event]:
        p = self.position
        return self.schedule.events_between(p - 1, p) if p > 0 else []

    def state_dict(self) -> dict[str, Any]:
        return self.compat.state_dict()  # type: ignore[no-any-return]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.compat.load_state_dict(state)

    def start_at(self, position: int, *, updates: int | None = None, tokens: int = 0) -> None:
        self.compat._num_updates = int(position) - 1
        self.refresh()

    def refresh(self) -> None:
        self.compat._set_lrs(max(0, self.compat._num_updates))

    def step(self) -> None:
        self.compat.step()


def schedule_end(scheduler: Any) -> int:
    """Where the run ends, in the schedule's units (the seed's ``total_steps`` for the compat view)."""
    end = getattr(scheduler, "end", None)
    return int(end) if end is not None else int(scheduler.schedule.end)


def _module_of(obj: Any) -> str:
    return type(obj).__module__ or ""


def resolve_scheduler(scheduler: Any, *, how_to_build: str | None = None) -> Any:
    """The scheduler the manager reads, from what a framework hands out; refuses what it cannot read safely.

    Accepts a :class:`WSDScheduler`, accelerate's ``AcceleratedScheduler`` around one (unless it steps it several
    times per update), Lightning's ``LRSchedulerConfig`` (``interval="step"``, ``frequency=1`` only) and
    :class:`wsd_pretrain.compat.WSDLrScheduler` (read through a :class:`CompatSchedulerView`). ``how_to_build``:
    the fix the error names when the scheduler is not one of these (the framework's own way to give a WSD
    scheduler: ``create_scheduler_fn`` in pytorch_accelerated, the ds_config section in DeepSpeed).
    """
    if isinstance(scheduler, (WSDScheduler, CompatSchedulerView)):
        return scheduler
    from ..compat import WSDLrScheduler

    if isinstance(scheduler, WSDLrScheduler):
        return CompatSchedulerView(scheduler)
    module = _module_of(scheduler)
    name = type(scheduler).__name__
    if module.startswith("accelerate") and name == "AcceleratedScheduler":
        _check_accelerated(scheduler)
        return resolve_scheduler(scheduler.scheduler, how_to_build=how_to_build)
    if module.startswith(("lightning", "pytorch_lightning")) and name == "LRSchedulerConfig":
        problems = []
        if scheduler.interval != "step":
            problems.append(
                f'interval="{scheduler.interval}": Lightning would step the schedule once per epoch; return '
                '{"scheduler": sched, "interval": "step"} from configure_optimizers'
            )
        if scheduler.frequency != 1:
            problems.append(
                f"frequency={scheduler.frequency}: Lightning would step the schedule every {scheduler.frequency} "
                "updates; use frequency 1 (the WSD position counts optimizer updates)"
            )
        if problems:
            raise ConfigError(problems, where="Lightning lr_scheduler config")
        return resolve_scheduler(scheduler.scheduler, how_to_build=how_to_build)
    inner = getattr(scheduler, "scheduler", None)
    if isinstance(inner, (WSDScheduler, WSDLrScheduler)):
        raise ConfigError(
            f"{name} wraps a {type(inner).__name__}; the manager cannot tell how often this wrapper steps it: pass the "
            "inner scheduler (and make sure it is stepped once per optimizer update)",
            where="checkpoint manager scheduler",
        )
    raise ConfigError(
        f"the checkpoint manager needs a WSDScheduler (it reads the schedule's pre-decay and post-decay points), got "
        f"{name}; {how_to_build or _HOW_TO_BUILD}",
        where="checkpoint manager scheduler",
    )


def _check_accelerated(wrapper: Any) -> None:
    """accelerate's wrapper steps its scheduler once per process per update unless told otherwise."""
    if not wrapper.step_with_optimizer or wrapper.split_batches:
        return
    from accelerate.state import AcceleratorState

    n = AcceleratorState().num_processes
    if n > 1:
        raise ConfigError(
            f"accelerate's AcceleratedScheduler steps this scheduler {n} times per optimizer update (once per "
            "process: step_scheduler_with_optimizer=True, split_batches=False), but the WSD position counts "
            "optimizer updates: its decays would come early and milestones would be skipped. Use "
            "wsd_pretrain.integrations.accelerate.AccelerateCheckpointer (it makes the prepared scheduler step once "
            "per real update), or set prepared_scheduler.split_batches = True yourself",
            where="checkpoint manager scheduler",
        )


class StepGuard:
    """Between two ``maybe_save()`` calls the scheduler advances by one optimizer update, or not at all.

    ``advanced()`` answers False when the position did not move (a framework hook called before the optimizer
    step or on an accumulation micro-batch, or the first call after a resume: the milestone at the resumed position
    was saved already), so nothing fires twice; it raises when the position moved by more than one update
    (double stepping) or went back outside the manager. Every rank sees the same positions, so every rank answers
    the same and the manager's collectives stay in step.
    """

    def __init__(self, scheduler: Any) -> None:
        self.reset(scheduler)

    def reset(self, scheduler: Any) -> None:
        """The scheduler's position is the new baseline (after a load, a resume or a rewind)."""
        self._updates = int(scheduler.last_epoch)
        self._position = int(scheduler.position)

    def advanced(self, scheduler: Any) -> bool:
        updates, position = int(scheduler.last_epoch), int(scheduler.position)
        moved = updates - self._updates
        if moved == 0 and position == self._position:
            return False
        if moved != 1:
            before = self._updates
            if moved > 1:
                why = (
                    f"the scheduler advanced by {moved} updates (from {before} to {updates}) since the last "
                    "maybe_save(): it is stepped more than once per optimizer update (accelerate steps a prepared "
                    "scheduler once per process unless split_batches is set; a framework that steps it too besides "
                    "your own scheduler.step()), or maybe_save() is not called after every update. The schedule's "
                    "milestones in between would be skipped"
                )
            else:
                why = (
                    f"the scheduler went back from update {before} to {updates} outside the checkpoint manager; load "
                    "checkpoints with manager.resume() or manager.load() so that it knows"
                )
            raise ConfigError(why, where="checkpoint manager")
        self._updates, self._position = updates, position
        return True


def check_total(scheduler: Any, max_steps: int, *, done: int = 0, framework: str, setting: str = "max_steps") -> None:
    """Refuse a framework budget that disagrees with the schedule (step units only).

    ``max_steps``: the optimizer update at which the framework stops; ``done``: updates it counts as done already
    (a resumed run). The schedule needs ``schedule_end - position`` more updates: a framework that stops earlier
    never reaches the final decay (no final checkpoint); one that runs on trains past the end at the floor LR.
    """
    resolved = resolve_scheduler(scheduler)
    if resolved.schedule.units != "steps":
        log.debug("token-based schedule: %s's %s is not compared with it", framework, setting)
        return
    end = schedule_end(resolved)
    needed = end - int(resolved.position)
    planned = int(max_steps) - int(done)
    if planned == needed:
        return
    if planned < needed:
        what = f"stops {needed - planned} updates before the schedule ends (its final decay and checkpoint never come)"
    else:
        what = f"runs {planned - needed} updates past the schedule's end (at the floor LR, after the final checkpoint)"
    raise ConfigError(
        f"{framework} {setting}={max_steps} {what}: the schedule ends at update {end} and this run is at "
        f"{resolved.position}{f' ({done} done by the framework)' if done else ''}; set {setting}={end - resolved.position + done} "
        f"or build the schedule with total={int(getattr(resolved, 'end', resolved.schedule.total)) + planned - needed}",
        where=f"{framework} and the WSD schedule",
    )


def warn_later_checkpoints(run_dir: Path, position: int) -> list[str]:
    """Rank 0 warns when complete checkpoints beyond ``position`` exist: the run will meet their names again (a
    checkpoint is written once) and stop there with an error. Returns their names."""
    if D.get_rank() != 0:
        return []
    from . import format as F

    later = [i.name for i in F.list_checkpoints(run_dir) if i.state == "complete" and (i.position or 0) > position]
    if later:
        log.warning(
            "resumed at position %d while %s has later checkpoints (%s): saving at their positions again will fail; "
            "move them away, or resume from the newest with resume('auto')",
            position,
            run_dir,
            ", ".join(later[:4]) + (" ..." if len(later) > 4 else ""),
        )
    return later


# ---------------------------------------------------------------------------------------------- what the manager is given


def _is_meta(t: Any) -> bool:
    return getattr(t, "is_meta", False) or getattr(getattr(t, "device", None), "type", None) == "meta"


def model_problems(adapter: Any, optimizer: Any) -> list[str]:
    """This rank's problems with the model and optimizer the manager was given, each with its fix (empty: none):

    * parameters or buffers on the meta device: they hold no values, so a save would write nothing real and a
      resume would "load" into tensors that stay on meta;
    * an optimizer holding parameters the model does not have (built over another module, or before FSDP2's
      ``fully_shard`` replaced the parameters): their optimizer state would never be saved or restored.
    """
    problems = []
    module = adapter.module
    meta = [n for n, p in module.named_parameters() if _is_meta(p)]
    meta += [n for n, b in module.named_buffers() if _is_meta(b)]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        problems.append(
            f"the model has {len(meta)} parameters or buffers on the meta device ({shown}): they hold no values, so "
            "a save would write nothing real and a resume would leave them on meta. Materialize the model before "
            "building the CheckpointManager: model.to_empty(device=...) then initialize it (reset_parameters(), "
            "model.apply(init_fn), or load its weights), or build it on a real device (not under "
            "torch.device('meta') or init_empty_weights())"
        )
    if optimizer is not None and adapter.engine != "deepspeed":
        own = {id(p) for p in module.parameters()}
        foreign = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"] if id(p) not in own]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            problems.append(
                f"the optimizer holds {len(foreign)} parameters that the model does not have (shapes {shapes}): "
                "their optimizer state would never be saved or restored. Build the optimizer over the model you "
                "pass to the manager: torch.optim.AdamW(model.parameters(), ...) (with FSDP2, after fully_shard; "
                "with DDP or torch.compile, the same module's parameters)"
            )
    return problems


def refuse_unusable_model(adapter: Any, optimizer: Any) -> None:
    """Raise :class:`ConfigError` on every rank when any rank's :func:`model_problems` found one (one small
    all-reduce on the checkpoint's group; on a single process, locally)."""
    from . import coord

    problems = model_problems(adapter, optimizer)
    if D.is_distributed():
        (failed,) = D.all_reduce_max([1 if problems else 0], group=coord.groups().coord)
        if failed:
            everyone = D.all_gather_object("; ".join(problems) or None, group=coord.groups().coord)
            raise ConfigError(coord.describe_errors(everyone), where="model or optimizer for the checkpoint manager")
        return
    if problems:
        raise ConfigError(problems, where="model or optimizer for the checkpoint manager")


def floor_tail(schedule: Any, end: int) -> tuple[int, int, int] | None:
    """``(last decay's end, updates after it at the floor, run length)`` when a schedule holding the floor after its
    last milestone (``after_last="floor"``) spends more than a fifth of the run there; None otherwise."""
    milestones = schedule.milestones_info
    if getattr(schedule, "after_last", None) != "floor" or not milestones:
        return None
    last = int(milestones[-1].post_decay)
    run = int(end) - int(getattr(schedule, "origin", 0) or 0)
    tail = int(end) - last
    if run > 0 and tail * 5 > run:
        return last, tail, run
    return None


def warn_floor_tail(schedule: Any, end: int, *, what: str, fix: str) -> bool:
    """Warn (rank 0) when :func:`floor_tail` finds a long floor: a run that trains a large part of its budget at
    the minimum LR, usually by mistake (the seed's checkpoint placement does it for ``num_checkpoints=2``)."""
    found = floor_tail(schedule, end)
    if found is None:
        return False
    last, tail, run = found
    if D.get_rank() == 0:
        log.warning(
            "%s: the last decay ends at %d of %d %s: the remaining %d (%.0f%% of the run) train at the minimum LR. %s",
            what,
            last,
            int(end),
            schedule.units,
            tail,
            100.0 * tail / run,
            fix,
        )
    return True
