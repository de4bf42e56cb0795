"""The on-disk format (docs/checkpoint-format.md, version 1): names, the manifest, index files, and the one
reader that validates them. Everything that opens a checkpoint (resume, tools, tests) goes through here.

::

    <run dir>/checkpoints/
        step-000000240-pre-decay/            a committed checkpoint (named by position and kinds)
            manifest.json                    written last: every file with size and checksum, kinds, step, schedule,
                                             layout, versions
            model.safetensors.index.json     Hugging Face index: {"metadata": {"total_size"}, "weight_map"}
            model-00001-of-00002.safetensors the model in its own parameter names and dtype
            config.json                      when the model has a Hugging Face config
            train_state/
                master.safetensors.index.json, master-0000k-of-0000n.safetensors   fp32 master weights, when they
                                                                                     differ from the model's
                optimizer.safetensors.index.json, optimizer-0000k-of-0000n.safetensors
                engine.json                  optimizer hyperparameters per group, engine counters
                trainer.json                 position, step, tokens, scheduler state, data position, user state
                rng/rank-00000.json          every rank's RNG streams
        .staging-step-000000300-post-decay-<nonce>/   in progress: never read by resume
        latest                               {"name": ...}: the newest committed checkpoint (a convenience)
    <run dir>/snapshots/
        step-000000120-snapshot/             a model-only snapshot (``checkpoint.snapshot_every``): the same files
                                             without master weights, optimizer state and RNG; never resumed from,
                                             read by ``ckpt merge`` (and inspect, verify, export-hf)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..errors import CheckpointError
from .safetensors_io import CHECKSUMS, hex_length, read_json

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "CheckpointInfo",
    "checkpoint_name",
    "list_checkpoints",
    "load_manifest",
    "resolve_checkpoint",
    "safe_path",
    "shard_name",
]

FORMAT = "wsd_pretrain.checkpoint"
FORMAT_VERSION = 3
READS_VERSIONS = (1, 2, 3)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.hash"
STAGING_PREFIX = ".staging-"
TRAIN_STATE = "train_state"
KINDS = ("pre-decay", "post-decay", "preempt", "periodic", "final", "imported", "snapshot")
SNAPSHOTS = "snapshots"
SNAPSHOT_KIND = "snapshot"
GROUP_NAMES = ("model", "master", "optimizer")
GROUP_PREFIX = {"model": "model", "master": f"{TRAIN_STATE}/master", "optimizer": f"{TRAIN_STATE}/optimizer"}
STATE_INDEX = f"{TRAIN_STATE}/state.index.json"
_KIND_RE = "(?:pre-decay|post-decay|preempt|periodic|final|imported|snapshot)"
_NAME_RE = re.compile(rf"^step-(\d{{9,}})-({_KIND_RE}(?:\+{_KIND_RE})*)$")
SHARD_RE = re.compile(r"^(model|master|optimizer)-(\d{5})-of-(\d{5})\.safetensors$")


def checkpoint_name(position: int, kinds: list[str] | tuple[str, ...]) -> str:
    """``step-000000300-post-decay+final``: the position (optimizer updates, or tokens) and every kind."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise CheckpointError(f"checkpoint kinds {list(kinds)}: each must be one of {KINDS}")
    ordered = [k for k in KINDS if k in kinds]
    return f"step-{position:09d}-{'+'.join(ordered)}"


def parse_name(name: str) -> tuple[int, list[str]] | None:
    m = _NAME_RE.match(name)
    return (int(m.group(1)), m.group(2).split("+")) if m else None


def shard_name(group: str, index: int, count: int) -> str:
    """``model-00001-of-00003.safetensors`` (group ``model``, ``master`` or ``optimizer``), 1-based."""
    return f"{group}-{index:05d}-of-{count:05d}.safetensors"


def state_file(rank: int, index: int) -> str:
    """``train_state/state-r00003-00001.safetensors``: rank 3's first file of master/optimizer slices (1-based)."""
    return f"{TRAIN_STATE}/state-r{rank:05d}-{index:05d}.safetensors"


