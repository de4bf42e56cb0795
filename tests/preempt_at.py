"""Run a training script and send its own process SIGUSR1 (what SLURM sends before it kills a job) once it is
UPDATES optimizer updates in, as a cluster's preemption would.

usage: python preempt_at.py UPDATES SCRIPT [ARGS...]

``CheckpointManager.maybe_save`` is wrapped: after the update UPDATES, the process signals itself once; the
manager must then write a ``preempt`` checkpoint at its next agreement and the framework must stop cleanly
(exit 0). SCRIPT runs as ``__main__`` with ARGS.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from wsd_pretrain.checkpoint.manager import CheckpointManager

updates, script, *args = sys.argv[1:]
real_maybe_save = CheckpointManager.maybe_save
sent: list[int] = []


def maybe_save(self):
    out = real_maybe_save(self)
    if not sent and self.scheduler.last_epoch >= int(updates):
        sent.append(self.scheduler.last_epoch)
        os.kill(os.getpid(), signal.SIGUSR1)
    return out


CheckpointManager.maybe_save = maybe_save
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
