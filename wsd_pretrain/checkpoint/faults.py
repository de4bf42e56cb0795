"""Fault-injection points of the save and load protocols (docs/reliability.md).

``fault_hook`` is None in normal use. The reliability suite (tools/reliability.py) and the fault tests set it to a
function that receives the name of each step as a rank reaches it and may kill the process or raise there:

save: ``save-begin``, ``staging-created``, ``fetch-begin``, ``fetch:<tensor>``, ``fetch-end``, ``snapshot:<tensor>``
(an async save's copy of a tensor, on its own thread while training goes on), ``shard-begin:<file>``,
``range-write:<file>`` (a byte range written in place: a shard owner's header or own tensor, a holder's range),
``shard-end:<file>``, ``report``, ``commit-begin``, ``manifest-begin``, ``manifest-written``, ``manifest-hash-written``,
``renamed:<name>``, ``latest-written:<name>``;
upload to object storage (objstore.py; the manager's background upload on every rank): ``upload-object:<file>``,
``upload-manifest`` (every object written, the manifest not yet), ``upload-committed:<name>`` (before ``latest``);
load: ``load-open`` (rank 0), ``load-verify``, ``load-plan``, ``load-read:<param>``, ``load-restore:<param>``.

An exception raised by the hook at any of these points is handled as a real failure there would be: every rank
raises it within seconds, and nothing committed is lost (tests/test_checkpoint_faults.py tries each phase).
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["fault_hook", "point"]

fault_hook: Callable[[str], None] | None = None


def point(name: str) -> None:
    """Called by the protocol at each named step."""
    if fault_hook is not None:
        fault_hook(name)
