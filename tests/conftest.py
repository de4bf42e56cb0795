"""Settings for the whole test session (and every process it starts, which inherits the environment)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# DeepSpeed JIT-builds its CPU communication op (deepspeed_shm_comm) into TORCH_EXTENSIONS_DIR, by default
# ~/.cache/torch_extensions, shared by every Python environment of the user. The build records its environment's
# include paths, so two checkouts with virtual environments of their own rebuild it in turn: about a minute each on
# 2 cores, while every DeepSpeed test of the other checkout waits on the build lock. A directory per environment
# builds it once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on a free port of 127.0.0.1 for the whole test session (tests/s3_helpers.py); boto3 in
    this process and every process it starts talks to it. Each test makes its own bucket (``s3_server.bucket()``)."""
    from loopback_server import serve
    from s3_helpers import S3Server

    yield from serve(S3Server())


@pytest.fixture(scope="session")
def azure_server():
    """Azurite (the Azure Blob emulator) on a free port of 127.0.0.1 for the whole test session
    (tests/azure_helpers.py); azure-storage-blob in this process and every process it starts talks to it. Each test
    makes its own container (``azure_server.container()``). Skipped where Azurite is not installed (launch/setup.sh
    installs it with npm into .cache/azurite)."""
    from azure_helpers import AzuriteServer, azurite_binary
    from loopback_server import serve

    binary = azurite_binary()
    if binary is None:
        pytest.skip(
            "Azurite is not installed: run launch/setup.sh (npm install into .cache/azurite) or set WSD_AZURITE"
        )
    pytest.importorskip("azure.storage.blob", reason="pip install 'wsd_pretrain[azure]'")
    yield from serve(AzuriteServer(binary))
