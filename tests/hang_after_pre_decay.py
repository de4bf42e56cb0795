"""Run a training script and stop it, as a SIGKILL would find it, a few updates after its pre-decay checkpoint.

usage: python hang_after_pre_decay.py MARKER UPDATES SCRIPT [ARGS...]
       torchrun --nproc-per-node 2 hang_after_pre_decay.py MARKER UPDATES SCRIPT [ARGS...]

``CheckpointManager.maybe_save`` is wrapped: once a pre-decay checkpoint is written and the run is UPDATES optimizer
updates past it, each rank writes ``MARKER.<rank>`` and sleeps until the test kills it (the state on disk is then
exactly what a crash at that point leaves). SCRIPT runs as ``__main__`` with ARGS.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

from wsd_pretrain.checkpoint.manager import CheckpointManager

marker, updates, script, *args = sys.argv[1:]
armed: dict[str, int] = {}
real_maybe_save = CheckpointManager.maybe_save


def maybe_save(self):
    out = real_maybe_save(self)
    if out is not None and "pre-decay" in Path(out).name:
        self.wait()  # an async save is committed before the kill
        armed.setdefault("at", int(self.scheduler.last_epoch))
    if "at" in armed and self.scheduler.last_epoch >= armed["at"] + int(updates):
        rank = os.environ.get("RANK", "0")
        Path(f"{marker}.{rank}").write_text(str(self.scheduler.last_epoch))
        time.sleep(600)
    return out


CheckpointManager.maybe_save = maybe_save
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
