"""Checkpoints on object storage (S3): listing, reading, verifying, and the object-storage commit protocol
(docs/checkpoint-format.md, "Object storage").

There is no rename on S3, so the commit is an object: a checkpoint's objects are written under its **final**
prefix, and ``manifest.json`` is written **last**, with a conditional create (``If-None-Match: *``). A prefix
without ``manifest.json`` is an unfinished save: readers never list it as a checkpoint. Before writing anything a
writer claims the name with a conditional create of ``<prefix>/.claim``: of two writers racing for one name,
the second stops at once with a clear error, before it has overwritten a single object. ``latest`` is replaced
with compare-and-swap (``If-Match`` on the ETag read), and only ever moves forward. Deleting a checkpoint removes
``manifest.json`` first, so a half-deleted checkpoint is never seen as complete. Whether a checkpoint is committed
is decided by reading its manifest, never by a listing alone (a stale listing can only show a name late or
early; the manifest read decides).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from . import format as F
from .faults import point
from .safetensors_io import fsync_dir, fsync_tree, new_hasher
from .storage import ObjectURL, PreconditionFailed, S3Store, parse_location, safe_key, store_for

__all__ = [
    "commit_upload",
    "copy",
    "delete_checkpoint",
    "fetch",
    "list_run",
    "load_manifest",
    "resolve",
    "upload",
    "upload_files",
    "upload_folder",
]

CLAIM = ".claim"
_CHUNK = 8 * 1024 * 1024
HEADER_GUESS = 64 * 1024
"""The first ranged GET of a safetensors file asks for this many bytes: the header of any file of ours fits."""
_THREADS = 8


# ---------------------------------------------------------------------------------------------- reading


def load_manifest(store: S3Store, ckpt: ObjectURL) -> tuple[dict[str, Any], bytes, bytes]:
    """The checkpoint's manifest, checked against ``manifest.hash`` and validated by the same checks as on disk
    (:func:`.format.load_manifest`: structure, versions, hostile names). Returns it with its raw bytes."""
    try:
        raw, _ = store.get((ckpt / F.MANIFEST).key, max_bytes=64 * 1024 * 1024)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {F.MANIFEST} (not a committed wsd_pretrain checkpoint)") from None
    try:
        raw_hash, _ = store.get((ckpt / F.MANIFEST_HASH).key, max_bytes=4096)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {F.MANIFEST_HASH} (an incomplete or foreign checkpoint)") from None
    with tempfile.TemporaryDirectory(prefix="wsd-manifest-") as tmp:
        # the one manifest validator, on a private copy: every rule that holds on disk holds here
        (Path(tmp) / F.MANIFEST).write_bytes(raw)
        (Path(tmp) / F.MANIFEST_HASH).write_bytes(raw_hash)
        try:
            m = F.load_manifest(Path(tmp))
        except CheckpointError as exc:
            raise CheckpointError(str(exc).replace(tmp, str(ckpt))) from None
    for rel in m["files"]:
        safe_key(ckpt, rel, f"{ckpt / F.MANIFEST} files")
    return m, raw, raw_hash


def _names(store: S3Store, root: ObjectURL) -> list[str]:
    _, prefixes = store.list(root.prefix, delimiter="/")
    return sorted(p[len(root.prefix) :].rstrip("/") for p in prefixes)


def read_latest(store: S3Store, run: ObjectURL) -> tuple[str | None, str | None]:
    """``latest``'s checkpoint name and the ETag read (None, None when absent or unreadable)."""
    try:
        raw, etag = store.get((run / F.CHECKPOINTS / F.LATEST).key, max_bytes=4096)
    except FileNotFoundError:
        return None, None
    try:
        name = json.loads(raw).get("name")
    except (ValueError, AttributeError):
        return None, etag
    return (name if isinstance(name, str) and F.parse_name(name) else None), etag


