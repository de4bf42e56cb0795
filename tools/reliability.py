"""The reliability suite: kills mid-save, full disk, corruption, hostile files, elastic restarts, preemption, lock.

    python tools/reliability.py                   # every scenario at full size; writes docs/reliability.md
    python tools/reliability.py --only kill --kills 80
    python tools/reliability.py --no-doc          # print the tally only

Every trial runs real processes (2 ranks on gloo, or torchrun with the training entry point) on real files and
checks what a user relies on: resume finds the newest complete checkpoint, nothing committed earlier is lost or
altered, bad files are refused with an error that names them. Each scenario returns one :class:`Trial` per trial;
``tests/test_reliability.py`` runs a CI-sized subset of the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOC = ROOT / "docs" / "reliability.md"
BIN = Path(sys.executable).parent
SAVE_EVERY = 2
TOTAL = 8
SHARD = 3 * 1024**2  # below the 4 MB weights: each is written by both ranks, a range each (range writes)

PHASES = ("before the save", "staging", "shard writes", "manifest", "rename", "pointer update", "after the commit")


@dataclass
class Trial:
    scenario: str
    case: str
    ok: bool
    lost: int = 0
    detail: str = ""
    phase: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------- the 2-rank child


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(3)))


def _child(run_dir: str, spec: dict[str, Any]) -> None:
    """One rank of a small 2-rank DDP job that saves every 2 updates (the victim of the kill and disk trials)."""
    import resource

    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain import distributed as D
    from wsd_pretrain.checkpoint import faults
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.errors import CheckpointError

    D.init_distributed(backend="gloo", timeout_s=60)
    rank = D.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    saves = 0
    events = open(spec["events"] + f".{rank}", "a") if spec.get("events") else None

    def hook(point: str) -> None:
        nonlocal saves
        if point == "save-begin":
            saves += 1
            if rank == 0:
                print(f"BEGIN {saves} {time.monotonic()}", flush=True)
        if rank == 0 and point.startswith("latest-written:"):
            print(f"COMMITTED {point.split(':', 1)[1]} {time.monotonic()}", flush=True)
        if events is not None:
            events.write(f"{saves} {point}\n")
            events.flush()
        if saves == spec.get("target") and point == spec.get("point"):
            victim = spec["victim"]
            if victim == "all":
                os.killpg(0, signal.SIGKILL)
            elif victim == rank:
                os.kill(os.getpid(), signal.SIGKILL)

    faults.fault_hook = hook
    cfg = CheckpointConfig(
        every_steps=SAVE_EVERY,
        at_milestones=False,
        at_end=False,
        on_preemption=False,
        keep_last=100,
        write_mode=spec.get("mode", "parallel"),
        async_save=bool(spec.get("async")),
        max_shard_size=SHARD,
        on_save_error=spec.get("on_error", "stop"),
    )
    mgr = CheckpointManager(run_dir, model, opt, sched, config=cfg)
    limited = False
    try:
        while not sched.finished:
            g = torch.Generator().manual_seed(1000 * sched.last_epoch + rank)
            model(torch.randn(4, 1024, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            if spec.get("fsize") and rank in spec["fsize_ranks"] and sched.last_epoch == SAVE_EVERY + 1:
                # the disk "fills up" after the first checkpoint: files may not grow past a few bytes
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.RLIM_INFINITY))
                limited = True
            mgr.maybe_save()
            if limited and sched.last_epoch == 2 * SAVE_EVERY + 1 and spec.get("on_error") == "continue":
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                limited = False  # space freed: the next save may succeed
        mgr.close()
    except CheckpointError as exc:
        print(f"CHECKPOINT-ERROR {exc}", flush=True)
        sys.stdout.flush()
        os._exit(3)
    print(f"DONE {sched.last_epoch}", flush=True)
    sys.stdout.flush()
    os._exit(0)


# the ranks of the 2-rank jobs are forked from one multiprocessing fork server that imported torch and the library
# once (a started interpreter spends about 3 s of CPU importing them, and the CI subset alone starts 14 jobs); in a
# test session, the session's server (tests/distributed_helpers.py) where it already runs
_PRELOAD = ["torch", "torch.distributed", "wsd_pretrain.checkpoint.manager", "wsd_pretrain.distributed"]
_FORK_CONTEXT: Any = None


def _fork_context() -> Any:
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        import multiprocessing as mp
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # not used where the server already runs
        saved = dict(os.environ)
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")  # read when torch and DeepSpeed are imported
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _FORK_CONTEXT = ctx
    return _FORK_CONTEXT


def _forked_rank(run_dir: str, spec: dict[str, Any], env: dict[str, str], out: str, err: str, pgid: int) -> None:
    """A rank of :class:`_Job`, forked from the fork server: its own process group (rank 0 makes it, rank 1 joins
    it), as a launcher starts a job, so that a kill of "all" takes both ranks and nothing else; its output to files
    the job reads."""
    if pgid == 0:
        os.setpgid(0, 0)
    else:
        deadline = time.monotonic() + 30
        while True:
            try:
                os.setpgid(0, pgid)
                break
            except PermissionError:  # rank 0 has not made its group yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.001)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.clear()
    os.environ.update(env)
    _child(run_dir, spec)


class _Rank:
    """A forked rank, seen as the ``subprocess.Popen`` of a launcher sees its worker (poll, wait, send_signal)."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("rank", timeout or 0)
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, sig)


