"""Writing and reading one checkpoint on every rank: the protocol of docs/checkpoint-format.md.

Save (every rank calls :func:`save_checkpoint` with the same request):

1. every rank computes the same plan: each tensor group (model, master, optimizer) cut into size-capped shards
   in parameter order, each shard given an owner rank (balanced by bytes; rank 0 for all in ``rank0`` mode);
2. rank 0 makes the staging directory ``.staging-<name>-<nonce>`` and tells the others its name;
3. parameters are fetched one at a time (a collective for sharded engines); a tensor is kept only by its shard's
   owner, and a shard is written (streamed, checksummed, fsynced) as soon as it is full, by a writer thread, so
   fetching and writing overlap and no rank holds more than a few shards;
4. every rank reports its files (size, checksum) or its error; on any error rank 0 removes the staging directory and
   every rank raises;
5. rank 0 writes the indexes, ``engine.json``, ``trainer.json``, then ``manifest.json`` last, fsyncs, renames the
   staging directory to its final name (the commit), fsyncs ``checkpoints/``, and updates ``latest``.

A crash before the rename leaves only a staging directory, which nothing reads; after it, the checkpoint is
complete. Resume picks the newest complete checkpoint, so a crash between the rename and ``latest`` loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
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
from . import format as F
from .adapters import EngineAdapter, TensorSpec
from .rng import capture_rng, restore_rng
from .safetensors_io import (
    DEFAULT_CHECKSUM,
    SafetensorsReader,
    fsync_dir,
    read_json,
    write_json,
    write_safetensors,
)

__all__ = ["PendingSave", "SaveRequest", "Shard", "load_checkpoint", "plan_shards", "save_checkpoint", "start_save"]

log = logging.getLogger(__name__)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

fault_hook: Callable[[str], None] | None = None
"""Called with the name of each step of a save as this rank reaches it (``save-begin``, ``staging-created``,
``shard-begin:<file>``, ``shard-end:<file>``, ``done-marker``, ``commit-begin``, ``manifest-begin``,
``manifest-written``, ``manifest-hash-written``, ``renamed:<name>``, ``latest-written:<name>``). ``None`` in normal use; the
reliability suite (tools/reliability.py) sets it to kill the process at chosen moments."""


def _point(name: str) -> None:
    if fault_hook is not None:
        fault_hook(name)


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


@dataclass
class Shard:
    group: str
    index: int  # 1-based within its group
    count: int
    specs: list[TensorSpec]
    owner: int = 0

    @property
    def relpath(self) -> str:
        name = F.shard_name(self.group, self.index, self.count)
        return f"{F.group_dir(self.group)}/{name}" if F.group_dir(self.group) else name

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int, world_size: int, rank0_only: bool) -> list[Shard]:
    """Cut each group into shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own), in
    order; give each shard an owner: the rank with the fewest bytes so far (rank 0 for all with ``rank0_only``)."""
    shards: list[Shard] = []
    for group in ("model", "master", "optimizer"):
        chunks: list[list[TensorSpec]] = []
        size = 0
        for spec in (s for s in specs if s.group == group):
            if chunks and size + spec.nbytes <= max_shard_bytes:
                chunks[-1].append(spec)
                size += spec.nbytes
            else:
                chunks.append([spec])
                size = spec.nbytes
        shards += [Shard(group, i + 1, len(chunks), chunk) for i, chunk in enumerate(chunks)]
    load = [0] * world_size
    for shard in shards:
        owner = 0 if rank0_only else min(range(world_size), key=lambda r: (load[r], r))
        shard.owner = owner
        load[owner] += shard.nbytes
    return shards


# ---------------------------------------------------------------------------------------------- saving


class _Writer:
    """A thread that writes full shards while the main thread fetches the next parameters."""

    def __init__(self, staging: Path, fsync: bool, checksum: str) -> None:
        self.staging, self.fsync, self.checksum = staging, fsync, checksum
        self.records: dict[str, dict[str, Any]] = {}
        self.attempted: list[str] = []
        self.error: str | None = None
        self._queue: queue.Queue[tuple[str, dict[str, torch.Tensor]] | None] = queue.Queue(maxsize=2)
        self._thread = threading.Thread(target=self._run, name="wsd-ckpt-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            rel, tensors = item
            if self.error is not None:
                continue
            try:
                path = _inside_staging(self.staging, rel)
                self.attempted.append(rel)
                _point(f"shard-begin:{rel}")
                size, digest = write_safetensors(path, tensors, fsync=self.fsync, checksum=self.checksum)
                self.records[rel] = {"size": size, "hash": digest}
                _point(f"shard-end:{rel}")
            except Exception as exc:  # reported to every rank, then raised
                self.error = f"{rel}: {type(exc).__name__}: {exc}"

    def submit(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        self._queue.put((rel, tensors))

    def write_json(self, rel: str, data: Any) -> None:
        if self.error is not None:
            return
        try:
            path = _inside_staging(self.staging, rel)
            self.attempted.append(rel)
            size, digest = write_json(path, data, fsync=self.fsync, checksum=self.checksum)
            self.records[rel] = {"size": size, "hash": digest}
        except Exception as exc:
            self.error = f"{rel}: {type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def discard(self) -> None:
        """Remove this rank's files of a save that failed: they would be deleted anyway, and on a full disk the space
        they free lets the error report reach rank 0."""
        for rel in self.attempted:
            with contextlib.suppress(OSError):
                (self.staging / rel).unlink()
        self.records = {}


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


def _write_report(staging: Path, rank: int, report: dict[str, Any], fsync: bool, writer: _Writer) -> str | None:
    """Write this rank's done marker (its files, or its error) atomically (a temporary name, then a rename: rank 0
    never reads half a report); on a full disk free this rank's files and try again with a bare error report.
    Returns an error to add to this rank's own."""
    path = staging / f".done-rank-{rank:05d}.json"
    tmp = staging / f".done-rank-{rank:05d}.json.tmp"

    def attempt(data: dict[str, Any]) -> str | None:
        try:
            write_json(tmp, data, fsync=fsync)
            os.rename(tmp, path)
            return None
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return f"done marker: {exc}"

    problem = attempt(report)
    if problem is None:
        return None
    writer.discard()
    again = attempt({"rank": rank, "records": {}, "error": "; ".join(e for e in (report["error"], problem) if e)})
    return problem if again is None else f"{problem} (and again after freeing this rank's files)"