def list_run(run: ObjectURL, *, snapshots: bool = False) -> list[F.CheckpointInfo]:
    """Every checkpoint (or snapshot) prefix of the run, oldest first: "complete" (manifest valid, every object
    there at its size), "unfinished" (no manifest: a save in progress or abandoned), or "corrupt"."""
    store = store_for(run)
    root = run / (F.SNAPSHOTS if snapshots else F.CHECKPOINTS)
    latest = None if snapshots else read_latest(store, run)[0]
    out = []
    for name in _names(store, root):
        parsed = F.parse_name(name)
        if parsed is None:
            continue
        ckpt = root / name
        objects, _ = store.list(ckpt.prefix)
        sizes = {o["key"][len(ckpt.prefix) :]: o["size"] for o in objects}
        info = F.CheckpointInfo(name, ckpt, "complete", position=parsed[0], kinds=parsed[1])  # type: ignore[arg-type]
        info.size = sum(sizes.values())
        if store.head((ckpt / F.MANIFEST).key) is None:  # the object decides, never the listing (it may be stale)
            info.state = "unfinished"
        else:
            try:
                m, _, _ = load_manifest(store, ckpt)
                problems = size_problems(store, ckpt, m, sizes)
                if problems:
                    info.state, info.problem = "corrupt", "; ".join(problems)
                else:
                    info.manifest, info.position, info.kinds = m, m["position"], m["kinds"]
            except CheckpointError as exc:
                info.state, info.problem = "corrupt", str(exc)
        info.latest = name == latest
        out.append(info)
    out.sort(key=lambda i: (i.position if i.position is not None else -1, i.name))
    return out


def size_problems(store: S3Store, ckpt: ObjectURL, m: dict[str, Any], sizes: dict[str, int]) -> list[str]:
    problems = []
    for rel, rec in sorted(m["files"].items()):
        size = sizes.get(rel)
        if size is None:  # a listing may lag behind a write: ask the object itself before calling it missing
            head = store.head(safe_key(ckpt, rel, "manifest"))
            size = None if head is None else head["size"]
        if size is None:
            problems.append(f"{rel}: missing")
        elif size != rec["size"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {rec['size']}")
    return problems


def resolve(target: ObjectURL, *, damaged: str = "error") -> ObjectURL:
    """A checkpoint prefix from itself or from a run prefix (its newest complete checkpoint; a damaged newest one
    is an error naming it, or returned with ``damaged="return"``)."""
    store = store_for(target)
    if store.head((target / F.MANIFEST).key) is not None:
        return target
    run = target.parent if target.name == F.CHECKPOINTS else target
    infos = list_run(run)
    committed = [i for i in infos if i.state in ("complete", "corrupt")]
    if not infos:
        raise CheckpointError(f"{target}: neither a checkpoint nor a run with checkpoints under {F.CHECKPOINTS}/")
    if committed and committed[-1].state == "corrupt":
        if damaged == "return":
            return committed[-1].path  # type: ignore[return-value]
        raise CheckpointError(f"{run}: the newest checkpoint {committed[-1].name} is damaged: {committed[-1].problem}")
    if not committed:
        raise CheckpointError(f"{run}: no complete checkpoint (only unfinished saves)")
    return committed[-1].path  # type: ignore[return-value]


def fetch(ckpt: ObjectURL, dest: Path, *, headers_only: bool = False) -> list[str]:
    """Download a committed checkpoint into the new folder ``dest``, every object checked against the manifest's
    size and checksum on the way (several objects in flight). Returns every problem (empty: all verified).
    ``headers_only``: the JSON files whole, and of each safetensors file only its header (one speculative ranged
    GET, a second only for a larger header) in a sparse file of the full size: enough for ``inspect``."""
    store = store_for(ckpt)
    m, raw, raw_hash = load_manifest(store, ckpt)
    dest.mkdir(parents=True)
    (dest / F.MANIFEST).write_bytes(raw)
    (dest / F.MANIFEST_HASH).write_bytes(raw_hash)
    problems = fetch_files(store, ckpt, m, dest, sorted(m["files"]), headers_only=headers_only)
    if not problems and not headers_only:
        problems = _check_ranged(dest, m)
    return sorted(problems)


def fetch_files(
    store: S3Store,
    ckpt: ObjectURL,
    m: dict[str, Any],
    dest: Path,
    rels: list[str],
    *,
    headers_only: bool = False,
) -> list[str]:
    """Download the objects ``rels`` of the checkpoint ``ckpt`` (manifest ``m``) into the folder ``dest``, several
    in flight, each checked against the manifest's size and checksum on the way (a range-written file's size
    only: :func:`_check_ranged` checks its holders' ranges once the whole copy is there). Returns the problems."""
    algo = m["checksum"]

    def one(rel: str) -> str | None:
        rec = m["files"][rel]
        key = safe_key(ckpt, rel, "manifest")
        path = F.safe_path(dest, rel, "manifest")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if headers_only and rel.endswith(".safetensors"):
                _fetch_header(store, key, path, rec["size"])
                return None
            body, size = store.stream(key)
            if size != rec["size"]:
                body.close()
                return f"{rel}: {size} bytes, the manifest says {rec['size']}"
            digest = new_hasher(algo)
            with open(path, "wb") as f:
                for chunk in body.iter_chunks(_CHUNK):
                    digest.update(chunk)
                    f.write(chunk)
            # a range-written file's hash covers its owner's bytes only: checked with its holders' ranges later
            if not rec.get("ranged") and digest.hexdigest() != rec["hash"]:
                return f"{rel}: {algo} {digest.hexdigest()[:12]}… does not match the manifest's {rec['hash'][:12]}…"
        except FileNotFoundError:
            return f"{rel}: missing"
        return None

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="wsd-fetch") as pool:
        return [p for p in pool.map(one, rels) if p]