class _Job:
    """The 2 ranks of :func:`_child`, started directly (as a launcher would) in one new process group."""

    def __init__(self, run_dir: Path, spec: dict[str, Any]) -> None:
        port = _free_port()
        self.lines: list[tuple[float, str]] = []
        self.committed: dict[str, str] = {}  # name -> manifest.hash at commit time
        self.run_dir = run_dir
        self.procs: list[_Rank] = []
        # outside run_dir, which may be a small filesystem the disk trials fill
        self.logs = Path(tempfile.mkdtemp(prefix="wsd-reliability-job-"))
        self.out = [str(self.logs / f"rank{r}.out") for r in range(2)]
        self.err = [str(self.logs / f"rank{r}.err") for r in range(2)]
        for path in self.out + self.err:
            Path(path).touch()
        ctx = _fork_context()
        pgid = 0
        for rank in range(2):
            env = _env(
                RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            p = ctx.Process(
                target=_forked_rank, args=(str(run_dir), spec, env, self.out[rank], self.err[rank], pgid), daemon=True
            )
            p.start()
            pgid = pgid or p.pid
            self.procs.append(_Rank(p))
        self.pgid = pgid
        self.stderr: list[str] = ["", ""]
        self._readers = [threading.Thread(target=self._read, args=(0,), daemon=True)]
        for t in self._readers:
            t.start()

    def _line(self, line: str) -> None:
        line = line.strip()
        self.lines.append((time.monotonic(), line))
        if line.startswith("COMMITTED "):
            name = line.split()[1]
            ckpt = self.run_dir / "checkpoints" / name
            self.committed[name] = (ckpt / "manifest.hash").read_text()

    def _read(self, i: int) -> None:
        """Follow rank ``i``'s output file line by line until the rank has ended and the file is read."""
        with open(self.out[i]) as f:
            partial = ""
            while True:
                ended = self.procs[i].poll() is not None
                chunk = f.readline()
                while chunk:
                    partial += chunk
                    if partial.endswith("\n"):
                        self._line(partial)
                        partial = ""
                    chunk = f.readline()
                if ended:
                    if partial:
                        self._line(partial)
                    return
                time.sleep(0.001)

    def wait_line(self, prefix: str, timeout: float = 120.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if line.startswith(prefix):
                    return t
            if all(p.poll() is not None for p in self.procs):
                return None
            time.sleep(0.001)
        return None

    def kill(self, which: int | str) -> None:
        with contextlib.suppress(ProcessLookupError):
            if which == "all":
                os.killpg(self.pgid, signal.SIGKILL)
            else:
                self.procs[int(which)].send_signal(signal.SIGKILL)

    def finish(self, after_first_death: float = 0.3, timeout: float = 120.0) -> list[int]:
        """Wait for the job: once one rank has died, the rest are killed (what a launcher does), like a real job."""
        deadline = time.monotonic() + timeout
        while all(p.poll() is None for p in self.procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        end = time.monotonic() + after_first_death
        while any(p.poll() is None for p in self.procs) and time.monotonic() < end:
            time.sleep(0.01)
        if any(p.poll() is None for p in self.procs):
            self.kill("all")
        codes = [p.wait(30) for p in self.procs]
        for t in self._readers:
            t.join(10)
        self.stderr = [Path(e).read_text(errors="replace") for e in self.err]
        shutil.rmtree(self.logs, ignore_errors=True)
        return codes

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


# ------------------------------------------------------------------------------------------------ kill mid-save


def _phase_of(event: str) -> str:
    name = event.split(":", 1)[0]
    return {
        "save-begin": "staging",
        "staging-created": "staging",
        "fetch-begin": "staging",
        "fetch": "shard writes",
        "fetch-end": "shard writes",
        "snapshot": "shard writes",  # an async save's copy, while training goes on
        "shard-begin": "shard writes",
        "shard-end": "shard writes",
        "range-write": "shard writes",  # a rank's byte range of a model file written in place
        "report": "shard writes",
        "commit-begin": "manifest",
        "manifest-begin": "manifest",
        "manifest-written": "manifest",
        "manifest-hash-written": "rename",
        "renamed": "pointer update",
        "latest-written": "after the commit",
    }[name]


def _disk_phase(run_dir: Path, target_step: int) -> str:
    """Where the interrupted save was, read from what it left on disk."""
    from wsd_pretrain.checkpoint import format as F

    root = run_dir / "checkpoints"
    staging = sorted(p for p in root.glob(F.STAGING_PREFIX + "*") if f"step-{target_step:09d}-" in p.name)
    if staging:
        s = staging[-1]
        if (s / "manifest.json").exists():
            return "rename" if (s / "manifest.hash").exists() else "manifest"
        if (s / "train_state" / "engine.json").exists() or (s / "model.safetensors.index.json").exists():
            return "manifest"  # rank 0 is writing the indexes and train state that precede the manifest
        if any(p.is_file() for p in s.rglob("*")):
            return "shard writes"
        return "staging"
    final = [p for p in root.glob(f"step-{target_step:09d}-*") if p.is_dir()]
    if final:
        return "after the commit" if F.read_latest(run_dir) == final[0].name else "pointer update"
    return "before the save"


def _check_after_crash(run_dir: Path, committed: dict[str, str], target_step: int) -> tuple[bool, int, str]:
    """Every checkpoint committed before the kill is intact; resume (a fresh process's manager) finds the newest."""
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    root = run_dir / "checkpoints"
    lost, notes = 0, []
    for name, mhash in committed.items():
        ckpt = root / name
        if not ckpt.is_dir():
            lost += 1
            notes.append(f"{name} missing")
        elif (ckpt / "manifest.hash").read_text() != mhash or verify_checkpoint_files(ckpt):
            lost += 1
            notes.append(f"{name} altered")
    complete = set(committed) | {p.name for p in root.glob(f"step-{target_step:09d}-*") if p.is_dir()}
    expected = max((int(n.split("-")[1]) for n in complete), default=None)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    mgr = CheckpointManager(
        run_dir, model, opt, sched, config=CheckpointConfig(on_preemption=False, max_shard_size=SHARD)
    )
    try:
        resumed = mgr.resume("auto")
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".wsd_pretrain.lock"]
    finally:
        mgr.close()
    ok = lost == 0
    if expected is None:
        ok = ok and not resumed
    elif not resumed or sched.last_epoch != expected:
        ok = False
        notes.append(f"resume went to step {sched.last_epoch if resumed else None}, expected {expected}")
    if leftovers:
        ok = False
        notes.append(f"leftovers after reopening: {leftovers}")
    listed = [i for i in F.list_checkpoints(run_dir) if i.state == "complete"]
    if sorted(i.name for i in listed) != sorted(complete):
        ok = False
        notes.append(f"complete checkpoints {[i.name for i in listed]}, expected {sorted(complete)}")
    return ok, lost, "; ".join(notes)


def calibrate(workdir: Path, mode: str, async_: bool) -> tuple[dict[int, list[str]], float]:
    """One uninterrupted run recording every save step each rank reaches, and how long a save takes."""
    run_dir = workdir / f"calibrate-{mode}-{int(async_)}"
    events = workdir / f"events-{mode}-{int(async_)}"
    job = _Job(run_dir, {"mode": mode, "async": async_, "events": str(events)})
    codes = job.finish(timeout=300)
    if codes != [0, 0]:
        raise RuntimeError(f"calibration run failed: {codes}\n{job.stderr[0][-3000:]}\n{job.stderr[1][-3000:]}")
    target = 2
    per_rank: dict[int, list[str]] = {}
    for r in range(2):
        lines = Path(f"{events}.{r}").read_text().splitlines()
        per_rank[r] = [ln.split(" ", 1)[1] for ln in lines if ln.split(" ", 1)[0] == str(target)]
    begin = [t for t, ln in job.lines if ln.startswith(f"BEGIN {target} ")]
    done = [t for t, ln in job.lines if ln.startswith("COMMITTED ") and f"-{target * SAVE_EVERY:09d}-" in ln]
    duration = (done[0] - begin[0]) if begin and done else 0.2
    shutil.rmtree(run_dir, ignore_errors=True)
    return per_rank, duration


def kill_trials(workdir: Path, n: int, seed: int = 0, log: Callable[[str], None] = print) -> list[Trial]:
    """``n`` SIGKILLs during the second save of a 2-rank job: half at a chosen step of the save protocol (spread
    evenly over its phases), half at a random time within the save; one rank or the whole job; parallel and rank0
    writes; sync and async saves."""
    rng = random.Random(seed)
    trials: list[Trial] = []
    configs = [("parallel", False), ("rank0", False), ("parallel", True), ("rank0", True)]
    calib = {c: calibrate(workdir, *c) for c in configs[: max(1, min(4, n))]}
    phase_cycle = ["staging", "shard writes", "manifest", "rename", "pointer update"]
    target_save = 2
    target_step = target_save * SAVE_EVERY
    for i in range(n):
        mode, async_ = configs[i % len(calib)]
        events, duration = calib[(mode, async_)]
        run_dir = workdir / f"kill-{i:03d}"
        spec: dict[str, Any] = {"mode": mode, "async": async_, "target": target_save}
        timed = i % 2 == 1
        if not timed:
            phase = phase_cycle[(i // 2) % len(phase_cycle)]
            victims = [v for v in (0, 1, "all") if any(_phase_of(e) == phase for e in events[0 if v == "all" else v])]
            victim = rng.choice(victims)
            choices = [e for e in events[0 if victim == "all" else victim] if _phase_of(e) == phase]
            ranged = [e for e in choices if e.startswith("range-write:")]
            if ranged and rng.random() < 0.5:  # half the kills aimed at the writes land in a rank's range write
                choices = ranged
            spec.update(point=rng.choice(choices), victim=victim)
            how = f"at {spec['point']}"
        else:
            victim = rng.choice([0, 1, "all"])
            spec.update(point=None, victim=victim)
            delay = rng.uniform(0, 1.1 * duration)
            how = f"{delay * 1000:.0f} ms into the save"
        job = _Job(run_dir, spec)
        if timed:
            t0 = job.wait_line(f"BEGIN {target_save} ")
            if t0 is not None:
                time.sleep(max(0.0, t0 + delay - time.monotonic()))
                job.kill(victim)
        codes = job.finish()
        killed = any(c == -signal.SIGKILL for c in codes)
        where = _disk_phase(run_dir, target_step)
        case = f"{mode}{' async' if async_ else ''}, kill {'both ranks' if victim == 'all' else f'rank {victim}'} {how}"
        if not killed:
            trials.append(Trial("kill", case, False, detail=f"the job was not killed (exit {codes})", phase=where))
            continue
        ok, lost, notes = _check_after_crash(run_dir, dict(job.committed), target_step)
        aimed = None if timed else phase
        trials.append(Trial("kill", case, ok, lost, notes, phase=where, extra={"timed": timed, "aimed": aimed}))
        log(f"  kill {i + 1}/{n}: {case}: phase {where}: {'ok' if ok else 'FAILED ' + notes}")
        shutil.rmtree(run_dir, ignore_errors=True)
    return trials


# --------------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_filesystem(path: Path, size_mb: int) -> Iterator[bool]:
    """A tmpfs of ``size_mb`` at ``path`` (needs root); yields False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True, text=True
    )
    try:
        yield res.returncode == 0
    finally:
        if res.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def disk_trials(workdir: Path, tmpfs: bool = True, log: Callable[[str], None] = print) -> list[Trial]:
    """The disk fills up after the first checkpoint (step 2): the step-4 save fails. With ``on_save_error=stop``
    every rank stops with a clear error; with ``continue`` training goes on (and, in the RLIMIT cases, the space
    comes back and the next saves succeed). Older checkpoints stay intact and no staging directory is left."""
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    trials = []
    cases: list[tuple[str, dict[str, Any]]] = [
        ("file size limit on rank 0, stop", {"fsize": 1 << 20, "fsize_ranks": [0], "on_error": "stop"}),
        ("file size limit on rank 1, stop", {"fsize": 1 << 20, "fsize_ranks": [1], "on_error": "stop"}),
        ("file size limit on both ranks, continue", {"fsize": 1 << 20, "fsize_ranks": [0, 1], "on_error": "continue"}),
        ("file size limit on rank 0, rank0 mode, stop", {"fsize": 1 << 20, "fsize_ranks": [0], "mode": "rank0"}),
    ]
    if tmpfs:
        cases += [
            ("full 60 MB filesystem, stop", {"tmpfs": 60, "on_error": "stop"}),
            ("full 60 MB filesystem, continue", {"tmpfs": 60, "on_error": "continue"}),
        ]
    for i, (case, spec) in enumerate(cases):
        run_dir = workdir / f"disk-{i}"
        with contextlib.ExitStack() as stack:
            if spec.get("tmpfs"):
                mounted = stack.enter_context(small_filesystem(run_dir, spec["tmpfs"]))
                if not mounted:
                    log(f"  disk: {case}: skipped (mounting a tmpfs needs root)")
                    continue
            job = _Job(run_dir, spec)
            codes = job.finish(after_first_death=30)
            out = job.text()
            notes = []
            stop = spec.get("on_error", "stop") == "stop"
            if stop and codes != [3, 3]:
                notes.append(f"expected every rank to stop with a checkpoint error, got exit codes {codes}")
            if not stop and codes != [0, 0]:
                notes.append(f"expected training to carry on to the end, got exit codes {codes}")
            msg = next((ln for ln in out.splitlines() if ln.startswith("CHECKPOINT-ERROR")), "")
            errtext = msg + job.stderr[0] + job.stderr[1]
            if not msg:  # on_save_error=continue: the error is logged and training goes on
                msg = next((ln for ln in job.stderr[0].splitlines() if "was not written" in ln), "")
            if not re.search(r"File too large|No space left", errtext):
                notes.append("no error naming the cause (file too large / no space left)")
            root = run_dir / "checkpoints"
            staging = [p.name for p in root.glob(".staging-*")]
            if staging:
                notes.append(f"staging left behind: {staging}")
            first = root / F.checkpoint_name(SAVE_EVERY, ["periodic"])
            if not first.is_dir() or verify_checkpoint_files(first):
                notes.append("the first checkpoint is missing or damaged")
            infos = [x.name for x in F.list_checkpoints(run_dir) if x.state == "complete"]
            if any(f"-{2 * SAVE_EVERY:09d}-" in n for n in infos):
                notes.append("the failed checkpoint was committed")
            if not stop and spec.get("fsize") and len(infos) != TOTAL // SAVE_EVERY - 1:
                notes.append(f"after the space came back, saves should succeed again: {infos}")
            lost = 0 if first.is_dir() else 1
            trials.append(Trial("disk", case, not notes, lost, "; ".join(notes), extra={"error": msg[:300]}))
            log(f"  disk: {case}: {'ok' if not notes else 'FAILED ' + '; '.join(notes)}")
    return trials


# ----------------------------------------------------------------------------------------- corruption, hostile


def _tiny_run(run_dir: Path, steps: int = 4) -> None:
    """A run of the default model (single process) with checkpoints at steps 2 and 4."""
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.model import LlamaLM, ModelConfig

    mcfg = ModelConfig()
    torch.manual_seed(0)
    model = LlamaLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=10, decay_length=2))
    cfg = CheckpointConfig(every_steps=2, at_milestones=False, at_end=False, on_preemption=False, keep_last=10)
    with CheckpointManager(run_dir, model, opt, sched, config=cfg, hf_config=mcfg.hf_config()) as mgr:
        for _ in range(steps):
            x = torch.randint(0, 256, (2, 16))
            model(x).float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            mgr.maybe_save()


def _fresh_manager(run_dir: Path, **cfg: Any):
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.model import LlamaLM, ModelConfig

    mcfg = ModelConfig()
    model = LlamaLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=10, decay_length=2))
    config = CheckpointConfig(on_preemption=False, **cfg)
    return CheckpointManager(run_dir, model, opt, sched, config=config), sched


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def corruption_trials(workdir: Path, seed: int = 0, log: Callable[[str], None] = print) -> list[Trial]:
    """Truncate, or flip one byte in, each file of the newest checkpoint (the safetensors shards in the header and
    in the data): ``verify`` names the file, resume refuses naming it, and resume with ``fallback`` goes back to
    the previous checkpoint."""
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files
    from wsd_pretrain.errors import CheckpointError

    rng = random.Random(seed)
    base = workdir / "corruption-base"
    _tiny_run(base)
    ckpts = [i for i in F.list_checkpoints(base) if i.state == "complete"]
    newest = ckpts[-1].path
    manifest = json.loads((newest / "manifest.json").read_text())
    files = [*sorted(manifest["files"]), "manifest.json", "manifest.hash"]
    trials = []
    for rel in files:
        size = (newest / rel).stat().st_size
        damages: list[tuple[str, Callable[[Path], None]]] = [
            ("truncated to half", lambda p, s=size: os.truncate(p, s // 2)),
        ]
        if rel.endswith(".safetensors"):
            hlen = struct.unpack("<Q", (newest / rel).read_bytes()[:8])[0]
            damages.append(("one byte flipped in the header", lambda p, h=hlen: _flip(p, 8 + rng.randrange(h))))
            damages.append(
                ("one byte flipped in the data", lambda p, h=hlen, s=size: _flip(p, rng.randrange(8 + h, s)))
            )
        else:
            damages.append(("one byte flipped", lambda p, s=size: _flip(p, rng.randrange(s))))
        for what, damage in damages:
            run = workdir / "corruption-trial"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(base, run)
            ckpt = run / "checkpoints" / newest.name
            damage(ckpt / rel)
            notes = []
            name = Path(rel).name
            try:
                problems = verify_checkpoint_files(ckpt)
                if not any(name in p for p in problems):
                    notes.append(f"verify did not name the file: {problems}")
            except CheckpointError as exc:
                if name not in str(exc):
                    notes.append(f"verify's error does not name the file: {exc}")
            mgr, sched = _fresh_manager(run)
            try:
                mgr.resume("auto")
                notes.append(f"resume accepted the damaged checkpoint (step {sched.last_epoch})")
            except CheckpointError as exc:
                if name not in str(exc):
                    notes.append(f"resume's error does not name the file: {str(exc)[:200]}")
            finally:
                mgr.close()
            mgr, sched = _fresh_manager(run, fallback=True)
            try:
                mgr.resume("auto")
                if sched.last_epoch != ckpts[-2].position:
                    notes.append(f"fallback resumed step {sched.last_epoch}, expected {ckpts[-2].position}")
            except CheckpointError as exc:
                notes.append(f"fallback failed: {str(exc)[:200]}")
            finally:
                mgr.close()
            trials.append(Trial("corruption", f"{rel}: {what}", not notes, detail="; ".join(notes)))
            if notes:
                log(f"  corruption {rel} {what}: FAILED {'; '.join(notes)}")
    shutil.rmtree(workdir / "corruption-trial", ignore_errors=True)
    return trials


def reseal(ckpt: Path, edit: Callable[[Any], Any] | None = None) -> None:
    """Recompute the manifest's sizes and checksums and the manifest's own hash: what a careful attacker (or a
    buggy tool) would do, so that the checks under test are the structural ones, not the checksums."""
    from wsd_pretrain.checkpoint.safetensors_io import hash_file

    mpath = ckpt / "manifest.json"
    m = json.loads(mpath.read_text())
    if isinstance(m, dict) and isinstance(m.get("files"), dict):
        algo = m.get("checksum", "xxh3_128")
        for rel, entry in m["files"].items():
            p = Path(rel) if os.path.isabs(rel) else ckpt / rel
            if p.exists() and isinstance(entry, dict):
                entry["size"], entry["hash"] = hash_file(p, algo)
        if edit is not None:
            edit(m)
        mpath.unlink()
        mpath.write_text(json.dumps(m, indent=1))
    algo = m.get("checksum", "xxh3_128") if isinstance(m, dict) else "xxh3_128"
    (ckpt / "manifest.hash").write_text(f"{algo} {hash_file(mpath, algo)[1]}\n")


def _rewrite_header(path: Path, edit: Callable[[dict[str, Any]], Any], length: int | None = None) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    new = edit(header)
    blob = json.dumps(header if new is None else new).encode()
    blob += b" " * (-len(blob) % 8)
    path.unlink()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _first_tensors(header: dict[str, Any]) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    new = edit(data)
    path.unlink()
    path.write_text(json.dumps(data if new is None else new))


def hostile_cases(outside: Path) -> list[tuple[str, Callable[[Path], None], set[str]]]:
    """(case, how to make the checkpoint hostile, which operations must refuse it). Every case must also leave
    ``outside`` unread and unchanged, and never unpickle."""
    secret = outside / "secret.safetensors"

    def shard(ckpt: Path) -> Path:
        return sorted(ckpt.glob("model-*.safetensors"))[0]

    def index(ckpt: Path) -> Path:
        return ckpt / "model.safetensors.index.json"

    def set_map(value: Callable[[Path], str]) -> Callable[[Path], None]:
        def f(ckpt: Path) -> None:
            def edit(ix: dict[str, Any]) -> None:
                key = sorted(ix["weight_map"])[0]
                ix["weight_map"][key] = value(ckpt)

            _edit_json(index(ckpt), edit)
            reseal(ckpt)

        return f

    def add_file(rel: Callable[[Path], str]) -> Callable[[Path], None]:
        def f(ckpt: Path) -> None:
            _edit_json(ckpt / "manifest.json", lambda m: m["files"].update({rel(ckpt): {"size": 0, "hash": "0"}}))
            reseal(ckpt)

        return f

    def symlink_shard(ckpt: Path) -> None:
        s = shard(ckpt)
        shutil.copy(s, outside / "copy.safetensors")
        s.unlink()
        s.symlink_to(outside / "copy.safetensors")  # same bytes: checksums pass; the link must be refused

    def symlink_dir(ckpt: Path) -> None:
        d = ckpt / "train_state" / "rng"
        shutil.copytree(d, outside / "rng")
        shutil.rmtree(d)
        d.symlink_to(outside / "rng", target_is_directory=True)

    def symlink_manifest(ckpt: Path) -> None:
        shutil.copy(ckpt / "manifest.json", outside / "manifest.json")
        (ckpt / "manifest.json").unlink()
        (ckpt / "manifest.json").symlink_to(outside / "manifest.json")

    def header(edit: Callable[[dict[str, Any]], Any], length: Callable[[Path], int] | None = None):
        def f(ckpt: Path) -> None:
            p = shard(ckpt)
            _rewrite_header(p, edit, None if length is None else length(p))
            reseal(ckpt)

        return f

    def overlap(h: dict[str, Any]) -> None:
        a, b = _first_tensors(h)[:2]
        h[b]["data_offsets"] = list(h[a]["data_offsets"])

    def past_end(h: dict[str, Any]) -> None:
        last = _first_tensors(h)[-1]
        h[last]["data_offsets"][1] += 1 << 40

    def shape_mismatch(h: dict[str, Any]) -> None:
        k = _first_tensors(h)[0]
        h[k]["shape"] = [d * 2 for d in h[k]["shape"]]

    def dtype(value: str) -> Callable[[dict[str, Any]], None]:
        def f(h: dict[str, Any]) -> None:
            k = next(k for k in _first_tensors(h) if h[k]["dtype"] == "F32")
            h[k]["dtype"] = value

        return f

    def transposed(h: dict[str, Any]) -> None:
        k = next(k for k in _first_tensors(h) if len(h[k]["shape"]) == 2 and h[k]["shape"][0] != h[k]["shape"][1])
        h[k]["shape"] = h[k]["shape"][::-1]

    def json_case(rel: str, edit: Callable[[Any], Any]) -> Callable[[Path], None]:
        def f(ckpt: Path) -> None:
            _edit_json(ckpt / rel, edit)
            reseal(ckpt)

        return f

    def sizes_as_strings(m: dict[str, Any]) -> None:
        for e in m["files"].values():
            e["size"] = str(e["size"])

    def manifest_as_list(ckpt: Path) -> None:
        _edit_json(ckpt / "manifest.json", lambda m: [m])
        reseal(ckpt)

    def latest_escapes(ckpt: Path) -> None:
        (ckpt.parent / "latest").write_text(json.dumps({"name": "../../outside"}))

    every = {"load", "verify", "export"}
    return [
        ("index entry with '..'", set_map(lambda c: "../../outside/secret.safetensors"), every),
        ("index entry with an absolute path", set_map(lambda c: str(secret)), every),
        ("manifest entry with '..'", add_file(lambda c: "../../outside/secret.safetensors"), every),
        ("manifest entry with an absolute path", add_file(lambda c: str(secret)), every),
        ("shard is a symlink out of the checkpoint", symlink_shard, every),
        ("directory is a symlink out of the checkpoint", symlink_dir, {"load", "verify"}),
        ("manifest.json is a symlink out of the checkpoint", symlink_manifest, every),
        ("safetensors header claims 2^62 bytes", header(lambda h: None, lambda p: 1 << 62), every),
        ("safetensors header longer than the file", header(lambda h: None, lambda p: p.stat().st_size), every),
        ("tensor offsets past the end of the file", header(past_end), every),
        ("overlapping tensor offsets", header(overlap), every),
        ("offsets disagree with shape and dtype", header(shape_mismatch), every),
        ("unknown dtype", header(dtype("F128")), every),
        ("header is a JSON list", header(lambda h: [h]), every),
        ("wrong dtype (int32 for a float weight)", header(dtype("I32")), {"load"}),
        ("wrong shape (a weight transposed)", header(transposed), {"load"}),
        ("manifest is a JSON list", manifest_as_list, every),
        ("manifest file sizes are strings", lambda c: reseal(c, sizes_as_strings), every),
        ("manifest position is a string", json_case("manifest.json", lambda m: m.update(position="ten")), every),
        (
            "index weight_map is a list",
            json_case("model.safetensors.index.json", lambda ix: ix.update(weight_map=[])),
            {"load", "export"},
        ),
        (
            "trainer.json step is a string",
            json_case("train_state/trainer.json", lambda t: t.update(step="ten")),
            {"load"},
        ),
        (
            "engine.json param_groups is not a list",
            json_case("train_state/engine.json", lambda e: e.update(optimizer={"param_groups": "x"})),
            {"load"},
        ),
        ("RNG state is a JSON list", json_case("train_state/rng/rank-00000.json", lambda r: [r]), {"load"}),
        ("config.json is a JSON list", json_case("config.json", lambda c: [c]), {"export"}),
        ("latest pointer leads out of the run", latest_escapes, set()),
    ]


class _Audit:
    """Records every file the interpreter opens (resolved through symlinks) and any unpickling."""

    def __init__(self) -> None:
        self.active = False
        self.opened: list[str] = []
        self.unpickled: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            with contextlib.suppress(Exception):
                self.opened.append(os.path.realpath(os.fsdecode(args[0])))
        elif event == "pickle.find_class":
            self.unpickled.append(repr(args))


_AUDIT: _Audit | None = None


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def hostile_trials(workdir: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """Each hostile checkpoint is opened by load (resume), verify, export-hf and list: the operations that must
    refuse it do, with a CheckpointError (a ValueError) and a message; none reads or writes outside the
    checkpoint, none unpickles, none crashes with any other exception."""
    global _AUDIT

    from wsd_pretrain.checkpoint import format as F

    if _AUDIT is None:
        _AUDIT = _Audit()
    base = workdir / "hostile-base"
    if not base.exists():
        _tiny_run(base)
    newest = [i for i in F.list_checkpoints(base) if i.state == "complete"][-1].path
    trials = []
    for case, make, must in hostile_cases(workdir / "outside"):
        trial = _hostile_one(workdir, base, newest, case, make, must)
        trials.append(trial)
        log(f"  hostile: {case}: {'ok' if trial.ok else 'FAILED ' + trial.detail}")
    shutil.rmtree(workdir / "hostile-trial", ignore_errors=True)
    return trials


def _hostile_one(
    workdir: Path, base: Path, newest: Path, case: str, make: Callable[[Path], None], must: set[str]
) -> Trial:
    import torch

    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.tools import export_hf, verify_checkpoint_files
    from wsd_pretrain.errors import CheckpointError

    real_load = torch.load

    def no_torch_load(*a: Any, **k: Any) -> Any:
        assert _AUDIT is not None
        _AUDIT.unpickled.append("torch.load")
        return real_load(*a, **k)

    top = workdir / "hostile-trial"
    shutil.rmtree(top, ignore_errors=True)
    outside = workdir / "outside"
    shutil.rmtree(outside, ignore_errors=True)
    outside.mkdir()
    shutil.copy(next(newest.glob("model-*.safetensors")), outside / "secret.safetensors")
    run = top / "run"
    shutil.copytree(base, run)
    ckpt = run / "checkpoints" / newest.name
    make(ckpt)
    before = _tree_digest(outside)
    notes: list[str] = []
    outcome: dict[str, str] = {}

    def attempt(op: str, fn: Callable[[], Any]) -> None:
        try:
            res = fn()
            outcome[op] = "refused" if (op == "verify" and res) else "accepted"
        except CheckpointError as exc:
            outcome[op] = "refused"
            if not str(exc).strip():
                notes.append(f"{op}: an empty error message")
        except Exception as exc:
            outcome[op] = "crashed"
            notes.append(f"{op}: crashed with {type(exc).__name__}: {exc}")

    assert _AUDIT is not None
    _AUDIT.opened.clear()
    _AUDIT.unpickled.clear()
    torch.load = no_torch_load
    _AUDIT.active = True
    try:

        def load() -> None:
            mgr, _ = _fresh_manager(run)
            try:
                mgr.resume(str(ckpt))
            finally:
                mgr.close()

        attempt("load", load)
        attempt("verify", lambda: verify_checkpoint_files(ckpt))
        attempt("export", lambda: export_hf(ckpt, top / "hf"))
        attempt("list", lambda: F.list_checkpoints(run))
        attempt("resolve", lambda: F.resolve_checkpoint(run))
    finally:
        _AUDIT.active = False
        torch.load = real_load
    for op in sorted(must):
        if outcome.get(op) != "refused":
            notes.append(f"{op} {outcome.get(op)} it")
    if "export" in outcome and outcome["export"] != "accepted" and (top / "hf").exists():
        notes.append("export left a half-written output folder")
    out_real = os.path.realpath(outside)
    touched = sorted({p for p in _AUDIT.opened if p == out_real or p.startswith(out_real + os.sep)})
    if touched:
        notes.append(f"read outside the checkpoint: {touched}")
    if _tree_digest(outside) != before:
        notes.append("files outside the checkpoint changed")
    if _AUDIT.unpickled:
        notes.append(f"unpickled: {_AUDIT.unpickled}")
    return Trial("hostile", case, not notes, detail="; ".join(notes), extra={k: outcome[k] for k in sorted(outcome)})


# ------------------------------------------------------------------------- elastic restarts, preemption, lock

QUICK = ["train.progress=false", "train.eval_every=1000", "data.max_bytes=2000000"]


def _torchrun(nproc: int, run_dir: Path, *args: str, restarts: int = 0) -> list[str]:
    # c10d rendezvous, as launch/torchrun_multinode.sh: with the static one (--master-port), torch 2.13's restarted
    # workers can read the previous attempt's gloo addresses from the store and fail to connect
    return [
        str(BIN / "torchrun"),
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(restarts),
        "--monitor-interval",
        "0.2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--rdzv-id",
        f"reliability-{os.getpid()}-{time.monotonic_ns()}",
        "-m",
        "wsd_pretrain.train",
        "--run-dir",
        str(run_dir),
        "--resume",
        "auto",
        *args,
        *QUICK,
    ]


def _final_tensors(run_dir: Path) -> dict[str, str]:
    from wsd_pretrain.checkpoint import format as F

    final = [i for i in F.list_checkpoints(run_dir) if i.state == "complete" and "final" in i.kinds]
    if not final:
        return {}
    m = json.loads((final[-1].path / "manifest.json").read_text())
    out = {rel: e["hash"] for rel, e in m["files"].items() if rel.endswith(".safetensors") and "rng" not in rel}
    # a range-written file's hash covers its owner's bytes: the holders' ranges have one checksum per holder
    for rank, holder in ((m.get("ranges") or {}).get("holders") or {}).items():
        out[f"ranges of rank {rank}"] = holder["hash"]
    return out


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(x).get("step", -1) for x in path.read_text().splitlines() if x.strip().startswith("{")]
    return max(steps, default=-1)


def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            env = dict(
                kv.split("=", 1)
                for kv in (d / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
            if "RANK" in env:
                out[int(env["RANK"])] = int(d.name)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _launch_until(run: Path, args: list[str], at: int, restarts: int = 0) -> subprocess.Popen[str]:
    """Start the training job on 2 ranks under torchrun; return once it has logged update ``at`` (or ended)."""
    proc = subprocess.Popen(
        _torchrun(2, run, *args, restarts=restarts),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while _last_step(run) < at and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def _worker_errors(out: str) -> str:
    """The workers' own error lines from a launcher's output (not the launcher's traceback)."""
    lines = [ln for ln in out.splitlines() if re.match(r"\[rank\d+\]: \w*(Error|Exception)", ln)]
    return " | ".join(lines[-4:]) or out[-800:]


def _run_to_end(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return res


def elastic_trials(
    workdir: Path, steps: int = 30, victims: tuple[int, ...] = (1, 0), log: Callable[[str], None] = print
) -> list[Trial]:
    """torchrun --max-restarts 1; one worker SIGKILLed mid-run: the agent restarts the group, which resumes from the
    newest checkpoint and ends with the same weights and optimizer state as an uninterrupted run."""
    args = ["--total-steps", str(steps), "--save-every", "5"]
    straight = workdir / "elastic-straight"
    _run_to_end(_torchrun(2, straight, *args))
    reference = _final_tensors(straight)
    trials = []
    for victim in victims:
        at = steps // 2 + 2 if victim else steps // 3 + 1
        run = workdir / f"elastic-{victim}"
        proc = _launch_until(run, args, at, restarts=1)
        notes = []
        try:
            pids = _workers(proc.pid)
            if victim not in pids:
                notes.append(f"no worker of rank {victim} found to kill (workers {pids})")
            else:
                os.kill(pids[victim], signal.SIGKILL)
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                out = ""
        (workdir / f"elastic-{victim}.log").write_text(out)
        if proc.returncode != 0:
            notes.append(f"the elastic job failed (exit {proc.returncode}): {_worker_errors(out)}")
        if "resumed" not in out:
            notes.append("the restarted workers did not resume from a checkpoint")
        got = _final_tensors(run)
        if not got or got != reference:
            notes.append("final weights differ from the uninterrupted run")
        case = f"rank {victim} killed at step {at} of {steps}, restarted by torchrun"
        trials.append(Trial("elastic", case, not notes, detail="; ".join(notes)))
        log(f"  elastic: {case}: {'ok' if not notes else 'FAILED ' + '; '.join(notes)}")
    return trials


def preemption_trials(
    workdir: Path, steps: int = 30, reference_dir: Path | None = None, log: Callable[[str], None] = print
) -> list[Trial]:
    """SIGTERM to the torchrun launcher mid-run (what SLURM's --signal and Kubernetes send): a complete preempt
    checkpoint appears within the grace period, the job exits, and rerunning the same command continues exactly."""
    from wsd_pretrain.checkpoint import format as F

    args = ["--total-steps", str(steps), "--save-every", "5"]
    straight = reference_dir or workdir / "elastic-straight"
    if not _final_tensors(straight):
        _run_to_end(_torchrun(2, straight, *args))
    reference = _final_tensors(straight)
    trials = []
    for at in (steps // 2 + 1,):
        run = workdir / f"preempt-{at}"
        proc = _launch_until(run, args, at)
        notes = []
        try:
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            grace = 30.0
            preempt = None
            while time.monotonic() - t0 < grace and preempt is None:
                done = [i for i in F.list_checkpoints(run) if i.state == "complete" and "preempt" in i.kinds]
                preempt = done[-1] if done else None
                time.sleep(0.05)
            took = time.monotonic() - t0
            out, _ = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                out = ""
        if preempt is None:
            notes.append(f"no complete preempt checkpoint within {grace:.0f}s: {out[-1500:]}")
        elif _final_tensors(run):
            notes.append("the run went on to the end instead of stopping")
        else:
            _run_to_end(_torchrun(2, run, *args))
            if _final_tensors(run) != reference:
                notes.append("the resumed run's final weights differ from the uninterrupted run")
        case = f"SIGTERM to torchrun at step {at} of {steps}" + (
            f"; preempt checkpoint {preempt.name} committed {took:.1f}s later" if preempt else ""
        )
        trials.append(Trial("preemption", case, not notes, detail="; ".join(notes), extra={"seconds": took}))
        log(f"  preemption: {case}: {'ok' if not notes else 'FAILED ' + '; '.join(notes)}")
    return trials


def lock_trials(workdir: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """A second run pointed at a run directory in use refuses to start and changes nothing there."""
    run = workdir / "lock"
    first = subprocess.Popen(
        [sys.executable, "-m", "wsd_pretrain.train", "--run-dir", str(run), "--total-steps", "400", *QUICK],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    notes = []
    try:
        deadline = time.monotonic() + 300
        while _last_step(run) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        lines_before = (run / "metrics.jsonl").read_text().count("\n")
        second = subprocess.run(
            [sys.executable, "-m", "wsd_pretrain.train", "--run-dir", str(run), "--total-steps", "400", *QUICK],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines_after = (run / "metrics.jsonl").read_text().count("\n")
        if second.returncode == 0:
            notes.append("the second run started")
        if "lock" not in second.stderr.lower() and "another run" not in second.stderr.lower():
            notes.append(f"the refusal does not say why: {second.stderr[-500:]}")
        if lines_after < lines_before:
            notes.append("the second run truncated the first run's metrics")
        if first.poll() is not None:
            notes.append("the first run died")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    case = "second training run on a run directory in use"
    trials = [Trial("lock", case, not notes, detail="; ".join(notes))]
    log(f"  lock: {case}: {'ok' if not notes else 'FAILED ' + '; '.join(notes)}")
    return trials


# ---------------------------------------------------------------------------------------------------- the report


# ---------------------------------------------------------------------------------------------- object storage

S3_KILL_POINTS = ("upload-object:model", "upload-object:train_state/", "upload-manifest", "upload-committed:")
S3_DIRECT_KILL_POINTS = ("upload-part:", "shard-begin:train_state/", "upload-manifest", "upload-committed:")
"""The direct streaming save (no staging folder): the writer streams each file to its multipart upload (a model
file's second part, small parts for that save; the first state file begun), then rank 0 uploads the small JSON files
and commits as the staging tier does."""


def _s3_child(spec: dict[str, Any]) -> None:
    """One job on an s3:// run (its rank 0: the rank that uploads): saves at 2 (waited for: on the bucket), then at 4,
    whose upload is SIGKILLed at ``spec["kill_at"]``. ``spec["staging"]`` None: the direct streaming save."""
    import torch

    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import faults, objstore_tier, storage

    objstore_tier.LEASE_TTL_S = 2.0  # the next run may take the dead job's lease over 2 s after its last renewal
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    cfg = CheckpointConfig(every_steps=2, staging_dir=spec["staging"], max_shard_size=SHARD, on_preemption=False)
    mgr = CheckpointManager(spec["url"], model, opt, sched, config=cfg)

    def kill(name: str) -> None:
        if sched.position == 4 and name.startswith(spec["kill_at"]):
            os.kill(os.getpid(), signal.SIGKILL)

    for _ in range(4):
        model(torch.randn(4, 1024)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.maybe_save()
        mgr.wait()
        faults.fault_hook = kill
        if sched.position == 2 and spec["kill_at"] == "upload-part:":
            storage.PART_SIZE = 256 * 1024  # the save at 4 in multipart uploads (never completed: moto's minimum)
    mgr.close()


@dataclass
class _MotoBucket:
    """The scenarios' moto server (``proc``: replaced when a trial restarts it), its environment and a boto3 client
    with the ``reliability`` bucket made."""

    proc: Any
    endpoint: str
    env: dict[str, str]
    client: Any


@contextlib.contextmanager
def _moto_bucket() -> Iterator[_MotoBucket]:
    """Start a moto server on loopback, point this process's environment at it and make the ``reliability``
    bucket; restore the environment and stop the server (the one in ``proc`` at the end) on the way out."""
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_s3 import KEYS, start_server

    proc, endpoint = start_server()
    env = {**KEYS, "AWS_ENDPOINT_URL_S3": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    moto = _MotoBucket(proc, endpoint, env, None)
    try:
        import boto3

        moto.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        moto.client.create_bucket(Bucket="reliability")
        yield moto
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        moto.proc.terminate()
        moto.proc.wait(10)


def s3_trials(workdir: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """Object storage (a local moto S3 server): SIGKILL of the uploading rank at each step of the upload (an object,
    the state files, between the objects and the manifest, after the manifest before ``latest``); the server
    stopped and restarted mid-upload; a stale listing; hostile object names in a manifest."""
    from wsd_pretrain.checkpoint.storage import S3Store

    trials: list[Trial] = []
    with _moto_bucket() as moto:
        env, client, endpoint = moto.env, moto.client, moto.endpoint
        store = S3Store("reliability")
        kills = [(at, False) for at in S3_KILL_POINTS] + [(at, True) for at in S3_DIRECT_KILL_POINTS]
        for i, (at, direct) in enumerate(kills):
            url = f"s3://reliability/kill-{i}"
            staging = None if direct else str(workdir / f"s3-kill-{i}")
            spec = {"url": url, "staging": staging, "kill_at": at}
            res = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "_s3child", json.dumps(spec)],
                env=_env(**env),
                capture_output=True,
                text=True,
                timeout=600,
            )
            trials.append(_s3_check(store, url, at, res.returncode, workdir / f"s3-kill-{i}-after", client, direct))
            log(f"  {trials[-1].case}: {'ok' if trials[-1].ok else trials[-1].detail}")
        trials.append(_s3_server_restart(workdir, moto.proc, endpoint, client))
        log(f"  server restarted mid-upload: {'ok' if trials[-1].ok else trials[-1].detail}")
        moto.proc = trials[-1].extra.pop("proc")
        trials += _s3_listing_and_names(store, workdir)
        # the same on the direct streaming save (its restart empties the bucket: run after the staging tier's rows)
        trials.append(_s3_server_restart(workdir, moto.proc, endpoint, client, direct=True))
        log(f"  {trials[-1].case}: {'ok' if trials[-1].ok else trials[-1].detail}")
        moto.proc = trials[-1].extra.pop("proc")
        trials += _s3_listing_and_names(store, workdir, "s3://reliability/restart-direct", hostile=False)
    return trials


def _s3_check(store: Any, url: str, at: str, rc: int, fresh: Path, client: Any, direct: bool = False) -> Trial:
    import torch

    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import objstore, objstore_tier
    from wsd_pretrain.checkpoint.storage import parse_location

    case = f"SIGKILL at {at}" + (" (direct streaming)" if direct else "")
    if rc != -signal.SIGKILL:
        return Trial("s3", case, False, detail=f"the job was not killed (exit {rc})")
    run = parse_location(url)
    before = {i.name: i.state for i in objstore.list_run(run)}
    committed_at_4 = at.startswith("upload-committed")
    if before.get("step-000000002-periodic") != "complete":
        return Trial("s3", case, False, lost=1, detail=f"step 2 not complete on the bucket: {before}")
    if (before.get("step-000000004-periodic") == "complete") != committed_at_4:
        return Trial("s3", case, False, detail=f"step 4 visible as complete={not committed_at_4}: {before}")
    time.sleep(2.5)  # the dead job's lease expires
    objstore_tier.LEASE_TTL_S = 2.0
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    cfg = CheckpointConfig(staging_dir=None if direct else str(fresh))
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    try:
        mgr.resume("latest")
        position = sched.position
    finally:
        mgr.close()
        objstore_tier.LEASE_TTL_S = 120.0
    want = 4 if committed_at_4 else 2
    after = {i.name: i.state for i in objstore.list_run(run)}
    uploads = client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", [])
    problems = []
    if position != want:
        problems.append(f"resumed at {position}, not {want}")
    if any(state != "complete" for state in after.values()):
        problems.append(f"leftovers after the next run: {after}")
    if uploads:
        problems.append(f"{len(uploads)} multipart upload(s) left")
    if objstore.fetch(run / "checkpoints" / "step-000000002-periodic", fresh / "check"):
        problems.append("step 2 does not verify")
    return Trial("s3", case, not problems, detail="; ".join(problems), extra={"before": before})


def _s3_server_restart(workdir: Path, proc: Any, endpoint: str, client: Any, direct: bool = False) -> Trial:
    """The server goes away during an upload and comes back (empty: moto keeps objects in memory): the save fails
    on the next wait() with an error naming the upload, within boto3's bounded retries; training state untouched;
    the next save, once the bucket is back, is committed. ``direct``: the direct streaming save (synchronous: the
    save itself raises), the server restarted as the first state file begins streaming."""
    import torch

    from wsd_pretrain import CheckpointConfig, CheckpointError, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import faults, objstore
    from wsd_pretrain.checkpoint.storage import parse_location

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_s3

    url = "s3://reliability/restart" + ("-direct" if direct else "")
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    staging = None if direct else str(workdir / "s3-restart")
    cfg = CheckpointConfig(every_steps=2, staging_dir=staging, max_shard_size=SHARD)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    state: dict[str, Any] = {"proc": proc}
    port = int(endpoint.rsplit(":", 1)[1])

    def restart(name: str) -> None:
        at = "shard-begin:train_state/" if direct else "upload-object:train_state/"
        if name.startswith(at) and "done" not in state:
            state["done"] = True
            state["proc"].terminate()
            state["proc"].wait(10)
            state["proc"] = _start_on(port, bench_s3)
            # the bucket is gone with the server's memory; it is made again only after this upload failed

    error, seconds = "", 0.0
    try:
        faults.fault_hook = restart
        for i in range(2):
            model(torch.randn(4, 1024)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            if not (direct and i == 1):
                mgr.maybe_save()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        t0 = time.monotonic()
        try:  # the direct save streams to the bucket before maybe_save returns: it raises there; the tier at wait()
            mgr.maybe_save() if direct else mgr.wait()
        except CheckpointError as exc:
            error, seconds = str(exc), time.monotonic() - t0
        faults.fault_hook = None
        intact = all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
        client.create_bucket(Bucket="reliability")
        for _ in range(2):
            model(torch.randn(4, 1024)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            mgr.maybe_save()
        mgr.wait()
        names = [i.name for i in objstore.list_run(parse_location(url)) if i.state == "complete"]
    finally:
        faults.fault_hook = None
        mgr.close()
    problems = []
    said = "checkpoint step-000000002-periodic was not written" if direct else "uploading step-000000002-periodic"
    if not error.startswith(said):
        problems.append(f"no clear error on the failed upload: {error[:200]!r}")
    if not intact:
        problems.append("training state changed")
    if names != ["step-000000004-periodic"]:
        problems.append(f"the next save is not committed: {names}")
    return Trial(
        "s3",
        "server stopped and restarted mid-upload" + (" (direct streaming)" if direct else ""),
        not problems,
        detail="; ".join(problems),
        extra={"proc": state["proc"], "error": error[:200], "seconds": round(seconds, 1)},
    )


def _start_on(port: int, bench_s3: Any) -> Any:
    """The restarted server, on the port the job's clients know."""
    return bench_s3.start_server(port)[0]


def _s3_listing_and_names(
    store: Any, workdir: Path, url: str = "s3://reliability/restart", hostile: bool = True
) -> list[Trial]:
    """A stale listing (it misses a committed manifest, or still shows a deleted one) and hostile object names."""
    from wsd_pretrain import CheckpointError
    from wsd_pretrain.checkpoint import objstore
    from wsd_pretrain.checkpoint.safetensors_io import new_hasher
    from wsd_pretrain.checkpoint.storage import parse_location

    trials = []
    run = parse_location(url)
    label = "" if url == "s3://reliability/restart" else " (direct streaming)"
    real_list = store.list
    names = [i.name for i in objstore.list_run(run)]
    target = run / "checkpoints" / names[-1]

    def stale(prefix: str, delimiter: str | None = None) -> Any:
        objects, prefixes = real_list(prefix, delimiter)
        return [o for o in objects if not o["key"].endswith("/manifest.json")], prefixes

    import wsd_pretrain.checkpoint.objstore as O

    real_store_for = O.store_for
    O.store_for = lambda url: store  # type: ignore[assignment]
    store.list = stale  # type: ignore[method-assign]
    try:
        seen = {i.name: i.state for i in objstore.list_run(run)}
    finally:
        store.list = real_list  # type: ignore[method-assign]
    ok = seen.get(target.name) == "complete"
    trials.append(Trial("s3", "stale listing without a committed manifest" + label, ok, detail="" if ok else str(seen)))
    # an unfinished save whose listing still shows a manifest (deleted since): never complete
    ghost = run / "checkpoints" / "step-000000006-periodic"
    store.put((ghost / "model-00001-of-00001.safetensors").key, b"partial")

    def ghostly(prefix: str, delimiter: str | None = None) -> Any:
        objects, prefixes = real_list(prefix, delimiter)
        if prefix == ghost.prefix:
            objects = [*objects, {"key": (ghost / "manifest.json").key, "size": 10, "etag": None}]
        return objects, prefixes

    store.list = ghostly  # type: ignore[method-assign]
    try:
        seen = {i.name: i.state for i in objstore.list_run(run)}
    finally:
        store.list = real_list  # type: ignore[method-assign]
        O.store_for = real_store_for  # type: ignore[assignment]
    ok = seen.get(ghost.name) == "unfinished"
    trials.append(Trial("s3", "stale listing showing a deleted manifest" + label, ok, detail="" if ok else str(seen)))
    if not hostile:
        return trials
    # hostile object names in a (resealed) manifest: refused before any object is read
    m, raw, _ = objstore.load_manifest(store, target)
    for rel in ("../outside.bin", "/absolute.bin", "a\\b.bin", "a//b.bin", "./a.bin"):
        bad = run / "checkpoints" / "step-000000008-periodic"
        edited = json.loads(raw)
        edited["files"][rel] = {"size": 1, "hash": "0" * 32, "rank": 0}
        body = json.dumps(edited).encode()
        h = new_hasher(m["checksum"])
        h.update(body)
        store.put((bad / "manifest.json").key, body)
        store.put((bad / "manifest.hash").key, f"{m['checksum']} {h.hexdigest()}\n".encode())
        try:
            objstore.fetch(bad, workdir / f"hostile-{abs(hash(rel))}")
            ok, detail = False, "accepted"
        except CheckpointError as exc:
            ok, detail = "refused" in str(exc), str(exc)[:120]
        trials.append(Trial("s3", f"hostile object name {rel!r}", ok, detail="" if ok else detail))
    return trials


# ------------------------------------------------------------- object storage: one rank of a torchrun job killed

S3_RANK_CASES = (
    ("direct", 1),
    ("direct", 0),
    ("staging", 1),
    ("staging", 0),
)
"""(save path, victim rank): the direct streaming save (no staging folder: each rank streams its files to multipart
uploads under the final prefix) and the staging tier (each rank saves to node-local disk, then uploads its files)."""


def _state_digest(model: Any, opt: Any) -> str:
    """The model's and the optimizer's tensors (and the optimizer's step counts), as one hash."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    for idx, st in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(st.items()):
            h.update(f"{idx}.{k}".encode())
            if torch.is_tensor(v):
                h.update(v.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(v).encode())
    return h.hexdigest()


def _update(model: Any, opt: Any, sched: Any, rank: int) -> None:
    """One update of the 2-rank S3 jobs' DDP MLP on batches seeded by the update and the rank (the same in every
    run of the job)."""
    import torch

    g = torch.Generator().manual_seed(1000 * sched.last_epoch + rank)
    model(torch.randn(4, 1024, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def _step(model: Any, opt: Any, sched: Any, mgr: Any, rank: int) -> None:
    """:func:`_update`, then the manager's ``maybe_save`` as a user's loop calls it."""
    _update(model, opt, sched, rank)
    mgr.maybe_save()


def _timed_save_at_4(
    model: Any, opt: Any, sched: Any, mgr: Any, rank: int, hook: Any, *, then_wait: bool = False
) -> dict[str, Any]:
    """Updates 3 and 4 of a job that committed its save at 2, with ``faults.fault_hook = hook`` (the trial's
    fault), the save at 4 called on its own and timed (``then_wait``: and its ``wait()``, where the staging tier
    raises the upload's outcome): what it raised, how long it took and whether it left the training state as it
    was."""
    from wsd_pretrain import CheckpointError
    from wsd_pretrain.checkpoint import faults

    faults.fault_hook = hook
    _step(model, opt, sched, mgr, rank)  # 3
    _update(model, opt, sched, rank)  # 4: its save streams to the bucket before maybe_save returns (and raises there)
    before = _state_digest(model, opt)
    t0 = time.monotonic()
    error = ""
    try:
        mgr.maybe_save()
        if then_wait:
            mgr.wait()
    except CheckpointError as exc:
        error = str(exc)
    took = time.monotonic() - t0
    faults.fault_hook = None
    return {"error": error, "seconds": took, "intact": _state_digest(model, opt) == before}


def _s3_rank(spec: dict[str, Any]) -> None:
    """One rank of a 2-rank DDP job under torchrun on an s3:// run (the manager in a user's loop, default preemption
    handling). ``phase == "job"``: saves at 2 (waited for: committed on the bucket; the state then is written down),
    then at 4, during whose upload rank ``victim`` is SIGKILLed at its second multipart part (small parts on that
    rank, that save only: a part in flight, one sent). ``phase == "resume"``: a new job resumes ("latest"), writes
    down where it landed and its state, then trains on and saves 4 again."""
    import torch

    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain import distributed as D
    from wsd_pretrain.checkpoint import faults, objstore_tier, storage

    if spec["phase"] != "restart":  # (the restarted server loses the lease: no renewal may come in between)
        objstore_tier.LEASE_TTL_S = 2.0  # the next job may take the dead one's lease 2 s after its last renewal
    D.init_distributed(backend="gloo", timeout_s=120)
    rank = D.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    cfg = CheckpointConfig(every_steps=2, staging_dir=spec["staging"], max_shard_size=SHARD, keep_last=100)
    mgr = CheckpointManager(spec["url"], model, opt, sched, config=cfg)
    out = Path(spec["out"])

    def step() -> None:
        _step(model, opt, sched, mgr, rank)

    if spec["phase"] == "restart":
        _s3_rank_restart(spec, mgr, model, opt, sched, step, rank, out)
        return
    if spec["phase"] == "resume":
        mgr.resume("latest")
        if rank == 0:
            (out / "resumed.json").write_text(
                json.dumps({"position": sched.position, "digest": _state_digest(model, opt)})
            )
        while sched.position < 4:
            step()
        mgr.close()
        if rank == 0:
            (out / "resaved.json").write_text(json.dumps({"last_saved": str(mgr.last_saved)}))
        return

    def kill(name: str) -> None:
        if rank == spec["victim"] and name.startswith("upload-part:") and name.endswith(":2"):
            (out / f"killed.{rank}").write_text(name)
            os.kill(os.getpid(), signal.SIGKILL)

    for _ in range(2):
        step()
    mgr.wait()  # committed on the bucket
    if rank == 0:
        (out / "saved2.json").write_text(json.dumps({"digest": _state_digest(model, opt)}))
    if rank == spec["victim"]:
        storage.PART_SIZE = 256 * 1024  # multipart uploads on the victim (parts never completed: moto's minimum)
    faults.fault_hook = kill
    for _ in range(2):
        step()
    mgr.wait()
    print(f"rank {rank}: the save at 4 was not interrupted", flush=True)
    mgr.close()


def _s3_rank_restart(spec: dict[str, Any], mgr: Any, model: Any, opt: Any, sched: Any, step: Any, rank: int, out: Path):
    """The server is stopped and restarted (empty) while both ranks stream the save at 4: rank 0 stops at its first
    state file and waits for the test to restart the server. Each rank writes down the error its save raised and
    whether its training state changed; once the test has made the bucket again, both train on and save at 6."""
    from wsd_pretrain import distributed as D

    def pause(name: str) -> None:
        if rank == 0 and sched.position == 4 and name.startswith("shard-begin:train_state/"):
            (out / "restart.ask").write_text(name)
            deadline = time.monotonic() + 120
            while not (out / "restart.done").exists() and time.monotonic() < deadline:
                time.sleep(0.05)

    for _ in range(2):
        step()
    mgr.wait()
    saved = _timed_save_at_4(model, opt, sched, mgr, rank, pause)
    (out / f"restart.{rank}.json").write_text(json.dumps(saved))
    D.barrier()
    if rank == 0:
        (out / "restart.failed").write_text("")
        deadline = time.monotonic() + 120
        while not (out / "bucket.done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    D.barrier()
    while sched.position < 6:
        step()
    mgr.close()


def _torchrun_script(*args: str) -> list[str]:
    """torchrun, 2 workers, no restarts (a worker's death ends the job: the agent stops the others), running this
    script with ``args``."""
    cmd = _torchrun(2, Path("unused"))
    return [*cmd[: cmd.index("-m")], str(Path(__file__).resolve()), *args]


def s3_rank_trials(workdir: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """One rank of a 2-rank job under torchrun SIGKILLed mid-upload (rank 1, then rank 0; the direct streaming save
    and the staging tier): nothing committed for that save, nothing half visible to ``ckpt list`` or the resolution
    of ``latest``; the next job resumes the previous checkpoint exactly and removes every leftover of the killed
    save, its multipart uploads included, then saves that step again. Then the server restarted while both ranks
    stream a save (:func:`_s3_rank_restart_trial`)."""
    trials: list[Trial] = []
    with _moto_bucket() as moto:
        env, client = moto.env, moto.client
        for mode, victim in S3_RANK_CASES:
            t0 = time.monotonic()
            trials.append(_s3_rank_trial(workdir / f"s3rank-{mode}-{victim}", mode, victim, env, client))
            trials[-1].extra["seconds"] = round(time.monotonic() - t0, 1)
            log(f"  {trials[-1].case}: {'ok' if trials[-1].ok else trials[-1].detail}")
        trials.append(_s3_rank_restart_trial(workdir / "s3rank-restart", env, client, moto.proc, moto.endpoint))
        moto.proc = trials[-1].extra.pop("proc")
        log(f"  {trials[-1].case}: {'ok' if trials[-1].ok else trials[-1].detail}")
    return trials


def _s3_rank_restart_trial(work: Path, env: dict[str, str], client: Any, proc: Any, endpoint: str) -> Trial:
    """2 ranks under torchrun streaming the save at 4 (no staging folder) when the server is stopped and restarted
    (empty, as moto keeps objects in memory; the bucket is made again once both saves failed): the save fails on
    both ranks with an error naming it, neither rank's training state changes, and the save at 6 is committed."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_s3

    from wsd_pretrain.checkpoint import objstore
    from wsd_pretrain.checkpoint.storage import parse_location

    case = "server stopped and restarted mid-upload, 2 ranks, direct streaming"
    url = "s3://reliability/ranks-restart"
    out, tmp = work / "out", work / "tmp"
    out.mkdir(parents=True)
    tmp.mkdir()
    spec = {"url": url, "staging": None, "victim": -1, "phase": "restart", "out": str(out)}
    log_path = work / "job.log"
    with open(log_path, "w") as logf:
        job = subprocess.Popen(
            _torchrun_script("_s3rank", json.dumps(spec)),
            cwd=ROOT,
            env=_env(**env, TMPDIR=str(tmp)),
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
        problems = []
        try:
            deadline = time.monotonic() + 300
            while not (out / "restart.ask").exists() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if (out / "restart.ask").exists():
                proc.terminate()
                proc.wait(10)
                proc = _start_on(int(endpoint.rsplit(":", 1)[1]), bench_s3)
                (out / "restart.done").write_text("")
                while not (out / "restart.failed").exists() and job.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                client.create_bucket(Bucket="reliability")
                (out / "bucket.done").write_text("")
            else:
                problems.append("the job never reached its first state file")
            rc = job.wait(300)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(10)
    if rc != 0:
        problems.append(f"the job failed (exit {rc}): {_worker_errors(log_path.read_text())[-600:]}")
    errors = []
    for r in range(2):
        path = out / f"restart.{r}.json"
        if not path.exists():
            problems.append(f"rank {r} did not report")
            continue
        got = json.loads(path.read_text())
        errors.append(f"rank {r} after {got['seconds']:.1f} s: {got['error'][:160]}")
        if not got["error"].startswith("checkpoint step-000000004-periodic was not written"):
            problems.append(f"rank {r}: no clear error on the failed save: {got['error'][:200]!r}")
        if not got["intact"]:
            problems.append(f"rank {r}: training state changed")
    run = parse_location(url)
    states = [(i.position, i.state) for i in objstore.list_run(run)]
    if states != [(6, "complete")]:  # 2 went with the server's memory, 4 failed
        problems.append(f"on the bucket afterwards: {states}")
    if client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", []):
        problems.append("multipart uploads left")
    return Trial("s3ranks", case, not problems, detail="; ".join(problems), extra={"proc": proc, "errors": errors})


def _s3_rank_trial(work: Path, mode: str, victim: int, env: dict[str, str], client: Any) -> Trial:
    import io

    from wsd_pretrain import cli
    from wsd_pretrain.checkpoint import objstore
    from wsd_pretrain.checkpoint.storage import parse_location

    case = f"rank {victim} of 2 SIGKILLed mid-upload, {'direct streaming' if mode == 'direct' else 'staging tier'}"
    url = f"s3://reliability/ranks-{mode}-{victim}"
    run = parse_location(url)
    out, tmp = work / "out", work / "tmp"
    out.mkdir(parents=True)
    tmp.mkdir()
    wenv = _env(**env, TMPDIR=str(tmp))  # the direct path's resume cache goes there

    def launch(phase: str, staging: str | None) -> subprocess.CompletedProcess[str]:
        spec = {"url": url, "staging": staging, "victim": victim, "phase": phase, "out": str(out)}
        cmd = _torchrun_script("_s3rank", json.dumps(spec))
        res = subprocess.run(cmd, cwd=ROOT, env=wenv, capture_output=True, text=True, timeout=600)
        (work / f"{phase}.log").write_text(res.stdout + res.stderr)
        return res

    def tail(res: subprocess.CompletedProcess[str]) -> str:
        return _worker_errors(res.stdout + res.stderr)[-600:]

    staging = str(work / "staging") if mode == "staging" else None
    t0 = time.monotonic()
    job = launch("job", staging)
    job_s = time.monotonic() - t0
    killed = out / f"killed.{victim}"
    if job.returncode == 0 or not killed.exists():
        return Trial(
            "s3ranks", case, False, detail=f"the job was not killed mid-upload (exit {job.returncode}): {tail(job)}"
        )
    if not (out / "saved2.json").exists():
        return Trial("s3ranks", case, False, detail=f"the save at 2 did not complete: {tail(job)}")
    problems = []
    # the rank that was not killed: a clear error naming the save (unless torchrun stopped it first), never a bare
    # transport error
    survivor = 1 - victim
    lines = (job.stdout + job.stderr).splitlines()
    errors = [ln for ln in lines if re.match(rf"\[rank{survivor}\]: [\w.]*(Error|Exception)\b", ln)]
    said = errors[-1].split(": ", 1)[1] if errors else "stopped by torchrun"
    if errors and not (said.startswith("wsd_pretrain.errors.CheckpointError") and "step-000000004-periodic" in said):
        problems.append(f"rank {survivor} ended with {said[:300]}")
    before = {i.name: i.state for i in objstore.list_run(run)}
    uploads_before = len(client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", []))
    if before.get("step-000000002-periodic") != "complete":
        return Trial("s3ranks", case, False, lost=1, detail=f"step 2 not complete on the bucket: {before}")
    if before.get("step-000000004-periodic", "unfinished") != "unfinished":
        problems.append(f"the killed save is {before['step-000000004-periodic']}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(["ckpt", "list", "--json", url])
    listed = {i["name"]: i for i in json.loads(buf.getvalue())}
    if [n for n, i in listed.items() if i["state"] == "complete"] != ["step-000000002-periodic"]:
        problems.append(f"ckpt list shows {listed}")
    if not listed.get("step-000000002-periodic", {}).get("latest"):
        problems.append(f"latest is not step 2 in ckpt list: {listed}")
    if objstore.resolve(run).name != "step-000000002-periodic":
        problems.append(f"latest resolves to {objstore.resolve(run).name}")
    time.sleep(2.5)  # the dead job's lease expires (its TTL is 2 s)
    fresh = str(work / "staging-new") if mode == "staging" else None  # a new node: its staging folder is empty
    t0 = time.monotonic()
    res = launch("resume", fresh)
    resume_s = time.monotonic() - t0
    if res.returncode != 0 or not (out / "resumed.json").exists():
        problems.append(f"the next job failed (exit {res.returncode}): {tail(res)}")
        return Trial("s3ranks", case, False, detail="; ".join(problems))
    resumed = json.loads((out / "resumed.json").read_text())
    saved = json.loads((out / "saved2.json").read_text())
    if resumed["position"] != 2:
        problems.append(f"resumed at {resumed['position']}, not 2")
    elif resumed["digest"] != saved["digest"]:
        problems.append("the resumed model or optimizer state differs from the one saved at 2")
    after = {i.name: i.state for i in objstore.list_run(run)}
    uploads = client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", [])
    if after != {"step-000000002-periodic": "complete", "step-000000004-periodic": "complete"}:
        problems.append(f"after the next job: {after}")
    if uploads:
        problems.append(f"{len(uploads)} multipart upload(s) left")
    if objstore.fetch(run / "checkpoints" / "step-000000002-periodic", work / "check"):
        problems.append("step 2 does not verify")
    return Trial(
        "s3ranks",
        case,
        not problems,
        detail="; ".join(problems),
        extra={
            "before": before,
            "uploads_before": uploads_before,
            "killed_at": killed.read_text(),
            "survivor": said.replace("wsd_pretrain.errors.", ""),
            "job_s": round(job_s, 1),
            "resume_s": round(resume_s, 1),
        },
    )


HANG_LIMIT_S = 2.0
"""``checkpoint.storage_timeout_s`` of the hang scenario's jobs (each try of a request; 3 tries)."""
HANG_CASES = (
    ("parts", "server stopped mid-upload (rank 1's second multipart part), longer than the limit"),
    ("manifest", "server stopped between the objects and the manifest (rank 0), longer than the limit"),
    ("short", "server stopped for less than the limit (1 s, as rank 1 begins its first state object)"),
    ("staging", "server stopped mid-upload on the staging tier (rank 1's first object), longer than the limit"),
)


def _hang_rank(spec: dict[str, Any]) -> None:
    """One rank of a 2-rank DDP job under torchrun on an s3:// run, streaming its saves (no staging folder) with
    ``storage_timeout_s`` = :data:`HANG_LIMIT_S` and a 6 s lease (renewed every 2 s: the heartbeat runs into the
    stopped server too). ``phase == "job"``: saves at 2 (committed); during the save at 4 the server is stopped
    (SIGSTOP of its pid: sockets open, nothing answers) at ``spec["case"]``'s point by the rank that reaches it;
    each rank writes down what its save raised, how long it took and whether its state changed, then waits for the
    harness to resume the server (SIGCONT), trains on and saves at 6 (its state written down). The ``staging``
    case saves through a staging folder instead: the save at 4 is committed locally and uploaded in the background,
    and its failure is raised by the next ``wait()``. ``phase == "resume"``: a new job (a new staging folder)
    resumes "latest" and writes down where it landed and its state."""
    import threading

    import torch

    from wsd_pretrain import CheckpointConfig, CheckpointManager, WSDSchedule, WSDScheduler
    from wsd_pretrain import distributed as D
    from wsd_pretrain.checkpoint import objstore_tier, storage

    objstore_tier.LEASE_TTL_S = 6.0
    D.init_distributed(backend="gloo", timeout_s=300)
    rank = D.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=TOTAL, decay_length=2))
    cfg = CheckpointConfig(
        every_steps=2,
        max_shard_size=SHARD,
        keep_last=100,
        storage_timeout_s=HANG_LIMIT_S,
        staging_dir=spec.get("staging"),
    )
    mgr = CheckpointManager(spec["url"], model, opt, sched, config=cfg)
    out, pid, case = Path(spec["out"]), int(spec["pid"]), spec["case"]

    def step() -> None:
        _step(model, opt, sched, mgr, rank)

    if spec["phase"] == "resume":
        mgr.resume("latest")
        if rank == 0:
            (out / "resumed.json").write_text(
                json.dumps({"position": sched.position, "digest": _state_digest(model, opt)})
            )
        mgr.close()
        return

    def stop(name: str) -> None:
        at = {
            "parts": rank == 1 and name.startswith("upload-part:") and name.endswith(":2"),
            "manifest": rank == 0 and name == "upload-manifest",
            "short": rank == 1 and name.startswith("shard-begin:train_state/"),  # (parts must be 5 MiB to complete)
            "staging": rank == 1 and name.startswith("upload-object:"),
        }[case]
        if sched.position != 4 or (out / "stopped").exists() or not at:
            return
        (out / "stopped").write_text(name)
        os.kill(pid, signal.SIGSTOP)
        if case == "short":  # resumed by this rank 1 s later: shorter than one try's limit
            threading.Timer(1.0, os.kill, (pid, signal.SIGCONT)).start()

    for _ in range(2):
        step()
    mgr.wait()
    if rank == 1 and case == "parts":  # multipart uploads on rank 1 for the save at 4 (never completed: moto's minimum)
        storage.PART_SIZE = 256 * 1024
    saved = _timed_save_at_4(model, opt, sched, mgr, rank, stop, then_wait=True)
    storage.PART_SIZE = 16 * 1024 * 1024
    (out / f"hang.{rank}.json").write_text(json.dumps(saved))
    deadline = time.monotonic() + 300
    while not (out / "resumed").exists() and time.monotonic() < deadline:  # the harness: SIGCONT once both reported
        time.sleep(0.05)
    while sched.position < 6:
        step()
    mgr.wait()
    if rank == 0:
        (out / "saved6.json").write_text(json.dumps({"digest": _state_digest(model, opt)}))
    mgr.close()


def hang_trials(workdir: Path, log: Callable[[str], None] = print) -> list[Trial]:
    """The server stops answering mid-save (SIGSTOP of moto: its sockets stay open, nothing answers, as a hung
    endpoint or a host gone without closing its connections) while a 2-rank torchrun job streams its save at 4: at
    rank 1's second multipart part, and between the objects and the manifest (rank 0), for longer than the limit;
    and for 1 s, less than the limit. :func:`_hang_trial` checks each."""
    trials: list[Trial] = []
    with _moto_bucket() as moto:
        for case, title in HANG_CASES:
            t0 = time.monotonic()
            trials.append(_hang_trial(workdir / f"hang-{case}", case, title, moto))
            trials[-1].extra["total_s"] = round(time.monotonic() - t0, 1)
            log(f"  {trials[-1].case}: {'ok' if trials[-1].ok else trials[-1].detail}")
    return trials


def _hang_trial(work: Path, case: str, title: str, moto: Any) -> Trial:
    """Longer than the limit: every rank's save at 4 fails with a CheckpointError saying the store stopped answering
    and naming the object, within the limits' bound; training state intact; nothing of 4 committed or listed as
    complete; once the server answers again (SIGCONT) the save at 6 commits, and a new job resumes 6 exactly and
    removes the failed save's leftovers (objects, claim, multipart uploads). Shorter: the save at 4 commits."""
    import io

    from wsd_pretrain import cli
    from wsd_pretrain.checkpoint import objstore, storage
    from wsd_pretrain.checkpoint.storage import parse_location

    url = f"s3://reliability/hang-{case}"
    run = parse_location(url)
    out, tmp = work / "out", work / "tmp"
    out.mkdir(parents=True)
    tmp.mkdir()
    wenv = _env(**moto.env, TMPDIR=str(tmp))
    pid = moto.proc.pid
    # the limits' worst case for a failing save: one stalled request (3 tries), the writer's abort and rank 0's
    # cleanup tried once each, and a margin for this loaded machine
    bound = storage.request_bound(HANG_LIMIT_S) + 2 * HANG_LIMIT_S + 15
    problems: list[str] = []
    staging = str(work / "staging") if case == "staging" else None
    spec = {"url": url, "phase": "job", "case": case, "out": str(out), "pid": pid, "staging": staging}
    log_path = work / "job.log"
    with open(log_path, "w") as logf:
        job = subprocess.Popen(
            _torchrun_script("_hangrank", json.dumps(spec)),
            cwd=ROOT,
            env=wenv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            reported = [out / f"hang.{r}.json" for r in range(2)]
            while not all(p.exists() for p in reported) and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            stopped_s = None
            if (out / "stopped").exists():
                stopped_s = time.time() - (out / "stopped").stat().st_mtime
            os.kill(pid, signal.SIGCONT)  # both ranks reported (or gave up): the server answers again
            (out / "resumed").write_text("")
            rc = job.wait(300)
        finally:
            os.kill(pid, signal.SIGCONT)
            if job.poll() is None:
                job.kill()
                job.wait(10)
    if not (out / "stopped").exists():
        return Trial(
            "hang", title, False, detail=f"the server was never stopped: {_worker_errors(log_path.read_text())}"
        )
    if rc != 0:
        problems.append(f"the job failed (exit {rc}): {_worker_errors(log_path.read_text())[-600:]}")
    errors, seconds = [], []
    for r in range(2):
        path = out / f"hang.{r}.json"
        if not path.exists():
            problems.append(f"rank {r} never came back from its save (a hang)")
            continue
        got = json.loads(path.read_text())
        seconds.append(got["seconds"])
        if not got["intact"]:
            problems.append(f"rank {r}: training state changed")
        if case == "short":
            if got["error"]:
                problems.append(f"rank {r}: a stall shorter than the limit failed the save: {got['error'][:300]}")
            continue
        errors.append(f"rank {r} after {got['seconds']:.1f} s: {got['error']}")
        said = (
            f"uploading step-000000004-periodic to {url} failed"
            if case == "staging"
            else "checkpoint step-000000004-periodic was not written (nothing was committed)"
        )
        if not (
            got["error"].startswith(said)
            and "the object store stopped answering: no answer for" in got["error"]
            and re.search(r"step-000000004-periodic/\S+: [A-Z-]+( \d+)?: the object store stopped", got["error"])
        ):
            problems.append(f"rank {r}: not the clear error: {got['error'][:400]!r}")
        if got["seconds"] > bound:
            problems.append(f"rank {r}: failed after {got['seconds']:.0f} s, past the limits' bound of {bound:.0f} s")
    states = {i.position: i.state for i in objstore.list_run(run)}
    want_complete = [2, 4, 6] if case == "short" else [2, 6]  # (6 is the pre-decay checkpoint too)
    if case != "short" and states.get(4, "unfinished") != "unfinished":
        problems.append(f"the failed save is {states[4]}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(["ckpt", "list", "--json", url])
    listed = [int(i["name"][5:14]) for i in json.loads(buf.getvalue()) if i["state"] == "complete"]
    if listed != want_complete:
        problems.append(f"ckpt list shows complete positions {listed}, expected {want_complete}")
    if not objstore.resolve(run).name.startswith("step-000000006-"):
        problems.append(f"latest resolves to {objstore.resolve(run).name}")
    left_before = sum(s == "unfinished" for s in states.values())
    uploads_before = len(moto.client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", []))
    # a new job resumes the newest checkpoint exactly and removes what the failed save left
    spec = {**spec, "phase": "resume", "staging": str(work / "staging-new") if staging else None}  # a new node
    res = subprocess.run(
        _torchrun_script("_hangrank", json.dumps(spec)), cwd=ROOT, env=wenv, capture_output=True, text=True, timeout=600
    )
    (work / "resume.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0 or not (out / "resumed.json").exists():
        problems.append(
            f"the next job failed (exit {res.returncode}): {_worker_errors(res.stdout + res.stderr)[-600:]}"
        )
    else:
        resumed = json.loads((out / "resumed.json").read_text())
        saved = json.loads((out / "saved6.json").read_text())
        if resumed["position"] != 6 or resumed["digest"] != saved["digest"]:
            problems.append(f"resumed at {resumed['position']}, state equal: {resumed['digest'] == saved['digest']}")
    after = {i.position: i.state for i in objstore.list_run(run)}
    if any(s != "complete" for s in after.values()):
        problems.append(f"after the next job: {after}")
    if moto.client.list_multipart_uploads(Bucket="reliability", Prefix=run.prefix).get("Uploads", []):
        problems.append("multipart uploads left after the next job")
    lease_warnings = len(re.findall(r"could not renew the run lease", log_path.read_text()))
    return Trial(
        "hang",
        title,
        not problems,
        detail="; ".join(problems),
        extra={
            "stopped_at": (out / "stopped").read_text(),
            "errors": errors,
            "seconds": [round(x, 1) for x in seconds],
            "stopped_s": None if stopped_s is None else round(stopped_s, 1),
            "bound": round(bound, 1),
            "left": left_before,
            "uploads": uploads_before,
            "lease_warnings": lease_warnings,
        },
    )


def write_doc(trials: list[Trial], seconds: float, path: Path = DOC) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from _bench import machine

    by = Counter(t.scenario for t in trials)
    fails = Counter(t.scenario for t in trials if not t.ok)
    lost = Counter()
    for t in trials:
        lost[t.scenario] += t.lost
    titles = {
        "kill": "SIGKILL during a save (one rank or all)",
        "disk": "full disk",
        "corruption": "corrupt files (truncated, one byte flipped)",
        "hostile": "hostile checkpoints",
        "elastic": "elastic restart (torchrun --max-restarts)",
        "preemption": "preemption (SIGTERM to the launcher)",
        "lock": "two runs on one directory",
        "s3": "object storage (S3), staging tier and direct streaming: kills mid-upload, server restart, stale "
        "listings, hostile names",
        "s3ranks": "object storage (S3): one rank of a 2-rank torchrun job killed mid-upload",
        "hang": "object storage (S3): the server stops answering mid-save (SIGSTOP), 2-rank torchrun job",
    }
    out = [
        "# Reliability",
        "",
        "Written by `python tools/reliability.py` (the whole suite; `tests/test_reliability.py`, marked `fault`,",
        "runs a CI-sized subset of the same code in the default test command, its torchrun test under `-m slow`). Every",
        "trial runs real processes on real",
        "files: 2-rank gloo jobs for the kills and the full disk, `torchrun` with the training entry point for the",
        "elastic restarts, the preemption and the lock.",
        "",
        f"Machine: {machine()}. Run on {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} minutes.",
        "",
        "| scenario | trials | failures | checkpoints lost |",
        "|---|---|---|---|",
    ]
    for s in titles:
        if by[s]:
            out.append(f"| {titles[s]} | {by[s]} | {fails[s]} | {lost[s]} |")
    kills = [t for t in trials if t.scenario == "kill"]
    if kills:
        ph = Counter(t.phase for t in kills)
        out += [
            "",
            "## Kills mid-save",
            "",
            "A 2-rank DDP job (a 3-layer 1024-wide MLP: 12.6 MB of weights, 37.8 MB with AdamW's state, in 3 MB",
            "shards) saves every 2 updates; during its second save one rank, or the whole job, is SIGKILLed. Its 4 MB",
            "weights are larger than a shard, so in parallel mode each is written in place by both ranks, a byte range",
            "each (range-written model files, docs/checkpoint-format.md). Half the",
            "kills land at a step of the save protocol chosen at random phase by phase (`checkpoint.faults.fault_hook`;",
            "half of those aimed at the writes land in a rank's range write, `range-write:<file>`), half at a",
            "random time within the save (uniform over 1.1x a calibrated save's duration); the writes are parallel or",
            "through rank 0, synchronous or async. When one rank dies the other is killed 0.3 s later, as a launcher",
            "would. Then a fresh process opens the run: every checkpoint committed before the kill must be present",
            "and unchanged (manifest hash equal, every file's checksum verified), resume must land on the newest",
            "complete checkpoint, and no staging directory may remain.",
            "",
            "Where the interrupted save was, read from what it left on disk:",
            "",
            "| phase | trials | failures |",
            "|---|---|---|",
        ]
        for p in PHASES:
            if ph[p]:
                out.append(f"| {p} | {ph[p]} | {sum(1 for t in kills if t.phase == p and not t.ok)} |")
    disks = [t for t in trials if t.scenario == "disk"]
    if disks:
        out += ["", "## Full disk", "", "| case | result | error seen by the user |", "|---|---|---|"]
        for t in disks:
            err = t.extra.get("error", "").replace("|", "/").replace("CHECKPOINT-ERROR ", "")
            out.append(f"| {t.case} | {'ok' if t.ok else 'FAILED: ' + t.detail} | {err[:160]} |")
    for scen, title in (("corruption", "Corruption"), ("hostile", "Hostile checkpoints")):
        rows = [t for t in trials if t.scenario == scen]
        if not rows:
            continue
        out += ["", f"## {title}", ""]
        if scen == "corruption":
            out += [
                "Each file of a checkpoint of the default model (its shards, indexes, config.json, the train-state",
                "JSON, RNG, manifest.json and manifest.hash) damaged in turn. Checked: `verify` names the file,",
                "resume refuses it naming the file, resume with `checkpoint.fallback=true` resumes the previous one.",
                "",
            ]
        else:
            out += [
                "Each case is opened by resume, `verify`, `export-hf`, `list` and the `latest` resolution. Checked:",
                "the operations that must refuse it do (CheckpointError, a ValueError, with a message), none crashes",
                "with another exception, none opens a file outside the checkpoint (every `open` audited, symlinks",
                "resolved), nothing outside changes, nothing is unpickled (`pickle.find_class` audited, `torch.load`",
                "trapped). The files are resealed (manifest sizes and checksums recomputed), so the structural checks",
                "are what is tested, not the checksums.",
                "",
                "| case | resume | verify | export-hf | result |",
                "|---|---|---|---|---|",
            ]
        for t in rows:
            if scen == "hostile":
                e = t.extra
                res = "ok" if t.ok else "FAILED: " + t.detail
                out.append(f"| {t.case} | {e.get('load')} | {e.get('verify')} | {e.get('export')} | {res} |")
        if scen == "hostile":
            out += [
                "",
                '"accepted" appears only where the operation does not use what the case breaks: `verify` checks each',
                "file's integrity against the manifest, not its meaning (a resealed file with a wrong dtype or a",
                "string step is intact); `export-hf` reads neither the training state nor tensor shapes beyond the",
                "file's own; resume does not read `config.json`. A `latest` pointer leading out of the run is ignored:",
                "resume and the tools take the newest complete checkpoint by position, and the pointer is only read",
                "when it names a checkpoint in `checkpoints/`.",
            ]
        if scen == "corruption":
            out.append(f"{len(rows)} trials, {sum(not t.ok for t in rows)} failures.")
            out += [f"- FAILED {t.case}: {t.detail}" for t in rows if not t.ok]
    s3 = [t for t in trials if t.scenario == "s3"]
    if s3:
        out += ["", "## Object storage (S3)", "", *S3_DOC, ""]
        for t in s3:
            res = "ok" if t.ok else "FAILED: " + t.detail
            if "error" in t.extra:
                res += f" (failed after {t.extra['seconds']} s: {t.extra['error'][:120]})"
            out.append(f"- {t.case}: {res}")
    ranks = [t for t in trials if t.scenario == "s3ranks"]
    if ranks:
        out += ["", "## Object storage (S3): one rank of a 2-rank job killed mid-upload", "", *S3_RANKS_DOC, ""]
        out += ["| case | result | killed at | the other rank | job / next job |", "|---|---|---|---|---|"]
        for t in ranks:
            e = t.extra
            if "errors" in e:
                continue
            res = "ok" if t.ok else "FAILED: " + t.detail.replace("|", "/")
            at = e.get("killed_at", "").replace("upload-part:", "").split("/checkpoints/")[-1].rsplit(":", 1)[0]
            other = e.get("survivor", "").replace("|", "/")
            other = re.sub(r"\[/__w/\S+\] ", "", other)  # gloo's source path
            other = re.sub(r"\. This is typically caused by.*?(?=(\)|;|$))", "", other)
            times = f"{e['job_s']} s / {e['resume_s']} s" if "job_s" in e else ""
            out.append(f"| {t.case} | {res} | part 2 of {at} | {other[:400]} | {times} |")
        for t in ranks:
            if "errors" in t.extra:
                res = "ok" if t.ok else "FAILED: " + t.detail
                out += ["", f"- {t.case}: {res} ({'; '.join(t.extra['errors'])})"]
    hangs = [t for t in trials if t.scenario == "hang"]
    if hangs:
        out += ["", "## Object storage (S3): the server stops answering mid-save", "", *HANG_DOC, ""]
        out += [
            "| case | result | stopped at | each rank's save raised after | bound | the error (rank 0) | left for the next run |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in hangs:
            e = t.extra
            res = "ok" if t.ok else "FAILED: " + t.detail.replace("|", "/")
            at = e.get("stopped_at", "").split("/checkpoints/")[-1]
            took = " / ".join(f"{x} s" for x in e.get("seconds", []))
            err = e["errors"][0].split(": ", 1)[1] if e.get("errors") else "(committed)"
            err = re.sub(r'Read timeout on endpoint URL: "[^"]*"', "Read timeout", err).replace("|", "/")
            left = f"{e.get('left', 0)} prefix, {e.get('uploads', 0)} multipart uploads"
            out.append(f"| {t.case} | {res} | {at} | {took} | {e.get('bound')} s | {err[:420]} | {left} |")
    for scen in ("elastic", "preemption", "lock"):
        rows = [t for t in trials if t.scenario == scen]
        if rows:
            out += ["", f"## {titles[scen][0].upper()}{titles[scen][1:]}", ""]
            out += [f"- {t.case}: {'ok' if t.ok else 'FAILED: ' + t.detail}" for t in rows]
    path.write_text("\n".join(out) + "\n")


SCENARIOS = ("kill", "disk", "corruption", "hostile", "elastic", "preemption", "lock", "s3", "s3ranks", "hang")
S3_DOC = [
    "A local S3 server (moto, 127.0.0.1). The job (`CheckpointManager` on an `s3://` run) saves at updates 2 and 4,",
    "through the staging tier (a staging folder: saved to local disk, then uploaded) and, in the rows marked",
    '"direct streaming", with no staging folder (each rank streams its files to multipart uploads under the final',
    "prefix, rank 0 then uploads the JSON files and commits). Its one process (which uploads every object and commits:",
    "each rank uploads the files it wrote, so on one process that is all of them) is SIGKILLed during the upload of",
    "the second save at each step of the object-storage commit: an object (on the direct save, the second multipart",
    "part of a model file, or the first state file begun), between the objects and the manifest, after the manifest",
    "before `latest`. A fresh job (with an empty staging folder) then takes the expired lease, resumes from the bucket",
    "alone, and must land on the newest committed checkpoint (2, or 4 when the kill came after its manifest); the",
    "earlier checkpoint must verify; no unfinished prefix or multipart upload may remain. The server is stopped and",
    "restarted mid-upload (moto keeps objects in memory, so the bucket comes back empty): the save must fail with an",
    "error naming it (at the next `wait()` on the staging tier, in the save itself on the synchronous direct save),",
    "the training state must be untouched, and the next save must be committed. Stale listings (one that misses a",
    "committed manifest, one that still shows a deleted one) must not change what is complete; manifests naming",
    "hostile keys must be refused before any object is read.",
]


S3_RANKS_DOC = [
    "A 2-rank DDP job under `torchrun` (no restarts: when a worker dies the agent stops the other, as in production)",
    "on an `s3://` run of the local server, the manager in a user's loop with its default preemption handling, saves at",
    "updates 2 (waited for: committed) and 4. During the save at 4 one rank (1, then 0) is SIGKILLed at the second",
    "multipart part of one of its objects (small parts on that rank for that save: a part sent, none completed), on",
    "the direct streaming save (no staging folder: each rank streams its files to multipart uploads under the final",
    "prefix) and on the staging tier (each rank saves to the node's disk, then uploads its files). Checked: the other",
    "rank ends with an error naming the save (or is stopped by torchrun first), nothing of the save at 4 is",
    "committed, `ckpt list --json` shows only checkpoint 2 complete and `latest` on it, the resolution of the run",
    "gives 2; a new 2-rank job under `torchrun` (a new node: an empty staging folder) takes the expired lease,",
    "resumes exactly the state written at 2 (model, AdamW moments and steps, hashed), has removed every leftover of",
    "the killed save (objects, claim, multipart uploads: `list_multipart_uploads` on the server is empty), and saves 4",
    "again, committed. Step 2 verifies object by object. Then the server is stopped and restarted (empty) while both",
    "ranks stream a save (direct, no staging folder): the save must fail on both ranks with an error naming it,",
    "neither rank's training state may change, and once the bucket is back the next save must be committed.",
]


HANG_DOC = [
    "The same 2-rank torchrun job on an `s3://` run of the local server, streaming its saves (no staging folder),",
    f"with `checkpoint.storage_timeout_s: {HANG_LIMIT_S:g}` (each try of a request; 3 tries) and a 6 s run lease",
    "(renewed every 2 s, so the heartbeat meets the stopped server too). During the save at 4 the server is stopped",
    "with SIGSTOP, which keeps its sockets open and answers nothing (a hung endpoint; a host gone without closing its",
    "connections), by the rank that reaches the chosen point: rank 1's second multipart part (part streaming), or",
    "rank 0 between the objects and the manifest; the harness resumes it (SIGCONT) once both ranks' saves returned.",
    "The staging-tier row saves through a staging folder instead (committed locally, uploaded in the background:",
    'stopped at rank 1\'s first object, the failure raised by the next `wait()`, "uploading ... failed").',
    "Checked: each rank's save raises a `CheckpointError` naming the save, saying the object store stopped answering",
    "and for how long, and naming the object, within the limits' bound (one stalled request's 3 tries and backoffs,",
    "the writer's abort and rank 0's cleanup tried once, and 15 s for this loaded machine); neither rank's training",
    "state changes; nothing of 4 is committed (`ckpt list --json` shows 2 and 6 complete, `latest` 6); the save at 6,",
    "after SIGCONT, commits; a new job resumes 6 exactly (model and AdamW state hashed) and has removed what the",
    "failed save left (its prefix and multipart uploads: left for the next run, as the protocol says, since the",
    "cleanup of a failed save is tried once). A stop of 1 s, less than one try's limit, must not fail the save.",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        _child(argv[1], json.loads(argv[2]))
        return 0
    if argv and argv[0] == "_s3child":
        _s3_child(json.loads(argv[1]))
        return 0
    if argv and argv[0] == "_s3rank":
        _s3_rank(json.loads(argv[1]))
        return 0
    if argv and argv[0] == "_hangrank":
        _hang_rank(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=60, help="SIGKILL trials (default 60)")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory, kept (default: a temporary one)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/reliability.md")
    ap.add_argument("--out", type=Path, default=DOC, help="the report to write (default docs/reliability.md)")
    args = ap.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SCENARIOS]
    if bad:
        ap.error(f"--only: unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wsd-reliability-")))
        else:
            work = args.workdir
            work.mkdir(parents=True, exist_ok=True)
        trials: list[Trial] = []
        runners: dict[str, Callable[[], list[Trial]]] = {
            "kill": lambda: kill_trials(work, args.kills, seed=args.seed),
            "disk": lambda: disk_trials(work),
            "corruption": lambda: corruption_trials(work, seed=args.seed),
            "hostile": lambda: hostile_trials(work),
            "elastic": lambda: elastic_trials(work),
            "preemption": lambda: preemption_trials(work),
            "lock": lambda: lock_trials(work),
            "s3": lambda: s3_trials(work),
            "s3ranks": lambda: s3_rank_trials(work),
            "hang": lambda: hang_trials(work),
        }
        for s in SCENARIOS:
            if s in only:
                print(f"{s}:", flush=True)
                got = runners[s]()
                trials += got
                print(f"{s}: {len(got)} trials, {sum(not t.ok for t in got)} failures", flush=True)
    seconds = time.monotonic() - t0
    if not args.no_doc:
        write_doc(trials, seconds, args.out)
        print(f"wrote {args.out}")
    failed = [t for t in trials if not t.ok]
    for t in failed:
        print(f"FAILED {t.scenario}: {t.case}: {t.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