def index_name(group: str) -> str:
    return f"{GROUP_PREFIX[group]}.safetensors.index.json"


def group_dir(group: str) -> str:
    return "" if group == "model" else TRAIN_STATE


def safe_path(base: Path, rel: Any, what: str) -> Path:
    """``base / rel`` for a relative path read from a checkpoint, refusing anything that leaves ``base``:
    absolute paths, ``..``, backslashes, empty parts and symbolic links on the way."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{what}: path {rel!r} is not a relative file name")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in rel.split("/")):
        raise CheckpointError(f"{what}: path {rel!r} leaves the checkpoint directory; refused")
    path = base
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise CheckpointError(f"{what}: {rel!r} goes through a symbolic link ({path}); refused")
    return path


# ---------------------------------------------------------------------------------------------- manifest


def _expect(cond: bool, where: Path, why: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: invalid manifest: {why}")


def load_manifest(ckpt: Path) -> dict[str, Any]:
    """Read and check ``ckpt/manifest.json``'s structure (not the files it lists: see :func:`check_files`)."""
    path = ckpt / MANIFEST
    if path.is_symlink():
        raise CheckpointError(f"{path}: is a symbolic link; refused")
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (not a committed wsd_pretrain checkpoint)")
    _check_manifest_hash(ckpt)
    m = read_json(path, max_bytes=64 * 1024 * 1024)
    _expect(isinstance(m, dict), path, "not a JSON object")
    _expect(m.get("format") == FORMAT, path, f"format is {m.get('format')!r}, expected {FORMAT!r}")
    version = m.get("format_version")
    _expect(isinstance(version, int) and not isinstance(version, bool), path, "format_version is missing")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is newer than this release reads ({FORMAT_VERSION}); upgrade wsd_pretrain"
        )
    _expect(version in READS_VERSIONS, path, f"format_version {version} is not one of {READS_VERSIONS}")
    for key, typ in (
        ("position", int),
        ("step", int),
        ("tokens", int),
        ("world_size", int),
        ("files", dict),
        ("kinds", list),
        ("layout", dict),
        ("groups", dict),
    ):
        _expect(
            isinstance(m.get(key), typ) and not isinstance(m.get(key), bool), path, f"{key!r} must be {typ.__name__}"
        )
    _expect(all(k in KINDS for k in m["kinds"]) and m["kinds"], path, f"kinds {m['kinds']!r}")
    algo = m.get("checksum")
    _expect(algo in CHECKSUMS, path, f"checksum {algo!r} is not one of {CHECKSUMS}")
    digits = hex_length(algo)
    for rel, rec in m["files"].items():
        safe_path(ckpt, rel, f"{path} files")
        _expect(
            isinstance(rec, dict)
            and isinstance(rec.get("size"), int)
            and rec["size"] >= 0
            and isinstance(rec.get("hash"), str)
            and re.fullmatch(rf"[0-9a-f]{{{digits}}}", rec["hash"]) is not None
            and (type(rec.get("rank", 0)) is int and rec.get("rank", 0) >= 0),
            path,
            f"file record for {rel!r} needs size (int) and hash ({digits} hex digits of {algo})",
        )
    ranged = sorted(rel for rel, rec in m["files"].items() if rec.get("ranged") is not None)
    _expect(
        all(m["files"][rel]["ranged"] is True for rel in ranged) and (not ranged or version >= 3),
        path,
        "a file record's 'ranged' must be true, in format version 3 or later",
    )
    if ranged or m.get("ranges") is not None:
        _check_ranges(m, ranged, path, digits)
    if version >= 2 and m.get("state") is not None:
        st = m["state"]
        _expect(isinstance(st, dict) and st.get("index") == STATE_INDEX, path, f"state must name {STATE_INDEX}")
    return m