def _check_ranged(ckpt: Path, manifest: dict[str, Any]) -> list[str]:
    """The range-written model files of a local copy (format 3): each file's owner bytes and every holder's ranges
    against the manifest, as ``verify`` checks them (a whole-file checksum of such a file is not in the manifest:
    no single rank wrote it)."""
    ranged = {rel: rec for rel, rec in manifest["files"].items() if rec.get("ranged")}
    if not ranged:
        return []
    return F.check_files(ckpt, {**manifest, "files": ranged}, checksums=True)


def _fetch_header(store: S3Store, key: str, path: Path, size: int) -> None:
    head = store.get_range(key, 0, min(size, HEADER_GUESS))
    if len(head) >= 8:
        n = int.from_bytes(head[:8], "little")
        if 8 + n > len(head) and 8 + n <= size:
            head += store.get_range(key, len(head), 8 + n - len(head))
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)  # sparse: the header readers check the length, never read the data


# ---------------------------------------------------------------------------------------------- writing


def _claim(store: S3Store, ckpt: ObjectURL, *, replace_unfinished: bool) -> None:
    """Claim ``ckpt``'s name before writing any object under it (conditional create of ``.claim``)."""
    if store.head((ckpt / F.MANIFEST).key) is not None:
        raise CheckpointError(f"{ckpt} already exists (committed); nothing was written")
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
    try:
        store.put((ckpt / CLAIM).key, body, if_none_match=True)
        return
    except PreconditionFailed:
        if not replace_unfinished:
            raw, _ = store.get((ckpt / CLAIM).key, max_bytes=4096)
            raise CheckpointError(
                f"{ckpt}: another writer claimed this name ({raw.decode(errors='replace')}) and has not committed: "
                "it is still writing, or it was interrupted. Nothing was written. If no other copy is running, "
                "remove the unfinished save with --replace-unfinished"
            ) from None
    remove_unfinished(store, ckpt)
    try:
        store.put((ckpt / CLAIM).key, body, if_none_match=True)
    except PreconditionFailed:
        raise CheckpointError(
            f"{ckpt}: another writer claimed this name at the same moment; nothing was written"
        ) from None


def remove_unfinished(store: S3Store, ckpt: ObjectURL) -> None:
    """Remove an unfinished save (no manifest): its objects, its claim, and its multipart uploads."""
    if store.head((ckpt / F.MANIFEST).key) is not None:
        raise CheckpointError(f"{ckpt} is committed; refusing to remove it as unfinished")
    store.abort_uploads(ckpt.prefix)
    objects, _ = store.list(ckpt.prefix)
    store.delete([o["key"] for o in objects])


