"""Writing one checkpoint on every rank (docs/checkpoint-format.md, "How a checkpoint is written").

Every rank calls :func:`start_save` with the same request:

1. **plan**: every rank computes the same :class:`~.layout.SavePlan` from the adapter's items, with no
   communication: the Hugging Face model shards and their writers, and each rank's own slice files;
2. **open**: rank 0 makes ``.staging-<name>-<nonce>`` and tells the others its name (coord group);
3. **fetch**: each rank hands its tensors to its writer thread: the slices it holds (master weights, optimizer
   state: no collective), the replicated tensors it was given, and the model weights of the shards it writes; a
   partitioned weight (ZeRO-3, FSDP2) is gathered to that one rank (one ``gather`` per such weight, on the training
   group: about the model's bytes in all, never an all-gather). Async saves copy each tensor into a reused host
   buffer (:class:`HostArena`) first. The phase ends with an agreement: any rank's error raises on every rank;
4. **write** (background thread): each file is streamed, checksummed and fsynced as its tensors arrive;
5. **report and commit** (background thread, commit group): rank 0 gathers every rank's files (size, checksum) or
   error, commits (:mod:`.commit`) or removes the staging directory, and tells every rank the outcome, which
   :meth:`PendingSave.wait` raises on every rank if the save failed.

Memory: a synchronous save writes CPU tensors from their own storage and copies a device tensor only when the
writer reaches it; gathered weights waiting for the writer are capped at one shard's bytes. An async save keeps one
host buffer of the rank's share (pinned on GPU), reused by every later save.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..errors import CheckpointError
from . import coord
from . import format as F
from .adapters import EngineAdapter
from .agreement import agree_on_items
from .faults import point
from .layout import Box, Item, ModelShard, SavePlan, StateFile, assembly_pieces, plan_save
from .rng import capture_rng
from .safetensors_io import (
    DEFAULT_CHECKSUM,
    RangeWriter,
    StreamingWriter,
    header_bytes,
    json_bytes,
    new_hasher,
    tensor_offsets,
    write_json,
)

__all__ = ["HostArena", "PendingSave", "SaveRequest", "save_checkpoint", "start_save"]

log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


@dataclass
class SaveRequest:
    """What to save besides the engine's tensors. ``trainer`` is plain JSON (position, step, tokens, scheduler and
    data-loader state, user state)."""

    position: int
    step: int
    tokens: int
    kinds: list[str]
    trainer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] | None = None
    hf_config: dict[str, Any] | None = None
    extra_manifest: dict[str, Any] = field(default_factory=dict)
    extra_json: dict[str, Any] = field(default_factory=dict)
    """Other JSON files beside the model (a PEFT model's ``adapter_config.json`` and ``base_config.json``)."""


# ---------------------------------------------------------------------------------------------- host buffers


class HostArena:
    """One host buffer that every async save of a manager reuses: a rank's share of the state is copied into it
    (before ``save()`` returns, or by a :class:`_Snapshot` until the next optimizer step), then written from it while
    training goes on. Pinned when the state is on a
    GPU (fast device-to-host copies); it grows when a save needs more, and is never one buffer per tensor."""

    _ALIGN = 64

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None
        self._off = 0
        self._pinned = False

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel()

    def begin(self, nbytes: int, pin: bool, count: int) -> None:
        """Make room for ``count`` tensors of ``nbytes`` in all, each aligned (allocating only when the buffer is too
        small or not pinned as asked)."""
        need = nbytes + self._ALIGN * (count + 1)
        if self._buf is None or self._buf.numel() < need or (pin and not self._pinned):
            self._buf = None
            self._buf = torch.empty(need, dtype=torch.uint8, pin_memory=pin)
            self._pinned = pin
        self._off = 0

    def reserve(self, t: torch.Tensor) -> torch.Tensor:
        """The place of a host copy of ``t`` inside the buffer, not yet filled (:class:`_Snapshot` fills it)."""
        if self._buf is None:
            raise CheckpointError("internal: the snapshot buffer was not prepared (HostArena.begin)")
        n = t.numel() * t.element_size()
        off = -(-self._off // self._ALIGN) * self._ALIGN
        if off + n > self._buf.numel():
            raise CheckpointError(f"internal: the snapshot buffer of {self._buf.numel()} bytes is too small")
        self._off = off + n
        return self._buf[off : off + n].view(t.dtype).view(t.shape)

    def copy(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """A host copy of ``t`` inside the buffer, and what to call before reading it: a copy from a GPU into pinned
        memory is asynchronous, and the writer thread must not read (and hash) the bytes before they have landed."""
        view = self.reserve(t)
        if self._pinned and t.device.type == "cuda":
            view.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(t.device))
            return view, done.synchronize
        view.copy_(t.detach())
        return view, None

    @property
    def pinned(self) -> bool:
        return self._pinned

    def end(self) -> None:
        if self._pinned and torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies must be done before training changes the tensors


class _Snapshot:
    """The copies of an async save into its host buffer, made by a thread of its own while training goes on.

    Training does not change the parameters, master weights or optimizer state between two optimizer steps (the
    forward and backward passes only read them), so these copies run during the next forward and backward pass
    instead of stalling the loop, and the next optimizer step waits for them: :func:`fence_snapshots`, an optimizer
    step pre-hook on every torch optimizer of the process (DeepSpeed's and the frameworks' optimizers step through
    one), and at every restore and save. Buffers (which a forward pass may change: running statistics, DDP's
    broadcast) and weights received from other ranks are copied before the save returns. On a GPU the copies run
    on a side stream that waits for the work queued so far, into pinned memory. The writer thread writes each tensor
    once it is copied (:meth:`ready`). ``checkpoint.async_snapshot: blocking`` copies everything before returning."""

    def __init__(self, device: torch.device, pinned: bool) -> None:
        self._copies: list[tuple[torch.Tensor, torch.Tensor, str]] = []
        self._done = 0
        self._cancelled = False
        self.error: str | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._device, self._pinned = device, pinned
        self._event: Any = None
        self.copy_s = 0.0  # how long the copies took (in the thread)
        self.fence_wait_s = 0.0  # how long training waited for them (the stall they cost)
        self.nbytes = 0

    def add(self, dst: torch.Tensor, src: torch.Tensor, key: str) -> Callable[[], None]:
        """Queue one copy; returns what the writer calls before it reads ``dst``."""
        index = len(self._copies)
        self._copies.append((dst, src.detach(), key))
        self.nbytes += dst.numel() * dst.element_size()
        return lambda: self.ready(index)

    def start(self) -> None:
        if not self._copies:
            return
        if self._device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(self._device))  # the work that made the tensors
        _install_fence()
        thread = threading.Thread(target=self._run, name="wsd-ckpt-snapshot", daemon=True)
        with _ACTIVE_LOCK:
            _ACTIVE.add(self)
        try:
            thread.start()
        except BaseException:
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)
            raise
        self._thread = thread

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            stream = None
            if self._event is not None:
                stream = torch.cuda.Stream(device=self._device)
                stream.wait_event(self._event)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for dst, src, key in self._copies:
                    if self._cancelled:
                        raise CheckpointError("the save was abandoned")
                    point(f"snapshot:{key}")
                    dst.copy_(src, non_blocking=stream is not None and self._pinned)
                    if stream is not None:
                        stream.synchronize()
                    with self._cond:
                        self._done += 1
                        self._cond.notify_all()
        except BaseException as exc:  # the writer reports it: the save fails on every rank, training goes on
            self._stop(f"copying the state for the async save: {type(exc).__name__}: {exc}")
        finally:
            self.copy_s = time.monotonic() - t0
            self._copies = []  # the engine's tensors are not held past the copy
            with _ACTIVE_LOCK:
                _ACTIVE.discard(self)

    def _stop(self, error: str) -> None:
        """No more copies will be made: the writer, waiting in :meth:`ready`, raises ``error`` instead of waiting."""
        with self._cond:
            self.error = self.error or error
            self._cond.notify_all()

    def ready(self, index: int) -> None:
        """Wait until copy ``index`` is done (the writer thread); raises if the copies failed."""
        with self._cond:
            while self._done <= index and self.error is None:
                self._cond.wait(1.0)
                thread = self._thread
                if thread is not None and not thread.is_alive() and self._done <= index and self.error is None:
                    self.error = "internal: the snapshot thread ended before copying everything"
            if self._done <= index:
                raise CheckpointError(self.error or "internal: snapshot copy missing")

    def fence(self) -> None:
        """Wait until every copy is done (training, before it changes the state again)."""
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            t0 = time.monotonic()
            thread.join()
            self.fence_wait_s += time.monotonic() - t0

    def cancel(self) -> None:
        """The save is abandoned (its fetch failed on some rank): stop copying, and release the writer, which may be
        waiting for copies that were queued but will never be made (the snapshot never started)."""
        self._cancelled = True
        self.fence()
        if self._done < len(self._copies) or self._thread is None:
            self._stop("the save was abandoned before its state was copied")


