"""The Warmup-Stable-Decay schedule: a frozen, validated value and a pure function of the position.

Positions are counted in ``units``: optimizer updates (``"steps"``) or tokens (``"tokens"``, for runs whose batch
size changes). Position ``p`` is "``p`` units done": the update that starts at position ``p`` runs at
``base_lr * schedule.factor(p)``. Phase membership goes by the position an update starts at, so a decay that begins
at position ``a`` and lasts ``D`` covers the updates that start in ``[a, a + D)``.

Milestones are the points where a finished (decayed) model comes out: milestone ``m`` with decay length ``D`` means
"the model trained for a budget of ``m``", its decay covering the last ``D`` units before ``m``. The state at
``m - D`` is the **pre-decay** point, the state at ``m`` the **post-decay** point. What follows a milestone depends
on ``mode``:

* ``"wsd-s"`` (Wen et al. 2024; the seed): training continues from the decayed weights, the LR back at the base
  value, towards the next milestone.
* ``"branching"`` (WSD with side branches): the decay was a side branch; the run goes back to the pre-decay state
  and continues the stable phase. The schedule's position never goes back: it counts every unit of work, branches
  included, so the LR stays a pure function of it, and each :class:`Milestone` says where the branch starts and
  ends on that axis (``pre_decay``, ``post_decay``, ``rewind``).

Example::

    >>> s = WSDSchedule(total=1000, warmup=100, decay_fraction=0.2, decay_shape="1-sqrt")
    >>> s.factor(0), s.factor(500), s.factor(999)
    (0.01, 1.0, 0.0)
    >>> [(m.pre_decay, m.post_decay) for m in s.milestones_info]
    [(800, 1000)]

Every lookup is O(log #milestones) (a bisection over phase boundaries computed once in ``__post_init__``).
"""

from __future__ import annotations

import difflib
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, NamedTuple

from .errors import ConfigError
from .shapes import (
    POSITIVE_FLOOR_SHAPES,
    canonical_decay_shape,
    canonical_warmup_shape,
    decay_factor,
    warmup_weight,
)

__all__ = ["Event", "Milestone", "Phase", "WSDSchedule"]

DEFAULT_DECAY_FRACTION = 0.2
_WARMUP, _STABLE, _DECAY, _FLOOR = "warmup", "stable", "decay", "floor"
# Tolerance when a fraction times a length should land on a whole number: 0.29 * 100 is 28.999999999999996.
_EPS = 1e-9


class _Segment(NamedTuple):
    """A run of positions [start, end) of one kind; a decay cut short by an overlaid warmup keeps the span of the
    whole phase in phase_start/phase_length, which its progress is measured against."""

    start: int
    end: int
    kind: str
    index: int
    phase_start: int = -1
    phase_length: int = -1

    @staticmethod
    def of(start: int, end: int, kind: str, index: int) -> _Segment:
        return _Segment(start, end, kind, index, start, end - start)


def _overlay_warmup(segments: list[_Segment], warmup: int) -> list[_Segment]:
    out = [_Segment.of(0, warmup, _WARMUP, 0)]
    for seg in segments:
        if seg.end > warmup:
            out.append(seg._replace(start=max(seg.start, warmup)))
    return out


@dataclass(frozen=True)
class Milestone:
    """One decay of a schedule and the points around it; every position is on the schedule's axis (``units``).

    Attributes:
        index: 0-based order of the milestone.
        at: the budget of the finished model: where the decay ends on its own trajectory.
        decay_length: units the decay lasts (0: a save point with no decay).
        pre_decay: position of the pre-decay state (the decay's first update starts here).
        post_decay: position of the post-decay state (the decay's last update ends here).
        rewind: True in branching mode: after the post-decay point, the run restores the pre-decay state and goes on
            with the stable phase from position ``post_decay`` (the axis never goes back).
        period_start: trajectory position where this milestone's period starts (the previous milestone, or the
            origin; in branching mode every period starts at the origin, each branch being a whole run).
        final: this is the run's last decay.
    """

    index: int
    at: int
    decay_length: int
    pre_decay: int
    post_decay: int
    rewind: bool
    period_start: int
    final: bool

    @property
    def trajectory_pre_decay(self) -> int:
        """The trajectory position (units trained into the model) of the pre-decay state."""
        return self.at - self.decay_length