def _snapshot(
    t: torch.Tensor, copy: bool, pool: dict[Any, torch.Tensor] | None = None, key: Any = None
) -> torch.Tensor:
    """A CPU tensor to write: the tensor itself (sync saves of CPU tensors), or a copy (async saves; device
    tensors). With ``pool``, copies go into buffers kept from the previous save: no new pages to fault in, which is
    most of a snapshot's cost on a CPU."""
    t = t.detach()
    if not copy and t.device.type == "cpu":
        return t
    if pool is not None:
        buf = pool.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = pool[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
        return buf.copy_(t, non_blocking=False)
    return t.to("cpu") if t.device.type != "cpu" else t.clone()


class PendingSave:
    """A checkpoint being written. Training may go on (async saves) until :meth:`wait`, which every rank calls
    (it is a collective) and which raises on every rank if any rank failed."""

    def __init__(self, name: str, final: Path, staging: Path, thread: threading.Thread | None) -> None:
        self.name, self.final, self.staging = name, final, staging
        self._thread = thread
        self.local_error: str | None = None
        self.commit_error: str | None = None

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> Path:
        if self._thread is not None:
            self._thread.join()
        gathered = D.all_gather_object([self.local_error, self.commit_error])
        errors = [c for _, c in gathered if c] or [e for e, _ in gathered if e]  # rank 0's error includes the rest
        if errors:
            raise CheckpointError(
                f"checkpoint {self.name} was not written (nothing was committed): {'; '.join(errors)}"
            )
        if D.get_rank() != 0:
            _wait_visible(self.final)
        return self.final


def save_checkpoint(
    adapter: EngineAdapter, run_dir: str | os.PathLike[str], request: SaveRequest, **kwargs: Any
) -> Path:
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
    snapshot: bool = False,
    commit_timeout: float = 3600.0,
    after_commit: Callable[[Path], None] | None = None,
    dest: str | os.PathLike[str] | None = None,
    with_rng: bool = True,
    rng_states: dict[int, Any] | None = None,
    checksum: str = DEFAULT_CHECKSUM,
    snapshot_pool: dict[Any, torch.Tensor] | None = None,
) -> PendingSave:
    """Start writing one checkpoint (every rank calls this with the same request) and return at once when the
    engine's state has been fetched: the files are written, and rank 0 commits, in background threads.

    ``snapshot`` copies CPU tensors when fetched (needed when training goes on during the write: async saves),
    into ``snapshot_pool``'s buffers when given (the caller keeps the pool between saves and never starts a save
    before the previous one has finished).
    ``rank0_only`` streams every tensor through rank 0 (jobs without a shared filesystem). ``after_commit`` runs
    on rank 0 once the checkpoint is committed (retention). ``dest`` writes the checkpoint at exactly that path
    (converters) instead of ``<run_dir>/checkpoints/<name>``, and leaves ``latest`` alone. ``with_rng=False``
    writes no RNG files (a converted checkpoint has none; resume then keeps fresh seeds).
    """
    rank, world = D.get_rank(), D.get_world_size()
    _point("save-begin")
    run_dir = Path(run_dir)
    root = F.checkpoints_dir(run_dir) if dest is None else Path(dest).parent
    name = F.checkpoint_name(request.position, request.kinds)
    final = root / name if dest is None else Path(dest)
    specs = adapter.plan()
    buffers = [(b, adapter.fetch_buffer(b)) for b in adapter.buffer_names]
    specs += [TensorSpec("model", b, tuple(t.shape), t.dtype) for b, t in buffers]
    shards = plan_shards(specs, max_shard_bytes, world, rank0_only)
    where: dict[tuple[str, str], Shard] = {(s.group, spec.name): s for s in shards for spec in s.specs}

    # 2. rank 0 opens the staging directory and tells everyone its name
    staging_name: Any = None
    if rank == 0:
        try:
            if final.exists() and (dest is None or any(final.iterdir())):
                raise CheckpointError(f"{final} already exists; a checkpoint is written once (give a new path)")
            if dest is not None and final.exists():
                final.rmdir()  # an empty folder given as the destination: the rename below takes its place
            root.mkdir(parents=True, exist_ok=True)
            staging_name = f"{F.STAGING_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            (root / staging_name / F.TRAIN_STATE / "rng").mkdir(parents=True)
            _point("staging-created")
        except (OSError, CheckpointError) as exc:
            staging_name = {"error": f"{type(exc).__name__}: {exc}"}
    staging_name = D.broadcast_object(staging_name)
    if isinstance(staging_name, dict):
        raise CheckpointError(f"cannot start checkpoint {name}: {staging_name['error']}")
    staging = root / staging_name
    writes_here = rank == 0 or not rank0_only
    if writes_here and rank != 0:
        _wait_visible(staging)
    writer = _Writer(staging, fsync, checksum) if writes_here else None

    # 3. fetch parameter by parameter; owners keep their tensors and hand full shards to the writer thread
    pending: dict[str, dict[str, torch.Tensor]] = {s.relpath: {} for s in shards if s.owner == rank}
    fetch_error = None

    def take(group: str, tensor_name: str, tensor: torch.Tensor) -> None:
        shard = where[(group, tensor_name)]
        if shard.owner != rank:
            return
        bucket = pending[shard.relpath]
        bucket[tensor_name] = _snapshot(tensor, snapshot, snapshot_pool, (group, tensor_name))
        if len(bucket) == len(shard.specs):
            del pending[shard.relpath]
            assert writer is not None
            writer.submit(shard.relpath, {spec.name: bucket[spec.name] for spec in shard.specs})

    owned = {
        spec.name.split("/")[0] if spec.group == "optimizer" else spec.name
        for s in shards
        if s.owner == rank
        for spec in s.specs
    }
    for pname in adapter.param_names:
        if not adapter.collective and pname not in owned:
            continue  # every rank holds everything: only the owner reads it
        try:
            bundle = adapter.fetch(pname)
        except Exception as exc:
            if adapter.collective:
                raise  # a collective failed: the other ranks fail in it too
            fetch_error = f"fetch {pname}: {type(exc).__name__}: {exc}"
            break
        for key, tensor in bundle.items():
            if key in ("model", "master"):
                take(key, pname, tensor)
            else:
                take("optimizer", f"{pname}/{key.split('/', 1)[1]}", tensor)
    for bname, tensor in buffers:
        take("model", bname, tensor)
    if fetch_error is None and pending:
        fetch_error = f"internal: shards {sorted(pending)} never filled"

    # per-rank files: the RNG streams (in rank0 mode they travel to rank 0 as JSON)
    rng = capture_rng() if with_rng else None
    rng_by_rank: Any = D.all_gather_object(rng) if rank0_only else {rank: rng}
    if not with_rng:
        rng_by_rank = {}
    elif rng_states is not None:  # a converter copies the source's RNG files
        rng_by_rank = dict(rng_states)
    meta = adapter.meta() if rank == 0 else {}
    layout = adapter.layout() if rank == 0 else {}
    writer_ranks = list(range(world)) if not rank0_only else [0]
    result = PendingSave(name, final, staging, None)

    def finish() -> None:
        assert writer is not None
        for r, state in enumerate(rng_by_rank) if isinstance(rng_by_rank, list) else rng_by_rank.items():
            writer.write_json(f"{F.TRAIN_STATE}/rng/rank-{r:05d}.json", state)
        writer.close()
        error = fetch_error or writer.error
        if error:
            writer.discard()
        done = {"rank": rank, "records": writer.records, "error": error}
        if rank != 0:  # rank 0 keeps its own report in memory
            problem = _write_report(staging, rank, done, fsync, writer)
            error = "; ".join(e for e in (error, problem) if e) or None
        _point("done-marker")
        result.local_error = f"rank {rank}: {error}" if error else None
        if rank != 0:
            return
        try:
            # every report is read, failed or not, before the staging directory may be removed: by then no rank
            # is still writing into it
            reports = [done, *_collect_reports(staging, [r for r in writer_ranks if r != 0], commit_timeout)]
            errors = [f"rank {r['rank']}: {r['error']}" for r in reports if r["error"]]
            if errors:
                result.commit_error = "; ".join(errors)
                shutil.rmtree(staging, ignore_errors=True)
                return
            _commit(
                staging,
                final,
                root,
                shards,
                reports,
                meta,
                layout,
                adapter.tied,
                request,
                world,
                rank0_only,
                fsync,
                latest=dest is None,
                with_rng=with_rng,
                checksum=checksum,
            )
            if after_commit is not None:
                after_commit(final)
        except Exception as exc:
            result.commit_error = f"commit: {type(exc).__name__}: {exc}"
            shutil.rmtree(staging, ignore_errors=True)

    if writer is not None:
        result._thread = threading.Thread(target=finish, name=f"wsd-ckpt-{name}", daemon=False)
        result._thread.start()
    return result