def delete_checkpoint(ckpt: ObjectURL) -> None:
    """Delete a committed checkpoint: ``manifest.json`` first (from then on it is unfinished, never complete), then
    the rest, then any multipart upload left under it."""
    store = store_for(ckpt)
    store.delete([(ckpt / F.MANIFEST).key])
    objects, _ = store.list(ckpt.prefix)
    store.delete([o["key"] for o in objects])
    store.abort_uploads(ckpt.prefix)


def upload(
    src: Path,
    run: ObjectURL,
    *,
    root: str = F.CHECKPOINTS,
    replace_unfinished: bool = False,
    progress: Callable[[int], Any] | None = None,
) -> ObjectURL:
    """Copy the local committed checkpoint ``src`` to ``<run>/<root>/<name>`` with the object-storage commit:
    claim the name, stream every object (parallel multipart parts, its checksum computed on the way and compared
    with the source manifest's), then ``manifest.hash``, then ``manifest.json`` with ``If-None-Match: *`` (the
    commit), then ``latest`` by compare-and-swap. Any failure aborts the uploads and removes what was written.
    (The manager's uploads split the objects over the ranks: :func:`upload_files` on each, :func:`commit_upload`
    on rank 0 once every rank reported.)"""
    m = F.load_manifest(src)
    store = store_for(run)
    ckpt = run / root / src.name
    damaged = _check_ranged(src, m)  # read once more, locally: their checksums are per holder, not per file
    if damaged:
        raise CheckpointError(f"{src}: not copied, the source is damaged: " + "; ".join(damaged))
    _claim(store, ckpt, replace_unfinished=replace_unfinished)
    try:
        problems = upload_files(src, m, store, ckpt, sorted(m["files"]), progress=progress)
        if problems:
            raise CheckpointError(f"{src}: not copied, the source is damaged: " + "; ".join(problems))
        commit_upload(src, store, run, ckpt, root)
    except BaseException:
        try:
            remove_unfinished(store, ckpt)
        except CheckpointError:
            pass
        raise
    return ckpt