@dataclass(frozen=True)
class Phase:
    """Where a position falls: ``name`` is warmup, stable, decay or floor (after the last decay)."""

    name: str
    period: int  # milestones completed before this position: the index of the milestone being worked towards
    start: int  # first position of this phase
    length: int  # units in the phase
    offset: int  # units into the phase
    progress: float  # fraction of the phase done, as the LR formula sees it (0 for stable and floor)


@dataclass(frozen=True)
class Event:
    """A checkpoint point reached: ``kind`` is ``"pre-decay"`` or ``"post-decay"``."""

    kind: str
    position: int
    milestone: Milestone


@dataclass(frozen=True, kw_only=True)
class WSDSchedule:
    """Warmup, stable and decay phases as a pure function of the position (see the module docstring)."""

    total: int
    """Length of the run in ``units`` (in branching mode, of the main trajectory; branches add to it)."""
    units: Literal["steps", "tokens"] = "steps"
    """What a position counts: optimizer updates or tokens."""
    warmup: int = 0
    """Warmup length in units, from position 0."""
    warmup_shape: str = "linear"
    """linear, cosine or 1-sqrt."""
    warmup_start_ratio: float = 0.0
    """LR at the start of the warmup as a fraction of the base LR, in [0, 1]."""
    milestones: str | tuple[int, ...] = "end"
    """"end" (one decay ending at ``total``), "geometric" (``num_milestones`` budgets, each twice the previous,
    the last at ``total``), "none" (no decay: warmup then stable, to be cooled down later), or explicit budgets."""
    num_milestones: int | None = None
    """How many budgets "geometric" places."""
    decay_fraction: float | None = None
    """Decay length as a fraction of each milestone's period (default 0.2 when ``decay_length`` is not given).
    The length is floor(period x fraction); 0 means no decay at that milestone (it stays a save point)."""
    decay_length: int | tuple[int, ...] | None = None
    """Decay length in units, one for all milestones or one per milestone (0: no decay there)."""
    decay_shape: str | Callable[[float], float] = "1-sqrt"
    """linear, cosine, 1-sqrt, inverse (Wen et al.), exponential, or a callable g(t): 1 at t=0 down to 0 at t=1."""
    min_lr_ratio: float = 0.0
    """LR at the end of a decay as a fraction of the base LR, in [0, 1] (> 0 for inverse and exponential)."""
    mode: Literal["wsd-s", "branching"] = "wsd-s"
    """What follows a milestone: go on from the decayed weights ("wsd-s"), or rewind to the pre-decay state
    ("branching")."""
    after_last: Literal["floor", "stable"] | None = None
    """What the LR does between the last milestone and ``total``, when the last milestone is before ``total``:
    stay at the floor, or go back to the stable LR. Required in that case, refused otherwise."""
    progress: Literal["end", "start"] = "end"
    """Where in an update its LR is read: "end" (the warmup's last update runs at the base LR and a decay's last
    update at the floor) or "start" (the first warmup update runs at the start LR and a decay's last update just
    above the floor: the convention of transformers and of the seed)."""
    origin: int = 0
    """First position of this schedule: 0 for a fresh run, the checkpoint's position for a continuation."""
    warmup_overlay: bool = False
    """False: a warmup that reaches a decay is refused. True: the seed's rule, kept for compatibility: during the
    warmup its values replace the schedule's, and the decays keep their places (one may end up cut short)."""

    # Derived once in __post_init__ (never keyed on self, never recomputed).
    _milestones: tuple[Milestone, ...] = field(init=False, repr=False, compare=False)
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _segments: tuple[_Segment, ...] = field(init=False, repr=False, compare=False)
    _events: tuple[tuple[int, int, str, int], ...] = field(init=False, repr=False, compare=False)
    _event_positions: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _post_positions: tuple[int, ...] = field(init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ validation and plan

    def __post_init__(self) -> None:
        problems: list[str] = []
        self._normalise(problems)
        if problems:
            raise ConfigError(problems, where="WSD schedule")
        budgets = self._budgets(problems)
        lengths = self._decay_lengths(budgets, problems) if budgets is not None else None
        if problems or budgets is None or lengths is None:
            raise ConfigError(problems, where="WSD schedule")
        self._check_layout(budgets, lengths, problems)
        if problems:
            raise ConfigError(problems, where="WSD schedule")
        self._build(budgets, lengths)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _normalise(self, problems: list[str]) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_ratio(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1

        if not is_int(self.total) or self.total <= 0:
            problems.append(f"total={self.total!r}: the run length must be a positive whole number of {self.units}")
        if self.units not in ("steps", "tokens"):
            problems.append(f"units={self.units!r}: use 'steps' or 'tokens'")
        if not is_int(self.origin) or self.origin < 0:
            problems.append(f"origin={self.origin!r}: must be a whole number >= 0")
        elif is_int(self.total) and self.origin >= self.total:
            problems.append(
                f"origin={self.origin} is not before total={self.total}: a continuation must end after it starts"
            )
        if not is_int(self.warmup) or self.warmup < 0:
            problems.append(f"warmup={self.warmup!r}: must be a whole number >= 0 (0 for no warmup)")
        elif self.origin and is_int(self.origin) and self.warmup > self.origin:
            problems.append(
                f"warmup={self.warmup} ends after origin={self.origin}: a continuation does not warm up again; "
                "set warmup=0 or start after the warmup"
            )
        shape = canonical_warmup_shape(self.warmup_shape) if isinstance(self.warmup_shape, str) else None
        if shape is None:
            problems.append(f"warmup_shape={self.warmup_shape!r}: use one of linear, cosine, 1-sqrt")
        else:
            self._set("warmup_shape", shape)
        if not is_ratio(self.warmup_start_ratio):
            problems.append(
                f"warmup_start_ratio={self.warmup_start_ratio!r}: the start LR is a fraction of the base LR in "
                "[0, 1]; a start LR above the base LR is not a warmup"
            )
        if not is_ratio(self.min_lr_ratio):
            problems.append(
                f"min_lr_ratio={self.min_lr_ratio!r}: the floor is a fraction of the base LR in [0, 1] "
                "(0.1 means 10% of the base LR)"
            )
        if callable(self.decay_shape):
            self._check_callable_shape(problems)
        else:
            dshape = canonical_decay_shape(self.decay_shape) if isinstance(self.decay_shape, str) else None
            if dshape is None:
                problems.append(
                    f"decay_shape={self.decay_shape!r}: use one of linear, cosine, 1-sqrt, inverse, exponential, "
                    "or pass a callable"
                )
            else:
                self._set("decay_shape", dshape)
                if dshape in POSITIVE_FLOOR_SHAPES and is_ratio(self.min_lr_ratio) and self.min_lr_ratio == 0:
                    problems.append(
                        f"min_lr_ratio=0 with decay_shape={dshape!r}: this shape needs a floor above 0 "
                        "(it divides by it or raises it to a power); set min_lr_ratio, e.g. 0.01"
                    )
        if self.mode not in ("wsd-s", "branching"):
            problems.append(f"mode={self.mode!r}: use 'wsd-s' or 'branching'")
        if self.after_last not in (None, "floor", "stable"):
            problems.append(f"after_last={self.after_last!r}: use 'floor', 'stable' or leave it unset")
        if self.progress not in ("end", "start"):
            problems.append(f"progress={self.progress!r}: use 'end' or 'start'")
        if isinstance(self.milestones, (list, tuple)):
            if not all(is_int(m) for m in self.milestones):
                problems.append(
                    f"milestones={self.milestones!r}: explicit milestones are whole numbers of {self.units}"
                )
            else:
                self._set("milestones", tuple(self.milestones))
        elif self.milestones not in ("end", "geometric", "none"):
            problems.append(f"milestones={self.milestones!r}: use 'end', 'geometric', 'none' or a list of {self.units}")
        if self.num_milestones is not None and (not is_int(self.num_milestones) or self.num_milestones < 1):
            problems.append(f"num_milestones={self.num_milestones!r}: must be a whole number >= 1")
        elif self.num_milestones is not None and self.milestones != "geometric":
            problems.append(
                f"num_milestones={self.num_milestones} is only read with milestones='geometric' "
                f"(milestones={self.milestones!r}); remove it or set milestones='geometric'"
            )
        if isinstance(self.decay_length, (list, tuple)):
            if not all(is_int(d) and d >= 0 for d in self.decay_length):
                problems.append(f"decay_length={self.decay_length!r}: lengths are whole numbers >= 0")
            else:
                self._set("decay_length", tuple(self.decay_length))
        elif self.decay_length is not None and (not is_int(self.decay_length) or self.decay_length < 0):
            problems.append(f"decay_length={self.decay_length!r}: must be a whole number >= 0 (0: no decay)")
        if self.decay_fraction is not None:
            if self.decay_length is not None:
                problems.append(
                    f"decay_fraction={self.decay_fraction!r} and decay_length={self.decay_length!r} are both set: "
                    "give the decay as a fraction of each period or as a length, not both"
                )
            elif not is_ratio(self.decay_fraction):
                problems.append(f"decay_fraction={self.decay_fraction!r}: must be in [0, 1] (0: no decay)")

    def _check_callable_shape(self, problems: list[str]) -> None:
        name = getattr(self.decay_shape, "__qualname__", repr(self.decay_shape))
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            try:
                value = float(self.decay_shape(t))  # type: ignore[operator]
            except Exception as exc:  # the user's function; report whatever it raised
                problems.append(f"decay_shape={name}: calling it with t={t} raised {exc!r}")
                return
            if not (math.isfinite(value) and -_EPS <= value <= 1 + _EPS):
                problems.append(
                    f"decay_shape={name}: g({t}) = {value!r}; a decay shape maps progress t in [0, 1] to a "
                    "weight in [0, 1] (1: base LR, 0: the floor)"
                )
                return

    def _budgets(self, problems: list[str]) -> tuple[int, ...] | None:
        span = self.total - self.origin
        if self.milestones == "none":
            return ()
        if self.milestones == "end":
            return (self.total,)
        if self.milestones == "geometric":
            n = self.num_milestones or 1
            if span < 2 ** (n - 1):
                problems.append(
                    f"num_milestones={n}: {span} {self.units} cannot hold {n} budgets that double each time "
                    f"(the first would be {span}/2^{n - 1}); use fewer milestones or a longer run"
                )
                return None
            return tuple(self.origin + (span >> (n - 1 - i)) for i in range(n))
        budgets = tuple(self.milestones)  # explicit
        if not budgets:
            return ()
        bad = [m for m in budgets if not self.origin < m <= self.total]
        if bad:
            problems.append(
                f"milestones={list(budgets)}: {bad} outside ({self.origin}, {self.total}]; each milestone is a "
                f"budget in {self.units} after the start and no later than total"
            )
        if any(b <= a for a, b in zip(budgets, budgets[1:])):
            problems.append(f"milestones={list(budgets)}: milestones must be in increasing order, each once")
        return None if problems else budgets

    def _period_start(self, i: int, budgets: Sequence[int]) -> int:
        if self.mode == "branching" or i == 0:
            return self.origin
        return budgets[i - 1]

    def _decay_lengths(self, budgets: Sequence[int], problems: list[str]) -> tuple[int, ...] | None:
        n = len(budgets)
        if isinstance(self.decay_length, tuple):
            if len(self.decay_length) != n:
                problems.append(
                    f"decay_length={list(self.decay_length)} has {len(self.decay_length)} entries for {n} "
                    f"milestones {list(budgets)}: give one length per milestone, or a single length"
                )
                return None
            return self.decay_length
        if isinstance(self.decay_length, int):
            return (self.decay_length,) * n
        fraction = DEFAULT_DECAY_FRACTION if self.decay_fraction is None else float(self.decay_fraction)
        lengths = []
        for i, m in enumerate(budgets):
            period = m - self._period_start(i, budgets)
            d = math.floor(period * fraction + _EPS)
            if d == 0 and fraction > 0:
                problems.append(
                    f"decay_fraction={fraction} of the {period}-{self.units[:-1]} period ending at milestone {m} "
                    "rounds to a decay of 0: use a larger fraction, an explicit decay_length, or 0 for no decay"
                )
            lengths.append(d)
        return tuple(lengths)

    def _check_layout(self, budgets: Sequence[int], lengths: Sequence[int], problems: list[str]) -> None:
        last_at_total = bool(budgets) and budgets[-1] == self.total
        if budgets and not last_at_total and self.after_last is None:
            problems.append(
                f"the last milestone {budgets[-1]} is before total={self.total}: add {self.total} to the "
                "milestones, or set after_last='stable' (train on at the base LR, to cool down later) or "
                "after_last='floor' (stay at the floor)"
            )
        if self.after_last is not None and (last_at_total or not budgets):
            problems.append(
                f"after_last={self.after_last!r} only applies when the last milestone is before total; remove it"
                if budgets
                else f"after_last={self.after_last!r} needs milestones; remove it"
            )
        if self.mode == "branching" and self.after_last == "floor":
            problems.append(
                "after_last='floor' with mode='branching': the main run would drop to the floor without a decay; "
                "end the run with a milestone at total, or use after_last='stable'"
            )
        for i, (m, d) in enumerate(zip(budgets, lengths)):
            start = self._period_start(i, budgets)
            if d > m - start:
                what = "the run so far" if self.mode == "branching" else f"its period [{start}, {m})"
                problems.append(
                    f"milestone {m}: decay_length={d} is longer than {what}; decays would overlap: shorten the "
                    "decay or space the milestones further apart"
                )
        pre = [m - d for m, d in zip(budgets, lengths)]
        if self.mode == "branching" and any(b < a for a, b in zip(pre, pre[1:])):
            problems.append(
                f"branching milestones {list(budgets)} with decays {list(lengths)} start their branches at "
                f"{pre}, out of order: each branch must start at or after the previous one's start"
            )
        if pre and self.warmup > min(pre) and not self.warmup_overlay:
            problems.append(
                f"warmup={self.warmup} runs into the decay that starts at {min(pre)}: shorten the warmup or move "
                "the first milestone later"
            )
        if self.warmup > self.total and not self.warmup_overlay:
            problems.append(f"warmup={self.warmup} is longer than total={self.total}")

    def _build(self, budgets: Sequence[int], lengths: Sequence[int]) -> None:
        segments: list[_Segment] = []
        milestones: list[Milestone] = []
        n = len(budgets)
        cursor = self.origin
        if self.warmup > 0 and self.origin == 0 and not self.warmup_overlay:
            segments.append(_Segment.of(0, self.warmup, _WARMUP, 0))
            cursor = self.warmup
        shift = 0  # units spent in branches so far (branching mode): trajectory position + shift = position
        for i, (m, d) in enumerate(zip(budgets, lengths)):
            pre = m - d + shift
            if pre > cursor:
                segments.append(_Segment.of(cursor, pre, _STABLE, i))
            if d > 0:
                segments.append(_Segment.of(pre, pre + d, _DECAY, i))
            final = i == n - 1 and m == self.total
            rewind = self.mode == "branching" and not final
            milestones.append(
                Milestone(
                    index=i,
                    at=m,
                    decay_length=d,
                    pre_decay=pre,
                    post_decay=pre + d,
                    rewind=rewind,
                    period_start=self._period_start(i, budgets),
                    final=final,
                )
            )
            cursor = max(cursor, pre + d)
            if rewind:
                shift += d
        end = self.total + shift
        if cursor < end:
            kind = _FLOOR if self.after_last == "floor" else _STABLE
            segments.append(_Segment.of(cursor, end, kind, n))
        if self.warmup > 0 and self.origin == 0 and self.warmup_overlay:
            segments = _overlay_warmup(segments, self.warmup)
        # Events sorted by position; at one position a pre-decay point comes before a post-decay point.
        events = sorted(
            [(ms.pre_decay, 0, "pre-decay", ms.index) for ms in milestones]
            + [(ms.post_decay, 1, "post-decay", ms.index) for ms in milestones]
        )
        self._set("_milestones", tuple(milestones))
        self._set("_segments", tuple(segments))
        self._set("_starts", tuple(s.start for s in segments))
        self._set("_events", tuple(events))
        self._set("_event_positions", tuple(e[0] for e in events))
        self._set("_post_positions", tuple(ms.post_decay for ms in milestones))

    # ------------------------------------------------------------------ queries

    @property
    def end(self) -> int:
        """The last position of the run (exclusive): ``total`` plus, in branching mode, the branches' lengths."""
        return self._segments[-1].end

    @property
    def milestones_info(self) -> tuple[Milestone, ...]:
        """Every milestone with its pre-decay and post-decay positions, in order."""
        return self._milestones

    def _segment(self, position: int) -> _Segment:
        if position < self.origin:
            raise ValueError(
                f"position {position} is before this schedule's origin {self.origin}: positions count the "
                f"{self.units} done since the start of the run"
            )
        i = bisect_right(self._starts, position) - 1
        return self._segments[i]

    def factor(self, position: int, *, warmup_start_ratio: float | None = None) -> float:
        """The LR factor (LR / base LR) of the update that starts at ``position``.

        ``warmup_start_ratio`` overrides the schedule's for one param group (a scheduler given an absolute start
        LR computes one ratio per group). Positions at or past :attr:`end` read the schedule's final value (the
        floor, after a final decay), whatever ``progress`` says.
        """
        seg = self._segment(position)
        kind = seg.kind
        if kind == _STABLE:
            return 1.0
        if kind == _FLOOR:
            return self.min_lr_ratio
        if position >= seg.end:
            t = 1.0
        else:
            t = (position - seg.phase_start + (1 if self.progress == "end" else 0)) / seg.phase_length
        if kind == _DECAY:
            return decay_factor(self.decay_shape, t, self.min_lr_ratio)
        s = self.warmup_start_ratio if warmup_start_ratio is None else warmup_start_ratio
        return s + (1.0 - s) * warmup_weight(self.warmup_shape, t)

    def phase_at(self, position: int) -> Phase:
        """The phase of the update that starts at ``position`` (positions past the end read as the last one)."""
        seg = self._segment(position)
        clamped = min(position, seg.end - 1)
        offset = clamped - seg.phase_start
        if seg.kind not in (_WARMUP, _DECAY):
            progress = 0.0
        elif position >= seg.end:
            progress = 1.0
        else:
            progress = (offset + (1 if self.progress == "end" else 0)) / seg.phase_length
        period = bisect_right(self._post_positions, clamped)
        return Phase(
            name=seg.kind,
            period=period,
            start=seg.phase_start,
            length=seg.phase_length,
            offset=offset,
            progress=progress,
        )

    def events_between(self, previous: int, current: int) -> list[Event]:
        """Checkpoint points reached when the position moves from ``previous`` to ``current``: those in
        ``(previous, current]``, in order. For step units, call it with ``(step - 1, step)`` after each update; for
        token units a point is reached by the first update that ends at or past it."""
        lo = bisect_right(self._event_positions, previous)
        hi = bisect_right(self._event_positions, current)
        return [
            Event(kind=kind, position=pos, milestone=self._milestones[i]) for pos, _, kind, i in self._events[lo:hi]
        ]

    def trajectory_position(self, position: int) -> int:
        """Units trained into the model at ``position``: the position itself in WSD-S mode; in branching mode the
        position less the branches already rewound."""
        shift = 0
        for ms in self._milestones:
            if ms.rewind and ms.post_decay <= position:
                shift += ms.decay_length
        return position - shift

    def segments(self) -> list[Phase]:
        """Every phase of the run in order, each as a :class:`Phase` at its first position."""
        return [self.phase_at(seg.start) for seg in self._segments]

    # ------------------------------------------------------------------ derived schedules

    def continued(self, at: int, total: int, **changes: Any) -> WSDSchedule:
        """A continuation from a checkpoint at trajectory position ``at`` to a new ``total``: no new warmup, the LR
        back at its base value from ``at``, and decays placed by the new length (the same milestone and decay rules
        unless ``changes`` say otherwise). Works from a pre-decay checkpoint (WSD) and a post-decay one (WSD-S)."""
        if at < self.warmup:
            raise ConfigError(
                f"at={at} is inside the warmup (warmup={self.warmup}); continue from a checkpoint after it",
                where="continuation",
            )
        params = self.to_dict(callable_ok=True)
        params.update(origin=at, total=total, warmup=0, after_last=None)
        if "milestones" not in changes and isinstance(self.milestones, tuple):
            params["milestones"] = "end"
        if changes.get("milestones", "geometric") != "geometric" and "num_milestones" not in changes:
            params["num_milestones"] = None
        if "decay_length" in changes:
            params["decay_fraction"] = None
        if "decay_fraction" in changes or ("milestones" not in changes and isinstance(self.decay_length, tuple)):
            params["decay_length"] = None
        params.update(changes)
        return WSDSchedule(**params)

    def cooldown(self, at: int, length: int, **changes: Any) -> WSDSchedule:
        """A cooldown branch: decay now, from the checkpoint at trajectory position ``at``, for ``length`` units
        (shape and floor as in this schedule unless ``changes`` say otherwise).

        ``at`` is a stable-phase position or a pre-decay point (the state just before a decay: the schedule's own
        decay starts there too). The branch's first update starts at ``at`` and runs at the decay's first LR (as in
        any decay: progress 1/``length``), its last ends at ``at + length`` and runs at the floor. From a pre-decay
        checkpoint with the run's own decay length and shape, the branch repeats the run's own decay exactly."""
        phase = self._trajectory_phase(at)
        if phase != _STABLE and not self.is_pre_decay(at):
            raise ConfigError(
                f"at={at} is in the {phase} phase; a cooldown branches from a stable-phase checkpoint or a "
                "pre-decay one (pre-decay points: "
                f"{[ms.trajectory_pre_decay for ms in self._milestones if ms.decay_length > 0]})",
                where="cooldown",
            )
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ConfigError(
                f"length={length!r}: a cooldown lasts a whole number > 0 of {self.units}", where="cooldown"
            )
        params = self.to_dict(callable_ok=True)
        params.update(
            origin=at,
            total=at + length,
            warmup=0,
            milestones="end",
            num_milestones=None,
            decay_fraction=None,
            decay_length=length,
            mode="wsd-s",
            after_last=None,
        )
        params.update(changes)
        return WSDSchedule(**params)

    def rescaled(self, total: int) -> WSDSchedule:
        """The same schedule stretched to a new ``total``: the warmup, explicit milestones and decay lengths scale
        with it (a non-zero length stays at least 1), fractions and shapes stay. How ``--total-steps`` turns a
        10,000-step recipe into a 60-step smoke run that still passes through every phase."""
        if self.origin != 0:
            raise ConfigError("only a schedule that starts at 0 can be rescaled", where="rescale")
        if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
            raise ConfigError(f"total={total!r}: must be a whole number > 0", where="rescale")
        ratio = total / self.total

        def scale(x: int) -> int:
            return max(1, round(x * ratio)) if x > 0 else 0

        params = self.to_dict(callable_ok=True)
        params.update(total=total, warmup=scale(self.warmup))
        if isinstance(self.milestones, tuple):
            params["milestones"] = tuple(scale(m) for m in self.milestones)
        if isinstance(self.decay_length, tuple):
            params["decay_length"] = tuple(scale(d) for d in self.decay_length)
        elif isinstance(self.decay_length, int):
            params["decay_length"] = scale(self.decay_length)
        return WSDSchedule(**params)

    def is_pre_decay(self, at: int) -> bool:
        """True when trajectory position ``at`` is a pre-decay point: the state just before one of the decays."""
        return any(ms.decay_length > 0 and ms.trajectory_pre_decay == at for ms in self._milestones)

    def _trajectory_phase(self, at: int) -> str:
        if at < self.origin or at >= self.total:
            return "outside"
        if self.mode == "wsd-s":
            return self.phase_at(at).name
        if at < self.warmup:
            return _WARMUP
        last = self._milestones[-1] if self._milestones else None
        if last is not None and last.final and at >= last.trajectory_pre_decay:
            return _DECAY
        return _STABLE

    # ------------------------------------------------------------------ serialisation

    def to_dict(self, *, callable_ok: bool = False) -> dict[str, Any]:
        """The constructor arguments as plain JSON values. A callable decay shape is written as
        ``"callable:module.qualname"`` (or kept as is with ``callable_ok``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            if callable(value) and not callable_ok:
                value = f"callable:{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', '?')}"
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WSDSchedule:
        """Build from :meth:`to_dict`'s output or a config section; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping of schedule settings, got {type(data).__name__}", where="schedule")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ConfigError(
                f"unknown setting(s) {', '.join(hints)}; valid settings: {sorted(known)}", where="schedule"
            )
        if isinstance(data.get("decay_shape"), str) and data["decay_shape"].startswith("callable:"):
            raise ConfigError(
                f"decay_shape={data['decay_shape']!r} names a Python function; pass the function itself",
                where="schedule",
            )
        return cls(**data)

    def with_changes(self, **changes: Any) -> WSDSchedule:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)
