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

Every request is bounded (:func:`request_timeout`: ``checkpoint.storage_timeout_s`` or ``$WSD_STORAGE_TIMEOUT_S``
per try, :data:`REQUEST_ATTEMPTS` tries): a store that stops answering raises :class:`StorageTimeout` naming the
object, never hangs; a store made for one save also stops at the save's deadline and at its first stall
(:class:`_Bounds`; docs/decisions.md 163).
"""

from __future__ import annotations

import os
import re
import threading
import time
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
    "StorageTimeout",
    "configure_timeouts",
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


class StorageTimeout(CheckpointError):
    """The object store stopped answering: a request got no byte for ``storage_timeout_s`` on each of its
    :data:`REQUEST_ATTEMPTS` tries, or a save ran out of its time on object storage (``storage_save_minutes``)."""


_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}

PART_SIZE = 16 * 1024 * 1024
"""Multipart part size: each in-flight part is one buffer of this size."""
UPLOAD_THREADS = 4
"""Parts of one object in flight at once (memory per upload: about (threads + 1) x PART_SIZE)."""

# ------------------------------------------------------------------------------ how long a request and a save may take

TIMEOUT_ENV = "WSD_STORAGE_TIMEOUT_S"
"""The per-request limit for processes that build no manager (``wsd-pretrain ckpt ...``); a manager's
``checkpoint.storage_timeout_s`` wins where it is given."""
REQUEST_TIMEOUT_S = 60.0
"""Default: how long the store may stay silent on one try of a request (connecting, or no byte sent or received)
before that try is abandoned (the SDKs' own default for S3 and Azure: docs/decisions.md)."""
REQUEST_ATTEMPTS = 3
"""Tries per request (each on a new connection, after a short backoff): a request fails after about
``REQUEST_ATTEMPTS x timeout`` of silence."""
SAVE_MINUTES = 30.0
"""Default: the most one save may spend on object storage on a rank (``checkpoint.storage_save_minutes``)."""

BACKOFF_S = 10.0
"""The most a request sleeps between its tries in all (botocore's standard mode: under 1 + 2 s; the Azure policy
set in azure_store.py: under 4 + 6 s)."""

_TIMEOUTS: dict[str, float | None] = {"request": None, "save": None}


def configure_timeouts(request_s: float | None = None, save_minutes: float | None = None) -> None:
    """This process's limits (the manager sets them from its config when it is built, as it sets the checkpoint
    groups' timeout): None keeps the default (``$WSD_STORAGE_TIMEOUT_S`` or :data:`REQUEST_TIMEOUT_S`;
    :data:`SAVE_MINUTES`)."""
    _TIMEOUTS["request"] = request_s
    _TIMEOUTS["save"] = save_minutes


def timeout_problems(value: Any, what: str) -> list[str]:
    """What is wrong with a per-request limit in seconds (a number > 0, at most an hour)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        return [f"{what}={value!r}: seconds the object store may stay silent on one request, a number in (0, 3600]"]
    return []


def request_timeout() -> float:
    """The per-try limit in seconds: the manager's ``storage_timeout_s``, else ``$WSD_STORAGE_TIMEOUT_S``, else
    :data:`REQUEST_TIMEOUT_S` (a bad value in the environment is a :class:`ConfigError` naming it)."""
    if _TIMEOUTS["request"] is not None:
        return float(_TIMEOUTS["request"])
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return REQUEST_TIMEOUT_S
    try:
        value: Any = float(raw)
    except ValueError:
        value = raw
    problems = timeout_problems(value, TIMEOUT_ENV)
    if problems:
        raise ConfigError(problems, where="environment")
    return float(value)


def request_bound(timeout: float | None = None) -> float:
    """The longest one request may take against a store that stopped answering: every try times out, plus the
    backoffs between them (:data:`BACKOFF_S`). A try may last its timeout plus about a second (botocore waits up to
    1 s for a PUT's ``100 Continue`` before sending the body: measured against a stopped server)."""
    t = request_timeout() if timeout is None else timeout
    return REQUEST_ATTEMPTS * (t + 1.0) + BACKOFF_S


def save_seconds() -> float:
    """The most one save may spend on object storage on a rank, in seconds."""
    minutes = _TIMEOUTS["save"]
    return 60.0 * (SAVE_MINUTES if minutes is None else float(minutes))


def _timed_out(exc: BaseException) -> bool:
    """A timeout, not a refusal: a read or connect timeout, or a connection dropped because a send timed out."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (TimeoutError, _socket_timeout())) or "Timeout" in type(e).__name__:
            return True
        if isinstance(e, BaseException):
            todo += [e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]]
            todo += [v for v in getattr(e, "kwargs", {}).values() if isinstance(v, BaseException)]
            inner = getattr(e, "inner_exception", None) or getattr(e, "error", None)
            todo.append(inner if isinstance(inner, BaseException) else None)
    return False


def _socket_timeout() -> type:
    import socket

    return socket.timeout


class _Bounds:
    """What a store does with time: every try of a request is bounded by the client's timeouts (the stores' SDK
    clients are built with them); a store made for one save (``save=True``) also has that save's deadline, and once
    the endpoint stopped answering in that save it sends no new request for it (each fails at once with the first
    error), except the best-effort cleanup, which is tried once (:meth:`wind_down`, ``once=True``)."""

    deadline: float | None = None
    stalled: str | None = None
    winding_down = False
    timeout: float = REQUEST_TIMEOUT_S

    def _bound(self, save: bool) -> None:
        self.timeout = request_timeout()
        if save:
            self.deadline = time.monotonic() + save_seconds()

    def wind_down(self) -> None:
        """The save failed: its cleanup from now on is best effort, one try per request (what it leaves, the next
        run removes under its lease)."""
        self.winding_down = True

    def _before(self, what: str, key: str, once: bool) -> None:
        if once or self.winding_down:
            return
        if self.stalled is not None:
            raise StorageTimeout(self.stalled)
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stalled = (
                f"{self.url(key)}: {what}: this save's time on object storage ran out "  # type: ignore[attr-defined]
                f"({save_seconds() / 60:g} min, checkpoint.storage_save_minutes)"
            )
            raise StorageTimeout(self.stalled)

    def _stalled(self, what: str, key: str, t0: float, once: bool, exc: BaseException) -> StorageTimeout:
        tries = 1 if once or self.winding_down else REQUEST_ATTEMPTS
        message = (
            f"{self.url(key)}: {what}: the object store stopped answering: no answer for "  # type: ignore[attr-defined]
            f"{time.monotonic() - t0:.0f} s ({tries} {'try' if tries == 1 else 'tries'} of {self.timeout:g} s each, "
            f"checkpoint.storage_timeout_s or ${TIMEOUT_ENV}): {str(exc).splitlines()[0][:200]}"
        )
        if self.deadline is not None and self.stalled is None and not once:
            self.stalled = message
        return StorageTimeout(message)


def _client(timeout: float | None = None, attempts: int = REQUEST_ATTEMPTS) -> Any:
    """One boto3 S3 client per process, limits and try count (clients are thread-safe; a forked child makes its
    own). Every try of a request is bounded by ``timeout`` (connecting, and each wait for a byte to send or
    receive): a store that stops answering fails the request after about ``attempts x timeout``, never hangs."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    timeout = request_timeout() if timeout is None else timeout
    key = (os.getpid(), endpoint, timeout, attempts)
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
                # total tries (standard mode: throttling and 5xx answers, timeouts and dropped connections retried
                # on a new connection after at most 1, 2, ... s)
                "retries": {"total_max_attempts": attempts, "mode": "standard"},
                "max_pool_connections": 32,
                "connect_timeout": timeout,
                "read_timeout": timeout,
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


class S3Store(_Bounds):
    """The objects under one bucket: every call names its URL in its errors; 412 is :class:`PreconditionFailed`; a
    store that stops answering is :class:`StorageTimeout` after the bounded tries. ``save=True``: a store for one
    save (its deadline, and no new request once the endpoint stopped answering: see :class:`_Bounds`)."""

    def __init__(self, bucket: str, *, save: bool = False) -> None:
        self.bucket = bucket
        self._bound(save)
        self.client = _client(self.timeout)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _call(self, what: str, key: str, op: str, *, once: bool = False, **kwargs: Any) -> Any:
        """``self.client.<op>(Bucket=..., **kwargs)`` with this store's errors; ``once``: a best-effort request
        (an abort, a cleanup), tried once."""
        from botocore.exceptions import BotoCoreError, ClientError

        self._before(what, key, once)
        single = once or self.winding_down
        client = _client(self.timeout, 1) if single else self.client
        t0 = time.monotonic()
        try:
            return getattr(client, op)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, status = err.get("Code", "?"), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412 or code == "PreconditionFailed":
                raise PreconditionFailed(f"{self.url(key)}: {what}: the precondition failed (412)") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(self.url(key)) from None
            raise CheckpointError(f"{self.url(key)}: {what} failed: {code}: {err.get('Message', exc)}") from None
        except BotoCoreError as exc:
            if _timed_out(exc):
                raise self._stalled(what, key, t0, once, exc) from None
            raise CheckpointError(f"{self.url(key)}: {what} failed: {exc}") from None

    def _read(self, what: str, key: str, body: Any) -> bytes:
        """A response body, read with the same limits and errors as the request (the store may stop mid-body)."""
        from botocore.exceptions import BotoCoreError

        t0 = time.monotonic()
        try:
            return body.read()
        except (BotoCoreError, OSError) as exc:
            if _timed_out(exc):
                raise self._stalled(what, key, t0, False, exc) from None
            raise CheckpointError(f"{self.url(key)}: {what} failed: {exc}") from None

    # reads
    def head(self, key: str) -> dict[str, Any] | None:
        """``{"size", "etag"}`` or None when the object does not exist."""
        try:
            r = self._call("HEAD", key, "head_object", Key=key)
        except FileNotFoundError:
            return None
        return {"size": int(r["ContentLength"]), "etag": r["ETag"]}

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The whole object and its ETag (refused beyond ``max_bytes``)."""
        r = self._call("GET", key, "get_object", Key=key)
        if max_bytes is not None and int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise CheckpointError(f"{self.url(key)}: {r['ContentLength']} bytes, more than {max_bytes} allowed")
        return self._read("GET", key, r["Body"]), r["ETag"]

    def get_aged(self, key: str, *, max_bytes: int) -> tuple[bytes, str, float]:
        """The object, its ETag, and its age in seconds on the **server's** clock: the response's ``Date`` minus
        the object's ``Last-Modified``, both written by the server (1-second resolution), so no host's clock is
        compared with another's. Without a ``Date`` header, this host's clock against ``Last-Modified``."""
        from datetime import datetime, timezone
        from email.utils import parsedate_to_datetime

        r = self._call("GET", key, "get_object", Key=key)
        if int(r["ContentLength"]) > max_bytes:
            r["Body"].close()
            raise CheckpointError(f"{self.url(key)}: {r['ContentLength']} bytes, more than {max_bytes} allowed")
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
        except (TypeError, ValueError):
            now = datetime.now(timezone.utc)
        return self._read("GET", key, r["Body"]), r["ETag"], (now - r["LastModified"]).total_seconds()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` (fewer at the end of the object), one ranged GET."""
        if length <= 0:
            return b""
        r = self._call("GET", key, "get_object", Key=key, Range=f"bytes={start}-{start + length - 1}")
        return self._read("GET", key, r["Body"])

    def stream(self, key: str) -> Any:
        """The object's body as a stream (``iter_chunks``) and its size."""
        r = self._call("GET", key, "get_object", Key=key)
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
            r = self._call("LIST", prefix, "list_objects_v2", **kwargs)
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
        return self._call("PUT", key, "put_object", **kwargs)["ETag"]

    def delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = self._call("DELETE", batch[0], "delete_objects", Delete={"Objects": [{"Key": k} for k in batch]})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise CheckpointError(f"{self.url(e['Key'])}: DELETE failed: {e.get('Code')}: {e.get('Message')}")

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished multipart upload under ``prefix`` (their parts cost storage until aborted)."""
        r = self._call("LIST-UPLOADS", prefix, "list_multipart_uploads", Prefix=prefix)
        uploads = r.get("Uploads", [])
        for u in uploads:
            self._call("ABORT", u["Key"], "abort_multipart_upload", Key=u["Key"], UploadId=u["UploadId"])
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
            r = self.store._call("CREATE-MULTIPART", self.key, "create_multipart_upload", Key=self.key)
            self._upload_id = r["UploadId"]
            self._pool = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="wsd-s3-part")
        self._raise_failed()  # an error in an earlier part stops the stream now
        body, self._buf = self._buf, bytearray()  # the buffer itself is the body: no copy
        number = len(self._parts) + 1
        from .faults import point

        point(f"upload-part:{self.key}:{number}")
        self._slots.acquire()  # bounded memory: wait for a slot before buffering another part
        try:  # the slot may have come free because a part failed (the store stopped answering): send no more
            self._raise_failed()
        except BaseException:
            self._slots.release()
            raise

        def send() -> dict[str, Any]:
            try:
                r = self.store._call(
                    f"UPLOAD-PART {number}",
                    self.key,
                    "upload_part",
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

    def _raise_failed(self) -> None:
        for done in [f for f in self._parts if f.done()]:
            done.result()

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
                self.store._call("COMPLETE-MULTIPART", self.key, "complete_multipart_upload", **kwargs)
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
                self.store._call(  # best effort, tried once: the store may be the reason for the abort
                    "ABORT", self.key, "abort_multipart_upload", once=True, Key=self.key, UploadId=upload_id
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


def store_for(url: ObjectURL, *, save: bool = False) -> S3Store:
    """The store of ``url``'s bucket or container. ``save=True``: a store for one save (the save's deadline,
    ``checkpoint.storage_save_minutes``, and no new request once the store stopped answering in it)."""
    if url.scheme == "az":  # the same interface and errors, on Azure Blob (azure_store.py)
        from .azure_store import AzureStore

        return AzureStore(url.bucket, save=save)  # type: ignore[return-value]
    if url.scheme != "s3":  # parse_location refuses the others first
        raise ConfigError(f"{url}: no client for {url.scheme}://", where="checkpoint location")
    return S3Store(url.bucket, save=save)


def safe_key(base: ObjectURL, rel: Any, what: str) -> str:
    """The key of ``rel`` under ``base``, refusing hostile names read from a manifest: absolute keys, ``..``,
    ``.``, empty parts, backslashes (the same rule as :func:`.format.safe_path` for files)."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: key {rel!r} is not a relative object name")
    if PurePosixPath(rel).is_absolute() or "\\" in rel or any(p in ("", ".", "..") for p in rel.split("/")):
        raise CheckpointError(f"{what}: key {rel!r} leaves the checkpoint's prefix; refused")
    return (base / rel).key