_ACTIVE: set[_Snapshot] = set()
_ACTIVE_LOCK = threading.Lock()
_FENCE_HOOK: Any = None


def fence_snapshots() -> None:
    """Wait for every async snapshot of this process still copying (before anything changes the training state)."""
    if not _ACTIVE:
        return
    with _ACTIVE_LOCK:
        active = list(_ACTIVE)
    for snap in active:
        snap.fence()


def _install_fence() -> None:
    """Once per process: every torch optimizer's step first waits for the snapshots in flight."""
    global _FENCE_HOOK
    if _FENCE_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _FENCE_HOOK = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: fence_snapshots())


# ---------------------------------------------------------------------------------------------- the writer thread


class _Writer:
    """A thread that streams this rank's files as their tensors arrive, while the main thread fetches the next
    ones. Files are written in the order their first tensor arrives; each is fsynced and checksummed.

    A range-written model file (:class:`~.layout.ModelShard`'s ``ranged``) is written in place by several ranks: its
    owner writes the header and its own tensors at their offsets (:meth:`expect_ranged`; its record's hash covers
    those bytes), and every holder writes its ranges of the shared tensors (:meth:`submit` with ``at``), hashed as
    one stream per holder rank in the plan's order (:attr:`ranges`)."""

    def __init__(self, staging: Path, fsync: bool, checksum: str, budget: int, objects: Any = None) -> None:
        self.staging, self.fsync, self.checksum = staging, fsync, checksum
        self.objects = objects  # (store, checkpoint URL): each file streams to its object (object storage)
        self.records: dict[str, dict[str, Any]] = {}
        self.attempted: list[str] = []
        self.error: str | None = None
        self._files: dict[str, tuple[list[tuple[str, torch.dtype, tuple[int, ...]]], dict[str, str]]] = {}
        self._open: dict[str, Any] = {}
        self._left: dict[str, int] = {}
        self._ranged: dict[str, tuple[int, dict[str, int], int]] = {}  # owned ranged files: header, offsets, size
        self._digests: dict[str, Any] = {}
        self._holders: dict[int, list[Any]] = {}  # holder rank -> [digest, bytes]
        self._piece: tuple[str, RangeWriter] | None = None  # the file this rank's ranges go into now
        self._queue: queue.Queue[
            tuple[str, str, torch.Tensor, int, Callable[[], None] | None, tuple[int, int, int] | None] | None
        ] = queue.Queue()
        self._held = 0  # bytes of tensors queued that exist only for this save (gathered weights)
        self._budget = budget
        self._cond = threading.Condition()
        self._syncs: list[tuple[str, Any]] = []  # each finished file's fsync, run while the next file is written
        self._syncer: Any = None
        self._thread = threading.Thread(target=self._run, name="wsd-ckpt-writer", daemon=True)
        self._thread.start()

    @property
    def ranges(self) -> dict[str, dict[str, Any]]:
        """``{holder rank: {"bytes", "hash"}}``: each holder's ranges of the range-written files, as one stream."""
        return {str(h): {"bytes": n, "hash": d.hexdigest()} for h, (d, n) in sorted(self._holders.items())}

    def expect(self, rel: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> None:
        self._files[rel] = (specs, metadata)
        self._left[rel] = len(specs)

    def expect_ranged(self, rel: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], owned: int) -> None:
        """A range-written file this rank owns: it writes the header (queued now) and ``owned`` tensors of its own."""
        self._files[rel] = (specs, {})
        self._ranged[rel] = tensor_offsets(specs)
        self._left[rel] = owned + 1
        self._queue.put((rel, "", torch.empty(0), 0, None, None))

    def holder(self, holder: int) -> None:
        """``holder`` writes ranges in this save (even empty ones: its record says so)."""
        self._holders.setdefault(holder, [new_hasher(self.checksum), 0])

    def submit(
        self,
        rel: str,
        key: str,
        tensor: torch.Tensor,
        held: int = 0,
        ready: Callable[[], None] | None = None,
        at: tuple[int, int, int] | None = None,
    ) -> None:
        """Queue one tensor of ``rel``; ``held`` bytes (a tensor made for this save) count against the budget, and
        the caller waits while the writer is that far behind. ``ready`` (an async snapshot's copy) is called before
        the tensor is read. ``at``: a holder's range of a range-written file, ``(byte offset, file size, holder)``."""
        with self._cond:
            while held and self._held > 0 and self._held + held > self._budget and self.error is None:
                self._cond.wait(1.0)
            self._held += held
        self._queue.put((rel, key, tensor, held, ready, at))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            rel, key, tensor, held, ready, at = item
            try:
                if self.error is None:
                    if ready is not None:
                        ready()
                    if at is not None:
                        self._write_range(rel, tensor, *at)
                    elif rel in self._ranged:
                        self._write_owned(rel, key, tensor)
                    else:
                        self._write(rel, key, tensor)
            except Exception as exc:  # reported to every rank, then raised
                self.error = f"{rel}: {type(exc).__name__}: {exc}"
                for w in self._open.values():
                    w.abort()
                self._open.clear()
                if self._piece is not None:
                    self._piece[1].abort()
                    self._piece = None
            finally:
                del tensor
                with self._cond:
                    self._held -= held
                    self._cond.notify_all()

    def _sync_later(self, rel: str, sync: Callable[[], None]) -> None:
        # the fsync waits for the disk: it runs on another thread while this one writes the next file, so the disk
        # is never idle between two files of a rank
        if self._syncer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsd-ckpt-fsync")
        self._syncs.append((rel, self._syncer.submit(sync)))

    def _write_range(self, rel: str, tensor: torch.Tensor, offset: int, size: int, holder: int) -> None:
        if self._piece is None or self._piece[0] != rel:
            if self._piece is not None:
                done, self._piece = self._piece, None
                self._sync_later(done[0], done[1].sync)
            self.attempted.append(rel)
            self._piece = (rel, RangeWriter(_inside_staging(self.staging, rel), size, fsync=self.fsync))
        entry = self._holders[holder]
        entry[1] += self._piece[1].put_tensor(offset, tensor, entry[0])

    def _write_owned(self, rel: str, key: str, tensor: torch.Tensor) -> None:
        _, offsets, size = self._ranged[rel]
        w = self._open.get(rel)
        if w is None:  # the header comes first (queued by expect_ranged)
            specs, _ = self._files[rel]
            self.attempted.append(rel)
            point(f"shard-begin:{rel}")
            w = self._open[rel] = RangeWriter(_inside_staging(self.staging, rel), size, fsync=self.fsync)
            self._digests[rel] = new_hasher(self.checksum)
            w.put(0, memoryview(header_bytes(specs)), self._digests[rel])
        else:
            specs, _ = self._files[rel]
            info = next(s for s in specs if s[0] == key)
            if tensor.dtype != info[1] or tensor.numel() != math.prod(info[2]):
                raise CheckpointError(
                    f"{rel}: got {key!r} as {tensor.dtype} x {tensor.numel()}, the header lists {info}"
                )
            w.put_tensor(offsets[key], tensor, self._digests[rel])
        self._left[rel] -= 1
        if self._left[rel] == 0:
            w = self._open.pop(rel)
            self._sync_later(rel, w.sync)
            self.records[rel] = {"size": size, "hash": self._digests.pop(rel).hexdigest(), "ranged": True}
            point(f"shard-end:{rel}")

    def _write(self, rel: str, key: str, tensor: torch.Tensor) -> None:
        w = self._open.get(rel)
        if w is None:
            specs, metadata = self._files[rel]
            self.attempted.append(rel)
            point(f"shard-begin:{rel}")
            if self.objects is not None:  # straight to a multipart upload under the final prefix, no fsync
                sink = _ObjectFile(self.objects[0].writer(self._key(rel), self.checksum))
                path = Path(f"{self.objects[1]}/{rel}")  # named in errors only
                w = StreamingWriter(path, specs, metadata, fsync=False, checksum=self.checksum, sink=sink)
            else:
                path = _inside_staging(self.staging, rel)
                w = StreamingWriter(path, specs, metadata, fsync=self.fsync, checksum=self.checksum)
            self._open[rel] = w
        w.add(key, tensor)
        self._left[rel] -= 1
        if self._left[rel] == 0:
            w = self._open.pop(rel)
            try:
                size, digest = w.finish()
            except BaseException:
                w.abort()
                raise
            self._sync_later(rel, w.sync)
            self.records[rel] = {"size": size, "hash": digest}
            point(f"shard-end:{rel}")

    def write_json(self, rel: str, data: Any) -> None:
        if self.error is not None:
            return
        try:
            self.attempted.append(rel)
            if self.objects is not None:
                ow = self.objects[0].writer(self._key(rel), self.checksum)
                ow.write(json_bytes(data))
                size, digest = ow.close()
            else:
                size, digest = write_json(
                    _inside_staging(self.staging, rel), data, fsync=self.fsync, checksum=self.checksum
                )
            self.records[rel] = {"size": size, "hash": digest}
        except Exception as exc:
            self.error = f"{rel}: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        """Wait until every queued tensor is written; a file left unfinished is an error."""
        self._queue.put(None)
        self._thread.join()
        if self._piece is not None:
            if self.error is None:
                self._sync_later(self._piece[0], self._piece[1].sync)
            else:
                self._piece[1].abort()
            self._piece = None
        for rel, done in self._syncs:  # every file is durable before this rank reports it
            try:
                done.result()
            except Exception as exc:
                self.error = self.error or f"{rel}: {type(exc).__name__}: {exc}"
        self._syncs = []
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        if self.error is None and any(self._left.values()):
            missing = sorted(rel for rel, n in self._left.items() if n)
            self.error = f"internal: files {missing[:3]} never received all their tensors"
        for w in self._open.values():
            w.abort()
        self._open.clear()

    def _key(self, rel: str) -> str:
        from .storage import safe_key

        return safe_key(self.objects[1], rel, "save plan")

    def discard(self) -> None:
        """Remove this rank's files of a save that failed: they would be deleted anyway, and on a full disk the space
        they free lets the error report through. (On object storage its unfinished uploads were aborted when the
        error happened; rank 0 removes the prefix, every rank's objects, once every rank has stopped.)"""
        for rel in self.attempted if self.objects is None else ():
            with contextlib.suppress(OSError):
                (self.staging / rel).unlink()
        self.records = {}
        self._holders = {}


class _ObjectFile:
    """The file a :class:`StreamingWriter` writes on object storage: its bytes go to a
    :class:`~.storage.ObjectWriter` (parallel multipart parts, bounded memory); closing completes the upload,
    :meth:`abort` aborts it (no part is left behind)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def write(self, data: Any) -> None:
        self.writer.write(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


def _inside_staging(staging: Path, rel: str) -> Path:
    """``staging/rel``, creating its folders one level at a time: never the staging directory itself, so a rank
    that is late to a save that rank 0 abandoned (and removed) fails instead of re-creating a stray directory."""
    folder = staging
    for part in Path(rel).parent.parts:
        folder = folder / part
        try:
            folder.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise CheckpointError(f"{staging}: the staging directory is gone (the save was abandoned)") from None
    if not staging.is_dir():
        raise CheckpointError(f"{staging}: the staging directory is gone (the save was abandoned)")
    return staging / rel


# ---------------------------------------------------------------------------------------------- a save in flight


class PendingSave:
    """A checkpoint being written. Training may go on (async saves) until :meth:`wait`, which raises on every rank
    if any rank failed (every rank learns the same outcome from rank 0)."""

    def __init__(self, name: str, final: Path, staging: Path) -> None:
        self.name, self.final, self.staging = name, final, staging
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.stats: dict[str, Any] = {}
        self.snapshot: _Snapshot | None = None
        """An async save's copies still running while training goes on (see :class:`_Snapshot`)."""

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> Path:
        if self.snapshot is not None:
            self.snapshot.fence()
        if self._thread is not None:
            self._thread.join()
        if self.error:
            raise CheckpointError(f"checkpoint {self.name} was not written (nothing was committed): {self.error}")
        return self.final


def save_checkpoint(adapter: Any, run_dir: str | os.PathLike[str], request: SaveRequest, **kwargs: Any) -> Path:
    """Write one checkpoint and commit it before returning (every rank calls this); see :func:`start_save`."""
    return start_save(adapter, run_dir, request, **kwargs).wait()


def start_save(
    adapter: EngineAdapter,
    run_dir: str | os.PathLike[str],
    request: SaveRequest,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    rank0_only: bool = False,
    fsync: bool = True,
    arena: HostArena | None = None,
    overlap: bool = False,
    after_commit: Callable[[Path], None] | None = None,
    dest: str | os.PathLike[str] | None = None,
    with_rng: bool = True,
    rng_states: dict[int, Any] | None = None,
    checksum: str = DEFAULT_CHECKSUM,
    claim: Callable[[Any], None] | None = None,
) -> PendingSave:
    """Start writing one checkpoint (every rank calls this with the same request) and return once the engine's
    state has been handed to the writer threads (see the module docstring).

    ``arena``: copy every tensor into this reused host buffer first (async saves: training may change the tensors
    as soon as this returns); with ``overlap`` the parameters, master weights and optimizer state are copied by a
    thread of their own while training goes on, and the next optimizer step waits for them (:class:`_Snapshot`).
    ``rank0_only``: rank 0 writes every file; the other ranks send it their slices (jobs without a shared
    filesystem). ``after_commit`` runs, on each rank given one, in the save's background thread once the checkpoint is committed
    and visible on every rank (it may run collectives on the commit group: every rank given one reaches it). ``dest`` writes
    the checkpoint at exactly that path (converters) and leaves ``latest`` alone. ``with_rng=False`` writes no RNG
    files; ``rng_states`` gives them (a converter copies the source's).

    ``run_dir`` (or ``dest``) may be an :class:`~.storage.ObjectURL` (object storage, no local copy): rank 0 runs
    ``claim(final)`` (claims the name) instead of making a staging directory, every rank streams its files straight
    to multipart uploads under the final prefix (no fsync), model files are written whole by their owners (no
    range-written files: the objects of one file cannot be written by several ranks at byte offsets), and rank 0
    writes the manifest last with ``If-None-Match: *`` (:func:`_commit_objects`) or removes the prefix.
    """
    from .storage import ObjectURL

    rank, procs = D.get_rank(), D.get_world_size()
    name = F.checkpoint_name(request.position, request.kinds)
    objects: Any = None
    if isinstance(run_dir, ObjectURL) or isinstance(dest, ObjectURL):
        from .storage import store_for

        final_url = dest if isinstance(dest, ObjectURL) else run_dir / F.CHECKPOINTS / name  # type: ignore[operator]
        objects = (store_for(final_url, save=True), final_url)  # this save's deadline and stall rule (storage.py)
        root = final = Path(".")  # unused on object storage (no staging directory, no rename)
    else:
        run_dir = Path(run_dir)
        root = F.checkpoints_dir(run_dir) if dest is None else Path(dest).parent
        final = root / name if dest is None else Path(dest)
    # 1. plan, after checking that the checkpoint can carry every optimizer state the engine holds now (state an
    # optimizer creates at its first step is not there when the manager is built); every rank learns of a failure
    problem: str | None = None
    items: list[Item] | None = None
    exchange = getattr(adapter, "exchange", None)  # pipeline stages: the union, fresh (collective, never raises)
    exchanged = exchange() if exchange is not None else None
    try:
        if exchanged:
            raise CheckpointError(exchanged)
        point("save-begin")
        check = getattr(adapter, "check_complete", None)  # a converter's source holds no live optimizer
        if check is not None:
            check()
        items = adapter.items()
        holders = getattr(adapter, "world", procs)
        # a running job's partitioned model tensors are written in place by their holders (a converter's source,
        # and write_mode rank0, write through one rank)
        ranged = getattr(adapter, "gathers", True) and not rank0_only and objects is None
        plan = plan_save(items, holders, max_shard_bytes, ranged=ranged)
    except Exception as exc:
        problem = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
    agree_on_items(items, problem, f"cannot save checkpoint {name}")  # and every rank planned from the same items
    t_plan = time.monotonic()

    # 2. rank 0 opens the staging directory and tells everyone its name
    staging_name: Any = None
    if rank == 0 and objects is not None:
        try:
            if claim is not None:
                claim(objects[1])
            else:  # a name is written once: a racing writer stops here, before any object is written
                from .objstore import _claim

                _claim(objects[0], objects[1], replace_unfinished=False)
            staging_name = "."
        except Exception as exc:
            staging_name = {"error": f"rank 0: {type(exc).__name__}: {exc}"}
    elif rank == 0:
        try:
            if final.exists() and (dest is None or any(final.iterdir())):
                raise CheckpointError(f"{final} already exists; a checkpoint is written once (give a new path)")
            if dest is not None and final.exists():
                final.rmdir()  # an empty folder given as the destination: the rename below takes its place
            root.mkdir(parents=True, exist_ok=True)
            staging_name = f"{F.STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            (root / staging_name / F.TRAIN_STATE / "rng").mkdir(parents=True)
            point("staging-created")
        except Exception as exc:
            if isinstance(staging_name, str):
                shutil.rmtree(root / staging_name, ignore_errors=True)
            staging_name = {"error": f"rank 0: {type(exc).__name__}: {exc}"}
    staging_name = coord.broadcast(staging_name)
    if isinstance(staging_name, dict):
        raise CheckpointError(f"cannot start checkpoint {name}: {staging_name['error']}")
    staging = root / staging_name
    result = PendingSave(name, final if objects is None else objects[1], staging)

    # 3. fetch: every rank hands what it writes to its writer thread
    writer_of = (lambda holder: 0) if rank0_only else (lambda holder: holder % procs)
    my_shards = [s for s in plan.model_shards if writer_of(s.owner) == rank]
    my_holders = [h for h in range(plan.world) if writer_of(h) == rank]
    my_files: list[StateFile] = [f for h in my_holders for f in plan.state_files(h)]
    my_ranges = _ranges_of(plan, my_holders)
    writer = _Writer(staging, fsync and objects is None, checksum, budget=max_shard_bytes, objects=objects)
    error: str | None = None
    if rank != 0 and objects is None:
        error = _wait_visible(staging)
    try:
        point("fetch-begin")
        for shard in my_shards:
            specs = [(i.name, i.dtype, i.shape) for i in shard.items]
            if shard.ranged:
                writer.expect_ranged(shard.relpath, specs, len(shard.items) - len(shard.ranged))
            else:
                writer.expect(shard.relpath, specs, {})
        for _, _, _, _, holder in my_ranges:
            writer.holder(holder)
        for f in my_files:
            starts = {item.key: start for item, start, _ in f.entries}
            described: dict[str, Any] = {"rank": f.holder, "starts": starts}
            boxes = {item.key: item.partition.box_of(f.holder) for item, _, _ in f.entries if item.partition.grid}
            if boxes:  # format 3: each grid part's box of its tensor, [offsets, lengths]
                described["boxes"] = {k: [list(b[0]), list(b[1])] for k, b in boxes.items() if b is not None}
            meta = {"wsd_pretrain": json.dumps(described, separators=(",", ":"))}
            writer.expect(f.relpath, [(item.key, item.dtype, (n,)) for item, _, n in f.entries], meta)
        if arena is not None:
            arena.begin(
                sum(s.owner_bytes for s in my_shards)
                + sum(f.nbytes for f in my_files)
                + sum(n * i.nbytes // max(i.numel, 1) for _, i, _, n, _ in my_ranges),
                pin=_on_gpu(adapter),
                count=sum(len(s.items) for s in my_shards) + sum(len(f.entries) for f in my_files) + len(my_ranges),
            )
    except Exception as exc:
        error = error or f"preparing the save: {type(exc).__name__}: {exc}"
        arena = None
    snapshot = None
    if arena is not None and overlap and not (rank0_only and procs > 1):
        snapshot = _Snapshot(torch.device(getattr(adapter, "device", "cpu")), arena.pinned)
    fetch = _Fetch(adapter, writer, arena, rank, procs, plan, error, snapshot)
    fetch.assemble(plan, set(my_holders))
    fetch.ranges(my_ranges)
    fetch.model(plan.model_shards, writer_of)
    fetch.state(my_files, plan, writer_of, rank0_only)
    if arena is not None:
        with contextlib.suppress(Exception):
            arena.end()
    if snapshot is not None and fetch.error is None:
        try:
            snapshot.start()
            result.snapshot = snapshot
        except Exception as exc:
            fetch._fail("starting the async snapshot", exc)
    rng: Any = None
    meta: dict[str, Any] = {}
    layout: dict[str, Any] = {}
    try:  # local work: a failure joins the fetch's error, so that the agreement below tells every rank
        rng = capture_rng() if with_rng else None
        if rank == 0:
            meta, layout = adapter.meta(), adapter.layout()
        point("fetch-end")
    except Exception as exc:
        fetch._fail("capturing the RNG state and the engine's metadata", exc)
    if rank0_only and procs > 1:
        gathered = D.gather_object(rng, dst=0, group=coord.groups().coord)
        rng_by_rank = dict(enumerate(gathered)) if gathered is not None else {}
    else:
        rng_by_rank = {rank: rng} if with_rng else {}
    if rng_states is not None:
        rng_by_rank = dict(rng_states)
    try:
        coord.agree(fetch.error, f"checkpoint {name}: fetching the state failed (nothing was committed)")
    except CheckpointError:
        if snapshot is not None:
            snapshot.cancel()
        writer.close()
        writer.discard()
        coord.agree(None, "abandoning the save")  # every rank has stopped writing before rank 0 removes the folder
        if rank == 0:
            _remove_save(staging, objects)
        raise
    result.stats = {"plan_s": t_plan, "fetched_s": time.monotonic(), "bytes": fetch.bytes, "sent": fetch.sent}

    def finish() -> None:
        from .commit import commit

        # local work; whatever fails here goes into this rank's report, so rank 0 (waiting for every report) learns
        # of it and every rank hears the outcome
        local_error = None
        try:
            for r, state in rng_by_rank.items():
                if state is not None:
                    writer.write_json(f"{F.TRAIN_STATE}/rng/rank-{int(r):05d}.json", state)
        except Exception as exc:
            local_error = f"writing the RNG state: {type(exc).__name__}: {exc}"
        writer.close()
        try:
            point("report")
        except Exception as exc:
            local_error = local_error or f"{type(exc).__name__}: {exc}"
        if writer.error or local_error:
            writer.discard()
        records = {rel: rec | {"rank": rank} for rel, rec in writer.records.items()}
        report = {"records": records, "ranges": writer.ranges, "error": writer.error or local_error}
        group = coord.groups().commit
        reports = D.gather_object(report, dst=0, group=group) if procs > 1 else [report]
        outcome: Any = None
        if rank == 0:
            assert reports is not None
            errors = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if rep["error"]]
            if errors:
                outcome = {"error": "; ".join(errors)}
                _remove_save(staging, objects)  # every rank has stopped: its uploads completed or aborted
            else:
                try:
                    files = {rel: rec for rep in reports for rel, rec in rep["records"].items()}
                    ranges = {h: rec for rep in reports for h, rec in rep["ranges"].items()}
                    args = (plan, files, meta, layout, adapter.tied, request, procs, rank0_only)
                    if objects is not None:
                        _commit_objects(objects, args, checksum, with_rng=with_rng, ranges=ranges)
                    else:
                        commit(
                            staging,
                            final,
                            root,
                            *args,
                            fsync,
                            checksum,
                            latest=dest is None,
                            with_rng=with_rng,
                            ranges=ranges,
                        )
                    outcome = {"ok": True}
                except Exception as exc:
                    outcome = {"error": f"rank 0 could not commit: {type(exc).__name__}: {exc}"}
                    _remove_save(staging, objects)
        outcome = D.broadcast_object(outcome, src=0, group=group) if procs > 1 else outcome
        if "error" in outcome:
            result.error = outcome["error"]
            return
        result.stats["committed_s"] = time.monotonic()
        if objects is not None:  # the manifest is the commit: no rename whose visibility to wait for
            if after_commit is not None:
                after_commit(objects[1])
            return
        seen = _wait_visible(final) if rank != 0 else None
        if procs > 1:
            coord_error = D.all_gather_object(seen, group=group)
            seen = "; ".join(f"rank {r}: {e}" for r, e in enumerate(coord_error) if e) or None
        if seen:
            result.error = f"committed, but not visible on every rank: {seen}"
            return
        if after_commit is not None:  # rank 0's retention; on object storage every rank's upload
            after_commit(final)

    def run() -> None:
        try:
            finish()
        except Exception as exc:  # a collective failed: every rank is told by its own failure
            result.error = result.error or f"{type(exc).__name__}: {exc}"

    result._thread = threading.Thread(target=run, name=f"wsd-ckpt-{name}", daemon=False)
    result._thread.start()
    return result


def _remove_save(staging: Path, objects: Any) -> None:
    """Rank 0, once every rank stopped writing: remove a failed save (its staging directory; on object storage every
    object under its prefix, its claim and any multipart upload left there)."""
    if objects is None:
        shutil.rmtree(staging, ignore_errors=True)
        return
    from .objstore import remove_unfinished

    objects[0].wind_down()  # best effort, one try per request: the store may be why the save failed
    try:
        remove_unfinished(objects[0], objects[1])
    except Exception as exc:  # the server is away: the next run removes the unfinished prefix
        log.warning("could not remove the failed save %s: %s", objects[1], exc)


def _commit_objects(objects: Any, args: tuple[Any, ...], checksum: str, **kwargs: Any) -> None:
    """Rank 0, every rank's objects written: the indexes, JSON state and manifest are made by the one POSIX
    :func:`.commit.commit` in a small local scratch folder, the JSON files uploaded (each checked against the
    manifest on the way), then ``manifest.hash``, then ``manifest.json`` with ``If-None-Match: *`` (the commit),
    then ``latest`` by compare-and-swap (:func:`.objstore.commit_upload`)."""
    import tempfile

    from . import objstore
    from .commit import commit

    store, ckpt = objects
    kind = ckpt.parent.name  # checkpoints/ or snapshots/
    with tempfile.TemporaryDirectory(prefix="wsd-commit-") as tmp:
        base = Path(tmp)
        staging, local = base / "staging", base / ckpt.name
        (staging / F.TRAIN_STATE / "rng").mkdir(parents=True)
        commit(staging, local, base, *args, False, checksum, latest=False, **kwargs)
        m = F.load_manifest(local)
        made = sorted(rel for rel in m["files"] if (local / rel).is_file())
        problems = objstore.upload_files(local, m, store, ckpt, made)
        if problems:
            raise CheckpointError("; ".join(problems))
        objstore.commit_upload(local, store, ckpt.parent.parent, ckpt, kind)


GATHER_WINDOW_BYTES = 512 * 1024**2
"""Received weights per writer in one window of the model's gathers (a larger weight makes a window of its own)."""

_P2P_READY = False


def _p2p_ready() -> None:
    """Once per process, before the first batch of point-to-point sends: one barrier on the training group. NCCL
    leaves a batch of sends and receives that is a group's first collective undefined unless every rank joins it,
    and a save may come before any training step (every rank of a save reaches this point)."""
    global _P2P_READY
    if not _P2P_READY:
        D.barrier()
        _P2P_READY = True


def _travels(item: Item, gathers: bool) -> bool:
    """Whether ``item`` crosses between ranks in a save: a partitioned weight of a running job (a replicated one is
    written by a rank that holds it whole; a converter's source holds every part)."""
    return gathers and not item.partition.replicated


def _windows(
    queues: dict[int, list[tuple[ModelShard, Item]]], gathers: bool
) -> list[list[tuple[int, ModelShard, Item]]]:
    """The same list of windows on every rank: each takes, from every writer's queue in turn, its next items up to
    :data:`GATHER_WINDOW_BYTES` of weights that travel (at least one item); items that do not travel (replicated,
    or a converter's) cost nothing."""
    pos = dict.fromkeys(queues, 0)
    out: list[list[tuple[int, ModelShard, Item]]] = []
    while any(pos[w] < len(q) for w, q in queues.items()):
        window: list[tuple[int, ModelShard, Item]] = []
        for w in sorted(queues):
            q, taken = queues[w], 0
            while pos[w] < len(q):
                shard, item = q[pos[w]]
                cost = item.nbytes if _travels(item, gathers) else 0
                if taken and taken + cost > GATHER_WINDOW_BYTES:
                    break
                window.append((w, shard, item))
                taken += cost
                pos[w] += 1
        out.append(window)
    return out


def _on_gpu(adapter: Any) -> bool:
    device = getattr(adapter, "device", torch.device("cpu"))
    return torch.device(device).type == "cuda"


class _Fetch:
    """The fetch phase of one rank: what it writes goes to its writer; what it holds for another rank's file goes
    there through a collective. A local error is remembered, and the rank keeps taking part in every collective
    (sending zeros) until the phase's agreement, so no rank waits forever."""

    def __init__(
        self,
        adapter: Any,
        writer: _Writer,
        arena: HostArena | None,
        rank: int,
        procs: int,
        plan: SavePlan,
        error: str | None,
        snapshot: _Snapshot | None = None,
    ) -> None:
        self.adapter, self.writer, self.arena, self.snapshot = adapter, writer, arena, snapshot
        self._buffers = set(getattr(adapter, "buffer_names", ()))
        self.rank, self.procs, self.plan = rank, procs, plan
        self.error = error
        self.bytes = 0  # bytes handed to the writer
        self.sent = 0  # bytes this rank sent through collectives
        self.assembled: dict[tuple[str, int], torch.Tensor] = {}  # moved ranges put together (assemble)

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{what}: {type(exc).__name__}: {exc}"

    def _hand(
        self,
        rel: str,
        key: str,
        tensor: torch.Tensor,
        made: bool,
        later: bool = False,
        at: tuple[int, int, int] | None = None,
    ) -> None:
        """Give one tensor to the writer; ``later``: the engine's own parameter or optimizer tensor, which an async
        save's snapshot may copy while training goes on (until the next optimizer step)."""
        if self.error is not None:
            return
        try:
            point(f"fetch:{key}")
            ready = None
            if self.arena is not None:
                if later and self.snapshot is not None:
                    view = self.arena.reserve(tensor)
                    ready = self.snapshot.add(view, tensor, key)
                    tensor = view
                else:
                    tensor, ready = self.arena.copy(tensor)
                made = False
            self.bytes += tensor.numel() * tensor.element_size()
            self.writer.submit(rel, key, tensor, tensor.numel() * tensor.element_size() if made else 0, ready, at)
        except Exception as exc:
            self._fail(f"{rel} {key}", exc)

    def model(self, shards: list[ModelShard], writer_of: Callable[[int], int]) -> None:
        """Hand this rank's model shards to its writer; send its parts of partitioned weights to their writers.

        The weights travel in windows that take from every writer's queue at once (each writer's own items in
        their file order, at most :data:`GATHER_WINDOW_BYTES` of received weights per writer and window), as one
        batch of point-to-point sends and receives on the training group: the writers receive in parallel, each
        from the ranks that hold parts of its weights, each part at its exact size (no padding, no all-gather).
        On NCCL a batch is one group call on the group's own communicator, not a communicator per pair of ranks."""
        gathers = getattr(self.adapter, "gathers", True)  # a running job (on one process too) vs a converter
        queues: dict[int, list[tuple[ModelShard, Item]]] = {}
        for shard in shards:
            queues.setdefault(writer_of(shard.owner), []).extend(
                (shard, item) for item in shard.items if item.name not in shard.ranged
            )
        windows = _windows(queues, gathers)
        if D.is_distributed() and any(_travels(item, gathers) for window in windows for _, _, item in window):
            _p2p_ready()
        for window in windows:
            received = self._exchange(window, gathers)
            for w, shard, item in window:
                if w != self.rank:
                    continue
                if not _travels(item, gathers):
                    try:
                        t = self._whole(item)
                    except Exception as exc:
                        self._fail(f"fetch {item.name}", exc)
                        continue
                    later = item.partition.replicated and item.name not in self._buffers
                    self._hand(shard.relpath, item.name, t, made=not item.partition.replicated, later=later)
                else:
                    self._hand(shard.relpath, item.name, received.pop(item.name).view(item.shape), made=True)

    def ranges(self, ranges: list[tuple[ModelShard, Item, int, int, int]]) -> None:
        """Hand this rank's ranges of the range-written model tensors to its writer, in the plan's order (each
        holder's ranges are hashed as one stream in that order): a partitioned tensor's local part as it is, a
        replicated one's chunk; nothing travels."""
        layout: dict[str, tuple[int, dict[str, int], int]] = {}
        for shard, item, start, n, holder in ranges:
            try:
                if shard.relpath not in layout:
                    layout[shard.relpath] = tensor_offsets([(i.name, i.dtype, i.shape) for i in shard.items])
                _, offsets, size = layout[shard.relpath]
                made = (item.name, start) in self.assembled
                t = self.assembled.pop((item.name, start)) if made else self.adapter.local(item).reshape(-1)
                if item.partition.replicated:
                    t = t[start : start + n]
                elif t.numel() != n:
                    raise CheckpointError(f"holds {t.numel()} elements, the plan says {n} from {start}")
                at = (offsets[item.name] + start * t.element_size(), size, holder)
            except Exception as exc:
                self._fail(f"fetch {item.name}", exc)
                continue
            later = not made and item.name not in self._buffers
            self._hand(shard.relpath, item.name, t, made=made, later=later, at=at)

    def assemble(self, plan: SavePlan, mine: set[int]) -> None:
        """Put together the ranges this rank writes of the moved range-written tensors (:attr:`SavePlan.moved`),
        from the holders' pieces: one batch of point-to-point sends and receives, each piece at its exact size (a
        dim-1 TP shard's row blocks from the column blocks of the TP group that holds those rows; a part moved for
        balance from its holder). Every rank takes part, with zeros where it failed, so no rank waits forever.
        ``mine``: the holders this rank writes for."""
        import torch.distributed as dist

        self.assembled = {}
        if not plan.moved:
            return
        device = D._comm_device(None) if D.is_distributed() else torch.device(getattr(self.adapter, "device", "cpu"))
        ops: list[Any] = []
        placed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination view, received piece) after the wait
        local: dict[str, torch.Tensor] = {}

        def held(item: Item, box: Box | None) -> torch.Tensor:
            if item.name not in local:
                try:
                    t = self.adapter.local(item)
                    if box is not None and tuple(t.shape) != tuple(box[1]):
                        raise CheckpointError(f"holds {list(t.shape)}, the plan says {list(box[1])}")
                    local[item.name] = t.detach().to(device)
                except Exception as exc:
                    self._fail(f"fetch {item.name}", exc)
                    local[item.name] = torch.zeros(box[1] if box else (0,), dtype=item.dtype, device=device)
            return local[item.name]

        for shard in plan.model_shards:
            for item in shard.items:
                kind = plan.moved.get(item.name)
                if kind is None:
                    continue
                writer = shard.ranged[item.name]
                for start, n, w, h, piece in assembly_pieces(item, writer, kind, plan.world):
                    if w not in mine and h not in mine:
                        continue
                    if w in mine and (item.name, start) not in self.assembled:
                        self.assembled[(item.name, start)] = torch.empty(n, dtype=item.dtype, device=device)
                    src_box = None if piece is None else piece[1]
                    if w in mine:
                        buf = self.assembled[(item.name, start)]
                        if piece is None:
                            view = buf
                        else:
                            inter, _, dst_box = piece
                            where = tuple(slice(o - d, o - d + k) for o, k, d in zip(inter[0], inter[1], dst_box[0]))
                            view = buf.view(dst_box[1])[where]
                    if w in mine and h in mine:
                        view.copy_(_piece(held(item, src_box), piece))
                    elif h in mine:
                        t = _piece(held(item, src_box), piece).contiguous()
                        if piece is None and t.numel() != n:
                            self._fail(f"fetch {item.name}", CheckpointError(f"holds {t.numel()}, the plan says {n}"))
                            t = torch.zeros(n, dtype=item.dtype, device=device)
                        ops.append(dist.P2POp(dist.isend, t, w % self.procs))
                        self.sent += t.numel() * t.element_size()
                    else:
                        tmp = view if piece is None else torch.empty(view.shape, dtype=item.dtype, device=device)
                        ops.append(dist.P2POp(dist.irecv, tmp, h % self.procs))
                        if piece is not None:
                            placed.append((view, tmp))
        if ops:
            _p2p_ready()
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for view, tmp in placed:
            view.copy_(tmp)

    def _whole(self, item: Item) -> torch.Tensor:
        if item.partition.replicated:
            return self.adapter.local(item)
        return self.adapter.full(item)  # a converter's source holds every part

    def _exchange(self, window: list[tuple[int, ModelShard, Item]], gathers: bool) -> dict[str, torch.Tensor]:
        """One window's sends and receives; returns the weights this rank writes, assembled (flat)."""
        import torch.distributed as dist

        ops: list[Any] = []
        received: dict[str, torch.Tensor] = {}
        travel = [(dst, item) for dst, _, item in window if _travels(item, gathers)]
        if not travel:
            return received
        device = D._comm_device(None) if D.is_distributed() else torch.device(self.adapter.device)
        boxed: list[tuple[torch.Tensor, tuple[slice, ...], torch.Tensor]] = []  # grid parts placed after the wait
        for dst, item in travel:
            parts = list(item.partition.iter_parts(item.numel, self.plan.world))
            if self.rank == dst:
                out = torch.empty(item.numel, dtype=item.dtype, device=device)
                for offsets, lengths, start, n, holder in item.partition.iter_boxes(item.shape):
                    # a flat part goes straight into place; a grid part (a box) arrives whole, then is placed
                    where = tuple(slice(o, o + k) for o, k in zip(offsets, lengths))
                    flat = item.partition.grid is None
                    buf = out[start : start + n] if flat else torch.empty(n, dtype=item.dtype, device=device)
                    if holder == dst:
                        try:
                            buf.copy_(self.adapter.local(item).reshape(-1).to(device))
                        except Exception as exc:
                            self._fail(f"fetch {item.name}", exc)
                    else:
                        ops.append(dist.P2POp(dist.irecv, buf, holder))
                    if not flat:
                        boxed.append((out.view(item.shape), where, buf.view(lengths)))
                received[item.name] = out
                continue
            mine = [part for part in parts if part[2] == self.rank]
            if not mine:
                continue
            _, n, _ = mine[0]
            try:
                local = self.adapter.local(item).reshape(-1)
                if local.numel() != n:
                    raise CheckpointError(f"holds {local.numel()} elements, the plan says {n}")
            except Exception as exc:  # keep taking part: the receiver is waiting for these bytes
                self._fail(f"fetch {item.name}", exc)
                local = torch.zeros(n, dtype=item.dtype)
            ops.append(dist.P2POp(dist.isend, local.to(device).contiguous(), dst))
            self.sent += n * local.element_size()
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for full, where, part in boxed:
            full[where] = part
        return received

    def state(self, files: list[StateFile], plan: SavePlan, writer_of: Callable[[int], int], rank0_only: bool) -> None:
        if rank0_only and self.procs > 1:
            self._state_to_rank0(plan)
            return
        for f in files:
            for item, start, n in f.entries:
                try:
                    live = getattr(self.adapter, "gathers", True)  # a running job; a converter holds every part
                    t = self.adapter.local(item) if live else self.adapter.part(item, f.holder)
                    t = t.reshape(-1)
                    if t.numel() != n:
                        raise CheckpointError(f"holds {t.numel()} elements, the plan says {n} from {start}")
                except Exception as exc:
                    self._fail(f"fetch {item.key}", exc)
                    continue
                self._hand(f.relpath, item.key, t, made=False, later=live)

    def _state_to_rank0(self, plan: SavePlan) -> None:
        """``write_mode: rank0``: each rank sends its slices to rank 0 (gloo, CPU tensors: works under NCCL too),
        holder by holder in rank order."""
        import torch.distributed as dist

        group = coord.groups().coord
        for holder in range(plan.world):
            if self.rank not in (0, holder):
                continue
            for f in plan.state_files(holder):
                for item, _, n in f.entries:
                    t: torch.Tensor | None = None
                    if self.rank == holder:
                        try:
                            t = self.adapter.local(item).reshape(-1).detach().to("cpu")
                            if t.numel() != n:
                                raise CheckpointError(f"holds {t.numel()} elements, the plan says {n}")
                        except Exception as exc:
                            self._fail(f"fetch {item.key}", exc)
                            t = torch.zeros(n, dtype=item.dtype)
                    if holder == 0:
                        self._hand(f.relpath, item.key, t, made=False)
                    elif self.rank == holder:
                        dist.send(t.contiguous(), dst=0, group=group)
                        self.sent += t.numel() * t.element_size()
                    else:
                        buf = torch.empty(n, dtype=item.dtype)
                        dist.recv(buf, src=holder, group=group)
                        self._hand(f.relpath, item.key, buf, made=True)


