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
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

__all__ = ["FLOCK_NAME", "LOCKFILE_NAME", "RunLock"]

log = logging.getLogger(__name__)

FLOCK_NAME = ".wsd_pretrain.lock"
LOCKFILE_NAME = ".wsd_pretrain.lockfile"
# what flock(LOCK_NB) answers when another open file holds the lock; anything else: the filesystem cannot lock
HELD_ERRNOS = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


def _holder_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CheckpointError(f"cannot create the run lock {self.path}: {exc}") from None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in HELD_ERRNOS:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
                os.close(fd)
                raise CheckpointError(
                    f"{self.run_dir} is in use by another run ({holder or 'unknown process'}); give this run its "
                    "own --run-dir, or stop the other one"
                ) from None
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
            return
        self._fd = fd
        record = _holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {record['pid']} on {record['host']}\n".encode(), 0)

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
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
        if self._lockfile_ino is not None:
            ino, self._lockfile_ino = self._lockfile_ino, None
            try:
                if os.stat(self.path).st_ino == ino:  # still ours (never remove a lock another run holds now)
                    os.unlink(self.path)
            except FileNotFoundError:
                log.warning("the run lock %s was removed while this run held it", self.path)
