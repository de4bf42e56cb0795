"""The manager on object storage: a run directory ``s3://bucket/prefix`` with a local staging tier
(docs/manager.md, "Object storage").

Every save is written and committed by the POSIX protocol into the local staging run
(``checkpoint.staging_dir``: node-local or shared disk, at disk speed), then rank 0 uploads it in the background
with the object-storage commit while training goes on: rank 0 claims the name, **each rank uploads the files it
wrote** (:func:`.objstore.upload_files`: parallel multipart parts, checksums on the way), reports to rank 0 with
one gather on the checkpoint's commit group, and rank 0 writes the manifest last with ``If-None-Match: *`` and
``latest`` by compare-and-swap, or removes every rank's objects and multipart uploads if any rank failed. The next ``save()``, ``wait()``, ``resume()`` or ``close()``
waits for the upload, and every rank raises if it failed (or logs it, with ``on_save_error: continue``). The
staging tier keeps the newest ``staging_keep`` checkpoints locally; retention on the bucket applies the same rule
as on disk, deleting each manifest first. A resume lists the bucket (a checkpoint is there when its manifest is),
and every rank downloads its share of the one to load (the files the manifest gives it, as for the uploads) into
a staging folder of the staging run, every object verified on the way; rank 0 commits the local copy once every
rank agreed, unless the staging run has it already.

The run is held by :class:`Lease`, an object beside the checkpoints created conditionally, renewed by a
heartbeat and taken over only once it has expired (``If-Match`` on the stale lease), with the messages of the
POSIX run lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import format as F
from . import objstore
from .storage import ObjectURL, PreconditionFailed, store_for

__all__ = ["LEASE_NAME", "Lease", "RemoteTier"]

log = logging.getLogger(__name__)

LEASE_NAME = ".wsd_pretrain.lease"
LEASE_TTL_S = 120.0
"""A lease not renewed for this long (measured on the server's clock: its Date minus the lease's Last-Modified) is
stale: another run may take it over (the heartbeat renews it every third)."""


class Lease:
    """The run lock on object storage: ``<run>/.wsd_pretrain.lease`` (JSON: holder, since, expires)."""

    def __init__(self, run: ObjectURL, ttl: float | None = None) -> None:
        self.run, self.ttl = run, LEASE_TTL_S if ttl is None else ttl
        self.store = store_for(run)
        self.key = (run / LEASE_NAME).key
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.nonce = uuid.uuid4().hex
        self.lost: str | None = None
        self._etag: str | None = None
        self._renewed = time.monotonic()  # when the last write of the lease that succeeded was sent
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="wsd-ckpt-lease", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps(
            {"holder": self.holder, "since": self.since, "expires": time.time() + self.ttl, "nonce": self.nonce}
        ).encode()

    def _acquire(self) -> None:
        self._renewed = time.monotonic()
        try:
            self._etag = self.store.put(self.key, self._body(), if_none_match=True)
            return
        except PreconditionFailed:
            pass
        # stale or not is decided on the server's clock alone: the time since the lease object was last written
        # (created or renewed), as the server's Date minus its Last-Modified. The holder's recorded expiry is
        # only shown: hosts' clocks may disagree by more than the TTL (docs/decisions.md)
        raw, etag, age = self.store.get_aged(self.key, max_bytes=4096)
        try:
            record = json.loads(raw)
            holder = f"{record['holder']}, since {record['since']}"
        except (ValueError, KeyError, TypeError):
            holder = "unreadable lease"
        if age < self.ttl:
            raise CheckpointError(
                f"{self.run} is in use by another run ({holder}; lease {self.store.url(self.key)}, renewed "
                f"{max(age, 0):.0f} s ago); give this run its own --run-dir, or stop the other one (a lease not "
                f"renewed for {self.ttl:.0f} s is taken over)"
            )
        try:  # stale: take it over, only if nobody renewed or took it since we read it
            self._renewed = time.monotonic()
            self._etag = self.store.put(self.key, self._body(), if_match=etag)
        except PreconditionFailed:
            raise CheckpointError(f"{self.run}: could not take the run lease (another run took it first)") from None
        log.warning("%s: took over the run lease of %s, not renewed for %.0f s", self.run, holder, age)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._mutex:
                if self._etag is None:
                    return
                try:
                    self._renew()
                except CheckpointError as exc:  # the server is away (each try bounded): again at the next beat
                    log.warning("%s: could not renew the run lease: %s", self.run, exc)
                if self.lost:
                    return

    def _renew(self) -> None:
        """One renewal (``If-Match`` on the lease's own ETag), under the mutex; a lost condition marks the lease
        lost (taken over by another run); other errors are raised."""
        sent = time.monotonic()
        try:
            self._etag = self.store.put(self.key, self._body(), if_match=self._etag)
            self._renewed = sent
        except PreconditionFailed:
            self.lost = f"{self.run}: the run lease was taken over by another run"
            log.error("%s; this run must stop writing", self.lost)

    def check(self) -> None:
        """Before a save claims a name: raise if the lease is lost, or may be. The heartbeat renews every TTL/3;
        when its last success is older than TTL/2 (the store did not answer it: each try is bounded, so a hung
        store never holds the heartbeat long), the lease is renewed here first: a 412 means another run took it
        over (lost), a store still not answering fails the save with that error; the lease is never assumed."""
        with self._mutex:
            if self.lost is None and self._etag is not None and time.monotonic() - self._renewed > self.ttl / 2:
                since = time.monotonic() - self._renewed
                try:
                    self._renew()
                except CheckpointError as exc:
                    raise CheckpointError(
                        f"{self.run}: the run lease could not be renewed for {since:.0f} s (another run may take "
                        f"it over after {self.ttl:.0f} s), so no save starts: {exc}"
                    ) from None
            if self.lost:
                raise CheckpointError(self.lost)

    @property
    def held(self) -> bool:
        return self._etag is not None and self.lost is None

    def release(self) -> None:
        self._stop.set()
        with self._mutex:
            etag, self._etag = self._etag, None
        if etag is None or self.lost:
            return
        try:
            raw, now = self.store.get(self.key, max_bytes=4096)
            if now == etag and json.loads(raw).get("nonce") == self.nonce:
                self.store.delete([self.key])
        except (CheckpointError, FileNotFoundError, ValueError) as exc:
            log.warning("%s: could not release the run lease (it expires by itself): %s", self.run, exc)


class RemoteTier:
    """A run on object storage: every rank uploads its own files; rank 0 claims, commits, applies retention on the
    bucket, lists and downloads."""

    def __init__(self, url: ObjectURL, staging: Path, keep_local: int, direct: bool = False) -> None:
        self.url, self.staging, self.keep_local = url, staging, keep_local
        self.direct = direct  # saves stream to the bucket; ``staging`` only caches checkpoints a resume fetched
        self.lease: Lease | None = None
        self.error: str | None = None  # the last background upload's failure, told to every rank at the next wait

    def start(self) -> None:
        """Rank 0, once the local run lock is held: take the lease, remove unfinished saves (objects without a
        manifest and their multipart uploads) left by an interrupted run, upload local checkpoints an interrupted
        run committed locally but never uploaded."""
        self.lease = Lease(self.url)
        for root, snapshots in ((F.CHECKPOINTS, False), (F.SNAPSHOTS, True)):
            for info in objstore.list_run(self.url, snapshots=snapshots):
                if info.state == "unfinished":
                    log.info("removing %s, an unfinished save of an interrupted run", info.path)
                    objstore.remove_unfinished(store_for(self.url), info.path)  # type: ignore[arg-type]
            local = F.list_snapshots(self.staging) if snapshots else F.list_checkpoints(self.staging)
            remote = [i for i in objstore.list_run(self.url, snapshots=snapshots) if i.state == "complete"]
            newest = remote[-1].position if remote else -1
            for info in local if not self.direct else ():  # never one that retention removed on the bucket
                if info.state == "complete" and (info.position or 0) > newest:
                    log.info("uploading %s, committed locally by an interrupted run", info.name)
                    objstore.upload(info.path, self.url, root=root)
        store_for(self.url).abort_uploads(self.url.prefix)

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def claim(self, newest: Path, snapshots: bool) -> None:
        """Rank 0, after a local commit and before any rank uploads: claim the checkpoint's name on the bucket
        (removing an unfinished save of the same name; the lease says no other run writes here). A snapshot
        written again after a resume went back past it replaces the committed one."""
        self.claim_prefix(self.url / (F.SNAPSHOTS if snapshots else F.CHECKPOINTS) / newest.name)

    def claim_prefix(self, ckpt: ObjectURL) -> None:
        """Rank 0: claim ``ckpt`` (a checkpoint or snapshot prefix of this run) before any rank writes under it."""
        if self.lease is not None:
            self.lease.check()  # lost, or unrenewed for long: renewed now or the save stops here
        store = store_for(self.url)
        if ckpt.parent.name == F.SNAPSHOTS and store.head((ckpt / F.MANIFEST).key) is not None:
            objstore.delete_checkpoint(ckpt)
        objstore._claim(store, ckpt, replace_unfinished=True)

    def upload_rank(
        self, newest: Path, snapshots: bool, keep: int, keep_milestones: bool, rank: int, world: int, group: Any
    ) -> str | None:
        """Every rank, in its background thread, after rank 0's claim: upload the files this rank wrote (the
        manifest's ``rank``), then report to rank 0 with one gather on the commit group (the POSIX save's
        agreement). Rank 0 commits (``manifest.json`` last, conditional) only when every rank uploaded, else it
        removes every object and multipart upload under the prefix; the outcome is broadcast back. Returns it
        (None: committed)."""
        from .. import distributed as D

        root = F.SNAPSHOTS if snapshots else F.CHECKPOINTS
        store = store_for(self.url, save=True)  # this upload's deadline and stall rule (storage.py)
        ckpt = self.url / root / newest.name
        error: str | None = None
        try:
            m = F.load_manifest(newest)
            mine = sorted(rel for rel, rec in m["files"].items() if int(rec.get("rank", 0)) % world == rank)
            problems = objstore.upload_files(newest, m, store, ckpt, mine)
            error = "; ".join(problems) or None
        except Exception as exc:  # reported: rank 0 hears of it and every rank raises at the next wait
            error = f"{type(exc).__name__}: {exc}"
        try:
            errors = D.gather_object(error, dst=0, group=group) if world > 1 else [error]
        except Exception:  # a rank died mid-upload (the gather timed out or lost it): nothing is committed
            if rank == 0:
                store.wind_down()
                try:
                    objstore.remove_unfinished(store, ckpt)  # every rank's objects and multipart uploads
                except CheckpointError:
                    pass  # the server is away: the next run removes the unfinished prefix
            raise
        outcome: str | None = None
        if rank == 0:
            assert errors is not None
            failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
            try:
                if failed:
                    outcome = "; ".join(failed)
                    store.wind_down()  # best effort, one try per request: the store may be why it failed
                    objstore.remove_unfinished(store, ckpt)  # every rank's objects and multipart uploads
                else:
                    objstore.commit_upload(newest, store, self.url, ckpt, root)
            except Exception as exc:
                outcome = outcome or f"rank 0 could not commit: {type(exc).__name__}: {exc}"
                store.wind_down()
                try:
                    objstore.remove_unfinished(store, ckpt)
                except CheckpointError:
                    pass  # committed after all (the manifest decides), or the server is away: the next run cleans
        if world > 1:
            outcome = D.broadcast_object(outcome, src=0, group=group)
        if outcome is not None or rank != 0:
            return outcome
        self.retain(newest.name, snapshots, keep, keep_milestones)
        return None

    def retain(self, newest: str, snapshots: bool, keep: int, keep_milestones: bool) -> None:
        """Rank 0, after a commit on the bucket: retention there (each manifest deleted first), then the newest
        ``keep_local`` kept in the staging run."""
        from .retention import checkpoints_to_delete

        complete = [i for i in objstore.list_run(self.url, snapshots=snapshots) if i.state == "complete"]
        for info in checkpoints_to_delete(
            complete, keep_last=keep, keep_milestones=keep_milestones, just_written=newest
        ):
            objstore.delete_checkpoint(info.path)  # type: ignore[arg-type]
            log.info("retention: removed %s", info.path)
        local = F.list_snapshots(self.staging) if snapshots else F.list_checkpoints(self.staging)
        local = [i for i in local if i.state == "complete" and i.name != newest]
        for info in local[: max(0, len(local) - (self.keep_local - 1))]:
            trash = info.path.parent / f".deleting-{info.name}"
            os.rename(info.path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def listing(self) -> list[dict[str, Any]]:
        """The bucket's committed checkpoints (complete and corrupt), oldest first, as the manager's listing, each
        with its path in the staging run."""
        return F.resume_candidates(objstore.list_run(self.url), under=F.checkpoints_dir(self.staging))

    def open_remote(self, name: str, *, in_place: bool) -> dict[str, Any] | None:
        """Rank 0, before a resume loads ``name``: None when the staging run has it; ``{"manifest"}`` (the bucket's,
        validated) when every rank reads it in place by ranged GETs (``in_place``); else ``{"staging"}``: a
        staging folder for :meth:`fetch_rank` and :meth:`end_fetch` (``write_mode: rank0``)."""
        if (F.checkpoints_dir(self.staging) / name / F.MANIFEST).is_file():
            return None
        if in_place:
            return {"manifest": objstore.load_manifest(store_for(self.url), self.url / F.CHECKPOINTS / name)[0]}
        staging = self.begin_fetch(name)
        return None if staging is None else {"staging": str(staging)}

    def begin_fetch(self, name: str) -> Path | None:
        """Rank 0, before a resume loads ``name``: None when the staging run has it; else a new staging folder
        beside it holding the bucket's manifest (validated), into which every rank fetches its share."""
        local = F.checkpoints_dir(self.staging) / name
        if (local / F.MANIFEST).is_file():
            return None
        store = store_for(self.url)
        _, raw, raw_hash = objstore.load_manifest(store, self.url / F.CHECKPOINTS / name)
        local.parent.mkdir(parents=True, exist_ok=True)
        staging = local.parent / f"{F.STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        (staging / F.MANIFEST).write_bytes(raw)
        (staging / F.MANIFEST_HASH).write_bytes(raw_hash)
        return staging

    def fetch_rank(self, name: str, staging: Path, rank: int, world: int) -> list[str]:
        """Every rank: download the objects of ``name`` this rank's share holds (the manifest's ``rank`` modulo the
        world: the same split as the uploads), verified on the way. Returns the problems."""
        m = F.load_manifest(staging)
        mine = sorted(rel for rel, rec in m["files"].items() if int(rec.get("rank", 0)) % world == rank)
        return objstore.fetch_files(store_for(self.url), self.url / F.CHECKPOINTS / name, m, staging, mine)

    def end_fetch(self, name: str, staging: Path) -> None:
        """Rank 0, once every rank fetched its share: the range-written files' holder checksums, then the local
        commit (fsync, rename, ``latest``)."""
        problems = objstore._check_ranged(staging, F.load_manifest(staging))
        if problems:
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(f"{self.url / F.CHECKPOINTS / name}: damaged objects: " + "; ".join(problems))
        objstore.commit_local(staging, F.checkpoints_dir(self.staging) / name, self.staging)
