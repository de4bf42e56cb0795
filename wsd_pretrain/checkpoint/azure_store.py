"""Azure Blob storage behind the object-storage seam (``az://container/prefix``; docs/checkpoint-format.md, "Object
storage", and docs/decisions.md): :class:`AzureStore` offers exactly the operations of
:class:`~.storage.S3Store` that :mod:`.objstore` and :mod:`.objstore_tier` use, with the same errors, so the commit
protocol, the lease, the tools and the manager run unchanged on Azure.

How each S3 operation maps onto the Blob service (``azure-storage-blob``):

* conditional create (``If-None-Match: *``): Put Blob / Put Block List with ``If-None-Match: *``; the service
  answers 409 ``BlobAlreadyExists`` (Put Blob) or 412 (Put Block List): both are :class:`~.storage.PreconditionFailed`;
* compare-and-swap (``If-Match``): the blob's ETag, 412 ``ConditionNotMet`` when it changed;
* multipart upload: staged blocks (Put Block, several in flight) committed by one Put Block List, which carries the
  conditional create. Blocks that are never committed cost storage until the service drops them (7 days) or the
  blob is committed; :meth:`AzureObjectWriter.abort` and :meth:`AzureStore.abort_uploads` discard them at once by
  committing an empty block list (``If-None-Match: *``: only where no blob exists) and deleting that empty blob
  (``If-Match`` on its ETag);
* ranged GET: a download with offset and length; listings: List Blobs with a ``/`` delimiter; deletes: one Delete
  Blob per object (a missing one is not an error, as in S3's DeleteObjects).

Connection settings come from the environment, as the ``az`` CLI reads them: ``AZURE_STORAGE_CONNECTION_STRING``
(its ``BlobEndpoint`` included), or ``AZURE_STORAGE_ACCOUNT`` with ``AZURE_STORAGE_KEY`` or
``AZURE_STORAGE_SAS_TOKEN`` (or, with neither, ``azure-identity``'s ``DefaultAzureCredential`` where installed).
``AZURE_STORAGE_SERVICE_ENDPOINT`` overrides the blob endpoint (an emulator, a private endpoint), as
``AWS_ENDPOINT_URL_S3`` does for S3.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import CheckpointError, ConfigError
from . import storage as _storage
from .storage import PreconditionFailed, _Bounds, _timed_out

__all__ = ["AzureObjectWriter", "AzureStore", "container_problems"]

_CONTAINER_RE = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_SERVICE_ENDPOINT",
)


def container_problems(location: str, container: str) -> list[str]:
    """What is wrong with an ``az://`` URL's container name (3-63 of a-z, 0-9 and single '-')."""
    if _CONTAINER_RE.match(container):
        return []
    return [
        f"{location}: container {container!r} is not a valid Azure container name (3-63 of a-z, 0-9 and '-', "
        "starting and ending with a letter or digit, no '--')"
    ]


def _service(timeout: float, attempts: int = _storage.REQUEST_ATTEMPTS) -> Any:
    """One ``BlobServiceClient`` per process, settings, limit and try count (clients are thread-safe; a forked child
    makes its own). Every try is bounded by ``timeout`` (connecting, and each wait for a byte to send or receive),
    retried after 1-4 s, then 3-6 s (the storage SDK's default waits 15 s and more between tries), so a service
    that stops answering fails a request after about ``attempts x timeout``, as on S3."""
    env = tuple(os.environ.get(k) for k in _ENV)
    key = (os.getpid(), *env, timeout, attempts)
    with _CLIENT_LOCK:
        client = _CLIENTS.get(key)
        if client is not None:
            return client
        try:
            from azure.storage.blob import BlobServiceClient
        except ImportError:
            raise ConfigError(
                "az:// checkpoints need azure-storage-blob: pip install 'wsd_pretrain[azure]'",
                where="checkpoint location",
            ) from None
        conn, account, account_key, sas, endpoint = env
        opts: dict[str, Any] = {
            "connection_timeout": timeout,
            "read_timeout": timeout,
            "retry_total": attempts - 1,
            "initial_backoff": 1,
            "increment_base": 2,
            "random_jitter_range": 1,
        }
        if conn:
            client = BlobServiceClient.from_connection_string(conn, **opts)
            if endpoint:  # the endpoint override wins, with the connection string's credential
                client = BlobServiceClient(endpoint, credential=client.credential, **opts)
        else:
            if not account and not endpoint:
                raise ConfigError(
                    "az:// checkpoints need the storage account: set AZURE_STORAGE_CONNECTION_STRING, or "
                    "AZURE_STORAGE_ACCOUNT with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN (or an Azure identity "
                    "with azure-identity installed); AZURE_STORAGE_SERVICE_ENDPOINT overrides the blob endpoint",
                    where="checkpoint location",
                )
            url = endpoint or f"https://{account}.blob.core.windows.net"
            credential: Any
            if account_key:
                if not account:
                    raise ConfigError(
                        "AZURE_STORAGE_KEY is set without AZURE_STORAGE_ACCOUNT (the key's account name)",
                        where="checkpoint location",
                    )
                credential = {"account_name": account, "account_key": account_key}
            elif sas:
                credential = sas
            else:
                try:
                    from azure.identity import DefaultAzureCredential
                except ImportError:
                    raise ConfigError(
                        f"az:// checkpoints on {url}: no credential; set AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN, "
                        "or AZURE_STORAGE_CONNECTION_STRING, or install azure-identity for an Azure identity",
                        where="checkpoint location",
                    ) from None
                credential = DefaultAzureCredential()
            client = BlobServiceClient(url, credential=credential, **opts)
        _CLIENTS[key] = client
        return client


