"""Rank, world size and local rank resolved once from the launcher (torchrun's variables or srun's SLURM_* ones),
exported for DeepSpeed and everything else, and the one rule that picks each process's GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_helpers import free_port
from wsd_pretrain import ConfigError
from wsd_pretrain.distributed import LaunchEnv, _launcher_env, choose_cuda_device

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RESTART_COUNT")

# ---------------------------------------------------------------------------------------------- the device rule


@pytest.mark.parametrize(
    ("local_rank", "local_world", "devices", "expected"),
    [
        (3, 8, 1, 0),  # srun --gpus-per-task=1: each task sees only its own GPU, which is device 0
        (0, 1, 1, 0),  # one process, one GPU
        (5, 8, 8, 5),  # torchrun / deepspeed launcher / srun with every GPU visible: one per local rank
        (1, 4, 8, 1),  # fewer processes than GPUs on the node
        (1, 2, 2, 1),  # two tasks, each seeing the node's two GPUs
    ],
)
def test_the_device_of_each_process(local_rank, local_world, devices, expected):
    assert choose_cuda_device(local_rank, local_world, devices) == expected


@pytest.mark.parametrize(
    ("local_rank", "local_world", "devices", "message"),
    [
        (0, 1, 0, "no CUDA device is visible"),
        (3, 4, 2, r"sees 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\): give each task one GPU \(srun --gpus-per-task=1\)"),
        (0, 4, 2, "give each task one GPU"),  # ambiguous for every rank, not only those past the last GPU
        (9, 16, 8, "local rank 9 of 16"),
    ],
)
def test_ambiguous_or_missing_devices_are_refused(local_rank, local_world, devices, message):
    with pytest.raises(ConfigError, match=message):
        choose_cuda_device(local_rank, local_world, devices, visible_devices="0,1")


# ---------------------------------------------------------------------------------------------- resolution


def _srun_env(procid: int, ntasks: int, localid: int, nodeid: int, tasks_per_node: str) -> dict[str, str]:
    """What srun sets for one task (the variables this package reads, and a few it must ignore)."""
    return {
        "SLURM_PROCID": str(procid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_GTIDS": str(procid),
    }


def test_srun_variables_resolve_to_rank_world_and_local_rank():
    env = {**_srun_env(5, 7, 1, 2, "2(x3),1"), "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    assert _launcher_env(env) == LaunchEnv(rank=5, world_size=7, local_rank=1, local_world_size=2, launcher="slurm")
    env.update(_srun_env(6, 7, 0, 3, "2(x3),1"))
    assert _launcher_env(env).local_world_size == 1, "the last node of '2(x3),1' runs one task"
    # torch-style variables win (torchrun started by srun, one per node)
    env.update(RANK="3", WORLD_SIZE="16", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8")
    assert _launcher_env(env) == LaunchEnv(rank=3, world_size=16, local_rank=3, local_world_size=8, launcher="torchrun")
    assert _launcher_env({}) == LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="none")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not"),
        ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x' is not a whole number"),
        ({"SLURM_STEP_TASKS_PER_NODE": "two"}, "cannot read the tasks on node 0"),
        ({"SLURM_STEP_TASKS_PER_NODE": None, "SLURM_TASKS_PER_NODE": None}, "how many tasks run on this node"),
        ({"SLURM_LOCALID": "2"}, "local rank 2 of 2 process"),
        ({"MASTER_PORT": None}, "MASTER_ADDR and MASTER_PORT must be set"),
    ],
)
def test_inconsistent_srun_environments_are_refused(change, message):
    env = {**_srun_env(1, 2, 1, 0, "2"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(ConfigError, match=message):
        _launcher_env(env)


# ---------------------------------------------------------------------------------------------- real processes

TASK = r"""
import json, os, sys
import torch
import torch.distributed as dist
from wsd_pretrain import distributed as D
info = D.init_distributed(backend="gloo", timeout_s=120)
total = torch.tensor([info.rank])
dist.all_reduce(total)  # the group works
out = {
    "info": [info.rank, info.world_size, info.local_rank, info.local_world_size, info.backend],
    "helpers": [D.get_rank(), D.get_world_size(), D.get_local_rank(), D.get_local_world_size()],
    "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")},
    "sum": int(total),
}
D.teardown()
print(json.dumps(out), flush=True)
"""


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("layout", "tasks"),
    [
        ("one node, two tasks", [(0, 0, 0, "2"), (1, 1, 0, "2")]),
        ("two nodes, one task each", [(0, 0, 0, "1(x2)"), (1, 0, 1, "1(x2)")]),
    ],
)
def test_tasks_started_as_srun_starts_them(layout, tasks):
    """Two processes with only srun's SLURM_* variables and MASTER_ADDR/MASTER_PORT (as launch/slurm.sbatch exports
    them): no RANK, WORLD_SIZE or LOCAL_RANK."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    procs = []
    for procid, localid, nodeid, per_node in tasks:
        env = {
            **base,
            **_srun_env(procid, len(tasks), localid, nodeid, per_node),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", TASK],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=180)
        finally:
            if p.poll() is None:
                p.kill()
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    for (procid, localid, _, _), res in zip(tasks, results):
        local_world = 2 if layout.startswith("one node") else 1
        assert res["info"] == [procid, 2, localid, local_world, "gloo"]
        assert res["helpers"] == [procid, 2, localid, local_world], "every helper answers the resolved values"
        assert res["env"] == {
            "RANK": str(procid),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(localid),
            "LOCAL_WORLD_SIZE": str(local_world),
        }, "exported for DeepSpeed, which reads LOCAL_RANK"
        assert res["sum"] == 1