def _piece(t: torch.Tensor, piece: Any) -> torch.Tensor:
    """A holder's piece of a moved tensor: its whole part (flat), or the common box of its box and a writer's."""
    if piece is None:
        return t.reshape(-1)
    inter, src_box, _ = piece
    return t.view(src_box[1])[tuple(slice(o - s, o - s + k) for o, k, s in zip(inter[0], inter[1], src_box[0]))]


def _ranges_of(plan: SavePlan, holders: list[int]) -> list[tuple[ModelShard, Item, int, int, int]]:
    """``(shard, item, start, numel, holder)`` for every range of a range-written model tensor that ``holders``
    hold, in the plan's order (shard by shard, tensor by tensor, holder by holder)."""
    out = []
    for shard in plan.model_shards:
        for item in shard.items:
            part = shard.ranged.get(item.name)
            if part is None:
                continue
            for holder in holders:
                local = part.local(holder, item.numel)
                if local is not None and local[1] > 0:
                    out.append((shard, item, local[0], local[1], holder))
    return out


def _wait_visible(path: Path, timeout: float = 120.0) -> str | None:
    """None once ``path`` exists here (a shared filesystem may show another node's rename late), else an error."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return f"{path} is not visible on this rank after {timeout:.0f}s"
        time.sleep(0.05)
    return None
