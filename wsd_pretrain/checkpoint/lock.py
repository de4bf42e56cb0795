"""The run lock: one run at a time per run directory, also on filesystems without ``flock``.

Rank 0 takes it when the :class:`~wsd_pretrain.checkpoint.manager.CheckpointManager` is built, so a second job
pointed at the same ``--run-dir`` (a resubmitted job while the first still runs, a typo) refuses to start instead of
interleaving saves and retention with the first.

* ``flock`` on ``<run_dir>/.wsd_pretrain.lock`` first: the kernel releases it when the process dies, however it
  dies. Only ``EAGAIN``/``EWOULDBLOCK`` (and ``EACCES``, which some systems return for a held lock) mean "held by
  another run".
* Any other error means the filesystem cannot lock (Lustre mounted with its default ``noflock`` gives ``ENOSYS``;
  NFS without a lock daemon ``ENOLCK``; some FUSE filesystems ``EOPNOTSUPP``). The lock then falls back, with a
  warning, to a lock file ``<run_dir>/.wsd_pretrain.lockfile`` created with ``O_CREAT | O_EXCL`` (atomic on every
  POSIX filesystem, Lustre and NFSv3+ included) holding the holder's host and pid as JSON. A process killed with
  SIGKILL leaves that file behind: a lock file whose pid is dead on this same host is stale and taken over, with a
  warning; one written on another host cannot be checked from here and is refused, with the command to remove it.

Who holds it:

* **Only the process that took it.** A ``flock`` belongs to the open file, and ``fork`` copies the descriptor: the
  DataLoader workers of a trainer (``num_workers > 0``; pytorch_accelerated starts them by default) would keep the
  lock for the seconds they outlive a trainer killed with SIGKILL, and a job requeued at once would be refused. The
  lock's descriptor is closed in every child right after ``fork`` (:func:`os.register_at_fork`), which drops the
  child's reference and nothing else (the parent's descriptor keeps the lock); it is not inheritable across
  ``exec`` either. (POSIX ``fcntl`` locks would not be inherited, but any ``close`` of the file anywhere in the
  process drops them: a tool reading the holder line would unlock the run.)
* **A holder that is dead.** When the lock is held but the pid written in it no longer runs on this host, the
  holder's children (started by something other than Python's ``os.fork``) still hold it: the lock waits for them
  up to :data:`DEAD_HOLDER_WAIT_S` seconds, then refuses saying that the recorded holder is gone and naming the
  processes that still have the file open.
* **This same process.** A second lock on a directory this process already holds (a second
  ``CheckpointManager`` in a notebook) is refused saying so, before the file is touched.
* The lock is released by :meth:`RunLock.release`, and also when the ``RunLock`` is garbage collected (a manager
  dropped without ``close()``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = ["DEAD_HOLDER_WAIT_S", "FLOCK_NAME", "LOCKFILE_NAME", "RunLock"]

log = logging.getLogger(__name__)

FLOCK_NAME = ".wsd_pretrain.lock"
LOCKFILE_NAME = ".wsd_pretrain.lockfile"
# what flock(LOCK_NB) answers when another open file holds the lock; anything else: the filesystem cannot lock
HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})
DEAD_HOLDER_WAIT_S = 10.0
"""How long a lock whose recorded holder is dead is waited for (its leftover children exit within seconds:
a DataLoader worker checks its parent every 5 s)."""

# the locks this process holds, by resolved run directory (a second lock on one of them is refused before the file
# is opened); guarded by _HELD_MUTEX
_HELD: dict[str, weakref.ReferenceType[RunLock]] = {}
_HELD_MUTEX = threading.Lock()


def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _release_resources(fd: int, lockfile: Path | None, ino: int | None) -> None:
    """What releasing a lock does (also a garbage-collected ``RunLock``'s finalizer): close the flock's descriptor,
    or remove the lock file if it is still ours."""
    if fd >= 0:
        _close_quietly(fd)  # closing the (last) descriptor drops the flock
    if lockfile is not None and ino is not None:
        try:
            if os.stat(lockfile).st_ino == ino:  # still ours (never remove a lock another run holds now)
                os.unlink(lockfile)
        except FileNotFoundError:
            log.warning("the run lock %s was removed while this run held it", lockfile)


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker) must not hold its parent's run lock: close its copy of the descriptor
    (the parent's copy keeps the lock) and forget the lock, so that the child never releases or removes it."""
    global _HELD_MUTEX
    _HELD_MUTEX = threading.Lock()  # the parent's may have been held by another thread at the fork
    for ref in list(_HELD.values()):
        lock = ref()
        if lock is not None:
            lock._forget_in_child()
    _HELD.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _holders_of(path: Path) -> list[int]:
    """Pids of this host's processes that have ``path`` open (Linux ``/proc``; those we may read), for messages."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    found = []
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(pid)
                break
    return found


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """An exclusive lock on ``run_dir`` for this process; :meth:`release` gives it back.

    Raises :class:`CheckpointError` when another run holds it (naming the holder), or when the run directory
    cannot be created or written.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / FLOCK_NAME
        self.mode: str = "flock"
        self._fd = -1
        self._lockfile_ino: int | None = None
        self._finalizer: weakref.finalize | None = None
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._key = str(self.run_dir.resolve())
        except OSError as exc:
            raise CheckpointError(f"cannot create the run lock {self.path}: {exc}") from None
        with _HELD_MUTEX:
            self._check_same_process()
            self._acquire()
            _HELD[self._key] = weakref.ref(self)

    def _check_same_process(self) -> None:
        """Refuse a directory this process holds already (before its lock file is opened: nothing to undo)."""
        ref = _HELD.get(self._key)
        other = ref() if ref is not None else None
        if other is not None and other.held:
            raise CheckpointError(
                f"{self.run_dir} is locked by another CheckpointManager in this same process (pid {os.getpid()}): "
                "close the first one (manager.close(), or build it as `with CheckpointManager(...) as manager:`), "
                "or drop every reference to it (its lock is released when it is garbage collected), then build "
                "this one again"
            )

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd >= 0 or self._lockfile_ino is not None

    def _acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot create the run lock {self.path}: {exc}") from None
        try:
            self._flock_waiting_for_dead_holder(fd)
        except OSError as exc:
            if exc.errno in HELD_ERRNOS:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                os.close(fd)
                raise CheckpointError(self._held_message(holder)) from None
            os.close(fd)
            log.warning(
                "%s: flock is not supported on this filesystem (%s: %s; Lustre mounted with 'noflock' does this): "
                "using the lock file %s instead, which a killed run leaves behind (taken over automatically on "
                "the same host once its process is gone)",
                self.run_dir,
                errno.errorcode.get(exc.errno or 0, exc.errno),
                exc.strerror,
                LOCKFILE_NAME,
            )
            self.mode = "lockfile"
            self.path = self.run_dir / LOCKFILE_NAME
            self._take_lockfile()
            self._finalizer = weakref.finalize(self, _release_resources, -1, self.path, self._lockfile_ino)
            return
        self._fd = fd
        self._finalizer = weakref.finalize(self, _release_resources, fd, None, None)
        record = _holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {record['pid']} on {record['host']}\n".encode(), 0)

    def _flock_waiting_for_dead_holder(self, fd: int) -> None:
        """``flock(LOCK_EX | LOCK_NB)``; while it is held and the pid written in the file is dead on this host (its
        leftover children hold it), try again for up to :data:`DEAD_HOLDER_WAIT_S` seconds."""
        import fcntl

        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in HELD_ERRNOS:
                    raise
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                if self._recorded_holder_alive(holder) is not False:
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + DEAD_HOLDER_WAIT_S
                    log.warning(
                        "%s: the run lock is held, but the run that took it (%s) is no longer running: waiting up to "
                        "%gs for the processes it left behind to let it go",
                        self.run_dir,
                        holder,
                        DEAD_HOLDER_WAIT_S,
                    )
                if now >= deadline:
                    raise
                time.sleep(0.2)
                continue
            if deadline is not None:
                log.warning("%s: the run lock left by a killed run was let go; taking it", self.run_dir)
            return

    @staticmethod
    def _parse_holder(holder: str) -> tuple[int, str] | None:
        match = re.fullmatch(r"pid (\d+) on (\S+)", holder)
        return (int(match.group(1)), match.group(2)) if match else None

    def _recorded_holder_alive(self, holder: str) -> bool | None:
        """Whether the pid written in the flock file runs (None: unreadable, or another host's)."""
        parsed = self._parse_holder(holder)
        if parsed is None or parsed[1] != socket.gethostname():
            return None
        return _pid_alive(parsed[0])

    def _held_message(self, holder: str) -> str:
        if self._recorded_holder_alive(holder) is False:
            pids = _holders_of(self.path)
            who = (
                f"process{'es' if len(pids) > 1 else ''} {', '.join(map(str, pids))} still hold{'s' if len(pids) == 1 else ''} it"
                if pids
                else "processes it started still hold it"
            )
            kill = f"`kill {' '.join(map(str, pids))}`" if pids else "kill them"
            return (
                f"{self.run_dir} is locked, but the run that took the lock ({holder}) is no longer running: {who} "
                f"(children it left behind, e.g. DataLoader workers of a killed trainer, or a run started by an older "
                f"version of wsd_pretrain), after {DEAD_HOLDER_WAIT_S:g}s of waiting. Wait for them to exit or "
                f"{kill}, then start again"
            )
        return (
            f"{self.run_dir} is in use by another run ({holder or 'unknown process'}); give this run its own "
            "--run-dir, or stop the other one"
        )

    def _forget_in_child(self) -> None:
        """In a forked child: drop this process's copy of the descriptor without touching the lock."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._fd >= 0:
            _close_quietly(self._fd)
            self._fd = -1
        self._lockfile_ino = None

    # ------------------------------------------------------------------ the lock-file fallback

    def _take_lockfile(self) -> None:
        payload = json.dumps(_holder_record()).encode()
        for _ in range(3):  # a stale file taken over, or one released meanwhile: then create it again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                raise CheckpointError(f"cannot create the run lock {self.path}: {exc}") from None
            try:
                os.write(fd, payload)
                os.fsync(fd)
                self._lockfile_ino = os.fstat(fd).st_ino
            finally:
                os.close(fd)
            return
        raise CheckpointError(f"{self.run_dir}: could not take the run lock {self.path} (another run took it first)")

    def _read_lockfile(self) -> tuple[dict[str, Any] | None, int | None]:
        """The holder record and the file's inode (None, None when it has just gone)."""
        try:
            with open(self.path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                raw = f.read(4096)
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            record = None
        if not (
            isinstance(record, dict) and isinstance(record.get("pid"), int) and isinstance(record.get("host"), str)
        ):
            record = {"unreadable": raw[:200].decode(errors="replace")}
        return record, ino

    def _take_over_if_stale(self) -> None:
        record, ino = self._read_lockfile()
        if record is None:
            return  # released meanwhile: try to create it again
        here = socket.gethostname()
        if record.get("unreadable") == "":
            raise CheckpointError(
                f"{self.run_dir} is in use by another run that is taking the run lock {self.path} right now, or one "
                f"that died doing so left it empty: if no run is using this directory, remove it (rm {self.path})"
            )
        if "unreadable" in record:
            raise CheckpointError(
                f"{self.run_dir}: the run lock {self.path} exists but cannot be read ({record['unreadable']!r}); if "
                f"no run is using this directory, remove it (rm {self.path}) and start again"
            )
        holder = f"pid {record['pid']} on {record['host']}, since {record.get('since', '?')}"
        if record["host"] != here:
            raise CheckpointError(
                f"{self.run_dir} is in use by another run ({holder}; lock file {self.path}, used because this "
                f"filesystem has no flock). If that run is gone, remove the file (rm {self.path}) and start again"
            )
        if _pid_alive(record["pid"]):
            raise CheckpointError(
                f"{self.run_dir} is in use by another run ({holder}); give this run its own --run-dir, or stop "
                "the other one"
            )
        # stale: move it aside under a unique name (atomic), and make sure what was moved is the file just judged
        aside = self.path.with_name(f"{LOCKFILE_NAME}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first; the O_EXCL create decides between us
        if os.stat(aside).st_ino != ino:
            # a new holder's file, created between the read and the rename: give it back and let it win
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            raise CheckpointError(
                f"{self.run_dir} is in use by another run (it took the run lock {self.path} just now)"
            )
        os.unlink(aside)
        log.warning(
            "%s: took over the run lock %s left by %s, which no longer runs on this host (a run that was killed)",
            self.run_dir,
            self.path,
            holder,
        )

    # ------------------------------------------------------------------ release

    def release(self) -> None:
        """Give the lock back (a no-op the second time)."""
        with _HELD_MUTEX:
            ref = _HELD.get(getattr(self, "_key", ""))
            if ref is not None and ref() is self:
                del _HELD[self._key]
        finalizer, self._finalizer = self._finalizer, None
        self._fd, self._lockfile_ino = -1, None
        if finalizer is not None:
            finalizer()  # closes the descriptor, or removes the lock file if still ours
