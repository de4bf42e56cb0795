"""A training process that stops, mid-save, at a chosen point and waits there to be killed (tests only).

usage: python kill_child.py RUN_DIR PHASE MARKER   (PHASE: shard | manifest | rename | latest)

The first checkpoint (step 2) is written normally; during the second (step 4) the process reaches PHASE, writes
MARKER and sleeps until the test SIGKILLs it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from wsd_pretrain import WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint import faults
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

run_dir, phase, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
state = {"saves": 0}
# where each phase stops, as the save protocol names its steps (wsd_pretrain.checkpoint.faults)
STOPS = {"shard": "shard-end:", "manifest": "manifest-begin", "rename": "manifest-hash-written", "latest": "renamed:"}


def hook(point: str) -> None:
    if point == "save-begin":
        state["saves"] += 1
    if state["saves"] == 2 and point.startswith(STOPS[phase]):
        marker.write_text(point)
        time.sleep(600)


faults.fault_hook = hook

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
mgr = CheckpointManager(
    run_dir,
    model,
    opt,
    sched,
    config=CheckpointConfig(every_steps=2, max_shard_size=2000, at_milestones=False, on_preemption=False),
)
while not sched.finished:
    model(torch.randn(2, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    mgr.maybe_save()
mgr.close()
