"""The one place that starts and stops torch.distributed, and the rank helpers everything else uses.

:func:`init_distributed` reads the launcher's environment (torchrun, the DeepSpeed launcher, SLURM's srun),
checks it, exports the resolved RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, and is safe to call twice; :func:`teardown` pairs with it. Every helper answers for a single
process too (rank 0 of 1), so library code never asks "am I distributed?".
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "LaunchEnv",
    "all_gather_object",
    "all_reduce_max",
    "barrier",
    "broadcast_object",
    "choose_cuda_device",
    "device_index",
    "gather_object",
    "get_local_rank",
    "get_local_world_size",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "teardown",
]

T = TypeVar("T")
_STARTED_HERE = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: global rank, world size, rank on its node, and the backend (None: one process)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    local_world_size: int = 1
    """Processes on this node."""


@dataclass(frozen=True)
class LaunchEnv:
    """What the launcher says about this process, resolved once (:func:`_launcher_env`)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str
    """"torchrun" (RANK/WORLD_SIZE: torchrun, the deepspeed launcher, anything torch-style), "slurm" (srun's
    SLURM_* variables) or "none" (one plain process)."""

    def exported(self) -> dict[str, str]:
        """The torch-style variables every later reader expects (DeepSpeed reads LOCAL_RANK)."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }


_LAUNCH: LaunchEnv | None = None  # set by init_distributed


def _env_int(name: str, env: dict[str, str], problems: list[str]) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not a whole number")
        return None


def _slurm_tasks_on_node(spec: str, node: int) -> int | None:
    """Tasks on node ``node`` from SLURM's compressed per-node counts (``"8(x2)"``, ``"2(x3),1"``)."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def _slurm_env(env: dict[str, str], problems: list[str]) -> tuple[int | None, int | None, int | None, int | None]:
    """(rank, world, local rank, local world) from the variables srun sets for each task."""
    rank = _env_int("SLURM_PROCID", env, problems)
    world = _env_int("SLURM_NTASKS", env, problems)
    local = _env_int("SLURM_LOCALID", env, problems)
    if local is None and not problems:
        problems.append("SLURM_PROCID is set but SLURM_LOCALID is not: start the tasks with srun")
    node = _env_int("SLURM_NODEID", env, problems) or 0
    local_world = None
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(name):
            local_world = _slurm_tasks_on_node(env[name], node)
            if local_world is None:
                problems.append(f"{name}={env[name]!r}: cannot read the tasks on node {node} from it")
            break
    else:
        local_world = _env_int("SLURM_NTASKS_PER_NODE", env, problems)
        if local_world is None and world is not None and _env_int("SLURM_NNODES", env, problems) == 1:
            local_world = world
    if local_world is None and not problems:
        problems.append(
            "cannot tell how many tasks run on this node: srun sets SLURM_STEP_TASKS_PER_NODE (or set "
            "--ntasks-per-node)"
        )
    return rank, world, local, local_world


def _launcher_env(env: dict[str, str]) -> LaunchEnv:
    """Rank, world size, local rank and local world size, resolved once from the launcher's variables.

    torch-style variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE: torchrun, the deepspeed launcher) win;
    without them, srun's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the tasks on this node from
    SLURM_STEP_TASKS_PER_NODE); without either, one plain process. Every problem is reported at once.
    """
    problems: list[str] = []
    rank = _env_int("RANK", env, problems)
    world = _env_int("WORLD_SIZE", env, problems)
    local = _env_int("LOCAL_RANK", env, problems)
    local_world = _env_int("LOCAL_WORLD_SIZE", env, problems)
    launcher = "torchrun"
    if rank is None and world is None and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        rank, world, local, local_world = _slurm_env(env, problems)
    if problems:
        raise ConfigError(problems, where="launcher environment")
    if rank is None and world is None:
        return LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, launcher="none")
    if rank is None or world is None:
        raise ConfigError(
            "RANK and WORLD_SIZE must be set together (launch with torchrun, deepspeed or srun)",
            where="launcher environment",
        )
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE", where="launcher environment")
    if not env.get("MASTER_PORT") or (world > 1 and not env.get("MASTER_ADDR")):
        raise ConfigError(
            "MASTER_ADDR and MASTER_PORT must be set for a process group (torchrun sets them; under srun export "
            "them in the batch script, see launch/slurm.sbatch; MASTER_ADDR defaults to 127.0.0.1 for one process)",
            where="launcher environment",
        )
    if local is None:  # a launcher that gives no local rank: one node
        local = rank
    if local_world is None:
        local_world = world
    if not 0 <= local < local_world <= world:
        raise ConfigError(
            f"local rank {local} of {local_world} process(es) on this node (world {world}): need "
            "0 <= local rank < local world size <= world size",
            where="launcher environment",
        )
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, local_world_size=local_world, launcher=launcher)


