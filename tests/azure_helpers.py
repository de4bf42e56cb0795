"""A local Azure Blob service for the tests: Azurite (the Azure Storage emulator, an npm package) on a free port of
127.0.0.1, started and stopped by the tests, in memory, with its telemetry off (it would otherwise call out).

launch/setup.sh installs it into ``.cache/azurite`` of the repository (``npm install``); ``WSD_AZURITE`` may name
another ``azurite-blob`` executable. The ``azure_server`` fixture (tests/conftest.py) starts one per test session
and points azure-storage-blob at it through ``AZURE_STORAGE_CONNECTION_STRING`` (Azurite's well-known development
account), which every process a test starts inherits.
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
import uuid
from pathlib import Path

ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's fixed development account and key (public, documented by Microsoft; valid only on the emulator)."""
ENV_KEYS = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_SERVICE_ENDPOINT",
)


def azurite_binary() -> str | None:
    """``WSD_AZURITE``, else the repository's ``.cache/azurite`` (launch/setup.sh), else ``azurite-blob`` on PATH."""
    if os.environ.get("WSD_AZURITE"):
        return os.environ["WSD_AZURITE"]
    local = Path(__file__).resolve().parents[1] / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return str(local)
    return shutil.which("azurite-blob")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AzuriteServer:
    """``azurite-blob`` on 127.0.0.1 only, in memory (nothing written to disk), telemetry disabled."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._cwd = tempfile.mkdtemp(prefix="wsd-azurite-")

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--loose",
                "--silent",
            ],
            cwd=self._cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}?comp=list", timeout=2).close()
                return
            except urllib.error.HTTPError:  # it answers (403: the request is not signed): up
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Azurite did not start on {self.endpoint}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self._cwd, ignore_errors=True)

    @property
    def connection_string(self) -> str:
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={self.endpoint};"

    def service(self):
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def container(self) -> str:
        """A new empty container (each test its own)."""
        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        self.service().create_container(name)
        return name

    def environ(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}


def apply_env(server: AzuriteServer) -> dict[str, str | None]:
    """Point this process (and its children) at the emulator alone; returns the old values."""
    old = {k: os.environ.get(k) for k in ENV_KEYS}
    for k in ENV_KEYS:
        os.environ.pop(k, None)
    os.environ.update(server.environ())
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
