"""``WSDScheduler``: a torch LR scheduler that is a thin shell around a :class:`~wsd_pretrain.WSDSchedule`.

Call ``step()`` once per real optimizer update (``step(tokens=n)`` for a token-based schedule). Each param group
keeps its own base LR; its LR is ``base_lr * schedule.factor(position)``. The state is the position and little
else, so resuming recomputes the exact LR sequence (torchtitan: "LR schedules are stateless functions of
(last_epoch, base_lr)").

Works as is with plain torch loops (DDP, FSDP2) and with DeepSpeed (``deepspeed.initialize(lr_scheduler=...)``,
as an object or as ``WSDScheduler.factory(schedule)``; see :mod:`wsd_pretrain.deepspeed_scheduler`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from .errors import CheckpointError, ConfigError, WSDError
from .schedule import Event, Phase, WSDSchedule

__all__ = ["WSDScheduler"]

log = logging.getLogger(__name__)

STATE_FORMAT = "wsd_pretrain.WSDScheduler"
STATE_VERSION = 1


class WSDScheduler(LRScheduler):
    """Sets every param group's LR from a :class:`WSDSchedule` at the current position.

    Args:
        optimizer: any torch optimizer, any number of param groups; each group's ``lr`` at construction is its
            base LR (kept as ``initial_lr``, as torch's schedulers do).
        schedule: the schedule.
        warmup_start_lr: an absolute LR to start the warmup from, the same for every group (the seed's
            ``warmup_starting_lr``); refused if above any group's base LR. Default: the schedule's
            ``warmup_start_ratio`` times each group's base LR.
        tokens_per_step: for a token-based schedule, the tokens one update consumes when ``step()`` is called
            without ``tokens=``; also counted (for logging) with a step-based schedule.

    Example::

        sched = WSDScheduler(opt, WSDSchedule(total=10_000, warmup=500, decay_fraction=0.2))
        for batch in loader:
            loss(model(batch)).backward(); opt.step(); opt.zero_grad(); sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: WSDSchedule,
        *,
        warmup_start_lr: float | None = None,
        tokens_per_step: int | None = None,
    ) -> None:
        problems = []
        if not isinstance(schedule, WSDSchedule):
            problems.append(f"schedule={schedule!r}: pass a wsd_pretrain.WSDSchedule")
        if tokens_per_step is not None and (
            not isinstance(tokens_per_step, int) or isinstance(tokens_per_step, bool) or tokens_per_step <= 0
        ):
            problems.append(f"tokens_per_step={tokens_per_step!r}: must be a whole number > 0")
        if warmup_start_lr is not None and (
            isinstance(warmup_start_lr, bool)
            or not isinstance(warmup_start_lr, (int, float))
            or not warmup_start_lr >= 0
        ):
            problems.append(f"warmup_start_lr={warmup_start_lr!r}: must be a number >= 0")
        if not isinstance(optimizer, Optimizer):
            problems.append(f"optimizer={type(optimizer).__name__}: pass a torch.optim.Optimizer")
        if problems:
            raise ConfigError(problems, where="WSDScheduler")
        self.schedule = schedule
        self.warmup_start_lr = None if warmup_start_lr is None else float(warmup_start_lr)
        self.tokens_per_step = tokens_per_step
        self.position = schedule.origin
        self.previous_position = schedule.origin
        self.tokens = 0
        self._started = False
        self._start_ratios: list[float | None] = []
        # LRScheduler.__init__ records initial_lr/base_lrs and calls step() once: our step() treats that first
        # call as "set the LR for position `origin`" and advances nothing.
        super().__init__(optimizer)

    @classmethod
    def factory(cls, schedule: WSDSchedule, **kwargs: Any) -> Callable[[Optimizer], WSDScheduler]:
        """A callable ``optimizer -> WSDScheduler``, for ``deepspeed.initialize(lr_scheduler=...)``, which then
        builds the scheduler on the optimizer it really steps."""
        return partial(cls, schedule=schedule, **kwargs)

    # ------------------------------------------------------------------ stepping

    def step(self, epoch: int | None = None, **kwargs: Any) -> None:  # type: ignore[override]
        """Advance by one optimizer update (``tokens=n``: by the ``n`` tokens it consumed) and set the LRs.

        Never raises TypeError: DeepSpeed answers a TypeError from ``step(**lr_kwargs)`` by calling
        ``step(train_batch_size())`` again, which would advance the schedule twice.
        """
        try:
            self._step(epoch, kwargs)
        except WSDError:
            raise
        except TypeError as exc:
            raise WSDError(f"WSDScheduler.step failed: {exc}") from exc

    def _step(self, epoch: int | None, kwargs: dict[str, Any]) -> None:
        if not self._started:
            self._started = True
            self.last_epoch = 0
            self._step_count = 1
            self._start_ratios = self._compute_start_ratios()
            self._apply()
            return
        if epoch is not None:
            raise ConfigError(
                f"step({epoch!r}): WSDScheduler.step() takes no epoch; call step() once per optimizer update, "
                "or step(tokens=n) for a token-based schedule",
                where="WSDScheduler.step",
            )
        tokens = kwargs.pop("tokens", None)
        if kwargs:
            raise ConfigError(
                f"unknown argument(s) {sorted(kwargs)}; step() takes only tokens=", where="WSDScheduler.step"
            )
        if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0):
            raise ConfigError(f"tokens={tokens!r}: must be a whole number >= 0", where="WSDScheduler.step")
        increment = tokens if tokens is not None else self.tokens_per_step
        self.previous_position = self.position
        if self.schedule.units == "tokens":
            if increment is None:
                raise ConfigError(
                    "this schedule counts tokens: call step(tokens=n) or build the scheduler with tokens_per_step",
                    where="WSDScheduler.step",
                )
            self.position += increment
        else:
            self.position += 1
        self.tokens += increment or 0
        self.last_epoch += 1
        self._step_count += 1
        self._apply()

    def _compute_start_ratios(self) -> list[float | None]:
        if self.warmup_start_lr is None:
            return [None] * len(self.base_lrs)
        ratios: list[float | None] = []
        for i, base in enumerate(self.base_lrs):
            base = float(base)
            if self.warmup_start_lr > base:
                raise ConfigError(
                    f"warmup_start_lr={self.warmup_start_lr} is above param group {i}'s base LR {base}: "
                    "a warmup starts at or below the base LR",
                    where="WSDScheduler",
                )
            ratios.append(self.warmup_start_lr / base if base > 0 else 0.0)
        return ratios

    def start_at(self, position: int, *, updates: int | None = None, tokens: int = 0) -> None:
        """Jump to ``position`` (for a checkpoint that has no scheduler state, e.g. one imported from DeepSpeed
        without a WSDScheduler): the LRs are set for it."""
        if not isinstance(position, int) or position < self.schedule.origin:
            raise ConfigError(
                f"position={position!r}: a whole number >= the schedule's origin {self.schedule.origin}",
                where="WSDScheduler.start_at",
            )
        self.position = self.previous_position = position
        self.last_epoch = position if updates is None else updates
        self.tokens = tokens
        self._apply()

    def refresh(self) -> None:
        """Set every group's LR for the current position again, after something else wrote the param groups
        (restoring an optimizer state does; the checkpoint manager calls this after a branching rewind)."""
        self._apply()

    def _apply(self) -> None:
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            group["lr"].clone() if isinstance(group["lr"], torch.Tensor) else group["lr"]
            for group in self.optimizer.param_groups
        ]

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LRs for the update that starts at the current position."""
        schedule, position = self.schedule, self.position
        if all(r is None for r in self._start_ratios):
            f = schedule.factor(position)
            return [float(base) * f for base in self.base_lrs]
        return [
            float(base) * schedule.factor(position, warmup_start_ratio=r)
            for base, r in zip(self.base_lrs, self._start_ratios)
        ]

    # ------------------------------------------------------------------ queries

    @property
    def phase(self) -> Phase:
        """The phase of the next update."""
        return self.schedule.phase_at(self.position)

    def events(self) -> list[Event]:
        """Checkpoint points (pre-decay, post-decay) reached by the last ``step()``."""
        if self.position == self.previous_position:
            return []
        return self.schedule.events_between(self.previous_position, self.position)

    @property
    def finished(self) -> bool:
        """True once the position has reached the schedule's end."""
        return self.position >= self.schedule.end

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values: the position, counters, base LRs and the schedule they belong to."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "position": self.position,
            "previous_position": self.previous_position,
            "trajectory_position": self.schedule.trajectory_position(self.position),
            "updates": self.last_epoch,
            "tokens": self.tokens,
            "base_lrs": [float(b) for b in self.base_lrs],
            "warmup_start_lr": self.warmup_start_lr,
            "tokens_per_step": self.tokens_per_step,
            "schedule": self.schedule.to_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume exactly: the saved position under the same schedule. A continuation schedule built at the saved
        trajectory position (``schedule.continued(at=...)``, ``schedule.cooldown(at=...)``) accepts the state and
        starts at its origin. Any other schedule change is refused: a resumed run never silently changes its LR
        curve."""
        state = _validated_state(state_dict)
        saved = state["schedule"]
        mine = self.schedule.to_dict()
        if len(state["base_lrs"]) != len(self.base_lrs):
            raise CheckpointError(
                f"the scheduler state has {len(state['base_lrs'])} param groups, this optimizer has "
                f"{len(self.base_lrs)}: build the optimizer with the same param groups as the saved run"
            )
        if saved == mine:
            self.position = state["position"]
            self.previous_position = state["previous_position"]
            self.base_lrs = list(state["base_lrs"])
        elif self.schedule.origin > 0 and self.schedule.origin == state["trajectory_position"]:
            log.info(
                "continuing from position %d under a new schedule (total %s -> %s)",
                state["trajectory_position"],
                saved.get("total"),
                mine["total"],
            )
            self.position = self.previous_position = self.schedule.origin
        else:
            changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in changed)
            raise CheckpointError(
                "the checkpoint's scheduler ran under another schedule "
                f"({detail}); to resume, use the saved schedule; to continue with a new length, build "
                f"schedule.continued(at={state['trajectory_position']}, total=...) or "
                f"schedule.cooldown(at={state['trajectory_position']}, length=...)"
            )
        self.last_epoch = state["updates"]
        self.tokens = state["tokens"]
        self._start_ratios = self._compute_start_ratios()
        self._apply()


def _validated_state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        keys = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"not a WSDScheduler state (got {keys}); a pytorch_accelerated WSDLrScheduler state loads into "
            "wsd_pretrain.compat.WSDLrScheduler"
        )
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"scheduler state version {state.get('version')!r}; this release reads {STATE_VERSION}")
    ints = ("position", "previous_position", "trajectory_position", "updates", "tokens")
    bad = [k for k in ints if not isinstance(state.get(k), int) or isinstance(state.get(k), bool)]
    if bad or not isinstance(state.get("schedule"), dict) or not isinstance(state.get("base_lrs"), list):
        raise CheckpointError(f"scheduler state is malformed (bad or missing: {bad or ['schedule', 'base_lrs']})")
    return state
