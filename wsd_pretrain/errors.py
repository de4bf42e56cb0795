"""The one error hierarchy of wsd_pretrain.

Every error a user can cause is a ``WSDError``; the ones caused by bad input are also ``ValueError``s, so
``except ValueError`` keeps working for code that does not know this package. Messages name the field, the value
and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CheckpointError",
    "ConfigError",
    "WSDError",
]


class WSDError(Exception):
    """Base class of every error raised on purpose by wsd_pretrain."""


class ConfigError(WSDError, ValueError):
    """A setting (schedule, scheduler, config file, command line) is invalid.

    ``problems`` lists every problem found; validation collects them all and raises once, so a user fixes a config
    in one pass instead of one error at a time.
    """

    def __init__(self, problems: str | Iterable[str], *, where: str | None = None) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.where = where
        head = f"invalid {where}" if where else "invalid configuration"
        if len(self.problems) == 1:
            message = f"{head}: {self.problems[0]}"
        else:
            message = head + ":\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class CheckpointError(WSDError, ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not match what is being restored."""
