"""Drop-in replacements for pytorch_accelerated 0.1.61's ``WSDLrScheduler`` and ``estimate_checkpoint_steps``.

Same arguments, same learning rates after each ``step()``, same query methods and state-dict keys, computed by
the one :class:`~wsd_pretrain.WSDSchedule` underneath (``progress="start"``, the seed's convention). What differs
on purpose (each listed with its reason in ``docs/seed-compatibility.md``):

* before the first ``step()`` the LR is the warmup's start, not the peak (the seed's first update ran at the peak);
* ``state_dict()`` keeps the step counter (``num_updates``), so a resumed run continues instead of restarting its
  warmup; a continuation (``is_continuation_from_checkpoint=True``) stays one after ``load_state_dict``;
* settings the seed accepts and then crashes on (a zero-length decay past the last checkpoint, ``lr_min=0`` with
  the inverse-proportional decay, checkpoints that collapse on short runs) are refused at construction or handled,
  and its unfounded 1/3 limit on ``decay_phase_ratio`` is gone (decays never overlap: each lies in its period);
* ``estimate_checkpoint_steps`` returns the seed's numbers but logs a warning when it places fewer checkpoints
  than asked for.

``WSDCheckpointCallback`` (imported from pytorch_accelerated on first use) takes the seed callback's arguments and
writes wsd_pretrain checkpoints, saving after the optimizer step; the checkpoint manager accepts
``WSDLrScheduler`` as it is. See :mod:`wsd_pretrain.integrations.pytorch_accelerated` and docs/integrations.md.

Invalid settings raise :class:`SeedConfigError`, a :class:`~wsd_pretrain.errors.ConfigError` (so a
``ValueError``) that is also an ``AssertionError``: code written against the seed, which asserts, still catches it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer

from .errors import ConfigError
from .schedule import WSDSchedule

if TYPE_CHECKING:
    from .integrations.pytorch_accelerated import WSDCheckpointCallback

__all__ = ["SeedConfigError", "WSDCheckpointCallback", "WSDLrScheduler", "estimate_checkpoint_steps"]

log = logging.getLogger(__name__)


class SeedConfigError(ConfigError, AssertionError):
    """An invalid compat setting: a :class:`ConfigError` (a ``ValueError``) and also an ``AssertionError``, which is
    what the seed raises for most of them (``assert total_steps > 0``), so ``except AssertionError`` keeps working."""


class _SeedCachedMethod:
    """The seed's ``@lru_cache`` method without the cache: callable, with a ``cache_clear()`` that has nothing to
    clear (the seed's own tests call it). The seed's cache is keyed on ``self`` and keeps it alive."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        bound = partial(self._fn, obj)
        bound.cache_clear = lambda: None  # type: ignore[attr-defined]
        return bound


# The attributes the seed's state_dict() carries (all public attributes but the optimizer).
_SEED_STATE_KEYS = (
    "param_group_field",
    "base_lr_values",
    "total_steps",
    "num_warmup_steps",
    "decay_phase_ratio",
    "lr_min",
    "warmup_starting_lr",
    "use_inverse_sqrt_decay",
    "num_checkpoints",
    "checkpoint_steps",
    "is_continuation_from_checkpoint",
    "previous_checkpoint_step",
    "checkpoint_decay_info",
)
_SCHEDULE_KEYS = (
    "base_lr_values",
    "total_steps",
    "num_warmup_steps",
    "decay_phase_ratio",
    "lr_min",
    "warmup_starting_lr",
    "use_inverse_sqrt_decay",
    "num_checkpoints",
)


def estimate_checkpoint_steps(total_steps: int, num_checkpoints: int = 3) -> list[int]:
    """The seed's checkpoint placement: one at ``total_steps``, or a geometric series from ``total_steps // 4``
    doubling each time and stopping at ``total_steps``.

    Reproduced number for number (2 checkpoints on 100K steps give [25000, 50000], and asking for 4 or 5 on a run
    that reaches ``total_steps`` at the third gives 3); a warning says when fewer than ``num_checkpoints`` come back.
    Our own API's geometric spacing (``WSDSchedule(milestones="geometric")``) ends at the total instead.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise SeedConfigError(f"total_steps={total_steps!r}: must be a whole number > 0", where="checkpoint estimate")
    if isinstance(num_checkpoints, bool) or not isinstance(num_checkpoints, int) or num_checkpoints <= 0:
        raise SeedConfigError(
            f"num_checkpoints={num_checkpoints!r}: must be a whole number > 0", where="checkpoint estimate"
        )
    if num_checkpoints == 1:
        return [total_steps]
    first = total_steps // 4
    checkpoints = []
    for i in range(num_checkpoints):
        checkpoint = min(first * (2**i), total_steps)
        checkpoints.append(checkpoint)
        if checkpoint == total_steps:
            break
    if len(checkpoints) < num_checkpoints:
        log.warning(
            "estimate_checkpoint_steps(%d, %d) places only %d checkpoints %s: the series from total//4 reaches "
            "total_steps first (the seed's behaviour, kept for compatibility)",
            total_steps,
            num_checkpoints,
            len(checkpoints),
            checkpoints,
        )
    return checkpoints


class WSDLrScheduler:
    """pytorch_accelerated's ``WSDLrScheduler`` (0.1.61) over :class:`WSDSchedule`; see the module docstring.

    Call ``step()`` after each optimizer update; after ``k`` calls every param group's LR is the seed's.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        num_epochs: int | None = None,
        num_update_steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        num_warmup_steps: int | None = 0,
        decay_phase_ratio: float = 0.1,
        lr_min: float = 1e-6,
        warmup_starting_lr: float = 1e-6,
        use_inverse_sqrt_decay: bool = True,
        num_checkpoints: int = 1,
        is_continuation_from_checkpoint: bool = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise SeedConfigError(
                f"optimizer={type(optimizer).__name__}: pass a torch.optim.Optimizer", where="WSDLrScheduler"
            )
        if num_epochs is not None and num_update_steps_per_epoch is not None and total_steps is not None:
            raise SeedConfigError(
                "Only num_epochs and num_update_steps_per_epoch, or total_steps should be provided",
                where="WSDLrScheduler",
            )
        if num_epochs is not None and num_update_steps_per_epoch is not None:
            total_steps = num_epochs * num_update_steps_per_epoch
        self.optimizer = optimizer
        self.param_group_field = "lr"
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lr_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.total_steps = total_steps
        self.num_warmup_steps = num_warmup_steps
        self.decay_phase_ratio = decay_phase_ratio
        self.lr_min = lr_min
        self.warmup_starting_lr = warmup_starting_lr
        self.use_inverse_sqrt_decay = use_inverse_sqrt_decay
        self.num_checkpoints = num_checkpoints
        self.is_continuation_from_checkpoint = is_continuation_from_checkpoint
        self.previous_checkpoint_step: int | None = None
        self._num_updates = -1
        self._rebuild()
        self._warn_floor_tail()
        # The seed leaves the peak LR in place until the first step(); we start at the schedule's first value.
        self._set_lrs(0)

    # ------------------------------------------------------------------ the schedule underneath

    def _rebuild(self) -> None:
        problems = []
        total = self.total_steps
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            problems.append(
                f"total_steps={total!r}: give total_steps > 0, or num_epochs and num_update_steps_per_epoch"
            )
        if not (isinstance(self.decay_phase_ratio, (int, float)) and 0 <= self.decay_phase_ratio <= 1):
            problems.append(f"decay_phase_ratio={self.decay_phase_ratio!r}: must be between 0 and 1")
        if not (isinstance(self.lr_min, (int, float)) and 0 <= self.lr_min <= 1):
            problems.append(f"lr_min={self.lr_min!r}: a fraction of the base LR in [0, 1] (0.1 means 10%)")
        elif self.lr_min == 0 and not self.use_inverse_sqrt_decay:
            problems.append(
                "lr_min=0 with use_inverse_sqrt_decay=False: the inverse-proportional decay divides by lr_min "
                "(the seed raises ZeroDivisionError mid-run); set lr_min > 0, e.g. 1e-6"
            )
        if not isinstance(self.num_checkpoints, int) or self.num_checkpoints <= 0:
            problems.append(f"num_checkpoints={self.num_checkpoints!r}: must be a whole number > 0")
        if not isinstance(self.warmup_starting_lr, (int, float)) or self.warmup_starting_lr < 0:
            problems.append(f"warmup_starting_lr={self.warmup_starting_lr!r}: must be a number >= 0")
        elif self.warmup_starting_lr > max(self.base_lr_values):
            problems.append("warmup_starting_lr should not exceed maximum base learning rate")
        if problems:
            raise SeedConfigError(problems, where="WSDLrScheduler")
        assert isinstance(total, int)
        if self.num_warmup_steps is None:
            self.num_warmup_steps = int(0.01 * total)
        checkpoints = estimate_checkpoint_steps(total, self.num_checkpoints)
        if checkpoints[0] <= 0 or any(b <= a for a, b in zip(checkpoints, checkpoints[1:])):
            raise SeedConfigError(
                f"total_steps={total} is too short for num_checkpoints={self.num_checkpoints}: the checkpoints "
                f"would be {checkpoints} (the seed divides by zero on them); use num_checkpoints=1 or >= 4 steps "
                "per checkpoint",
                where="WSDLrScheduler",
            )
        starts = [0, *checkpoints[:-1]]
        lengths = tuple(int((end - start) * self.decay_phase_ratio) for start, end in zip(starts, checkpoints))
        warmup = 0 if self.is_continuation_from_checkpoint else self.num_warmup_steps
        self.checkpoint_steps = checkpoints
        self.checkpoint_decay_info = [
            {"period_start": s, "period_end": e, "decay_steps": d, "pre_decay_step": e - d}
            for s, e, d in zip(starts, checkpoints, lengths)
        ]
        # The seed holds the floor from its last checkpoint on, past total_steps too (its own tests read the LR at
        # step total_steps), and lets a long warmup override whatever falls under it: both said in the schedule.
        # A zero-length decay is no decay (the seed divides by it after its last checkpoint).
        try:
            self._schedule = self._build_schedule(total, warmup, checkpoints, lengths)
        except ConfigError as exc:  # the seed's error type for whatever the schedule itself refuses
            raise SeedConfigError(exc.problems, where="WSDLrScheduler") from None
        self._start_ratios = [self.warmup_starting_lr / base if base > 0 else 0.0 for base in self.base_lr_values]

    def _warn_floor_tail(self) -> None:
        """The seed's placement can end the last decay long before ``total_steps`` (``num_checkpoints=2`` decays at
        a quarter and a half of the run, then trains the second half at ``lr_min``): say so, with the fix."""
        from .checkpoint.guards import warn_floor_tail

        warn_floor_tail(
            self._schedule,
            int(self.total_steps),  # type: ignore[arg-type]
            what=f"WSDLrScheduler(num_checkpoints={self.num_checkpoints}, total_steps={self.total_steps})",
            fix=(
                f"The seed places its decays at total_steps // 4 x 1, 2, 4, ... (here {self.checkpoint_steps}); to "
                "end the run with a decay, use num_checkpoints=1 (one decay, at the end) or a count whose series "
                "reaches total_steps (num_checkpoints=3 when total_steps is a multiple of 4: a quarter, a half, "
                "the end)"
            ),
        )

    def _build_schedule(self, total: int, warmup: int, checkpoints: list[int], lengths: tuple[int, ...]) -> WSDSchedule:
        return WSDSchedule(
            total=max(total, warmup) + 1,
            warmup=warmup,
            warmup_shape="linear",
            warmup_overlay=True,
            milestones=tuple(checkpoints),
            decay_length=lengths,
            decay_shape="1-sqrt" if self.use_inverse_sqrt_decay else "inverse",
            min_lr_ratio=float(self.lr_min),
            after_last="floor",
            progress="start",
        )

    @property
    def schedule(self) -> WSDSchedule:
        """The :class:`WSDSchedule` this scheduler follows (``progress="start"``)."""
        return self._schedule

    def _set_lrs(self, num_updates: int) -> None:
        for group, value in zip(self.optimizer.param_groups, self.get_updated_values(num_updates)):
            group[self.param_group_field] = value

    def get_updated_values(self, num_updates: int) -> list[float]:
        """The LRs the seed sets after ``num_updates + 1`` calls to ``step()``, one per param group."""
        position = max(0, num_updates)
        return [
            base * self._schedule.factor(position, warmup_start_ratio=ratio)
            for base, ratio in zip(self.base_lr_values, self._start_ratios)
        ]

    def _track_pre_decay(self, num_updates: int) -> None:
        # The seed records the step just before a decay starts (outside the warmup) in previous_checkpoint_step.
        if num_updates < self._schedule.warmup:
            return
        for event in self._schedule.events_between(num_updates, num_updates + 1):
            if event.kind == "pre-decay" and num_updates >= event.milestone.period_start:
                self.previous_checkpoint_step = num_updates

    # ------------------------------------------------------------------ the seed's API

    def step(self) -> None:
        """Advance one optimizer update and set the LRs for the next one."""
        self._num_updates += 1
        self._track_pre_decay(self._num_updates)
        self._set_lrs(self._num_updates)

    def step_update(self, num_updates: int) -> None:
        """Set the LRs as after ``num_updates + 1`` steps (the seed's stateless entry point)."""
        self._set_lrs(num_updates)

    def get_checkpoint_steps(self) -> list[int]:
        """The steps at which the seed's checkpoints fall (ends of the decays)."""
        return self.checkpoint_steps

    def get_decay_info(self) -> list[dict[str, int]]:
        """Per period: ``period_start``, ``period_end``, ``decay_steps``, ``pre_decay_step``."""
        return self.checkpoint_decay_info

    def get_phase_info(self, num_updates: int) -> dict[str, int]:
        """The decay info of the period holding ``num_updates`` (the last one past the end)."""
        for info in self.checkpoint_decay_info:
            if info["period_end"] >= num_updates:
                return info
        return self.checkpoint_decay_info[-1]

    @_SeedCachedMethod
    def _get_checkpoint_info(self, num_updates: int) -> tuple[int, int]:
        """``(period length, steps into the period)`` for ``num_updates``, with the seed's results everywhere.

        The seed's own (private) helper, kept because its tests and code built on it call it. As in the seed, a
        step at or past the last checkpoint falls back to the first period (its loop finds no later checkpoint),
        so there the second number exceeds the first; nothing in compat's LR arithmetic uses it.
        """
        checkpoints = self.checkpoint_steps  # the continuation's own, recomputed from its total, as the seed does
        current = 0
        for i, checkpoint in enumerate(checkpoints):
            if num_updates < checkpoint:
                current = i
                break
        period_start = 0 if current == 0 else checkpoints[current - 1]
        return checkpoints[current] - period_start, num_updates - period_start

    def get_current_step(self) -> int:
        """Optimizer updates completed so far, minus one (-1 before the first ``step()``), as in the seed."""
        return self._num_updates

    def get_current_phase_info(self) -> dict[str, int]:
        """:meth:`get_phase_info` at the current step."""
        return self.get_phase_info(self._num_updates)

    def state_dict(self) -> dict[str, Any]:
        """The seed's keys plus ``num_updates``, the step counter the seed forgot."""
        state = {key: getattr(self, key) for key in _SEED_STATE_KEYS}
        state["checkpoint_decay_info"] = [dict(d) for d in self.checkpoint_decay_info]
        state["num_updates"] = self._num_updates
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` or from the seed's own ``state_dict()``.

        Resume: the step counter comes back and the LR continues where it was (a seed state has no counter: the
        schedule then restarts, as in the seed, with a warning). Continuation: the saved settings come back except
        ``total_steps`` and ``is_continuation_from_checkpoint`` (both this run's); the counter starts afresh.
        """
        if not isinstance(state_dict, dict):
            raise SeedConfigError(
                f"expected a state dict, got {type(state_dict).__name__}", where="WSDLrScheduler state"
            )
        unknown = sorted(set(state_dict) - set(_SEED_STATE_KEYS) - {"num_updates", "_step_count"})
        if unknown:
            raise SeedConfigError(f"unknown keys {unknown}", where="WSDLrScheduler state")
        continuation = self.is_continuation_from_checkpoint
        new_total = self.total_steps
        keys = _SCHEDULE_KEYS if continuation else (*_SCHEDULE_KEYS, "is_continuation_from_checkpoint")
        for key in keys:
            if key in state_dict:
                setattr(self, key, state_dict[key])
        if continuation:
            self.total_steps = new_total
            self.previous_checkpoint_step = None
            self._num_updates = -1
        else:
            self.previous_checkpoint_step = state_dict.get("previous_checkpoint_step")
            if "num_updates" in state_dict:
                self._num_updates = int(state_dict["num_updates"])
            else:
                log.warning(
                    "this scheduler state has no step counter (written by pytorch_accelerated): "
                    "the schedule restarts from step 0, as it did in the seed"
                )
        self._rebuild()
        self._set_lrs(self._num_updates)

    @classmethod
    def create_scheduler_fn(
        cls,
        total_num_epochs: Any = None,
        num_update_steps_per_epoch: Any = None,
        num_warmup_epochs: int | None = None,
        decay_phase_ratio: float = 0.1,
        lr_min: float = 1e-6,
        warmup_starting_lr: float = 1e-6,
        use_inverse_sqrt_decay: bool = True,
        num_checkpoints: int = 1,
        is_continuation_from_checkpoint: bool = False,
        *,
        num_warmup_steps: int | None = None,
    ) -> Callable[..., WSDLrScheduler]:
        """A function ``optimizer -> WSDLrScheduler`` for pytorch_accelerated's ``Trainer``.

        As in the seed, the epoch counts default to the Trainer's placeholders (when pytorch_accelerated is
        installed), which it replaces with the run's values. The warmup is ``num_warmup_epochs`` epochs or
        ``num_warmup_steps`` optimizer updates (not both; an addition to the seed's arguments); neither means 1% of
        the steps.
        """
        if num_warmup_epochs is not None and num_warmup_steps is not None:
            raise SeedConfigError(
                f"num_warmup_epochs={num_warmup_epochs} and num_warmup_steps={num_warmup_steps}: give one of them",
                where="WSDLrScheduler.create_scheduler_fn",
            )
        if num_warmup_steps is not None and (
            isinstance(num_warmup_steps, bool) or not isinstance(num_warmup_steps, int) or num_warmup_steps < 0
        ):
            raise SeedConfigError(
                f"num_warmup_steps={num_warmup_steps!r}: a whole number of optimizer updates >= 0",
                where="WSDLrScheduler.create_scheduler_fn",
            )
        placeholders = _trainer_placeholders()
        if total_num_epochs is None and placeholders is not None:
            total_num_epochs = placeholders.NUM_EPOCHS
        if num_update_steps_per_epoch is None and placeholders is not None:
            num_update_steps_per_epoch = placeholders.PER_PROCESS_NUM_UPDATE_STEPS_PER_EPOCH
        warmup: Any = num_warmup_steps
        if num_warmup_epochs is not None:
            warmup = num_update_steps_per_epoch * num_warmup_epochs
        return partial(
            cls,
            num_epochs=total_num_epochs,
            num_update_steps_per_epoch=num_update_steps_per_epoch,
            num_warmup_steps=warmup,
            decay_phase_ratio=decay_phase_ratio,
            lr_min=lr_min,
            warmup_starting_lr=warmup_starting_lr,
            use_inverse_sqrt_decay=use_inverse_sqrt_decay,
            num_checkpoints=num_checkpoints,
            is_continuation_from_checkpoint=is_continuation_from_checkpoint,
        )


def _trainer_placeholders() -> Any:
    try:
        from pytorch_accelerated.trainer import TrainerPlaceholderValues
    except ImportError:
        return None
    return TrainerPlaceholderValues


def __getattr__(name: str) -> Any:
    # WSDCheckpointCallback subclasses pytorch_accelerated's TrainerCallback: imported on first use only, so that
    # this module works without pytorch_accelerated installed
    if name == "WSDCheckpointCallback":
        from .integrations.pytorch_accelerated import WSDCheckpointCallback

        return WSDCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
