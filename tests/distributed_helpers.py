"""Run a function on several real processes (gloo on CPU), the way torchrun would start them.

``run_distributed(fn, world_size=2, args=...)`` starts one spawned process per rank with RANK, WORLD_SIZE,
LOCAL_RANK and a free loopback MASTER_PORT, calls :func:`wsd_pretrain.distributed.init_distributed`, runs
``fn(rank, world_size, *args)``, tears the group down in ``finally``, and returns each rank's (JSON-able) result.
An exception on any rank fails the test with that rank's traceback and the end of its output; a hang is killed
after ``timeout`` seconds.

The ranks are forked from one ``forkserver`` process per test session that has imported torch, DeepSpeed and the
library once: a spawned process spends about 3 s of CPU importing them, and the default suite starts a few hundred
ranks. Each rank is a fresh fork of that server (never of an earlier rank), so no state leaks between tests; its
output goes to a file of its own (the server's standard streams belong to whichever test started it).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest


def _failed(path: str) -> bool:
    if not os.path.exists(path):
        return True
    try:
        return not json.loads(Path(path).read_text())["ok"]
    except (ValueError, KeyError):
        return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# imported once by the fork server; a module that fails to import is skipped there and imported by the rank itself
_PRELOAD = [
    "numpy",
    "torch",
    "torch.distributed",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "safetensors.torch",
    "deepspeed",
    "transformers",
    "wsd_pretrain.checkpoint.manager",
    "wsd_pretrain.distributed",
    "distributed_helpers",
]
_CONTEXT: Any = None


def _context() -> Any:
    """The session's fork server, started with the settings every rank runs under (libgomp reads OMP_NUM_THREADS
    when torch is imported, DeepSpeed picks its accelerator when it is imported)."""
    global _CONTEXT
    if _CONTEXT is None:
        from multiprocessing import forkserver

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        saved = dict(os.environ)
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _CONTEXT = ctx
    return _CONTEXT


def _child(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: Sequence[Any], out: str, env: dict[str, str]
) -> None:
    log = os.open(out + ".log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    from wsd_pretrain import distributed

    result: dict[str, Any]
    try:
        # WSD_TEST_BACKEND: another backend string for the training group, e.g. "cuda:gloo", a device-only map that
        # refuses CPU tensors on this CPU machine as "cuda:nccl" does on a cluster
        backend = os.environ.get("WSD_TEST_BACKEND", "gloo")
        distributed.init_distributed(backend=backend, timeout_s=120)
        try:
            result = {"ok": True, "value": fn(rank, world_size, *args)}
        finally:
            distributed.teardown(barrier=backend == "gloo")
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    Path(out).write_text(json.dumps(result, default=repr))
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's worker threads can abort the interpreter's shutdown after the work is done ("terminate called
    # without an active exception"); the result is written, so leave without the shutdown
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the per-rank results."""
    ctx = _context()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world_size)]
        procs = [
            ctx.Process(target=_child, args=(fn, r, world_size, port, tuple(args), outs[r], env or {}))
            for r in range(world_size)
        ]
        try:
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                # fail fast: when a rank has failed, the others may wait forever in a collective
                if any(not p.is_alive() and _failed(outs[r]) for r, p in enumerate(procs)):
                    time.sleep(2.0)
                    break
                time.sleep(0.05)
            hung = [r for r, p in enumerate(procs) if p.is_alive() and _failed(outs[r])]
            if hung and not any(_failed(outs[r]) for r, p in enumerate(procs) if not p.is_alive()):
                pytest.fail(f"ranks {hung} still running after {timeout:.0f}s")
            results = []
            for r, path in enumerate(outs):
                if not os.path.exists(path):
                    results.append(
                        {
                            "ok": False,
                            "error": f"no result (exit code {procs[r].exitcode}; killed after "
                            "another rank failed, or it died)",
                        }
                    )
                    continue
                results.append(json.loads(Path(path).read_text()))
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        errors = [
            f"--- rank {r} ---\n{res['error']}{_output_tail(outs[r])}" for r, res in enumerate(results) if not res["ok"]
        ]
        if errors:
            pytest.fail("\n".join(errors), pytrace=False)
        return [res["value"] for res in results]


def _output_tail(out: str, limit: int = 4000) -> str:
    try:
        text = Path(out + ".log").read_text(errors="replace")
    except OSError:
        return ""
    return f"--- its output (last {limit} characters) ---\n{text[-limit:]}" if text.strip() else ""


def _script_main(path: str, argv: Sequence[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    for fd, name in ((1, out), (2, err)):
        f = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # the process's own standard streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [path, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # as `python path` puts the script's folder first
    code: Any = 0
    try:
        import runpy

        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import atexit

        atexit._run_exitfuncs()  # what the interpreter runs at its exit: a script's temporary folders, servers
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class ScriptProcess:
    """A script started by :func:`start_script`, seen as a ``subprocess.Popen`` (poll, wait, send_signal, kill)."""

    def __init__(self, proc: Any, tmp: str) -> None:
        self.proc, self.pid, self.tmp = proc, proc.pid, tmp
        self.stdout_path, self.stderr_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.proc.kill()


def start_script(
    path: str | os.PathLike[str],
    args: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> ScriptProcess:
    """Start ``python path *args`` as :func:`run_script` does, without waiting for it; its output goes to files in a
    temporary folder of its own (``stdout_path``, ``stderr_path``; removed with the test's temporary files)."""
    tmp = tempfile.mkdtemp(prefix="wsd-script-")
    cwd = os.getcwd() if cwd is None else cwd
    env = dict(os.environ) if env is None else env
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    p = _context().Process(target=_script_main, args=(str(path), list(args), str(cwd), dict(env), out, err))
    p.start()
    return ScriptProcess(p, tmp)


def run_script(
    path: str | os.PathLike[str], args: Sequence[str], cwd: str | os.PathLike[str], env: dict[str, str], timeout: float
) -> Any:
    """``python path *args`` (the script run as ``__main__`` by runpy, as the interpreter runs it) in a process
    forked from the session's fork server, which has imported torch, DeepSpeed and transformers already: the 3-5 s
    of CPU a fresh interpreter spends on those imports are paid once per session instead of once per script. The
    script's environment is ``env`` (variables the server read when it imported torch and DeepSpeed are fixed:
    ``OMP_NUM_THREADS=1``, ``DS_ACCELERATOR=cpu``). Returns a ``subprocess.CompletedProcess`` with its exit code
    and output; a run past ``timeout`` seconds is killed and raises ``subprocess.TimeoutExpired``."""
    import shutil
    import subprocess

    proc = start_script(path, args, cwd, env)
    try:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.proc.join(5)
            raise subprocess.TimeoutExpired([str(path), *args], timeout) from None
        read = lambda f: Path(f).read_text(errors="replace") if os.path.exists(f) else ""
        return subprocess.CompletedProcess([str(path), *args], code, read(proc.stdout_path), read(proc.stderr_path))
    finally:
        shutil.rmtree(proc.tmp, ignore_errors=True)
