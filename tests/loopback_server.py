"""A server process the tests start on a free port of 127.0.0.1 and stop again: the base of the local S3 server
(tests/s3_helpers.py, moto) and the local Azure Blob service (tests/azure_helpers.py, Azurite).

The server runs in a temporary folder of its own, its output goes to ``server.log`` there; :meth:`start` waits
until it answers over HTTP. A server that does not come up raises an error naming that log (and quoting its end),
and the folder is kept; :meth:`stop` removes it. :func:`serve` is the session fixtures' body (tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar
from unittest import mock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackServer:
    """A subclass names its command (:meth:`command`, listening on ``self.port`` of 127.0.0.1 only), the URL it
    answers on once up (:meth:`ready_url`) and the environment that points a client at it (:meth:`environ`, plus
    ``clear_env``: variables removed so that nothing else is used)."""

    name = "server"
    clear_env: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"wsd-{self.name.lower()}-"))
        self.log = self.workdir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready_url(self) -> str:
        raise NotImplementedError

    def environ(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it answers (any HTTP status counts: an unsigned request may get 403)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.ready_url(), timeout=2).close()
                return
            except urllib.error.HTTPError:  # it answers: up
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(self._failed(self.proc.poll())) from None
                time.sleep(0.1)

    def _failed(self, code: int | None) -> str:
        how = f"exited with code {code}" if code is not None else "did not answer in time"
        tail = self.log.read_text(errors="replace")[-2000:].strip() if self.log.exists() else ""
        return f"{self.name} did not start on 127.0.0.1:{self.port} ({how}); its log: {self.log}\n{tail}"

    def _terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        """Stop it and remove its folder (log included)."""
        self._terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start it on the same port (what it held in memory is lost, as after a crash)."""
        self._terminate()
        self.start()


Server = TypeVar("Server", bound=LoopbackServer)


def serve(server: Server) -> Iterator[Server]:
    """A session fixture's body: start the server, point this process (and every process it starts) at it alone,
    yield it; then restore the environment and stop it."""
    server.start()
    try:
        with mock.patch.dict(os.environ):  # the whole environment as it was, afterwards
            for k in server.clear_env:
                os.environ.pop(k, None)
            os.environ.update(server.environ())
            yield server
    finally:
        server.stop()
