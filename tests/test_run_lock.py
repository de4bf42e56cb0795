"""The run lock (wsd_pretrain/checkpoint/lock.py) across real processes: flock held by another process (EAGAIN),
a filesystem without flock (ENOSYS, Lustre's default 'noflock': the lock-file fallback), a stale lock file left by a
killed run, and a distributed run whose rank 0 finds the lock held (every rank raises)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distributed_helpers import run_distributed
from wsd_pretrain import CheckpointError
from wsd_pretrain.checkpoint.lock import FLOCK_NAME, LOCKFILE_NAME, RunLock

ROOT = Path(__file__).resolve().parent.parent

# A run holding the lock in its own process until its stdin closes. "nosys": flock raises ENOSYS, as on Lustre
# mounted with noflock (no Lustre here: this stand-in is the only way to reach that path on this machine).
HOLDER = r"""
import errno, fcntl, logging, os, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
if sys.argv[2] == "nosys":
    def flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fcntl.flock = flock
from wsd_pretrain.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1])
print("locked", lock.mode, flush=True)
sys.stdin.read()
lock.release()
"""


def _holder(run_dir: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir), mode],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("locked"):
        proc.kill()
        pytest.fail(f"the holder did not take the lock: {line!r} {proc.communicate()[1][-2000:]}")
    assert line.split()[1] == ("lockfile" if mode == "nosys" else "flock")
    return proc


def _release(proc: subprocess.Popen) -> str:
    _, err = proc.communicate("", timeout=60)
    assert proc.returncode == 0, err
    return err


def _no_flock(monkeypatch: pytest.MonkeyPatch, code: int = errno.ENOSYS) -> None:
    def flock(fd: int, op: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_flock_held_by_another_process_is_refused(tmp_path):
    holder = _holder(tmp_path, "flock")
    try:
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on "):
            RunLock(tmp_path)
    finally:
        _release(holder)
    lock = RunLock(tmp_path)  # released when the holder let go
    assert lock.mode == "flock" and not (tmp_path / LOCKFILE_NAME).exists()
    lock.release()


def test_without_flock_a_lock_file_with_host_and_pid_is_used(tmp_path, monkeypatch, caplog):
    holder = _holder(tmp_path, "nosys")
    try:
        record = json.loads((tmp_path / LOCKFILE_NAME).read_text())
        assert (record["host"], record["pid"]) == (socket.gethostname(), holder.pid)
        _no_flock(monkeypatch)
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on "):
            RunLock(tmp_path)
        assert (tmp_path / LOCKFILE_NAME).exists(), "a refused run leaves the holder's lock alone"
    finally:
        err = _release(holder)
    assert "flock is not supported" in err and "ENOSYS" in err and LOCKFILE_NAME in err, "with a warning"
    assert not (tmp_path / LOCKFILE_NAME).exists(), "released on close"
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path)
    assert lock.mode == "lockfile" and "took over" not in caplog.text
    assert json.loads((tmp_path / LOCKFILE_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCKFILE_NAME).exists()


def test_a_stale_lock_file_of_a_killed_run_is_taken_over(tmp_path, monkeypatch, caplog):
    holder = _holder(tmp_path, "nosys")
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=60)
    assert json.loads((tmp_path / LOCKFILE_NAME).read_text())["pid"] == holder.pid, "SIGKILL left it behind"
    _no_flock(monkeypatch)
    with caplog.at_level(logging.WARNING):
        lock = RunLock(tmp_path)
    assert f"took over the run lock {tmp_path / LOCKFILE_NAME} left by pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCKFILE_NAME).read_text())["pid"] == os.getpid()
    assert not list(tmp_path.glob(f"{LOCKFILE_NAME}.stale-*")), "the stale file is gone"
    lock.release()


def test_a_lock_file_from_another_host_is_refused_with_the_fix(tmp_path, monkeypatch):
    (tmp_path / LOCKFILE_NAME).write_text(json.dumps({"host": "node-that-is-not-this-one", "pid": 1}))
    _no_flock(monkeypatch, errno.ENOLCK)
    with pytest.raises(CheckpointError, match=r"pid 1 on node-that-is-not-this-one.*rm .*\.wsd_pretrain\.lockfile"):
        RunLock(tmp_path)
    (tmp_path / LOCKFILE_NAME).write_text("garbage")
    with pytest.raises(CheckpointError, match="cannot be read"):
        RunLock(tmp_path)
    (tmp_path / LOCKFILE_NAME).write_text("")  # created with O_EXCL, holder not written yet (or never)
    with pytest.raises(CheckpointError, match=r"taking the run lock .* right now"):
        RunLock(tmp_path)


@pytest.mark.parametrize(
    ("code", "held"),
    [
        (errno.EAGAIN, True),
        (errno.EACCES, True),  # what some systems return for a lock held elsewhere
        (errno.ENOSYS, False),  # Lustre noflock
        (errno.ENOLCK, False),  # NFS without a lock daemon
        (errno.EOPNOTSUPP, False),
        (errno.EINVAL, False),
    ],
)
def test_only_a_held_lock_errno_means_in_use(tmp_path, monkeypatch, code, held):
    (tmp_path / FLOCK_NAME).write_text("pid 4242 on elsewhere\n")
    _no_flock(monkeypatch, code)
    if held:
        with pytest.raises(CheckpointError, match=r"in use by another run \(pid 4242 on elsewhere\)"):
            RunLock(tmp_path)
        assert not (tmp_path / LOCKFILE_NAME).exists()
    else:
        lock = RunLock(tmp_path)
        assert lock.mode == "lockfile"
        lock.release()


def _build_manager_on_locked_dir(rank: int, world: int, run_dir: str) -> str:
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    torch.manual_seed(0)  # replicas with equal values: the plan agreement passes and the lock is what is refused
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=4, decay_length=1))
    try:
        CheckpointManager(run_dir, model, opt, sched).close()
    except CheckpointError as exc:
        return f"CheckpointError: {exc}"
    return "built"


@pytest.mark.distributed
def test_every_rank_raises_when_rank_0_finds_the_lock_held(tmp_path):
    held = RunLock(tmp_path)  # another run (this test process) holds the directory
    try:
        results = run_distributed(_build_manager_on_locked_dir, 2, args=(str(tmp_path),), timeout=120)
    finally:
        held.release()
    assert results[0] == results[1], "the same error on every rank"
    assert results[0].startswith("CheckpointError: ") and f"in use by another run (pid {os.getpid()} on" in results[0]


# A trainer holding the lock with the children a trainer has: DataLoader workers (forked by multiprocessing) and a
# plain os.fork() child; it prints their pids and waits to be killed.
TRAINER_WITH_WORKERS = r"""
import os, sys, time
import torch
from wsd_pretrain.checkpoint.lock import RunLock
lock = RunLock(sys.argv[1])
loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
it = iter(loader)
next(it)
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print("locked", child, *[w.pid for w in it._workers], flush=True)
time.sleep(120)
"""


def test_a_restart_right_after_sigkill_is_not_refused_by_the_trainers_children(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAINER_WITH_WORKERS, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("locked"):
        proc.kill()
        pytest.fail(f"the trainer did not start: {line!r} {proc.communicate()[1][-2000:]}")
    children = [int(p) for p in line.split()[1:]]
    try:
        proc.send_signal(signal.SIGKILL)  # a node failure, the OOM killer, scancel --signal=KILL
        proc.wait(timeout=60)  # (not communicate(): the children keep its pipes open)
        alive = [p for p in children if _alive(p)]
        lock = RunLock(tmp_path)  # the requeued job, at once: the trainer's children must not hold its lock
        assert alive, "the children outlived the trainer (else this test proves nothing)"
        assert lock.mode == "flock"
        assert (tmp_path / FLOCK_NAME).read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        lock.release()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdout.close()
        proc.stderr.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_lock_whose_recorded_holder_is_dead_says_so_and_is_taken_once_let_go(tmp_path, monkeypatch, caplog):
    import threading

    from wsd_pretrain.checkpoint import lock as lock_module

    # a killed run's leftover child holds the flock (started by something other than Python's os.fork, or by an
    # older wsd_pretrain): the pid written in the file is dead
    holder = _holder(tmp_path, "flock")
    dead = _dead_pid()
    (tmp_path / FLOCK_NAME).write_text(f"pid {dead} on {socket.gethostname()}\n")
    monkeypatch.setattr(lock_module, "DEAD_HOLDER_WAIT_S", 0.5)
    try:
        with pytest.raises(CheckpointError) as info:
            RunLock(tmp_path)
        text = str(info.value)
        assert f"the run that took the lock (pid {dead} on {socket.gethostname()}) is no longer running" in text
        assert f"process {holder.pid} still holds it" in text and f"`kill {holder.pid}`" in text, text
        # the leftover exits while a new run waits for it: the new run takes the lock
        monkeypatch.setattr(lock_module, "DEAD_HOLDER_WAIT_S", 60.0)
        threading.Timer(0.5, holder.stdin.close).start()  # the holder releases and exits
        with caplog.at_level(logging.WARNING):
            lock = RunLock(tmp_path)
    finally:
        try:
            holder.wait(timeout=60)
        finally:
            if holder.poll() is None:
                holder.kill()
    assert "is no longer running: waiting up to 60s" in caplog.text and "let go; taking it" in caplog.text
    lock.release()


@pytest.mark.parametrize("flock", [True, False])
def test_a_second_lock_in_the_same_process_is_told_so(tmp_path, monkeypatch, flock):
    if not flock:
        _no_flock(monkeypatch)
    first = RunLock(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=rf"locked by another CheckpointManager in this same process \(pid {os.getpid()}\): close the first one",
    ):
        RunLock(tmp_path)
    assert first.held, "the refused attempt leaves the first lock alone"
    holder_file = tmp_path / (FLOCK_NAME if flock else LOCKFILE_NAME)
    assert str(os.getpid()) in holder_file.read_text()
    del first  # dropped without release(): garbage collection gives the lock back
    again = RunLock(tmp_path)
    again.release()
    assert flock or not holder_file.exists()
