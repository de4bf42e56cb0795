"""Where a checkpoint lives: a local path, or a URL on object storage (docs/checkpoint-format.md, "Object storage").

Every place that takes a checkpoint or run directory (the manager, the main job, every ``wsd-pretrain ckpt``
command) passes it through :func:`parse_location` first:

* a plain path or a ``file://`` URL is a local :class:`~pathlib.Path`, handled exactly as before (one string test:
  no cost);
* ``s3://bucket/prefix`` is an :class:`ObjectURL`, read and written through :class:`S3Store` (boto3; docs/decisions.md
  says why boto3 rather than fsspec/s3fs), with the object-storage commit protocol of :mod:`.objstore`;
* ``az://container/prefix`` is an :class:`ObjectURL` too, read and written through
  :class:`~.azure_store.AzureStore` (azure-storage-blob): the same operations and errors, the same protocol;
* a path that a ``Path()`` already collapsed from a URL (``s3:/bucket/...``) is refused, never written as a local
  ``./s3:/`` tree.

The S3 endpoint and credentials come from boto3's own settings (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...), as for the AWS CLI; Azure's from the ``az`` CLI's
(``AZURE_STORAGE_CONNECTION_STRING``, or ``AZURE_STORAGE_ACCOUNT`` with a key or SAS token;
``AZURE_STORAGE_SERVICE_ENDPOINT`` for another endpoint).
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote

from ..errors import CheckpointError, ConfigError

__all__ = [
    "ObjectURL",
    "PreconditionFailed",
    "S3Store",
    "is_url",
    "parse_location",
    "require_local",
    "store_for",
]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OBJECT_SCHEMES = ("s3", "az")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def is_url(location: Any) -> bool:
    """A string with a scheme (``s3://``, ``az://``, ``file://``, ...)."""
    return isinstance(location, str) and _SCHEME_RE.match(location) is not None


@dataclass(frozen=True)
class ObjectURL:
    """``s3://bucket/key`` (``key`` without a trailing slash; "" for the bucket's root)."""

    scheme: str
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def __truediv__(self, rel: str) -> ObjectURL:
        rel = str(rel).strip("/")
        return ObjectURL(self.scheme, self.bucket, f"{self.key}/{rel}" if self.key else rel)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectURL:
        return ObjectURL(self.scheme, self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    @property
    def prefix(self) -> str:
        """The key prefix of everything under this URL (``key/``)."""
        return f"{self.key}/" if self.key else ""


def parse_location(location: str | os.PathLike[str]) -> Path | ObjectURL:
    """A local :class:`Path` (plain paths and ``file://``) or an :class:`ObjectURL` (``s3://``, ``az://``); anything
    else is refused with what to give instead."""
    if isinstance(location, ObjectURL):
        return location
    if not isinstance(location, str):
        path = Path(location)
        _refuse_collapsed(path, str(location))
        return path
    m = _SCHEME_RE.match(location)
    if m is None:
        path = Path(location)
        _refuse_collapsed(path, location)
        return path
    scheme = m.group(1).lower()
    rest = location[m.end() :]
    if scheme == "file":
        host, _, path_part = rest.partition("/")
        if host not in ("", "localhost"):
            raise ConfigError(
                f"{location}: a file:// URL names a local path (file:///abs/path); host {host!r} is not this machine",
                where="checkpoint location",
            )
        return Path("/" + unquote(path_part))
    if scheme not in OBJECT_SCHEMES:
        raise ConfigError(
            f"{location}: unsupported scheme {scheme}://; give a local path, file:///path, s3://bucket/prefix or "
            "az://container/prefix",
            where="checkpoint location",
        )
    bucket, _, key = rest.partition("/")
    key = key.strip("/")
    problems = []
    if scheme == "az":  # Azure Blob (azure_store.py): the account comes from the environment
        from .azure_store import container_problems

        problems += container_problems(location, bucket)
    elif not _BUCKET_RE.match(bucket):
        problems.append(f"{location}: bucket {bucket!r} is not a valid bucket name (3-63 of a-z, 0-9, '.', '-')")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        problems.append(f"{location}: the prefix {key!r} has an empty, '.' or '..' part")
    if "\\" in key:
        problems.append(f"{location}: backslashes are not allowed in the prefix")
    if problems:
        raise ConfigError(problems, where="checkpoint location")
    return ObjectURL(scheme, bucket, key)


def _refuse_collapsed(path: Path, text: str) -> None:
    """``Path("s3://b/p")`` is ``s3:/b/p``: a URL that something turned into a relative path. Writing there would
    make a local ``./s3:/`` tree that looks like a bucket; refuse it."""
    first = path.parts[0] if path.parts else ""
    if (
        not path.is_absolute()
        and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:", first)
        and first[:-1]
        in (
            *OBJECT_SCHEMES,
            "file",
            "gs",
            "gcs",
            "abfs",
            "abfss",
            "http",
            "https",
        )
    ):
        raise ConfigError(
            f"{text}: looks like a URL whose '//' was lost (a pathlib.Path made of {first[:-1]}://...); pass the URL "
            "as a string, e.g. 's3://bucket/prefix'",
            where="checkpoint location",
        )


def require_local(location: str | os.PathLike[str], what: str, fix: str) -> Path:
    """The local path of ``location``; a URL on object storage is refused (``what`` cannot use it; ``fix``)."""
    loc = parse_location(location)
    if isinstance(loc, ObjectURL):
        raise ConfigError(f"{what}: {loc} is on object storage, which {what} does not support; {fix}")
    return loc


# ---------------------------------------------------------------------------------------------- S3 client


class PreconditionFailed(CheckpointError):
    """A conditional write lost (``If-None-Match: *`` on an existing object, a stale ``If-Match``): HTTP 412."""


_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[int, str | None], Any] = {}

PART_SIZE = 16 * 1024 * 1024
"""Multipart part size: each in-flight part is one buffer of this size."""
UPLOAD_THREADS = 4
"""Parts of one object in flight at once (memory per upload: about (threads + 1) x PART_SIZE)."""


def _client() -> Any:
    """One boto3 S3 client per process (clients are thread-safe; a forked child makes its own)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    key = (os.getpid(), endpoint)
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise ConfigError(
                    "s3:// checkpoints need boto3: pip install 'wsd_pretrain[s3]'", where="checkpoint location"
                ) from None
            settings: dict[str, Any] = {
                "retries": {"max_attempts": 5, "mode": "standard"},
                "max_pool_connections": 32,
                "connect_timeout": 10,
                "read_timeout": 120,
            }
            # botocore >= 1.36 computes a CRC32 of every PUT and part body by default (and asks the server to store
            # and check it): one more pass over every byte on the client and on the server, which our own xxh3
            # (computed on the way, in the manifest, verified by every read) makes redundant; over HTTPS, TLS
            # already authenticates every byte in transit (docs/decisions.md). Older botocore has no such setting.
            checksums = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
            try:
                config = Config(**settings, **checksums)
            except TypeError:
                config = Config(**settings)
            client = boto3.client("s3", endpoint_url=endpoint, config=config)
            _CLIENTS[key] = client
        return client


class S3Store:
    """The objects under one bucket: every call names its URL in its errors; 412 is :class:`PreconditionFailed`."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.client = _client()

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, status = err.get("Code", "?"), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed(f"{self.url(key)}: {what}: the precondition failed (412)") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(self.url(key)) from None
            raise CheckpointError(f"{self.url(key)}: {what} failed: {code}: {err.get('Message', exc)}") from None
        except BotoCoreError as exc:
            raise CheckpointError(f"{self.url(key)}: {what} failed: {exc}") from None

    # reads
    def head(self, key: str) -> dict[str, Any] | None:
        """``{"size", "etag"}`` or None when the object does not exist."""
        try:
            r = self._call("HEAD", key, self.client.head_object, Key=key)
        except FileNotFoundError:
            return None
        return {"size": int(r["ContentLength"]), "etag": r["ETag"]}

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The whole object and its ETag (refused beyond ``max_bytes``)."""
        r = self._call("GET", key, self.client.get_object, Key=key)
        if max_bytes is not None and int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise CheckpointError(f"{self.url(key)}: {r['ContentLength']} bytes, more than {max_bytes} allowed")
        return r["Body"].read(), r["ETag"]

    def get_aged(self, key: str, *, max_bytes: int) -> tuple[bytes, str, float]:
        """The object, its ETag, and its age in seconds on the **server's** clock: the response's ``Date`` minus
        the object's ``Last-Modified``, both written by the server (1-second resolution), so no host's clock is
        compared with another's. Without a ``Date`` header, this host's clock against ``Last-Modified``."""
        from datetime import datetime, timezone
        from email.utils import parsedate_to_datetime

        r = self._call("GET", key, self.client.get_object, Key=key)
        if int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise CheckpointError(f"{self.url(key)}: {r['ContentLength']} bytes, more than {max_bytes} allowed")
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        except (TypeError, ValueError):
            now = datetime.now(timezone.utc)
        return r["Body"].read(), r["ETag"], (now - r["LastModified"]).total_seconds()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` (fewer at the end of the object), one ranged GET."""
        if length <= 0:
            return b""
        r = self._call("GET", key, self.client.get_object, Key=key, Range=f"bytes={start}-{start + length - 1}")
        return r["Body"].read()

    def stream(self, key: str) -> Any:
        """The object's body as a stream (``iter_chunks``) and its size."""
        r = self._call("GET", key, self.client.get_object, Key=key)
        return r["Body"], int(r["ContentLength"])

    def list(self, prefix: str, delimiter: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """Every object under ``prefix`` (key, size, etag) and, with a delimiter, the common prefixes. Listings are
        only used to find names; whether a checkpoint is committed is decided by reading its manifest."""
        objects: list[dict[str, Any]] = []
        prefixes: list[str] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": prefix}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            r = self._call("LIST", prefix, self.client.list_objects_v2, **kwargs)
            objects += [{"key": o["Key"], "size": int(o["Size"]), "etag": o.get("ETag")} for o in r.get("Contents", [])]
            prefixes += [p["Prefix"] for p in r.get("CommonPrefixes", [])]
            if not r.get("IsTruncated"):
                return objects, prefixes
            token = r["NextContinuationToken"]

    # writes
    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """One PUT; ``if_none_match`` creates only (412 if the object exists), ``if_match`` replaces only that
        version (412 if it changed). Returns the new ETag."""
        kwargs: dict[str, Any] = {"Key": key, "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        return self._call("PUT", key, self.client.put_object, **kwargs)["ETag"]

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = self._call(
                "DELETE", batch[0], self.client.delete_objects, Delete={"Objects": [{"Key": k} for k in batch]}
            )
            if r.get("Errors"):
                e = r["Errors"][0]
                raise CheckpointError(f"{self.url(e['Key'])}: DELETE failed: {e.get('Code')}: {e.get('Message')}")

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under ``prefix`` (their parts cost storage until aborted)."""
        r = self._call("LIST-UPLOADS", prefix, self.client.list_multipart_uploads, Prefix=prefix)
        uploads = r.get("Uploads", [])
        for u in uploads:
            self._call("ABORT", u["Key"], self.client.abort_multipart_upload, Key=u["Key"], UploadId=u["UploadId"])
        return len(uploads)

    def writer(self, key: str, checksum: str, *, if_none_match: bool = False) -> ObjectWriter:
        return ObjectWriter(self, key, checksum, if_none_match=if_none_match)


class ObjectWriter:
    """Streams one object: bytes are hashed on the way (our checksum, as the file writer does) and sent as parallel
    multipart parts of :data:`PART_SIZE`, at most :data:`UPLOAD_THREADS` in flight (bounded memory, no local copy,
    no ``os.sync()``). An object smaller than one part is one PUT. :meth:`abort` (or any error) aborts the multipart
    upload, so no parts are left behind."""

    def __init__(self, store: S3Store, key: str, checksum: str, *, if_none_match: bool = False) -> None:
        from .safetensors_io import new_hasher

        self.store, self.key, self.if_none_match = store, key, if_none_match
        self.hasher = new_hasher(checksum)
        self.size = 0
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(UPLOAD_THREADS)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        while len(view):
            take = min(len(view), PART_SIZE - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == PART_SIZE:
                self._send_part()

    def _send_part(self) -> None:
        if self._upload_id is None:
            r = self.store._call("CREATE-MULTIPART", self.key, self.store.client.create_multipart_upload, Key=self.key)
            self._upload_id = r["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="wsd-s3-part")
        for done in [f for f in self._parts if f.done()]:
            done.result()  # an error in an earlier part stops the stream now
        body, self._buf = self._buf, bytearray()  # the buffer itself is the body: no copy
        number = len(self._parts) + 1
        from .faults import point

        point(f"upload-part:{self.key}:{number}")
        self._slots.acquire()  # bounded memory: wait for a slot before buffering another part

        def send() -> dict[str, Any]:
            try:
                r = self.store._call(
                    f"UPLOAD-PART {number}",
                    self.key,
                    self.store.client.upload_part,
                    Key=self.key,
                    UploadId=self._upload_id,
                    PartNumber=number,
                    Body=body,
                )
                return {"PartNumber": number, "ETag": r["ETag"]}
            finally:
                self._slots.release()

        assert self._pool is not None
        self._parts.append(self._pool.submit(send))

    def close(self) -> tuple[int, str]:
        """Finish the object (the conditional create applies here); returns ``(size, checksum hex)``."""
        try:
            if self._upload_id is None:
                self.store.put(self.key, bytes(self._buf), if_none_match=self.if_none_match)
            else:
                if self._buf:
                    self._send_part()
                parts = [f.result() for f in self._parts]
                kwargs: dict[str, Any] = {
                    "Key": self.key,
                    "UploadId": self._upload_id,
                    "MultipartUpload": {"Parts": parts},
                }
                if self.if_none_match:
                    kwargs["IfNoneMatch"] = "*"
                self.store._call("COMPLETE-MULTIPART", self.key, self.store.client.complete_multipart_upload, **kwargs)
                self._upload_id = None
        except BaseException:
            self.abort()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return self.size, self.hasher.hexdigest()

    def abort(self) -> None:
        """Drop the object: the multipart upload (if any) is aborted; nothing was written under the key."""
        self._buf = bytearray()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                self.store._call(
                    "ABORT", self.key, self.store.client.abort_multipart_upload, Key=self.key, UploadId=upload_id
                )
            except (CheckpointError, FileNotFoundError):
                pass  # the abort is best effort; the next run aborts what is left under the prefix


def cache_dir(url: ObjectURL) -> str:
    """A node-local folder for a run on object storage saved without a staging tier: it only holds what a resume
    fetched from the bucket (the same path on every rank of a node)."""
    import hashlib
    import tempfile

    tag = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"wsd_pretrain-cache-{tag}")


def store_for(url: ObjectURL) -> S3Store:
    if url.scheme == "az":  # the same interface and errors, on Azure Blob (azure_store.py)
        from .azure_store import AzureStore

        return AzureStore(url.bucket)  # type: ignore[return-value]
    if url.scheme != "s3":  # parse_location refuses the others first
        raise ConfigError(f"{url}: no client for {url.scheme}://", where="checkpoint location")
    return S3Store(url.bucket)


def safe_key(base: ObjectURL, rel: Any, what: str) -> str:
    """The key of ``rel`` under ``base``, refusing hostile names read from a manifest: absolute keys, ``..``,
    ``.``, empty parts, backslashes (the same rule as :func:`.format.safe_path` for files)."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: key {rel!r} is not a relative object name")
    if PurePosixPath(rel).is_absolute() or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise CheckpointError(f"{what}: key {rel!r} leaves the checkpoint's prefix; refused")
    return (base / rel).key
