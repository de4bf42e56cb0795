"""A local Azure Blob service for the tests: Azurite (the Azure Storage emulator, an npm package) on a free port of
127.0.0.1 (tests/loopback_server.py), in memory, with its telemetry off (it would otherwise call out).

launch/setup.sh installs it into ``.cache/azurite`` of the repository (``npm install``); ``WSD_AZURITE`` may name
another ``azurite-blob`` executable. The ``azure_server`` fixture (tests/conftest.py) starts one per test session
and points azure-storage-blob at it through ``AZURE_STORAGE_CONNECTION_STRING`` (Azurite's well-known development
account), which every process a test starts inherits.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from loopback_server import LoopbackServer

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


class AzuriteServer(LoopbackServer):
    """``azurite-blob`` on 127.0.0.1 only, in memory (nothing written to disk), telemetry disabled."""

    name = "Azurite"
    clear_env = ENV_KEYS

    def __init__(self, binary: str) -> None:
        super().__init__()
        self.binary = binary
        self.endpoint = f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    def command(self) -> list[str]:
        return [
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
        ]

    def ready_url(self) -> str:
        return f"{self.endpoint}?comp=list"

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