def upload_files(
    src: Path,
    m: dict[str, Any],
    store: S3Store,
    ckpt: ObjectURL,
    rels: list[str],
    *,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """Stream the files ``rels`` of the local checkpoint ``src`` (manifest ``m``) to their objects under ``ckpt``:
    several objects at once, each in parallel multipart parts, its checksum computed on the way and compared with
    the manifest's (a range-written file's size only: its checksums are per holder). Returns the problems (empty:
    all written); an object that fails is aborted (no multipart upload is left by it). Raises on a fault or a
    server error, after aborting its own object."""
    algo = m["checksum"]

    def one(rel: str) -> str | None:
        rec = m["files"][rel]
        point(f"upload-object:{rel}")
        w = store.writer(safe_key(ckpt, rel, "manifest"), algo)
        try:
            stream_file(F.safe_path(src, rel, "manifest"), w)
        except OSError as exc:
            return f"{rel}: cannot read: {exc.strerror or exc}"
        size, digest = w.close()
        if progress is not None:
            progress(1)
        if (size, digest if not rec.get("ranged") else rec["hash"]) != (rec["size"], rec["hash"]):
            return f"{rel}: the source's {size} bytes / {algo} {digest[:12]}… do not match its manifest"
        return None

    with ThreadPoolExecutor(_THREADS, thread_name_prefix="wsd-upload") as pool:
        return [p for p in pool.map(one, rels) if p]


def stream_file(path: Path, writer: Any) -> None:
    """Write the local file ``path`` into an object ``writer`` (``S3Store.writer``: parts sent as they fill, the
    checksum computed on the way); on any error the writer is aborted (no multipart upload left) and the error
    raised. The caller closes the writer."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                writer.write(chunk)
    except BaseException:
        writer.abort()
        raise


def upload_folder(store: S3Store, local: Path, out: ObjectURL, *, last: str = "config.json") -> None:
    """A local folder that is not a checkpoint (a Hugging Face folder, a DCP directory) under the prefix ``out``:
    each file created only if absent (a racing writer gets a clear error), streamed in multipart parts, its size
    checked on the server afterwards. The file named ``last`` (a Hugging Face folder's ``config.json``, a DCP
    directory's ``.metadata``: what its readers open first) goes last, so a reader that finds it finds every file
    it names. Any failure aborts the object being written and raises (objects already written stay: the caller
    names the prefix; :func:`remove_folder` removes it)."""
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.name == last, str(p)))
    for path in files:
        key = (out / path.relative_to(local).as_posix()).key
        writer = store.writer(key, "xxh3_128", if_none_match=True)
        stream_file(path, writer)
        writer.close()
        head = store.head(key)
        if head is None or head["size"] != path.stat().st_size:
            raise CheckpointError(f"{store.url(key)}: uploaded, but the server has {head and head['size']} bytes")


def remove_folder(store: S3Store, out: ObjectURL, *, first: str = "config.json") -> int:
    """Remove every object under the prefix ``out`` written by :func:`upload_folder`: ``first`` (its commit
    object) before the rest, so a reader never finds it naming a missing file; then any multipart upload left
    under it. Returns the number of objects removed."""
    store.delete([(out / first).key])
    objects, _ = store.list(out.prefix)
    store.delete([o["key"] for o in objects])
    store.abort_uploads(out.prefix)
    return len(objects)


def commit_upload(src: Path, store: S3Store, run: ObjectURL, ckpt: ObjectURL, root: str) -> None:
    """Every object of ``src`` is under ``ckpt``: write ``manifest.hash``, then ``manifest.json`` with
    ``If-None-Match: *`` (the commit), remove the claim, and move ``latest`` by compare-and-swap."""
    point("upload-manifest")
    store.put((ckpt / F.MANIFEST_HASH).key, (src / F.MANIFEST_HASH).read_bytes())
    try:
        store.put((ckpt / F.MANIFEST).key, (src / F.MANIFEST).read_bytes(), if_none_match=True)  # the commit
    except PreconditionFailed:
        raise CheckpointError(f"{ckpt}: another writer committed this checkpoint first; this copy stops") from None
    point(f"upload-committed:{src.name}")
    store.delete([(ckpt / CLAIM).key])
    if root == F.CHECKPOINTS:
        set_latest(store, run, src.name)


def set_latest(store: S3Store, run: ObjectURL, name: str, *, attempts: int = 20) -> None:
    """Point ``latest`` at ``name`` unless it already names a newer position: compare-and-swap on the ETag, retried
    when another writer moved it in between."""
    position = F.parse_name(name)[0]  # type: ignore[index]
    key = (run / F.CHECKPOINTS / F.LATEST).key
    body = json.dumps({"name": name}).encode()
    for _ in range(attempts):
        current, etag = read_latest(store, run)
        if current is not None and F.parse_name(current)[0] >= position:  # type: ignore[index]
            return
        try:
            if etag is None:
                store.put(key, body, if_none_match=True)
            else:
                store.put(key, body, if_match=etag)
            return
        except PreconditionFailed:
            continue
    raise CheckpointError(f"{run}: could not update {F.LATEST} after {attempts} attempts (others keep changing it)")


def download(src: ObjectURL, run: Path, *, root: str = F.CHECKPOINTS) -> Path:
    """Copy a committed checkpoint from object storage into the local run ``run``: fetched and verified into a
    staging folder, fsynced, renamed (the local commit), then ``latest`` if it is the newest."""
    base = run / root
    final = base / src.name
    if final.exists():
        raise CheckpointError(f"{final} already exists; nothing was copied")
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f"{F.STAGING_PREFIX}{src.name}-{uuid.uuid4().hex[:8]}"
    try:
        problems = fetch(src, staging)
        if problems:
            raise CheckpointError(f"{src}: not copied, damaged objects: " + "; ".join(problems))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return commit_local(staging, final, run, root)


def commit_local(staging: Path, final: Path, run: Path, root: str = F.CHECKPOINTS) -> Path:
    """A verified local copy in ``staging`` becomes the checkpoint ``final`` of the local run ``run``: every file
    and folder fsynced, renamed (the local commit), then ``latest`` if it is the newest. ``staging`` is removed on
    any failure."""
    from .commit import write_latest

    base = final.parent
    try:
        fsync_tree(staging)
        os.rename(staging, final)
        fsync_dir(base)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if root == F.CHECKPOINTS:
        complete = [i for i in F.list_checkpoints(run) if i.state == "complete"]
        if complete and complete[-1].name == final.name:
            write_latest(base, final.name)
    return final


def copy(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    replace_unfinished: bool = False,
    log: Callable[[str], Any] = print,
) -> list[str]:
    """``wsd-pretrain ckpt cp SRC DST``: SRC is a checkpoint or a run (every complete checkpoint and snapshot of
    it); DST is a run, local or ``s3://``. Checkpoints DST already holds are skipped. Returns the names copied."""
    s, d = parse_location(src), parse_location(dst)
    if isinstance(s, Path) and isinstance(d, Path):
        raise ConfigError(f"{src} and {dst} are both local: copy a local checkpoint with cp -r", where="ckpt cp")
    items = _sources(s)
    if not items:
        raise CheckpointError(f"{src}: no complete checkpoint to copy")
    done = []
    for root, ckpt in items:
        name = ckpt.name
        if _exists(d, root, name):
            log(f"skip {root}/{name}: already in {dst}")
            continue
        if isinstance(d, ObjectURL):
            if isinstance(ckpt, ObjectURL):  # S3 to S3: through a verified local copy
                with tempfile.TemporaryDirectory(prefix="wsd-cp-") as tmp:
                    problems = fetch(ckpt, Path(tmp) / name)
                    if problems:
                        raise CheckpointError(f"{ckpt}: not copied, damaged objects: " + "; ".join(problems))
                    upload(Path(tmp) / name, d, root=root, replace_unfinished=replace_unfinished)
            else:
                upload(ckpt, d, root=root, replace_unfinished=replace_unfinished)
        else:
            download(ckpt, d, root=root)  # type: ignore[arg-type]
        log(f"copied {root}/{name}")
        done.append(name)
    return done


def _sources(s: Path | ObjectURL) -> list[tuple[str, Any]]:
    if isinstance(s, Path):
        if (s / F.MANIFEST).exists():
            m = F.load_manifest(s)
            return [(F.SNAPSHOTS if F.SNAPSHOT_KIND in m["kinds"] else F.CHECKPOINTS, s)]
        if not F.checkpoints_dir(s).is_dir() and not F.snapshots_dir(s).is_dir():
            raise CheckpointError(f"{s}: neither a checkpoint nor a run directory")
        out: list[tuple[str, Any]] = [(F.CHECKPOINTS, i.path) for i in F.list_checkpoints(s) if i.state == "complete"]
        return out + [(F.SNAPSHOTS, i.path) for i in F.list_snapshots(s) if i.state == "complete"]
    store = store_for(s)
    if store.head((s / F.MANIFEST).key) is not None:
        m, _, _ = load_manifest(store, s)
        return [(F.SNAPSHOTS if F.SNAPSHOT_KIND in m["kinds"] else F.CHECKPOINTS, s)]
    run = s.parent if s.name == F.CHECKPOINTS else s
    out = [(F.CHECKPOINTS, i.path) for i in list_run(run) if i.state == "complete"]
    return out + [(F.SNAPSHOTS, i.path) for i in list_run(run, snapshots=True) if i.state == "complete"]


def _exists(d: Path | ObjectURL, root: str, name: str) -> bool:
    if isinstance(d, Path):
        return (d / root / name / F.MANIFEST).exists()
    return store_for(d).head((d / root / name / F.MANIFEST).key) is not None
