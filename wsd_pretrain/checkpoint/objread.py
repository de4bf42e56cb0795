"""A resume read straight from object storage: each rank fetches exactly the byte ranges its restore needs with
ranged GETs, several in flight (docs/checkpoint-format.md, "Object storage", "Reading in place").

:class:`RemoteCheckpoint` is one committed checkpoint on the bucket (its manifest already validated by rank 0 and
broadcast). :class:`RemoteStore` is :class:`.store.CheckpointStore` over it: the same box intersection decides
which byte ranges of which files a rank needs; each safetensors header is read with one speculative ranged GET
of :data:`HEADER_GUESS` bytes (a second only for a longer header), the headers a step needs fetched together
(:meth:`RemoteCheckpoint.headers`: every model shard's when the store opens, every state file's a recording pass
meets); the index and JSON files are fetched whole and checked against their manifest checksum.

The read runs in two passes (:func:`.load.load_checkpoint`): a **recording** pass walks the restore's reads and
records ``(file, offset, bytes)`` without fetching anything; :meth:`RemoteCheckpoint.prefetch` then merges the
ranges of each file (adjacent and overlapping ones coalesced into one), adds **this rank's verification share**
(the files rank ``r mod world`` wrote, whole: the split of the local verification), and fetches them with
ranged GETs of :data:`PIECE` to :data:`PIECE_MAX` bytes, :data:`THREADS` in flight, into one buffer per merged
range. Each share file's checksum is computed over its fetched bytes; only then (after one agreement over every
rank) does anything get restored, from those buffers.

The guarantee is the local resume's (docs/checkpoint-format.md, "How a checkpoint is read"): every file is
verified whole by the rank whose share it is before any rank restores; a rank that reads part of a file outside
its share relies on that rank's check of the same object (its own bytes are fetched once, not hashed again).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from . import format as F
from .safetensors_io import MAX_HEADER_BYTES, SafetensorsHeader, SafetensorsReader, new_hasher, parse_header
from .storage import ObjectURL, safe_key, store_for
from .store import CheckpointStore

__all__ = ["HeaderPending", "RemoteCheckpoint", "RemoteStore"]

HEADER_GUESS = 64 * 1024
"""The first ranged GET of a safetensors file asks for this many bytes: the header of any file of ours fits."""
PIECE = 8 * 1024 * 1024
"""The smallest piece a merged range is cut into for its ranged GETs (and the size of the GETs that read past the
prefetch budget)."""
PIECE_MAX = 64 * 1024 * 1024
"""The largest: a rank fetching much cuts it into about ``2 x THREADS`` pieces up to this size (fewer requests,
each paying its first-byte latency once), a rank fetching little into :data:`PIECE`-sized ones (all in flight)."""
THREADS = 8
"""Ranged GETs in flight at once per rank."""


class HeaderPending(Exception):
    """A safetensors header not fetched yet, met while :meth:`RemoteStore.record` discovers which headers the
    restore needs (each want that meets one is skipped in that pass; the headers are then fetched together)."""


class RemoteCheckpoint:
    """A committed checkpoint on object storage, read in place by ranged GETs (``manifest``: validated)."""

    def __init__(self, url: ObjectURL, manifest: dict[str, Any], *, verify: str = "checksum") -> None:
        self.url, self.manifest, self.verify = url, manifest, verify
        self.store = store_for(url)
        self.recording: list[tuple[str, int, int]] | None = None
        """While set: the reads a rank's restore makes, recorded instead of fetched (the planning pass)."""
        self.bytes_fetched = 0
        self.gets = 0
        self.rank, self.world = 0, 1  # set by the load: whose share this rank verifies
        self._headers: dict[str, SafetensorsHeader] = {}
        self._heads: dict[str, bytearray] = {}  # each file's first bytes, fetched with its header: served from
        self._lock = threading.Lock()
        self.pending: set[str] | None = None
        """While set: the files whose headers a discovery pass met before they were fetched (:meth:`header` raises
        :class:`HeaderPending` instead of fetching one by one)."""

    def _rec(self, rel: str) -> dict[str, Any]:
        rec = self.manifest["files"].get(rel)
        if rec is None:
            raise CheckpointError(f"{self.url}: {rel} is not listed in the manifest")
        return rec

    def get_range(self, rel: str, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` of the object ``rel``: one ranged GET; a short answer is an error."""
        data = self.store.get_range(safe_key(self.url, rel, "manifest"), start, length)
        with self._lock:
            self.bytes_fetched += len(data)
            self.gets += 1
        if len(data) != length:
            raise CheckpointError(
                f"{self.url / rel}: {len(data)} bytes at {start}, {length} expected (the object is shorter than its "
                "manifest says)"
            )
        return data

    def json(self, rel: str, what: str) -> Any:
        """A JSON file of the checkpoint, fetched whole and checked against its manifest size and checksum."""
        rec = self._rec(rel)
        try:
            raw, _ = self.store.get(safe_key(self.url, rel, what), max_bytes=256 * 1024 * 1024)
        except FileNotFoundError:
            raise CheckpointError(f"{self.url / rel}: missing ({what})") from None
        with self._lock:
            self.bytes_fetched += len(raw)
            self.gets += 1
        if self.verify != "none" and len(raw) != rec["size"]:
            raise CheckpointError(f"{self.url / rel}: {len(raw)} bytes, the manifest says {rec['size']}")
        if self.verify == "checksum":
            digest = new_hasher(self.manifest["checksum"])
            digest.update(raw)
            if digest.hexdigest() != rec["hash"]:
                raise CheckpointError(f"{self.url / rel}: its checksum does not match the manifest's")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.url / rel}: not JSON ({exc})") from None

    def header(self, rel: str) -> SafetensorsHeader:
        """A safetensors file's checked header: one speculative ranged GET, a second only for a longer header."""
        header = self._headers.get(rel)
        if header is not None:
            return header
        if self.pending is not None:
            self.pending.add(rel)
            raise HeaderPending(rel)
        size = int(self._rec(rel)["size"])
        where = self.url / rel
        if size < 8:
            raise CheckpointError(f"{where}: not a valid safetensors file: {size} bytes")
        head = self.get_range(rel, 0, min(size, HEADER_GUESS))
        n = int.from_bytes(head[:8], "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{where}: not a valid safetensors file: header claims {n} bytes of {size}")
        if 8 + n > len(head):
            head += self.get_range(rel, len(head), 8 + n - len(head))
        header = self._headers[rel] = parse_header(where, head[8 : 8 + n], size)
        self._heads[rel] = bytearray(head)  # writable: the restore may view it as a tensor
        return header

    def headers(self, rels: list[str]) -> None:
        """Fetch the headers of ``rels`` not fetched yet together, :data:`THREADS` in flight: one round trip of
        latency for all instead of one per file (a rank reads the headers of every model shard to describe the
        checkpoint, and of every state file it restores from)."""
        todo = [rel for rel in dict.fromkeys(rels) if rel not in self._headers]
        if len(todo) <= 1:
            for rel in todo:
                self.header(rel)
            return
        with ThreadPoolExecutor(min(THREADS, len(todo)), thread_name_prefix="wsd-ranged-get") as pool:
            list(pool.map(self.header, todo))

    def share(self, rank: int, world: int) -> list[tuple[str, list[tuple[str, int, int]], str, int | None]]:
        """The checksummed units this rank verifies, the local split (:func:`.load._verify_problems`): the files
        rank ``r mod world`` wrote (of a range-written file, its owner's bytes: header and own tensors) and the
        ranges holder ``h mod world`` wrote. Each: ``(what, [(file, offset, bytes)], checksum, bytes or None)``."""
        units: list[tuple[str, list[tuple[str, int, int]], str, int | None]] = []
        ranges = self.manifest.get("ranges") or {}
        for i, (rel, rec) in enumerate(sorted(self.manifest["files"].items())):
            if not rel.endswith(".safetensors") or int(rec.get("rank", i)) % world != rank:
                continue
            if rec.get("ranged"):
                pieces = F.owner_pieces(self.header(rel), ranges.get("tensors", {}))
                units.append((f"{rel} (its owner's bytes)", [(rel, o, n) for o, n in pieces], rec["hash"], None))
            else:
                units.append((rel, [(rel, 0, int(rec["size"]))], rec["hash"], int(rec["size"])))
        mine = [int(h) for h in ranges.get("holders", {}) if int(h) % world == rank]
        if mine:
            pieces = F.holder_pieces(self.url, self.manifest, mine, header_of=self.header)
            for h in mine:
                rec = ranges["holders"][str(h)]
                units.append((f"the ranges rank {h} wrote", pieces[h], rec["hash"], int(rec["bytes"])))
        return units

    def prefetch(
        self, needs: list[tuple[str, int, int]], units: list[Any], budget: int
    ) -> tuple[dict[str, list[tuple[int, Any]]], list[str]]:
        """Fetch the ranges ``needs`` (``(file, offset, bytes)``) and the checksummed ``units`` (:meth:`share`),
        every file's ranges merged (adjacent and overlapping ones coalesced into one), with ranged GETs of
        :data:`PIECE` to :data:`PIECE_MAX` bytes (about ``2 x THREADS`` of them when the rank fetches much),
        :data:`THREADS` in flight; then check each unit's checksum over its bytes. Returns
        the fetched ranges ``{file: [(offset, bytes)]}`` for the restore (up to ``budget`` bytes; past it, the rest
        is fetched when read, and a unit beyond it is hashed as it streams) and the problems found."""
        if self.verify != "checksum":
            units = []
        spans: dict[str, list[tuple[int, int]]] = {}
        for rel, off, n in needs + [p for u in units for p in u[1]]:
            if n > 0:
                spans.setdefault(rel, []).append((off, off + n))
        merged: list[tuple[str, int, int]] = []
        for rel, ss in sorted(spans.items()):
            ss.sort()
            lo, hi = ss[0]
            for a, b in ss[1:]:
                if a <= hi:  # adjacent or overlapping: one range, one buffer
                    hi = max(hi, b)
                else:
                    merged.append((rel, lo, hi))
                    lo, hi = a, b
            merged.append((rel, lo, hi))
        problems: list[str] = []
        if self.verify == "size":  # sizes only: one HEAD per file of this rank's share
            for rel, rec in sorted(self.manifest["files"].items()):
                if rel.endswith(".safetensors") and int(rec.get("rank", 0)) % max(1, self.world) == self.rank:
                    head = self.store.head(safe_key(self.url, rel, "manifest"))
                    if head is None or head["size"] != rec["size"]:
                        got = "missing" if head is None else f"{head['size']} bytes"
                        problems.append(f"{rel}: {got}, the manifest says {rec['size']} bytes")
        kept: dict[str, list[tuple[int, Any]]] = {}
        total, fetch = 0, []
        for rel, lo, hi in merged:
            head = self._heads.get(rel, b"")
            if hi <= len(head):  # within the bytes fetched with the header: no request
                kept.setdefault(rel, []).append((lo, memoryview(head)[lo:hi]))
                continue
            if total + (hi - lo) > budget:
                continue  # read when needed (and a unit in it hashed as it streams)
            total += hi - lo
            buf = memoryview(torch.empty(hi - lo, dtype=torch.uint8).numpy())
            kept.setdefault(rel, []).append((lo, buf))
            have = max(0, len(head) - lo)  # a range starting inside the header's bytes: those are not asked again
            buf[:have] = head[lo : lo + have]
            fetch.append((rel, lo, buf, have))
        piece = min(PIECE_MAX, max(PIECE, -(-total // (2 * THREADS * PIECE)) * PIECE))
        jobs = [(rel, lo + a, buf[a : a + piece]) for rel, lo, buf, have in fetch for a in range(have, len(buf), piece)]

        def one(job: tuple[str, int, memoryview]) -> None:
            rel, at, view = job
            view[:] = self.get_range(rel, at, len(view))

        algo = self.manifest["checksum"]

        def held(rel: str, off: int, n: int) -> Any:
            for lo, buf in kept.get(rel, []):
                if lo <= off and off + n <= lo + len(buf):
                    return buf[off - lo : off - lo + n]
            return b"".join(self.get_range(rel, a, min(PIECE, off + n - a)) for a in range(off, off + n, PIECE))

        def check(unit: Any) -> str | None:
            what, pieces, expected, nbytes = unit
            digest, total = new_hasher(algo), 0
            for rel, off, n in pieces:
                digest.update(held(rel, off, n))
                total += n
            if digest.hexdigest() != expected or (nbytes is not None and total != nbytes):
                return f"{what}: {total} bytes, {algo} {digest.hexdigest()[:12]}… do not match the manifest's"
            return None

        with ThreadPoolExecutor(THREADS, thread_name_prefix="wsd-ranged-get") as pool:
            try:
                list(pool.map(one, jobs))
                problems += [p for p in pool.map(check, units) if p]
            except (CheckpointError, FileNotFoundError) as exc:
                return {}, [str(exc) if isinstance(exc, CheckpointError) else f"{exc}: missing"]
        return kept, problems


class _ObjectReader(SafetensorsReader):
    """:class:`.safetensors_io.SafetensorsReader` over an object: the header by ranged GET, reads served from the
    prefetched ranges, a read outside them one ranged GET (or, while recording, only noted)."""

    def __init__(self, source: RemoteCheckpoint, rel: str, kept: Any) -> None:
        self.path = source.url / rel  # type: ignore[assignment]  # named in messages
        self.source, self.rel = source, rel
        self.header = source.header(rel)
        self._handle = None
        self._fd = None
        self._kept = sorted(kept, key=lambda k: k[0])
        self.kept_hits = 0
        self.misses = 0

    def _pread(self, view: memoryview, offset: int, name: str) -> None:
        if self.source.recording is not None:
            self.source.recording.append((self.rel, offset, len(view)))
            return
        self.misses += 1
        view[:] = self.source.get_range(self.rel, offset, len(view))

    def get(self, name: str) -> torch.Tensor:
        info = self.header.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        return self.read_range(name, 0, info.numel if hasattr(info, "numel") else _numel(info.shape)).view(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def close(self) -> None:
        pass


def _numel(shape: tuple[int, ...]) -> int:
    import math

    return math.prod(shape)


class RemoteStore(CheckpointStore):
    """:class:`.store.CheckpointStore` over a checkpoint on object storage (``ckpt``: its name in messages)."""

    def __init__(self, source: RemoteCheckpoint, ckpt: Path) -> None:
        self.source = source
        super().__init__(ckpt, source.manifest)
        # describing the checkpoint reads every Hugging Face shard's header (the tensors' shapes): all together
        source.headers(sorted({e.file for g in self.groups.values() for e in g.values() if e.file is not None}))

    def _holder(self, rank: int) -> dict[str, str]:
        # while discovering: a holder whose state files' headers are not fetched yet names them all at once
        if self.source.pending is not None and rank not in self._holder_keys and rank < len(self.files_per_rank):
            paths = [F.state_file(rank, k) for k in range(1, self.files_per_rank[rank] + 1)]
            missing = [p for p in paths if p not in self.source._headers]
            if missing:
                self.source.pending.update(missing)
                raise HeaderPending(missing[0])
        return super()._holder(rank)

    def _json(self, rel: str, what: str) -> Any:
        return self.source.json(rel, what)

    def _open(self, path: str) -> SafetensorsReader:
        return _ObjectReader(self.source, path, self.kept.get(path, ()))

    def record(self, walk: Callable[[], None]) -> list[tuple[str, int, int]]:
        """The byte ranges ``walk`` (the restore's reads) asks for, noted without fetching them. ``walk`` skips a
        want that raises :class:`HeaderPending`: a pass that met headers not fetched yet fetches them together
        (:meth:`RemoteCheckpoint.headers`) and walks again, so a rank restoring from many files pays one round
        trip for their headers, not one per file."""
        source = self.source
        try:
            while True:
                source.recording, source.pending = [], set()
                try:
                    walk()
                except HeaderPending:
                    pass  # a walk that does not skip: the headers met so far, then again
                pending, source.pending = sorted(source.pending), None
                if not pending:
                    return source.recording
                if all(rel in source._headers for rel in pending):  # cannot happen: no progress, no endless loop
                    raise CheckpointError(f"{source.url}: the headers of {pending[:3]} could not be read")
                source.headers(pending)
        finally:
            source.recording = source.pending = None
            self.bytes_read = 0

    def keep(self, kept: dict[str, list[tuple[int, Any]]]) -> None:
        """Serve the restore's reads from the prefetched ranges (readers reopened: headers are cached)."""
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self.kept = kept
