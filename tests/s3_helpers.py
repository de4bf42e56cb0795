"""A local S3 server for the tests: moto's server on a free port of 127.0.0.1 (tests/loopback_server.py).

The ``s3_server`` fixture (tests/conftest.py) starts one per test session and points boto3 at it through the
environment (``AWS_ENDPOINT_URL_S3`` and dummy keys), which every process a test starts inherits.
"""

from __future__ import annotations

import sys
import uuid

from loopback_server import LoopbackServer

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server(LoopbackServer):
    """``python -m moto.server`` on 127.0.0.1 only; :meth:`restart` stops and starts it on the same port (its
    objects are lost, as after a crash of a real server's front end)."""

    name = "moto server"

    def __init__(self) -> None:
        super().__init__()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready_url(self) -> str:
        return f"{self.endpoint}/moto-api/"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, **_keys())

    def bucket(self) -> str:
        """A new empty bucket (each test its own)."""
        name = f"ckpt-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def environ(self) -> dict[str, str]:
        return {**ENV, "AWS_ENDPOINT_URL_S3": self.endpoint}


def _keys() -> dict[str, str]:
    return {
        "aws_access_key_id": ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": ENV["AWS_DEFAULT_REGION"],
    }
