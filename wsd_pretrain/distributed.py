"""The one place that starts and stops torch.distributed, and the rank helpers everything else uses.

:func:`init_distributed` reads the launcher's environment (torchrun, the DeepSpeed launcher, SLURM's srun),
checks it, and is safe to call twice; :func:`teardown` pairs with it. Every helper answers for a single
process too (rank 0 of 1), so library code never asks "am I distributed?".
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ConfigError

__all__ = [
    "DistInfo",
    "all_gather_object",
    "all_reduce_max",
    "barrier",
    "broadcast_object",
    "gather_object",
    "get_local_rank",
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


def _env_int(name: str, env: dict[str, str], problems: list[str]) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        problems.append(f"{name}={raw!r} is not a whole number")
        return None


def _launcher_env(env: dict[str, str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/deepspeed variables, or SLURM's when those are absent."""
    problems: list[str] = []
    rank = _env_int("RANK", env, problems)
    world = _env_int("WORLD_SIZE", env, problems)
    local = _env_int("LOCAL_RANK", env, problems)
    if rank is None and world is None and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = _env_int("SLURM_PROCID", env, problems)
        world = _env_int("SLURM_NTASKS", env, problems)
        local = _env_int("SLURM_LOCALID", env, problems)
    if problems:
        raise ConfigError(problems, where="launcher environment")
    if rank is None and world is None:
        return 0, 1, 0
    if rank is None or world is None:
        raise ConfigError(
            "RANK and WORLD_SIZE must be set together (launch with torchrun, deepspeed or srun)",
            where="launcher environment",
        )
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE", where="launcher environment")
    if world > 1 and (not env.get("MASTER_ADDR") or not env.get("MASTER_PORT")):
        raise ConfigError(
            "MASTER_ADDR and MASTER_PORT must be set for a multi-process run (torchrun sets them; under srun "
            "export them in the batch script, see launch/slurm.sbatch)",
            where="launcher environment",
        )
    return rank, world, local if local is not None else rank


def default_backend() -> str:
    """nccl with CUDA, gloo on CPU (and whenever DeepSpeed is told to run on the CPU)."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu" or not torch.cuda.is_available():
        return "gloo"
    return "nccl"


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Start the process group described by the launcher's environment; a plain process stays single.

    Safe to call twice (the second call returns the running group's info). ``timeout_s`` bounds every collective:
    a rank that never arrives fails the job instead of hanging it.
    """
    global _STARTED_HERE
    if dist.is_available() and dist.is_initialized():
        return _info()
    rank, world, local = _launcher_env(dict(os.environ))
    if world == 1 and "RANK" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(local)
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
    global _STARTED_HERE
    if _STARTED_HERE and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _STARTED_HERE = False


def _info() -> DistInfo:
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
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
    """Rank on this node (0 for a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


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


def _comm_device(group: Any = None) -> torch.device:
    """Where a group's tensors must live: the current CUDA device for NCCL, the CPU for gloo (a group with a backend
    per device, "cpu:gloo,cuda:nccl", takes CPU tensors)."""
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