class AzureStore(_Bounds):
    """The blobs under one container, with :class:`~.storage.S3Store`'s interface: every call names its URL in
    its errors; a lost condition is :class:`~.storage.PreconditionFailed`, a missing blob ``FileNotFoundError``, a
    service that stopped answering :class:`~.storage.StorageTimeout` (the same limits and ``save`` store as S3)."""

    def __init__(self, container: str, *, save: bool = False) -> None:
        self.bucket = container  # the name objstore_tier and the messages use for S3's bucket
        self._bound(save)
        self.service = _service(self.timeout)
        self._main = self.service.get_container_client(container)
        self._once: Any = None

    @property
    def container(self) -> Any:
        """The container client: once the save winds down, one whose requests are tried once (best effort)."""
        return self._container(False)

    def _container(self, once: bool) -> Any:
        if not (once or self.winding_down):
            return self._main
        if self._once is None:
            self._once = _service(self.timeout, 1).get_container_client(self.bucket)
        return self._once

    def url(self, key: str) -> str:
        return f"az://{self.bucket}/{key}"

    def _call(self, what: str, key: str, fn: Any, *args: Any, once: bool = False, **kwargs: Any) -> Any:
        from azure.core.exceptions import AzureError, HttpResponseError

        self._before(what, key, once)
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        except HttpResponseError as exc:
            status, code = exc.status_code, str(exc.error_code or "?")
            code = getattr(exc.error_code, "value", code)
            if status == 412 or (status == 409 and code == "BlobAlreadyExists"):
                raise PreconditionFailed(
                    f"{self.url(key)}: {what}: the precondition failed ({status}{'' if status == 412 else ' ' + code})"
                ) from None
            if status == 404 and code != "ContainerNotFound":
                raise FileNotFoundError(self.url(key)) from None
            message = str(exc.message or exc).splitlines()[0]
            raise CheckpointError(f"{self.url(key)}: {what} failed: {code}: {message}") from None
        except AzureError as exc:  # no answer: connection refused, timeouts after the retries
            if _timed_out(exc):
                raise self._stalled(what, key, t0, once, exc) from None
            raise CheckpointError(f"{self.url(key)}: {what} failed: {str(exc).splitlines()[0]}") from None

    def _blob(self, key: str, once: bool = False) -> Any:
        return self._container(once).get_blob_client(key)

    # reads
    def head(self, key: str) -> dict[str, Any] | None:
        """``{"size", "etag"}`` or None when the blob does not exist."""
        try:
            p = self._call("HEAD", key, self._blob(key).get_blob_properties)
        except FileNotFoundError:
            return None
        return {"size": int(p.size), "etag": p.etag}

    def _download(self, what: str, key: str, max_bytes: int | None, hook: Any = None) -> Any:
        kwargs = {"raw_response_hook": hook} if hook is not None else {}
        d = self._call(what, key, self._blob(key).download_blob, max_concurrency=1, **kwargs)
        if max_bytes is not None and d.size > max_bytes:
            raise CheckpointError(f"{self.url(key)}: {d.size} bytes, more than {max_bytes} allowed")
        return d

    def get(self, key: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        """The whole blob and its ETag (refused beyond ``max_bytes``)."""
        d = self._download("GET", key, max_bytes)
        return self._call("GET", key, d.readall), d.properties.etag

    def get_aged(self, key: str, *, max_bytes: int) -> tuple[bytes, str, float]:
        """The blob, its ETag and its age on the **service's** clock (its ``Date`` minus ``Last-Modified``), as
        :meth:`.storage.S3Store.get_aged`."""
        from datetime import datetime, timezone
        from email.utils import parsedate_to_datetime

        seen: dict[str, str | None] = {}
        d = self._download(
            "GET", key, max_bytes, lambda r: seen.setdefault("date", r.http_response.headers.get("Date"))
        )
        body = self._call("GET", key, d.readall)
        try:
            now = parsedate_to_datetime(seen["date"]) if seen.get("date") else datetime.now(timezone.utc)
        except (TypeError, ValueError):
            now = datetime.now(timezone.utc)
        return body, d.properties.etag, (now - d.properties.last_modified).total_seconds()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` (fewer at the end of the blob), one ranged download."""
        if length <= 0:
            return b""
        d = self._call("GET", key, self._blob(key).download_blob, offset=start, length=length, max_concurrency=1)
        return self._call("GET", key, d.readall)

    def stream(self, key: str) -> tuple[_Body, int]:
        """The blob's body as a stream (``iter_chunks``) and its size."""
        d = self._download("GET", key, None)
        return _Body(self, key, d), int(d.size)

    def list(self, prefix: str, delimiter: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
        """Every committed blob under ``prefix`` (key, size, etag) and, with a delimiter, the common prefixes."""
        from azure.storage.blob import BlobPrefix

        def run() -> tuple[list[dict[str, Any]], list[str]]:
            objects: list[dict[str, Any]] = []
            prefixes: list[str] = []
            if delimiter:
                items = self.container.walk_blobs(name_starts_with=prefix or None, delimiter=delimiter)
            else:
                items = self.container.list_blobs(name_starts_with=prefix or None)
            for item in items:
                if isinstance(item, BlobPrefix):
                    prefixes.append(item.name)
                else:
                    objects.append({"key": item.name, "size": int(item.size), "etag": item.etag})
            return objects, prefixes

        return self._call("LIST", prefix, run)

    # writes
    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """One Put Blob; ``if_none_match`` creates only, ``if_match`` replaces only that version (else
        :class:`~.storage.PreconditionFailed`). Returns the new ETag."""
        from azure.core import MatchConditions

        kwargs: dict[str, Any] = {"overwrite": True}
        if if_none_match:
            kwargs["match_condition"] = MatchConditions.IfMissing
        elif if_match is not None:
            kwargs.update(etag=if_match, match_condition=MatchConditions.IfNotModified)
        return self._call("PUT", key, self._blob(key).upload_blob, bytes(data), **kwargs)["etag"]

    def delete(self, keys: list[str]) -> None:
        """Delete the blobs (in order for one key, several in flight for more); a missing blob is no error."""

        def one(key: str) -> None:
            try:
                self._call("DELETE", key, self._blob(key).delete_blob)
            except FileNotFoundError:
                pass

        if len(keys) <= 1:
            for k in keys:
                one(k)
            return
        with ThreadPoolExecutor(8, thread_name_prefix="wsd-az-delete") as pool:
            list(pool.map(one, keys))

    def _discard_blocks(self, key: str, once: bool = False) -> bool:
        """Drop the uncommitted blocks of ``key`` where no committed blob exists: commit an empty block list
        (create only) and delete that empty blob (``If-Match``). False where a committed blob exists (its
        uncommitted blocks go at its next commit or when the service expires them). ``once``: best effort, each
        request tried once (a writer's abort: the service may be why it aborts)."""
        from azure.core import MatchConditions

        blob = self._blob(key, once)
        try:
            r = self._call(
                "ABORT", key, blob.commit_block_list, [], once=once, match_condition=MatchConditions.IfMissing
            )
        except PreconditionFailed:
            return False
        try:
            self._call(
                "ABORT",
                key,
                blob.delete_blob,
                once=once,
                etag=r["etag"],
                match_condition=MatchConditions.IfNotModified,
            )
        except (PreconditionFailed, FileNotFoundError):
            pass  # someone committed there meanwhile: theirs
        return True

    def abort_uploads(self, prefix: str) -> int:
        """Discard every staged upload under ``prefix`` that was never committed (S3's unfinished multipart
        uploads): the names listed with uncommitted blobs that have no committed blob."""

        def names(include: list[str] | None) -> set[str]:
            kw = {"include": include} if include else {}
            return {b.name for b in self.container.list_blobs(name_starts_with=prefix or None, **kw)}

        staged = self._call("LIST-UPLOADS", prefix, names, ["uncommittedblobs"])
        committed = self._call("LIST-UPLOADS", prefix, names, None)
        return sum(self._discard_blocks(k) for k in sorted(staged - committed))

    def writer(self, key: str, checksum: str, *, if_none_match: bool = False) -> AzureObjectWriter:
        return AzureObjectWriter(self, key, checksum, if_none_match=if_none_match)


class _Body:
    """A download as objstore reads an S3 body: ``iter_chunks`` and ``close``."""

    def __init__(self, store: AzureStore, key: str, downloader: Any) -> None:
        self.store, self.key, self.d = store, key, downloader

    def iter_chunks(self, size: int) -> Any:
        buf = bytearray()
        for chunk in self.store._call("GET", self.key, self.d.chunks):
            buf += chunk
            while len(buf) >= size:
                yield bytes(buf[:size])
                del buf[:size]
        if buf:
            yield bytes(buf)

    def close(self) -> None:
        pass


class AzureObjectWriter:
    """Streams one blob as :class:`~.storage.ObjectWriter` streams an S3 object: hashed on the way, sent as staged
    blocks of :data:`.storage.PART_SIZE` with at most :data:`.storage.UPLOAD_THREADS` in flight, committed by one
    Put Block List (carrying the conditional create); a blob smaller than one block is one Put Blob. Block ids
    carry a per-writer random prefix, so two writers of one name never commit each other's blocks."""

    def __init__(self, store: AzureStore, key: str, checksum: str, *, if_none_match: bool = False) -> None:
        from .safetensors_io import new_hasher

        self.store, self.key, self.if_none_match = store, key, if_none_match
        self.hasher = new_hasher(checksum)
        self.size = 0
        self._tag = uuid.uuid4().hex[:16]
        self._buf = bytearray()
        self._blocks: list[Future[str]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(_storage.UPLOAD_THREADS)
        self._part = _storage.PART_SIZE

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        while len(view):
            take = min(len(view), self._part - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == self._part:
                self._send_block()

    def _send_block(self) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_storage.UPLOAD_THREADS, thread_name_prefix="wsd-az-block")
        self._raise_failed()  # an error in an earlier block stops the stream now
        body, self._buf = bytes(self._buf), bytearray()
        number = len(self._blocks) + 1
        block_id = base64.b64encode(f"{self._tag}-{number:08d}".encode()).decode()
        self._slots.acquire()  # bounded memory: wait for a slot before buffering another block
        try:  # the slot may have come free because a block failed (the service stopped answering): send no more
            self._raise_failed()
        except BaseException:
            self._slots.release()
            raise

        def send() -> str:
            try:
                blob = self.store._blob(self.key)
                self.store._call(f"PUT-BLOCK {number}", self.key, blob.stage_block, block_id, body)
                return block_id
            finally:
                self._slots.release()

        self._blocks.append(self._pool.submit(send))

    def _raise_failed(self) -> None:
        for done in [f for f in self._blocks if f.done()]:
            done.result()

    def close(self) -> tuple[int, str]:
        """Finish the blob (the conditional create applies here); returns ``(size, checksum hex)``."""
        from azure.core import MatchConditions
        from azure.storage.blob import BlobBlock

        try:
            if self._pool is None:
                self.store.put(self.key, bytes(self._buf), if_none_match=self.if_none_match)
            else:
                if self._buf:
                    self._send_block()
                ids = [f.result() for f in self._blocks]
                kwargs: dict[str, Any] = {}
                if self.if_none_match:
                    kwargs["match_condition"] = MatchConditions.IfMissing
                blob = self.store._blob(self.key)
                blocks = [BlobBlock(block_id=i) for i in ids]
                self.store._call("PUT-BLOCK-LIST", self.key, blob.commit_block_list, blocks, **kwargs)
                self._blocks = []
        except BaseException:
            self.abort()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return self.size, self.hasher.hexdigest()

    def abort(self) -> None:
        """Drop the blob: its staged blocks are discarded (where no committed blob of that name exists; else they go
        at that blob's next commit or expire); nothing was committed under the key."""
        self._buf = bytearray()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._blocks:
            self._blocks = []
            try:
                self.store._discard_blocks(self.key, once=True)
            except (CheckpointError, FileNotFoundError):
                pass  # best effort; the next run discards what is left under the prefix
