"""Checkpoints at every decay: the manager a training loop calls, and what a user needs beside it.

::

    from wsd_pretrain.checkpoint import CheckpointConfig, CheckpointManager

    manager = CheckpointManager("runs/x", model, optimizer, scheduler, config=CheckpointConfig(every_steps=1000))
    manager.resume("auto")
    for batch in loader:
        ...; optimizer.step(); scheduler.step()
        manager.maybe_save()
        if manager.should_stop:
            break
    manager.close()

See docs/manager.md.
"""

from ..errors import CheckpointError
from .adapters import EngineAdapter, make_adapter
from .guards import check_total
from .manager import CheckpointConfig, CheckpointManager, Stateful, parse_size
from .pipeline import Pipeline

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "EngineAdapter",
    "Pipeline",
    "Stateful",
    "check_total",
    "make_adapter",
    "parse_size",
]