def choose_cuda_device(
    local_rank: int, local_world_size: int, device_count: int, visible_devices: str | None = None
) -> int:
    """The CUDA device index this process uses, from what it can see.

    * one visible device (``srun --gpus-per-task=1``, or any binding that gives each task its own GPU through
      CUDA_VISIBLE_DEVICES): index 0, whatever the local rank;
    * at least one device per process on the node (torchrun, the deepspeed launcher, srun with every GPU visible
      to every task): the local rank;
    * anything else (fewer visible devices than processes on the node, but more than one) is ambiguous: an error
      saying how to launch.

    ``visible_devices`` (CUDA_VISIBLE_DEVICES) is only quoted in the error.
    """
    shown = f" (CUDA_VISIBLE_DEVICES={visible_devices})" if visible_devices is not None else ""
    if device_count < 1:
        raise ConfigError(f"no CUDA device is visible to this process{shown}", where="device")
    if device_count == 1:
        return 0
    if local_world_size <= device_count and 0 <= local_rank < device_count:
        return local_rank
    raise ConfigError(
        f"this process (local rank {local_rank} of {local_world_size} on its node) sees {device_count} GPUs"
        f"{shown}: give each task one GPU (srun --gpus-per-task=1) or let every process see all of the node's "
        "GPUs, at least one per process",
        where="device",
    )