def _collect_reports(staging: Path, ranks: list[int], timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    reports = []
    for r in ranks:
        path = staging / f".done-rank-{r:05d}.json"
        while not path.is_file():
            if time.monotonic() > deadline:
                raise CheckpointError(f"rank {r} did not finish writing within {timeout:.0f}s")
            time.sleep(0.02)
        try:
            report = read_json(path)
            if not isinstance(report, dict) or not isinstance(report.get("records"), dict):
                raise CheckpointError(f"{path}: not a done report")
        except CheckpointError as exc:  # a rank that could not finish its report (a full disk): its error
            report = {"rank": r, "records": {}, "error": f"unreadable done marker ({exc})"}
        reports.append(report)
        path.unlink()
    return reports


def _commit(
    staging: Path,
    final: Path,
    root: Path,
    shards: list[Shard],
    reports: list[dict[str, Any]],
    meta: dict[str, Any],
    layout: dict[str, Any],
    tied: dict[str, str],
    request: SaveRequest,
    world: int,
    rank0_only: bool,
    fsync: bool,
    *,
    latest: bool = True,
    with_rng: bool = True,
    checksum: str = DEFAULT_CHECKSUM,
) -> None:
    _point("commit-begin")
    files: dict[str, dict[str, Any]] = {}
    for r in reports:
        files.update(r["records"])

    def add_json(rel: str, data: Any) -> None:
        size, digest = write_json(staging / rel, data, fsync=fsync, checksum=checksum)
        files[rel] = {"size": size, "hash": digest}

    groups: dict[str, Any] = {}
    for group in ("model", "master", "optimizer"):
        gshards = [s for s in shards if s.group == group]
        if not gshards:
            continue
        base = F.group_dir(group)
        weight_map = {spec.name: F.shard_name(group, s.index, s.count) for s in gshards for spec in s.specs}
        index = {"metadata": {"total_size": sum(s.nbytes for s in gshards)}, "weight_map": weight_map}
        add_json(F.index_name(group), index)
        dtypes = sorted({str(spec.dtype).removeprefix("torch.") for s in gshards for spec in s.specs})
        groups[group] = {
            "index": F.index_name(group),
            "shards": len(gshards),
            "tensors": len(weight_map),
            "bytes": index["metadata"]["total_size"],
            "dtypes": dtypes,
            "dir": base,
        }
    if request.hf_config is not None:
        add_json("config.json", request.hf_config)
    add_json(f"{F.TRAIN_STATE}/engine.json", meta)
    add_json(f"{F.TRAIN_STATE}/trainer.json", request.trainer)
    manifest = {
        "format": F.FORMAT,
        "format_version": F.FORMAT_VERSION,
        "name": final.name,
        "kinds": list(request.kinds),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "position": request.position,
        "step": request.step,
        "tokens": request.tokens,
        "schedule": request.schedule,
        "world_size": int(layout.get("world_size", world)),
        "rng": with_rng,
        "layout": layout | {"write_mode": "rank0" if rank0_only else "parallel"},
        "groups": groups,
        "master_weights": "master" if "master" in groups else "model",
        "tied": tied,
        "checksum": checksum,
        "files": dict(sorted(files.items())),
        "versions": _versions(),
        **request.extra_manifest,
    }
    _point("manifest-begin")
    _, digest = write_json(staging / F.MANIFEST, manifest, fsync=fsync, checksum=checksum)
    _point("manifest-written")
    # the manifest's own checksum, in a file of its own: a flipped byte anywhere in manifest.json is caught
    with open(staging / F.MANIFEST_HASH, "x") as f:
        f.write(f"{checksum} {digest}\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    _point("manifest-hash-written")
    if fsync:
        for dirpath, _, _ in os.walk(staging):
            fsync_dir(dirpath)
    os.rename(staging, final)  # the commit
    _point(f"renamed:{final.name}")
    if fsync:
        fsync_dir(root)
    if latest:
        write_latest(root, final.name, fsync)
        _point(f"latest-written:{final.name}")


def write_latest(root: Path, name: str, fsync: bool = True) -> None:
    """Point ``latest`` at ``name``: a temporary file, fsynced, renamed over the old pointer."""
    tmp = root / f".latest-{uuid.uuid4().hex[:8]}"
    write_json(tmp, {"name": name}, fsync=fsync)
    os.replace(tmp, root / F.LATEST)
    if fsync:
        fsync_dir(root)


def _wait_visible(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise CheckpointError(f"{path} was committed by rank 0 but is not visible here after {timeout:.0f}s")
        time.sleep(0.05)


def _versions() -> dict[str, str]:
    import platform

    import safetensors

    from .. import __version__

    out = {
        "wsd_pretrain": __version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
    try:
        import deepspeed

        out["deepspeed"] = deepspeed.__version__
    except ImportError:
        pass
    return out


# ---------------------------------------------------------------------------------------------- loading


def verify_checkpoint(ckpt: Path, *, checksums: bool = True) -> dict[str, Any]:
    """Check the manifest and every file (split across ranks when distributed); raise naming each bad file."""
    manifest = F.load_manifest(ckpt)
    rank, world = D.get_rank(), D.get_world_size()
    names = sorted(manifest["files"])
    mine = {
        "checksum": manifest["checksum"],
        "files": {n: manifest["files"][n] for i, n in enumerate(names) if i % world == rank},
    }
    problems = F.check_files(ckpt, mine, checksums=checksums)
    problems = [p for ps in D.all_gather_object(problems) for p in ps]
    if problems:
        raise CheckpointError(f"{ckpt} failed verification: " + "; ".join(problems))
    return manifest


class _Tensors:
    """Tensor lookup across a group's shards, through the index (validated) and lazily opened readers."""

    def __init__(self, ckpt: Path, manifest: dict[str, Any], group: str) -> None:
        self.ckpt, self.group = ckpt, group
        info = manifest["groups"].get(group)
        self.weight_map: dict[str, str] = {}
        self._readers: dict[str, SafetensorsReader] = {}
        if info is None:
            return
        index_rel = F.index_name(group)
        index = read_json(F.safe_path(ckpt, index_rel, "index"))
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{ckpt / index_rel}: weight_map must map tensor names to file names")
        for fname in set(wm.values()):
            if "/" in fname or F._SHARD_RE.match(fname) is None:
                raise CheckpointError(f"{ckpt / index_rel}: shard file name {fname!r} refused")
        self.weight_map = wm

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _reader(self, fname: str) -> SafetensorsReader:
        if fname not in self._readers:
            base = F.group_dir(self.group)
            rel = f"{base}/{fname}" if base else fname
            reader = SafetensorsReader(F.safe_path(self.ckpt, rel, "index"))
            listed = {n for n, f in self.weight_map.items() if f == fname}
            if set(reader.keys()) != listed:
                raise CheckpointError(
                    f"{reader.path}: holds {len(reader.keys())} tensors, the index lists {len(listed)}"
                )
            self._readers[fname] = reader
        return self._readers[fname]

    def header(self, name: str) -> Any:
        return self._reader(self.weight_map[name]).header.tensors[name]

    def get(self, name: str) -> torch.Tensor:
        return self._reader(self.weight_map[name]).get(name)


def _read_or_receive(store: _Tensors, name: str, rank0_only: bool) -> torch.Tensor:
    if not rank0_only or not D.is_distributed():
        return store.get(name)
    import torch.distributed as dist

    from .safetensors_io import DTYPE_TO_STR, STR_TO_DTYPE

    desc = None
    tensor = None
    if D.get_rank() == 0:
        tensor = store.get(name).contiguous()
        desc = {"shape": list(tensor.shape), "dtype": DTYPE_TO_STR[tensor.dtype]}
    desc = D.broadcast_object(desc)
    if tensor is None:
        tensor = torch.empty(desc["shape"], dtype=STR_TO_DTYPE[desc["dtype"]])
    dist.broadcast(tensor, src=0)
    return tensor


def load_checkpoint(
    adapter: EngineAdapter,
    ckpt: str | os.PathLike[str],
    *,
    verify: str = "checksum",
    rank0_only: bool = False,
    load_optimizer: bool = True,
    restore_rng_state: bool = True,
) -> dict[str, Any]:
    """Restore the engine from ``ckpt`` (every rank calls this); return ``{"manifest", "trainer"}``.

    ``verify``: "checksum" (every file's checksum), "size" (sizes only, for speed) or "none". A mismatched model
    (names, shapes) or a corrupt file raises CheckpointError naming it, before anything is changed.
    ``rank0_only``: only rank 0 reads files and broadcasts each tensor (no shared filesystem).
    """
    ckpt = Path(ckpt)
    if verify not in ("checksum", "size", "none"):
        raise CheckpointError(f"verify={verify!r}: use 'checksum', 'size' or 'none'")
    rank = D.get_rank()
    if rank0_only:
        result = None
        if rank == 0:
            try:
                manifest = verify_checkpoint_local(ckpt, verify)
                result = {
                    "manifest": manifest,
                    "trainer": read_json(ckpt / F.TRAIN_STATE / "trainer.json"),
                    "engine": read_json(ckpt / F.TRAIN_STATE / "engine.json"),
                }
                _validated_trainer(ckpt, result["trainer"], result["engine"])
            except CheckpointError as exc:
                result = {"error": str(exc)}
        result = D.broadcast_object(result)
        if "error" in result:
            raise CheckpointError(result["error"])
        manifest, trainer, engine_meta = result["manifest"], result["trainer"], result["engine"]
    else:
        manifest = (
            verify_checkpoint(ckpt, checksums=verify == "checksum") if verify != "none" else F.load_manifest(ckpt)
        )
        trainer = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/trainer.json", "trainer state"))
        engine_meta = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/engine.json", "engine state"))
        _validated_trainer(ckpt, trainer, engine_meta)

    stores, early = None, []
    if rank == 0 or not rank0_only:
        try:
            stores = {g: _Tensors(ckpt, manifest, g) for g in ("model", "master", "optimizer")}
        except CheckpointError as exc:
            if not rank0_only:
                raise
            early = [str(exc)]  # told to the other ranks below, so none waits forever
    _check_compatible(adapter, ckpt, stores, rank0_only, early)
    with_optim = load_optimizer and bool(manifest["groups"].get("optimizer"))
    adapter.begin_restore(with_optim)
    optimizer_keys = _optimizer_keys(stores, rank0_only) if with_optim else {}
    for pname in adapter.param_names:
        tensors = {"model": _read_or_receive(stores["model"] if stores else None, pname, rank0_only)}  # type: ignore[arg-type]
        if manifest["groups"].get("master"):
            tensors["master"] = _read_or_receive(stores["master"] if stores else None, pname, rank0_only)  # type: ignore[arg-type]
        for key in optimizer_keys.get(pname, []):
            tensors[f"optimizer/{key}"] = _read_or_receive(
                stores["optimizer"] if stores else None, f"{pname}/{key}", rank0_only
            )  # type: ignore[arg-type]
        adapter.restore(pname, tensors)
    for bname in adapter.buffer_names:
        adapter.restore_buffer(bname, _read_or_receive(stores["model"] if stores else None, bname, rank0_only))  # type: ignore[arg-type]
    if load_optimizer:
        adapter.restore_meta(engine_meta)
    adapter.end_restore()
    if restore_rng_state:
        _restore_rng(ckpt, manifest, rank0_only)
    return {"manifest": manifest, "trainer": trainer}


def verify_checkpoint_local(ckpt: Path, verify: str) -> dict[str, Any]:
    manifest = F.load_manifest(ckpt)
    if verify != "none":
        problems = F.check_files(ckpt, manifest, checksums=verify == "checksum")
        if problems:
            raise CheckpointError(f"{ckpt} failed verification: " + "; ".join(problems))
    return manifest


def _optimizer_keys(stores: dict[str, _Tensors] | None, rank0_only: bool) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    if stores is not None:
        for full in stores["optimizer"].weight_map:
            pname, _, key = full.rpartition("/")
            keys.setdefault(pname, []).append(key)
    return D.broadcast_object(keys) if rank0_only else keys


def _check_compatible(
    adapter: EngineAdapter, ckpt: Path, stores: dict[str, _Tensors] | None, rank0_only: bool, early: list[str]
) -> None:
    """Refuse, before anything changes, a checkpoint whose tensors do not fit this model: names, shapes, dtypes
    (a floating tensor for a floating one, others exactly), and optimizer tensors of the wrong shape."""
    problems: list[str] = list(early)
    if stores is not None:
        model, master, optim = stores["model"], stores["master"], stores["optimizer"]
        wanted = {s.name: (s.shape, s.dtype) for s in adapter.plan() if s.group == "model"}
        for b in adapter.buffer_names:
            t = adapter.fetch_buffer(b)
            wanted[b] = (tuple(t.shape), t.dtype)
        missing = sorted(set(wanted) - set(model.weight_map))
        extra = sorted(set(model.weight_map) - set(wanted))
        if missing:
            problems.append(f"the checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")
        if extra:
            problems.append(f"the checkpoint has {len(extra)} tensors this model lacks, e.g. {extra[:3]}")

        def check(store: _Tensors, key: str, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
            info = store.header(key)
            if tuple(info.shape) != tuple(shape):
                problems.append(f"{what} {key}: shape {list(info.shape)} in the checkpoint, {list(shape)} here")
            elif info.dtype.is_floating_point != dtype.is_floating_point or (
                not dtype.is_floating_point and info.dtype != dtype
            ):
                problems.append(f"{what} {key}: dtype {info.dtype} in the checkpoint, {dtype} here")

        for name in sorted(set(wanted) & set(model.weight_map)):
            check(model, name, *wanted[name], "model tensor")
            if master.has(name):
                check(master, name, wanted[name][0], torch.float32, "master weight")
            if len(problems) > 8:
                break
        for key in optim.weight_map:
            pname = key.rpartition("/")[0]
            info = optim.header(key)
            if pname not in wanted:
                problems.append(f"optimizer state {key} belongs to no parameter of this model")
            elif info.shape and tuple(info.shape) != tuple(wanted[pname][0]):
                problems.append(
                    f"optimizer state {key}: shape {list(info.shape)}, the parameter's is {list(wanted[pname][0])}"
                )
            elif not info.dtype.is_floating_point:
                problems.append(f"optimizer state {key}: dtype {info.dtype}, expected a floating type")
            if len(problems) > 8:
                break
    if rank0_only:
        problems = D.broadcast_object(problems)
    if problems:
        raise CheckpointError(f"{ckpt} does not match this model: " + "; ".join(problems))


def _validated_trainer(ckpt: Path, trainer: Any, engine: Any) -> None:
    """trainer.json and engine.json are JSON we wrote: refuse any other shape with a clear error."""
    where = ckpt / F.TRAIN_STATE
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{where / 'trainer.json'}: not a JSON object")
    for key in ("position", "step", "tokens"):
        if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool) or trainer[key] < 0:
            raise CheckpointError(f"{where / 'trainer.json'}: {key!r} must be a whole number >= 0")
    for key in ("scheduler", "data", "extra"):
        if trainer.get(key) is not None and not isinstance(trainer[key], dict):
            raise CheckpointError(f"{where / 'trainer.json'}: {key!r} must be an object or null")
    if not isinstance(engine, dict) or not isinstance(engine.get("optimizer", {}) or {}, dict):
        raise CheckpointError(f"{where / 'engine.json'}: not an engine state object")
    groups = (engine.get("optimizer") or {}).get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{where / 'engine.json'}: optimizer.param_groups must be a list of objects")


def _restore_rng(ckpt: Path, manifest: dict[str, Any], rank0_only: bool) -> None:
    rank, world = D.get_rank(), D.get_world_size()
    if rank0_only:
        states = None
        if rank == 0:
            states = [
                read_json(ckpt / F.TRAIN_STATE / "rng" / f"rank-{r:05d}.json")
                if (ckpt / F.TRAIN_STATE / "rng" / f"rank-{r:05d}.json").is_file()
                else None
                for r in range(world)
            ]
        state = D.broadcast_object(states)[rank]
    else:
        path = F.safe_path(ckpt, f"{F.TRAIN_STATE}/rng/rank-{rank:05d}.json", "rng state")
        state = read_json(path) if path.is_file() else None
    if state is None:
        if not manifest.get("rng", True):
            log.info("rank %d: the checkpoint has no RNG state (imported); this rank keeps its fresh seed", rank)
            return
        if manifest["world_size"] == world:
            raise CheckpointError(f"{ckpt}: no RNG state for rank {rank}")
        log.warning(
            "rank %d: the checkpoint was written by %d ranks; this rank's RNG keeps its fresh seed",
            rank,
            manifest["world_size"],
        )
        return
    restore_rng(state)