def _check_ranges(m: dict[str, Any], ranged: list[str], path: Path, digits: int) -> None:
    """``ranges``: the range-written model files (each with a ``ranged`` record), their shared tensors' writers and
    each holder's record (bytes and checksum of its ranges)."""
    r = m.get("ranges")
    _expect(isinstance(r, dict), path, "range-written files need a 'ranges' object")
    _expect(
        isinstance(r.get("files"), list) and sorted(r["files"]) == ranged and len(set(r["files"])) == len(ranged),
        path,
        "ranges.files must list exactly the files whose records say 'ranged'",
    )
    _expect(
        isinstance(r.get("tensors"), dict) and all(isinstance(v, dict) for v in r["tensors"].values()),
        path,
        "ranges.tensors must map tensor names to partitions",
    )
    holders = r.get("holders")
    _expect(
        isinstance(holders, dict)
        and all(
            re.fullmatch(r"\d+", h) is not None
            and isinstance(rec, dict)
            and type(rec.get("bytes")) is int
            and rec["bytes"] >= 0
            and isinstance(rec.get("hash"), str)
            and re.fullmatch(rf"[0-9a-f]{{{digits}}}", rec["hash"]) is not None
            for h, rec in holders.items()
        ),
        path,
        f"ranges.holders must map ranks to {{bytes, hash ({digits} hex digits)}}",
    )


def _check_manifest_hash(ckpt: Path) -> None:
    from .safetensors_io import hash_file

    hpath = ckpt / MANIFEST_HASH
    if hpath.is_symlink() or not hpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST_HASH} (an incomplete or foreign checkpoint)")
    try:
        raw = hpath.read_bytes()[:200].decode("ascii").split()
    except UnicodeDecodeError:
        raw = []
    if len(raw) != 2 or raw[0] not in CHECKSUMS or not re.fullmatch(rf"[0-9a-f]{{{hex_length(raw[0])}}}", raw[1]):
        raise CheckpointError(f"{hpath}: damaged (expected '<algorithm> <hex digest>')")
    _, digest = hash_file(ckpt / MANIFEST, raw[0])
    if digest != raw[1]:
        raise CheckpointError(
            f"{ckpt / MANIFEST}: {raw[0]} {digest[:12]}… does not match {MANIFEST_HASH}'s "
            f"{raw[1][:12]}…: the manifest is corrupt"
        )


def check_files(ckpt: Path, manifest: dict[str, Any], *, checksums: bool, keep: Any = None) -> list[str]:
    """Problems with the files the manifest lists (missing, wrong size, wrong checksum, symlink), one per file, and
    with the ranges of the range-written model files its ``ranges`` lists holders for (each holder's ranges hashed
    as one stream, in the plan's order). ``keep(rel, offset, data)`` is given every byte range read for a checksum
    (a resume keeps the ones it is about to restore: each byte is read once)."""
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    to_hash = []
    ranges = manifest.get("ranges") or {}
    for rel, rec in sorted(manifest["files"].items()):
        path = safe_path(ckpt, rel, "manifest")
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != rec["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {rec['size']}")
            continue
        if checksums:
            to_hash.append((rel, rec, path))
    # files are hashed on several threads (hashlib releases the GIL): verification runs at disk speed
    algo = manifest.get("checksum", "xxh3_128")

    def one(item: tuple[str, dict[str, Any], Path]) -> str:
        rel, rec, path = item
        if rec.get("ranged"):
            try:
                pieces = _owner_pieces(path, ranges.get("tensors", {}))
            except CheckpointError as exc:  # a damaged header: the owner's bytes
                return f"error: {exc}"
            return _hash_pieces(path, pieces, algo, rel, keep)
        return _hash_whole(path, algo, rel, keep)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for (rel, rec, _), digest in zip(to_hash, pool.map(one, to_hash)):
            if digest.startswith("error: "):
                problems.append(f"{rel}: its owner's bytes: {digest[7:]}")
            elif digest != rec["hash"]:
                what = "its owner's bytes (header and own tensors)" if rec.get("ranged") else algo
                problems.append(
                    f"{rel}: {what}: {algo} {digest[:12]}… does not match the manifest's {rec['hash'][:12]}…"
                )
        if checksums and ranges.get("holders"):
            problems += _check_holders(ckpt, manifest, algo, keep, pool)
    return sorted(problems)