def default_backend() -> str:
    """nccl with CUDA, gloo on CPU (and whenever DeepSpeed is told to run on the CPU)."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group described by the launcher's environment; a plain process stays single.

    The launcher's variables are resolved once (:func:`_launcher_env`: torchrun's, or srun's SLURM_* ones) and
    exported as RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, so DeepSpeed and every helper here read the same
    values. With nccl the current CUDA device is set by :func:`choose_cuda_device`.

    Safe to call twice (the second call returns the running group's info). ``timeout_s`` bounds every collective:
    a rank that never arrives fails the job instead of hanging it.
    """
    global _STARTED_HERE, _LAUNCH
    if dist.is_available() and dist.is_initialized():
        return _info()
    launch = _launcher_env(dict(os.environ))
    if launch.launcher == "none":
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    os.environ.update(launch.exported())
    _LAUNCH = launch
    rank, world = launch.rank, launch.world_size
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(device_index())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    timeout = datetime.timedelta(seconds=timeout_s)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart is not None and "MASTER_PORT" in os.environ:
        # torchrun keeps one store across restarts; without a per-attempt prefix, restarted workers can read the
        # previous attempt's connection keys (gloo addresses, NCCL ids) and fail to connect or hang
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
        )
        prefixed = dist.PrefixStore(f"wsd_pretrain/attempt_{restart}", store)
        dist.init_process_group(backend=backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    _STARTED_HERE = True
    return _info()


def teardown(barrier: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` started it (after a last barrier, unless leaving on
    an error, when another rank may never arrive)."""
    global _STARTED_HERE, _LAUNCH
    if _STARTED_HERE and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _STARTED_HERE = False
    _LAUNCH = None


def _info() -> DistInfo:
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=get_local_rank(),
        backend=str(dist.get_backend()),
        local_world_size=get_local_world_size(),
    )


def is_distributed() -> bool:
    """True when a process group is running."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 for a single process)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 for a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    """Rank on this node (0 for a single process): the value :func:`init_distributed` resolved and exported."""
    if _LAUNCH is not None:
        return _LAUNCH.local_rank
    return int(os.environ.get("LOCAL_RANK", dist.get_rank())) if is_distributed() else 0


def get_local_world_size() -> int:
    """Processes on this node (1 for a single process)."""
    if _LAUNCH is not None:
        return _LAUNCH.local_world_size
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())) if is_distributed() else 1


def device_index() -> int:
    """The CUDA device of this process (:func:`choose_cuda_device` over the resolved local rank)."""
    return choose_cuda_device(
        get_local_rank(), get_local_world_size(), torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES")
    )


def barrier() -> None:
    """Wait for every rank (nothing for a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_max(values: list[int], group: Any = None) -> list[int]:
    """Element-wise maximum of small integer flags over all ranks (one collective; the per-step agreement on
    time-based and preemption saves runs it on the checkpoint's gloo group: no device synchronisation)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def backend_device_type(backend: str) -> str:
    """The device type whose tensors a backend string takes: "cpu" for gloo (and for a map with a CPU entry,
    "cpu:gloo,cuda:nccl": the host path costs no device synchronisation), "cuda" for nccl and for a map with only a
    device entry ("cuda:nccl", which refuses CPU tensors)."""
    backend = backend.strip().lower()
    if ":" not in backend:
        return "cuda" if backend == "nccl" else "cpu"
    devices = [entry.split(":", 1)[0].strip() for entry in backend.split(",") if entry.strip()]
    if "cpu" in devices:
        return "cpu"
    return devices[0] if devices else "cpu"


def _comm_device(group: Any = None) -> torch.device:
    """Where a group's tensors must live (:func:`backend_device_type`): the current CUDA device for NCCL, the CPU
    for gloo."""
    kind = backend_device_type(str(dist.get_backend(group)))
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def broadcast_object(obj: T, src: int = 0, group: Any = None) -> T:
    """Rank ``src``'s ``obj`` on every rank of ``group``. Plain JSON values only: they travel as UTF-8 bytes,
    never pickled. ``src`` is a global rank."""
    if not is_distributed():
        return obj
    device = _comm_device(group)
    payload = json.dumps(obj).encode() if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=src, group=group)
    return json.loads(buf.cpu().numpy().tobytes().decode()) if dist.get_rank() != src else obj


def all_gather_object(obj: T, group: Any = None) -> list[T]:
    """Every rank's ``obj``, in rank order. Plain JSON values only (UTF-8 bytes, never pickled)."""
    if not is_distributed():
        return [obj]
    device = _comm_device(group)
    payload = json.dumps(obj).encode()
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(payload)], dtype=torch.int64, device=device), group=group)
    longest = max(int(t.item()) for t in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(bufs, mine, group=group)
    return [json.loads(b[: int(n.item())].cpu().numpy().tobytes().decode()) for b, n in zip(bufs, sizes)]


def gather_object(obj: T, dst: int = 0, group: Any = None) -> list[T] | None:
    """Every rank's ``obj`` on rank ``dst`` only (None elsewhere), in rank order: what rank 0 needs from each
    rank without sending it to all (plain JSON, never pickled). ``dst`` is a global rank."""
    if not is_distributed():
        return [obj]
    device = _comm_device(group)
    payload = json.dumps(obj).encode()
    world = dist.get_world_size(group)
    me = dist.get_rank() == dst
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)] if me else None
    dist.gather(size, sizes, dst=dst, group=group)
    # the longest payload sets the buffer size: one more small broadcast, then one gather of equal-sized buffers
    longest = torch.tensor([max(int(t.item()) for t in sizes) if me else 0], dtype=torch.int64, device=device)
    dist.broadcast(longest, src=dst, group=group)
    n = int(longest.item())
    mine = torch.zeros(n, dtype=torch.uint8, device=device)
    if payload:
        mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    bufs = [torch.zeros(n, dtype=torch.uint8, device=device) for _ in range(world)] if me else None
    dist.gather(mine, bufs, dst=dst, group=group)
    if not me:
        return None
    return [json.loads(b[: int(k.item())].cpu().numpy().tobytes().decode()) for b, k in zip(bufs, sizes)]
