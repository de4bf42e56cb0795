"""How the ranks agree during a save or a resume: their own gloo groups, and failing together.

Checkpoint coordination never runs on the training process group. On a cluster that group is NCCL, whose
watchdog kills a job that waits longer than its timeout (a slow save to Lustre can take that long) and whose
collectives need device tensors (a host-device synchronisation for each small message). Two gloo groups, made
once by every rank at the same point (the checkpoint manager's constructor, or the first save or load), carry
every message of the protocol instead, as CPU tensors with their own long timeout:

* ``coord``: the main thread's agreements (the staging directory's name, which checkpoint to resume, the per-step
  preemption and time decisions, each phase's outcome);
* ``commit``: the save's background thread (each rank's written files to rank 0, rank 0's commit result back).
  A separate group, because an async save commits while the main thread goes on agreeing on other things.

**Failing together.** Each phase ends with :func:`agree`: every rank says whether it failed; if any did, every
rank raises the same :class:`CheckpointError` naming each failed rank and its error. A rank that hits an error in
the middle of a phase keeps taking part in that phase's collectives (with placeholder data) until the agreement,
so no rank is ever left waiting in a collective for a rank that has already raised.

On a single process every helper answers locally.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .. import distributed as D
from ..errors import CheckpointError

__all__ = ["Groups", "acquire", "agree", "groups", "release", "set_timeout"]

log = logging.getLogger(__name__)

_TIMEOUT_S = 3600.0


@dataclass
class Groups:
    """The checkpoint's process groups (None on a single process)."""

    coord: Any
    commit: Any


_groups: Groups | None = None
_for_world: Any = None
_users = 0


def set_timeout(seconds: float) -> None:
    """The timeout of groups made from now on (``checkpoint.timeout_minutes``; default one hour)."""
    global _TIMEOUT_S
    _TIMEOUT_S = float(seconds)


def groups() -> Groups:
    """The checkpoint's gloo groups, made on first use (every rank must reach its first save, load or manager at the
    same point: making a group is collective)."""
    global _groups, _for_world
    if not D.is_distributed():
        return Groups(None, None)
    world = dist.group.WORLD
    if _groups is None or _for_world is not world:
        timeout = datetime.timedelta(seconds=_TIMEOUT_S)
        _groups = Groups(
            coord=dist.new_group(backend="gloo", timeout=timeout),
            commit=dist.new_group(backend="gloo", timeout=timeout),
        )
        _for_world = world
    return _groups


def acquire() -> Groups:
    """A checkpoint manager's hold on the groups (made here if needed); pair with :func:`release`."""
    global _users
    made = groups()
    _users += 1
    return made


def release() -> None:
    """Drop a hold; the last one destroys the groups (every rank calls this at the same point, like
    ``CheckpointManager.close``), so their gloo threads end before the interpreter's shutdown, not during it."""
    global _users, _groups, _for_world
    _users = max(0, _users - 1)
    if _users or _groups is None:
        return
    if D.is_distributed() and _for_world is dist.group.WORLD:
        for group in (_groups.coord, _groups.commit):
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # already destroyed with the default group
                log.debug("checkpoint group not destroyed: %s", exc)
    _groups, _for_world = None, None


def agree(error: str | None, what: str, group: Any = None) -> None:
    """End of a phase: raise the same CheckpointError on every rank if any rank failed (``error`` is this rank's
    message or None). Costs one small all-reduce when every rank succeeded."""
    if not D.is_distributed():
        if error:
            raise CheckpointError(f"{what}: {error}")
        return
    group = group if group is not None else groups().coord
    (failed,) = D.all_reduce_max([1 if error else 0], group=group)
    if not failed:
        return
    errors = D.all_gather_object(error, group=group)
    raise CheckpointError(f"{what}: {describe_errors(errors)}")


def describe_errors(errors: list[str | None]) -> str:
    """Per-rank errors as one text, each distinct error once with the ranks that hit it ("ranks 0-1023: ..."): a
    thousand ranks failing alike make one line, not a thousand."""
    by_text: dict[str, list[int]] = {}
    for r, e in enumerate(errors):
        if e:
            by_text.setdefault(e, []).append(r)
    parts = []
    for text, ranks in by_text.items():
        spans: list[str] = []
        start = ranks[0]
        for prev, cur in zip(ranks, [*ranks[1:], -1]):
            if cur != prev + 1:  # a run of consecutive ranks ends at prev
                spans.append(str(start) if start == prev else f"{start}-{prev}")
                start = cur
        label = "rank" if len(ranks) == 1 else "ranks"
        parts.append(f"{label} {', '.join(spans)}: {text}")
    return "; ".join(parts)


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` from ``src`` on every rank, on the coord group (plain JSON)."""
    return D.broadcast_object(obj, src=src, group=groups().coord) if D.is_distributed() else obj


def all_reduce_max(values: list[int]) -> list[int]:
    return D.all_reduce_max(values, group=groups().coord) if D.is_distributed() else list(values)
