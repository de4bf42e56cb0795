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
from wsd_pretrain.checkpoint import io
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

run_dir, phase, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
state = {"saves": 0}


def stall(where: str) -> None:
    if state["saves"] == 2 and where == phase:
        marker.write_text(where)
        time.sleep(600)


real_shard, real_json, real_rename, real_latest = io.write_safetensors, io.write_json, io.os.rename, io.write_latest


def shard(path, *a, **k):
    out = real_shard(path, *a, **k)
    stall("shard")  # one shard written, more to come
    return out


def json_(path, *a, **k):
    if Path(path).name == "manifest.json":
        stall("manifest")
    return real_json(path, *a, **k)


def rename(src, dst):
    stall("rename")
    real_rename(src, dst)
    stall("latest")


io.write_safetensors, io.write_json = shard, json_
io.os.rename = rename

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
    if sched.last_epoch % 2 == 0:
        state["saves"] += 1
    mgr.maybe_save()
mgr.close()
