"""Which committed checkpoints retention deletes: one pure function, no files touched.

The rule, in full (``checkpoint.keep_last`` and ``checkpoint.keep_milestones``)::

    a committed checkpoint is KEPT when any of these holds, and deleted otherwise:
    1. it is the newest complete checkpoint (the last one, by position), or the one just written;
    2. one of its kinds is protected: ``imported`` always; ``pre-decay``, ``post-decay`` and ``final`` while
       ``keep_milestones`` is true;
    3. it is one of the newest ``keep_last`` of the others (the rotating ones: periodic and preempt checkpoints,
       and milestones when ``keep_milestones`` is false).

Rule 1 is what makes retention safe whatever the other two say: the checkpoint a restart would resume from is never
deleted (transformers #25129, Megatron-Bridge #4678 deleted the only good one). The manager calls
:func:`checkpoints_to_delete` after each commit, with the complete checkpoints oldest first, and deletes what it
returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

__all__ = ["ALWAYS_KEPT_KINDS", "MILESTONE_KINDS", "Committed", "checkpoints_to_delete"]

MILESTONE_KINDS = frozenset({"pre-decay", "post-decay", "final"})
"""Kinds kept while ``keep_milestones`` is true."""
ALWAYS_KEPT_KINDS = frozenset({"imported"})
"""Kinds never deleted: an imported checkpoint is the only copy of another framework's state in this run."""


class Committed(Protocol):
    """What retention needs to know of a checkpoint (``format.CheckpointInfo`` has both)."""

    @property
    def name(self) -> str: ...

    @property
    def kinds(self) -> list[str]: ...


C = TypeVar("C", bound=Committed)


def checkpoints_to_delete(
    committed: Sequence[C], *, keep_last: int, keep_milestones: bool, just_written: str | None = None
) -> list[C]:
    """The checkpoints to delete, oldest first, from the complete ones ``committed`` (oldest first).

    ``keep_last`` (>= 0) rotating checkpoints are kept, ``keep_milestones`` protects the pre-decay, post-decay and
    final ones, and the newest complete checkpoint and ``just_written`` (a name) are never returned: see the module
    docstring for the rule.
    """
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ValueError(f"keep_last={keep_last!r}: a whole number >= 0")
    protected = ALWAYS_KEPT_KINDS | (MILESTONE_KINDS if keep_milestones else frozenset())
    rotating = [i for i, c in enumerate(committed) if not protected.intersection(c.kinds)]
    kept: set[int] = set()
    if committed:
        kept.add(len(committed) - 1)  # rule 1: the newest complete checkpoint
    kept.update(i for i, c in enumerate(committed) if c.name == just_written)  # rule 1: the one just written
    kept.update(i for i, c in enumerate(committed) if protected.intersection(c.kinds))  # rule 2
    kept.update(rotating[max(0, len(rotating) - keep_last) :] if keep_last else [])  # rule 3
    return [c for i, c in enumerate(committed) if i not in kept]