def _hash_whole(path: Path, algo: str, rel: str, keep: Any) -> str:
    from .safetensors_io import _CHUNK, new_hasher

    digest = new_hasher(algo)
    if keep is None:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()
    fd = os.open(path, os.O_RDONLY)  # one buffer of the whole file, kept for the restore
    try:
        _read_piece(fd, path, 0, os.fstat(fd).st_size, digest, rel, keep)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _hash_pieces(path: Path, pieces: list[tuple[int, int]], algo: str, rel: str, keep: Any) -> str:
    """The checksum of ``(offset, length)`` byte ranges of a file, in order."""
    from .safetensors_io import new_hasher

    digest = new_hasher(algo)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in pieces:
            _read_piece(fd, path, offset, length, digest, rel, keep)
    finally:
        os.close(fd)
    return digest.hexdigest()


def _read_piece(fd: int, path: Path, offset: int, length: int, digest: Any, rel: str, keep: Any) -> None:
    """Read ``length`` bytes at ``offset`` into ``digest``; with ``keep``, in one buffer given to it afterwards."""
    import torch

    from .safetensors_io import _CHUNK

    # an uninitialised buffer (torch.empty: no zero fill, whose page faults cost as much as the read), written by
    # positioned reads of at most _CHUNK bytes, each hashed as it lands; kept whole when asked
    whole = torch.empty(length if keep is not None else min(length, _CHUNK), dtype=torch.uint8)
    buf = memoryview(whole.numpy()) if length else memoryview(b"")
    done = 0
    while done < length:
        lo = done if keep is not None else 0
        view = buf[lo : lo + min(_CHUNK, length - done)]
        n = os.preadv(fd, [view], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: ended at byte {offset + done} (truncated?)")
        digest.update(view[:n])
        done += n
    if keep is not None:
        keep(rel, offset, buf)


def _owner_pieces(path: Path, tensors: dict[str, Any]) -> list[tuple[int, int]]:
    """A range-written file's bytes its owner wrote: the header and every tensor not written by its holders."""
    from .safetensors_io import read_header

    return owner_pieces(read_header(path), tensors)


def owner_pieces(header: Any, tensors: dict[str, Any]) -> list[tuple[int, int]]:
    """:func:`_owner_pieces` from a checked header."""
    pieces = [(0, header.data_start)]
    for info in sorted(header.tensors.values(), key=lambda i: i.start):
        if info.name in tensors or info.end == info.start:
            continue
        lo, n = header.data_start + info.start, info.end - info.start
        if pieces[-1][0] + pieces[-1][1] == lo:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
        else:
            pieces.append((lo, n))
    return pieces


def bytes_written(ckpt: Path, manifest: dict[str, Any]) -> dict[int, int]:
    """``{rank: bytes}`` each saving rank wrote: its files, and of a range-written file the owner's bytes (header and
    own tensors) and each holder's ranges (docs/checkpoint-format.md, "Range-written model files")."""
    out: dict[int, int] = {}
    ranges = manifest.get("ranges") or {}
    for rel, rec in manifest["files"].items():
        rank = int(rec.get("rank", 0))
        if rec.get("ranged"):
            pieces = _owner_pieces(safe_path(ckpt, rel, "manifest"), ranges.get("tensors", {}))
            out[rank] = out.get(rank, 0) + sum(n for _, n in pieces)
        else:
            out[rank] = out.get(rank, 0) + rec["size"]
    for h, rec in (ranges.get("holders") or {}).items():
        out[int(h)] = out.get(int(h), 0) + rec["bytes"]
    return out


def holder_pieces(
    ckpt: Any, manifest: dict[str, Any], holders: list[int], header_of: Any = None
) -> dict[int, list[tuple[str, int, int]]]:
    """``{holder: [(file, byte offset, length)]}``: each holder's ranges of the range-written model files, in the
    plan's order (file by file, tensor by tensor), from the files' headers (``header_of(rel)``: an object's, read
    by ranged GET) and the manifest's partitions."""
    from .layout import Partition
    from .safetensors_io import itemsize, read_header

    ranges = manifest["ranges"]
    out: dict[int, list[tuple[str, int, int]]] = {h: [] for h in holders}
    for rel in ranges["files"]:
        header = header_of(rel) if header_of is not None else read_header(safe_path(ckpt, rel, "manifest ranges"))
        for info in sorted(header.tensors.values(), key=lambda i: i.start):
            spec = ranges["tensors"].get(info.name)
            if spec is None:
                continue
            numel = (info.end - info.start) // itemsize(info.dtype)
            part = Partition.from_json(spec, numel, f"{ckpt / MANIFEST}: ranges.tensors.{info.name}")
            for h in holders:
                local = part.local(h, numel)
                if local is not None and local[1] > 0:
                    size = itemsize(info.dtype)
                    out[h].append((rel, header.data_start + info.start + local[0] * size, local[1] * size))
    return out


def _check_holders(ckpt: Path, manifest: dict[str, Any], algo: str, keep: Any, pool: Any) -> list[str]:
    from .safetensors_io import new_hasher

    holders = manifest["ranges"]["holders"]
    try:
        pieces = holder_pieces(ckpt, manifest, [int(h) for h in holders])
    except CheckpointError as exc:
        return [str(exc)]

    def one(h: int) -> tuple[int, int, str, set[str]]:
        digest, total, fds = new_hasher(algo), 0, {}
        try:
            for rel, offset, length in pieces[h]:
                fd = fds.get(rel)
                if fd is None:
                    fd = fds[rel] = os.open(safe_path(ckpt, rel, "manifest ranges"), os.O_RDONLY)
                _read_piece(fd, ckpt / rel, offset, length, digest, rel, keep)
                total += length
        finally:
            for fd in fds.values():
                os.close(fd)
        return h, total, digest.hexdigest(), {rel for rel, _, _ in pieces[h]}

    problems = []
    for h, total, digest, rels in pool.map(one, [int(h) for h in holders]):
        rec = holders[str(h)]
        if total != rec["bytes"] or digest != rec["hash"]:
            where = ", ".join(sorted(rels)[:3]) + (f" and {len(rels) - 3} more" if len(rels) > 3 else "")
            problems.append(
                f"the ranges rank {h} wrote ({where}): {total} bytes, {algo} {digest[:12]}… do not match the "
                f"manifest's {rec['bytes']} bytes, {rec['hash'][:12]}…"
            )
    return problems


# ---------------------------------------------------------------------------------------------- listing


@dataclass
class CheckpointInfo:
    """One directory under ``checkpoints/``: its state is complete, in progress (staging) or corrupt."""

    name: str
    path: Path
    state: str
    position: int | None = None
    kinds: list[str] = field(default_factory=list)
    size: int = 0
    manifest: dict[str, Any] | None = None
    problem: str | None = None
    latest: bool = False


def resume_candidates(infos: Iterable[CheckpointInfo], under: Path | None = None) -> list[dict[str, Any]]:
    """The committed checkpoints among ``infos`` (complete and corrupt ones: a resume names the damage) as the
    plain JSON rank 0 hands the other ranks, in order, each with its local path (``under/<name>`` when given: an
    object-storage run's staging folder)."""
    return [
        {
            "name": i.name,
            "path": str(under / i.name if under is not None else i.path),
            "state": i.state,
            "problem": i.problem,
            "position": i.position,
            "kinds": i.kinds,
        }
        for i in infos
        if i.state in ("complete", "corrupt")
    ]


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def read_latest(run_dir: Path) -> str | None:
    path = checkpoints_dir(run_dir) / LATEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        data = read_json(path, max_bytes=4096)
    except CheckpointError:
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and parse_name(name) else None


def snapshots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOTS


def list_snapshots(run_dir: Path, *, checksums: bool = False) -> list[CheckpointInfo]:
    """Every model-only snapshot of the run (``<run>/snapshots/``), oldest first, checked as
    :func:`list_checkpoints` checks checkpoints."""
    return _list(snapshots_dir(run_dir), None, checksums)


def list_checkpoints(run_dir: Path, *, checksums: bool = False) -> list[CheckpointInfo]:
    """Every checkpoint directory in the run, oldest first; complete ones have their manifest checked (and sizes,
    and with ``checksums`` the checksum of every file). Snapshots are apart (:func:`list_snapshots`)."""
    return _list(checkpoints_dir(run_dir), read_latest(run_dir), checksums)


def _list(root: Path, latest: str | None, checksums: bool) -> list[CheckpointInfo]:
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if entry.name.startswith(STAGING_PREFIX):
            out.append(CheckpointInfo(entry.name, path, "in progress", size=disk_usage(path)))
            continue
        parsed = parse_name(entry.name)
        if parsed is None:
            continue
        info = CheckpointInfo(entry.name, path, "complete", position=parsed[0], kinds=parsed[1], size=disk_usage(path))
        try:
            info.manifest = load_manifest(path)
            problems = check_files(path, info.manifest, checksums=checksums)
            if problems:
                info.state, info.problem = "corrupt", "; ".join(problems)
            else:
                info.position, info.kinds = info.manifest["position"], info.manifest["kinds"]
        except CheckpointError as exc:
            info.state, info.problem = "corrupt", str(exc)
        info.latest = entry.name == latest
        out.append(info)
    out.sort(key=lambda i: (i.position if i.position is not None else -1, i.name))
    return out


def disk_usage(path: Path) -> int:
    """The bytes of the files under ``path`` (a checkpoint's folder, recursively); a file that vanishes meanwhile
    counts as nothing."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def resolve_checkpoint(
    target: str | os.PathLike[str], which: str = "latest", *, damaged: Literal["skip", "error", "return"] = "skip"
) -> Path:
    """A checkpoint directory from a run directory (``which``: "latest" = the newest complete one, or a name) or
    from a checkpoint directory itself. ``damaged`` says what a damaged newest checkpoint does: "skip" (the newest
    complete one is returned), "error" (a CheckpointError naming it, its file and the reason: the tools), "return"
    (it is returned, for a verifier to report)."""
    path = Path(target)
    if (path / MANIFEST).exists():
        return path
    if path.name == CHECKPOINTS:
        path = path.parent
    if not checkpoints_dir(path).is_dir():
        raise CheckpointError(f"{path}: neither a checkpoint nor a run directory with a checkpoints/ folder")
    infos = list_checkpoints(path)
    if which != "latest":
        for info in infos:
            if info.name == which:
                if info.state != "complete":
                    raise CheckpointError(f"checkpoint {which!r} is {info.state}: {info.problem or ''}")
                return info.path
        raise CheckpointError(f"{path}: no checkpoint named {which!r}")
    committed = [i for i in infos if i.state in ("complete", "corrupt")]
    if committed and committed[-1].state == "corrupt" and damaged == "return":
        return committed[-1].path
    if committed and committed[-1].state == "corrupt" and damaged == "error":
        # the newest is damaged: say which and why (as when it is named), never fall back to older state silently
        bad = committed[-1]
        older = [i.name for i in committed if i.state == "complete"]
        hint = f"name an older one ({older[-1]}) or remove it" if older else "remove it"
        raise CheckpointError(f"{path}: the newest checkpoint {bad.name} is damaged: {bad.problem}; {hint}")
    complete = [i for i in infos if i.state == "complete"]
    if not complete:
        raise CheckpointError(f"{path}: no complete checkpoint to resume from")
    return complete[-1].path
