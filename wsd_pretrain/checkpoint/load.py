"""Reading one checkpoint back into a running job, on every rank (docs/checkpoint-format.md, "How a checkpoint is
read").

Every rank calls :func:`load_checkpoint`. Each phase ends with an agreement (:func:`.coord.agree`), so an error on
any rank raises the same :class:`CheckpointError` on every rank and none is left waiting in a collective:

1. **open**: rank 0 reads and checks the manifest (against ``manifest.hash``), ``trainer.json`` and
   ``engine.json``, and sends them to every rank (one read instead of one per rank);
2. **verify**: the files are checked against the manifest (checksums, sizes only, or not at all), each rank
   checking the files that rank ``r mod world`` wrote: on the same layout, the files it is about to read;
3. **plan**: each rank opens the indexes, compares the checkpoint's tensors with this job's (names, shapes,
   dtypes; nothing has changed yet) and works out what it needs: its own slices on the same layout, the
   overlapping parts of other ranks' slices on another (steps 2 and 3 end with one agreement);
4. **read and restore**: each rank reads exactly those bytes and puts them back, with no collective (a
   low-precision weight that every rank holds whole, as under ZeRO-1/2, is read whole by every rank);
5. the optimizer's hyperparameters and counters and each rank's RNG streams (steps 4 and 5 end with one
   agreement), then the caller's scheduler and data.

``rank0_only`` (``write_mode: rank0``, no shared filesystem): rank 0 reads every tensor and broadcasts it on the
checkpoint's gloo group; each rank keeps its part.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..errors import CheckpointError
from . import coord, resume_checks
from . import format as F
from .adapters import EngineAdapter, Want
from .faults import point
from .names import canonical_text
from .rng import restore_rng
from .safetensors_io import DTYPE_TO_STR, STR_TO_DTYPE, read_json
from .store import CheckpointStore

__all__ = ["load_checkpoint", "verify_checkpoint"]

log = logging.getLogger(__name__)


def _open(ckpt: Path) -> dict[str, Any]:
    manifest = F.load_manifest(ckpt)
    if F.SNAPSHOT_KIND in manifest["kinds"]:
        raise CheckpointError(
            f"{ckpt} is a model-only snapshot (no optimizer, data or RNG state): it cannot be resumed; resume from a "
            "checkpoint under checkpoints/, or merge snapshots with `wsd-pretrain ckpt merge`"
        )
    trainer = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/trainer.json", "trainer state"))
    engine = read_json(F.safe_path(ckpt, f"{F.TRAIN_STATE}/engine.json", "engine state"))
    _validated_trainer(ckpt, trainer, engine)
    return {"manifest": manifest, "trainer": trainer, "engine": engine}


def verify_checkpoint(ckpt: Path, manifest: dict[str, Any], mode: str, *, everything: bool = False) -> None:
    """Check the files against the manifest (``mode``: checksum, size, none), this rank's share of them (the files
    rank ``r mod world`` wrote) or ``everything``; raise on every rank naming each bad file."""
    problems = _verify_problems(ckpt, manifest, mode, everything)
    coord.agree("; ".join(problems) or None, f"{ckpt} failed verification")


READ_ONCE_BYTES = 16 * 1024**3
"""The most bytes of its share of the files a resuming rank keeps from the verification for the restore (each
byte read once); past it, the rest is read again from the disk after its checksum (docs/checkpoint-format.md)."""


class _Kept:
    """The byte ranges of safetensors files a rank's verification read and hashed, kept for its restore (up to
    ``budget`` bytes): ``{file: [(offset, bytes)]}``. Filled by the verification's threads."""

    def __init__(self, budget: int) -> None:
        import threading

        self.budget, self.nbytes = budget, 0
        self.ranges: dict[str, list[tuple[int, Any]]] = {}
        self._lock = threading.Lock()

    def __call__(self, rel: str, offset: int, data: Any) -> None:
        if not rel.endswith(".safetensors"):
            return
        with self._lock:
            if self.nbytes + len(data) > self.budget:
                return
            self.nbytes += len(data)
            self.ranges.setdefault(rel, []).append((offset, data))


def _verify_problems(
    ckpt: Path, manifest: dict[str, Any], mode: str, everything: bool = False, keep: Any = None
) -> list[str]:
    rank, world = D.get_rank(), D.get_world_size()
    if mode == "none":
        return []
    mine = {
        rel: rec
        for i, (rel, rec) in enumerate(sorted(manifest["files"].items()))
        if everything or int(rec.get("rank", i)) % world == rank
    }
    share = {**manifest, "files": mine}
    if manifest.get("ranges"):  # and the ranges holder r wrote (r mod world): on the same layout, this rank's own
        ranges = manifest["ranges"]
        holders = {h: rec for h, rec in ranges["holders"].items() if everything or int(h) % world == rank}
        share["ranges"] = {**ranges, "holders": holders}
    try:
        point("load-verify")
        return F.check_files(ckpt, share, checksums=mode == "checksum", keep=keep)
    except Exception as exc:
        return [str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"]


def load_checkpoint(
    adapter: EngineAdapter,
    ckpt: str | os.PathLike[str],
    *,
    verify: str = "checksum",
    rank0_only: bool = False,
    load_optimizer: bool = True,
    restore_rng_state: bool = True,
    check: Callable[[dict[str, Any]], None] | None = None,
    source: Any = None,
) -> dict[str, Any]:
    """Restore the engine from ``ckpt`` (every rank calls this); return ``{"manifest", "trainer", "stats"}``.

    ``verify``: "checksum" (every file's checksum), "size" (sizes only, for speed) or "none". A mismatched model
    (names, shapes), another optimizer class, optimizer state that does not fit this optimizer, or a corrupt file
    raises CheckpointError naming it on every rank, before anything is changed. ``check`` is called on every rank
    with ``{"manifest", "trainer", "engine"}`` (the same plain JSON everywhere) before anything is read: it may
    raise to refuse the checkpoint.

    ``source`` (a :class:`.objread.RemoteCheckpoint`): the checkpoint is on object storage and read in place, each
    rank fetching exactly the byte ranges its restore needs and its verification share (:mod:`.objread`); ``ckpt``
    only names it in messages.
    """
    ckpt = Path(ckpt)
    if verify not in ("checksum", "size", "none"):
        raise CheckpointError(f"verify={verify!r}: use 'checksum', 'size' or 'none'")
    rank = D.get_rank()
    from .save import fence_snapshots

    fence_snapshots()  # an async save still copying this engine's tensors finishes before they are overwritten
    # 1. open: rank 0 reads the manifest and the JSON state for everyone
    opened: Any = None
    if rank == 0:
        try:
            point("load-open")
            opened = _open(ckpt) if source is None else _open_remote(ckpt, source)
        except Exception as exc:
            why = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            opened = {"error": f"cannot resume: rank 0: {why}"}
    opened = coord.broadcast(opened)
    if "error" in opened:
        raise CheckpointError(opened["error"])
    manifest, trainer, engine_meta = opened["manifest"], opened["trainer"], _canonical_meta(opened["engine"])
    live_optimizer = getattr(adapter, "optimizer", None)
    saved_optimizer = engine_meta.get("optimizer") or {}
    if load_optimizer and live_optimizer is not None:
        problem = resume_checks.class_problem(saved_optimizer.get("class"), type(live_optimizer).__name__)
        if problem is not None:
            raise CheckpointError(f"{ckpt}: {problem}")  # every rank, from the same broadcast data
    if check is not None:
        check(opened)

    # 2-3. verify this rank's share of the files and plan what it needs, checked against this job: local work,
    # then one agreement (a bad file or a mismatch anywhere stops every rank before anything changes)
    reads = rank == 0 or not rank0_only
    store: CheckpointStore | None = None
    described: Any = None
    problems: list[str] = []
    # on the same world size each rank verifies the files and ranges it wrote, which are what it restores: it keeps
    # the bytes it hashed and restores from them (each byte read once), after every rank's checks have passed
    kept = (
        _Kept(READ_ONCE_BYTES)
        if verify == "checksum" and not rank0_only and manifest.get("world_size") == D.get_world_size()
        else None
    )
    if source is not None:
        source.verify, kept = verify, None
    if reads and source is not None:
        try:
            store = _remote_store(source, ckpt)
            described = _describe(store)
        except Exception as exc:
            problems = [str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"]
    elif reads:
        problems = _verify_problems(ckpt, manifest, verify, everything=rank0_only, keep=kept)
        if problems:
            problems = [f"{ckpt} failed verification: " + "; ".join(problems)]
        else:
            try:
                store = CheckpointStore(ckpt, manifest, kept.ranges if kept is not None else None)
                described = _describe(store)
            except Exception as exc:
                problems = [str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"]
    if rank0_only:  # the other ranks learn what the checkpoint holds (or rank 0's problem) from rank 0
        described = coord.broadcast(described if not problems else {"error": problems[0]})
        if "error" in described:
            problems = problems or ["rank 0 could not read the checkpoint"]
            described = None
    plan: dict[str, list[Want]] = {}
    with_optim = load_optimizer and described is not None and bool(described["optimizer"])
    if described is not None and not problems:
        try:
            point("load-plan")
            mismatches = _check_compatible(adapter, described)
            if mismatches:
                raise CheckpointError(f"{ckpt} does not match this model: " + "; ".join(mismatches))
            if with_optim and live_optimizer is not None and adapter.engine != "deepspeed":
                # DeepSpeed's flat state has its own keys; its class check above is the guard there
                keys_problem = resume_checks.state_keys_problem(
                    saved_optimizer.get("class"),
                    type(live_optimizer).__name__,
                    described["optimizer"],
                    adapter.optimizer_state_keys(),
                )
                if keys_problem is not None:
                    raise CheckpointError(f"{ckpt}: {keys_problem}")
            saved = {p: {k: tuple(s) for k, s in keys.items()} for p, keys in described["optimizer"].items()}
            plan = adapter.wants(saved if with_optim else {})
            if source is not None:  # the ranges this rank's restore reads, then fetched with its verification share
                problems = _prefetch(store, source, adapter, plan, described)
        except Exception as exc:  # an engine that cannot describe what it needs: every rank must hear of it
            problems = [str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"]
    _agree_or_close("; ".join(problems) or None, store)

    # 4. read and restore, parameter by parameter (no collective, except in rank0 mode)
    error = None
    reader = _Rank0Reader(store) if rank0_only else _Reader(store)

    def step(what: str, fn: Any) -> None:
        # a failure is remembered; in rank0 mode the rank keeps receiving rank 0's broadcasts (without restoring)
        # so that rank 0 is never left sending to a rank that stopped listening
        nonlocal error
        if error is not None and not rank0_only:
            return
        try:
            fn(error is None)
        except Exception as exc:
            if error is None:
                error = f"{what}: {exc}" if isinstance(exc, CheckpointError) else f"{what}: {type(exc).__name__}: {exc}"

    step("preparing the engine", lambda ok: adapter.begin_restore(with_optim) if ok else None)
    for pname in adapter.param_names:

        def one(ok: bool, pname: str = pname) -> None:
            point(f"load-read:{pname}")
            tensors = {w.slot: reader.get(w, described) for w in plan.get(pname, [])}
            if ok:
                point(f"load-restore:{pname}")
                adapter.restore(pname, tensors)

        step(pname, one)
    for bname in adapter.buffer_names:

        def buf(ok: bool, bname: str = bname) -> None:
            t = reader.get(Want("buffer", bname), described)
            if ok:
                adapter.restore_buffer(bname, t)

        step(bname, buf)
    step("optimizer hyperparameters", lambda ok: adapter.restore_meta(engine_meta) if ok and load_optimizer else None)
    step("finishing the restore", lambda ok: adapter.end_restore() if ok else None)
    if store is not None:
        store.close()
    stats = {
        "bytes_read": store.bytes_read if store is not None else 0,
        "bytes_kept": kept.nbytes if kept is not None else 0,  # read once: by the verification, for the restore
        "kept_hits": store.kept_hits if store is not None else 0,
        "files_read": sorted(store.opened) if store is not None else [],
    }
    if source is not None:  # object storage: what this rank fetched (ranged GETs) to verify its share and restore
        stats.update(bytes_fetched=source.bytes_fetched, gets=source.gets)
    kept = None
    if restore_rng_state:
        rng_error = _restore_rng(ckpt, manifest, rank0_only, source)
        error = error or rng_error
    coord.agree(error, f"resuming from {ckpt} failed (the engine may be partly restored: restart the job)")
    return {"manifest": manifest, "trainer": trainer, "stats": stats}


def _open_remote(ckpt: Path, source: Any) -> dict[str, Any]:
    """:func:`_open` for a checkpoint on object storage (its manifest was validated when it was fetched)."""
    manifest = source.manifest
    if F.SNAPSHOT_KIND in manifest["kinds"]:
        raise CheckpointError(f"{source.url} is a model-only snapshot (no optimizer, data or RNG state)")
    trainer = source.json(f"{F.TRAIN_STATE}/trainer.json", "trainer state")
    engine = source.json(f"{F.TRAIN_STATE}/engine.json", "engine state")
    _validated_trainer(ckpt, trainer, engine)
    return {"manifest": manifest, "trainer": trainer, "engine": engine}


def _remote_store(source: Any, ckpt: Path) -> CheckpointStore:
    from .objread import RemoteStore

    return RemoteStore(source, ckpt)


def _prefetch(
    store: Any, source: Any, adapter: EngineAdapter, plan: dict[str, list[Want]], described: Any
) -> list[str]:
    """Object storage: record the byte ranges the restore below will read (nothing fetched), then fetch them and
    this rank's verification share (whole files, checksummed) with ranged GETs, several in flight; the restore
    reads from those bytes. Returns the problems (agreed on before anything is restored)."""

    from .objread import HeaderPending

    def walk() -> None:
        reader = _Reader(store)
        wants = [w for pname in adapter.param_names for w in plan.get(pname, [])]
        for w in wants + [Want("buffer", bname) for bname in adapter.buffer_names]:
            try:
                reader.get(w, described)
            except HeaderPending:  # its file's header is fetched with the others this pass meets, then walked again
                continue

    needs = store.record(walk)
    source.rank, source.world = D.get_rank(), D.get_world_size()
    kept, problems = source.prefetch(needs, source.share(source.rank, source.world), READ_ONCE_BYTES)
    if problems:
        return [f"{source.url} failed verification: " + "; ".join(problems)]
    store.keep(kept)
    return []


def _agree_or_close(error: str | None, store: CheckpointStore | None) -> None:
    try:
        coord.agree(error, "cannot resume")
    except CheckpointError:
        if store is not None:
            store.close()
        raise


def verify_checkpoint_local(ckpt: Path, manifest: dict[str, Any], verify: str) -> None:
    if verify != "none":
        problems = F.check_files(ckpt, manifest, checksums=verify == "checksum")
        if problems:
            raise CheckpointError(f"{ckpt} failed verification: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------- planning


def _describe(store: CheckpointStore | None) -> dict[str, Any]:
    """What the checkpoint holds, as plain JSON (in rank0 mode the other ranks learn it from rank 0), under the
    bare model's names: a checkpoint written before names dropped torch's wrapper segments (a compiled model's
    ``_orig_mod.``) is described by its canonical names, and ``aliases`` maps them back to the stored ones."""
    assert store is not None
    out: dict[str, Any] = {"model": {}, "master": {}, "optimizer": {}, "aliases": {}}
    for group in ("model", "master"):
        for name in store.names(group):
            e = store.entry(group, name)
            bare = canonical_text(name)
            if bare != name:
                out["aliases"][f"{group}/{bare}"] = name
            out[group][bare] = [list(e.shape), DTYPE_TO_STR[e.dtype]]
    for pname, keys in store.optimizer_keys().items():
        bare = canonical_text(pname)
        out["optimizer"][bare] = {}
        for key in keys:
            e = store.entry("optimizer", f"{pname}/{key}")
            if bare != pname:
                out["aliases"][f"optimizer/{bare}/{key}"] = f"{pname}/{key}"
            out["optimizer"][bare][key] = list(e.shape)
            out.setdefault("optimizer_dtypes", {})[f"{bare}/{key}"] = DTYPE_TO_STR[e.dtype]
    return out


def _canonical_meta(engine: Any) -> Any:
    """engine.json's parameter names (param groups, non-tensor state) by the same rule as :func:`_describe`."""
    optimizer = engine.get("optimizer") if isinstance(engine, dict) else None
    if not isinstance(optimizer, dict):
        return engine
    optimizer = dict(optimizer)
    groups = optimizer.get("param_groups")
    if isinstance(groups, list):
        optimizer["param_groups"] = [
            {**g, "params": [canonical_text(n) for n in g["params"]]}
            if isinstance(g, dict)
            and isinstance(g.get("params"), list)
            and all(isinstance(n, str) for n in g["params"])
            else g
            for g in groups
        ]
    if isinstance(optimizer.get("scalars"), dict):
        optimizer["scalars"] = {canonical_text(k): v for k, v in optimizer["scalars"].items()}
    return {**engine, "optimizer": optimizer}


def _check_compatible(adapter: EngineAdapter, described: dict[str, Any]) -> list[str]:
    """Problems that make the checkpoint unfit for this model: names, shapes, dtypes (a floating tensor for a
    floating one, others exactly), master weights of the wrong shape. Optimizer state of any shape is accepted: the
    adapter reads per-element state as its parameter and any other whole, and refuses what it cannot place."""
    problems: list[str] = []
    model, master = described["model"], described["master"]
    wanted = {i.name: (i.shape, i.dtype) for i in adapter.items() if i.group == "model"}
    missing = sorted(set(wanted) - set(model))
    extra = sorted(set(model) - set(wanted))
    if missing:
        problems.append(f"the checkpoint lacks {len(missing)} tensors of this model, e.g. {missing[:3]}")
    if extra:
        problems.append(f"the checkpoint has {len(extra)} tensors this model lacks, e.g. {extra[:3]}")

    def check(entry: list[Any], key: str, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> None:
        saved_shape, saved_dtype = tuple(entry[0]), STR_TO_DTYPE[entry[1]]
        if saved_shape != tuple(shape):
            problems.append(f"{what} {key}: shape {list(saved_shape)} in the checkpoint, {list(shape)} here")
        elif saved_dtype.is_floating_point != dtype.is_floating_point or (
            not dtype.is_floating_point and saved_dtype != dtype
        ):
            problems.append(f"{what} {key}: dtype {saved_dtype} in the checkpoint, {dtype} here")

    for name in sorted(set(wanted) & set(model)):
        check(model[name], name, *wanted[name], "model tensor")
        if name in master:
            check(master[name], name, wanted[name][0], torch.float32, "master weight")
        if len(problems) > 8:
            return problems
    dtypes = described.get("optimizer_dtypes", {})
    for pname, keys in described["optimizer"].items():
        for key in keys:
            full = f"{pname}/{key}"
            if pname not in wanted:
                problems.append(f"optimizer state {full} belongs to no parameter of this model")
            elif not STR_TO_DTYPE[dtypes[full]].is_floating_point:
                problems.append(f"optimizer state {full}: dtype {dtypes[full]}, expected a floating type")
            if len(problems) > 8:
                return problems
    return problems


def _source(want: Want, described: dict[str, Any]) -> tuple[str, str, torch.dtype | None]:
    """Where a want is read from: (group, tensor name as stored, dtype to cast to or None)."""
    group, name, cast = _source_bare(want, described)
    return group, described.get("aliases", {}).get(f"{group}/{name}", name), cast


def _source_bare(want: Want, described: dict[str, Any]) -> tuple[str, str, torch.dtype | None]:
    if want.kind == "optimizer":
        return "optimizer", f"{want.name}/{want.key}", None
    if want.kind == "buffer":
        return "model", want.name, None
    hp = ("master", want.name) if want.name in described["master"] else ("model", want.name)
    if want.kind == "hp":
        return (*hp, None)
    # lp: the model's own weight when its dtype is what this engine holds, else the master (or weight) cast
    saved = STR_TO_DTYPE[described["model"][want.name][1]]
    if want.dtype is None or saved == want.dtype:
        return "model", want.name, None
    return (*hp, want.dtype)


class _Reader:
    """Each want read from the files (one positioned read per slice); repeated reads of a parameter are shared."""

    def __init__(self, store: CheckpointStore | None) -> None:
        assert store is not None
        self.store = store
        self._last: dict[tuple[Any, ...], torch.Tensor] = {}

    def get(self, want: Want, described: dict[str, Any]) -> torch.Tensor:
        group, name, cast = _source(want, described)
        key = (group, name, want.start, want.numel, want.box)
        t = self._last.get(key)
        if t is None:
            if len(self._last) > 8:
                self._last.clear()
            t = self._last[key] = self.store.read(group, name, want.start, want.numel, box=want.box)
        return t.to(cast) if cast is not None else t


class _Rank0Reader(_Reader):
    """``write_mode: rank0``: rank 0 reads each whole tensor and broadcasts it (gloo, CPU); every rank keeps its
    part. Costs each tensor's bytes times the world size in messages: for jobs without a shared filesystem."""

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store  # type: ignore[assignment]
        self._last = {}

    def get(self, want: Want, described: dict[str, Any]) -> torch.Tensor:
        import torch.distributed as dist

        group, name, cast = _source(want, described)
        key = (group, name)
        full = self._last.get(key)
        if full is None:
            desc: Any = None
            if D.get_rank() == 0:
                try:
                    full = self.store.read(group, name).contiguous()
                    desc = [list(full.shape), DTYPE_TO_STR[full.dtype]]
                except Exception as exc:  # told to every rank, which all stop reading
                    desc = {"error": f"{type(exc).__name__}: {exc}"}
            desc = coord.broadcast(desc)
            if isinstance(desc, dict):
                raise CheckpointError(f"rank 0 could not read {group} tensor {name!r}: {desc['error']}")
            if full is None:
                full = torch.empty(desc[0], dtype=STR_TO_DTYPE[desc[1]])
            if D.is_distributed():
                dist.broadcast(full, src=0, group=coord.groups().coord)
            self._last = {key: full}
        t = full
        if want.box is not None:  # a tensor-parallel shard's box
            t = full[tuple(slice(o, o + n) for o, n in zip(*want.box))]
        t = t if want.numel is None else t.reshape(-1)[want.start : want.start + want.numel]
        return t.to(cast) if cast is not None else t


# ---------------------------------------------------------------------------------------------- JSON state


def _validated_trainer(ckpt: Path, trainer: Any, engine: Any) -> None:
    """trainer.json and engine.json are JSON we wrote: refuse any other shape with a clear error."""
    where = ckpt / F.TRAIN_STATE
    if not isinstance(trainer, dict):
        raise CheckpointError(f"{where / 'trainer.json'}: not a JSON object")
    for key in ("position", "step", "tokens"):
        if not isinstance(trainer.get(key), int) or isinstance(trainer.get(key), bool) or trainer[key] < 0:
            raise CheckpointError(f"{where / 'trainer.json'}: {key!r} must be a whole number >= 0")
    for key in ("scheduler", "data", "extra", "scaler"):
        if trainer.get(key) is not None and not isinstance(trainer[key], dict):
            raise CheckpointError(f"{where / 'trainer.json'}: {key!r} must be an object or null")
    if not isinstance(engine, dict) or not isinstance(engine.get("optimizer", {}) or {}, dict):
        raise CheckpointError(f"{where / 'engine.json'}: not an engine state object")
    groups = (engine.get("optimizer") or {}).get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{where / 'engine.json'}: optimizer.param_groups must be a list of objects")
    scalars = (engine.get("optimizer") or {}).get("scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(v, dict) for v in scalars.values()):
        raise CheckpointError(f"{where / 'engine.json'}: optimizer.scalars must map parameters to objects")


def _restore_rng(ckpt: Path, manifest: dict[str, Any], rank0_only: bool, source: Any = None) -> str | None:
    """This rank's RNG streams back; returns this rank's error (the caller's agreement raises it everywhere)."""
    rank, world = D.get_rank(), D.get_world_size()
    error, state = None, None
    try:
        if rank0_only:
            states: Any = None
            if rank == 0:
                try:
                    states = []
                    for r in range(world):
                        path = F.safe_path(ckpt, f"{F.TRAIN_STATE}/rng/rank-{r:05d}.json", "rng state")
                        states.append(read_json(path) if path.is_file() else None)
                except CheckpointError as exc:
                    states = {"error": str(exc)}
            states = coord.broadcast(states)
            if isinstance(states, dict):
                raise CheckpointError(states["error"])
            state = states[rank]
        elif source is not None:
            rel = f"{F.TRAIN_STATE}/rng/rank-{rank:05d}.json"
            state = source.json(rel, "rng state") if rel in manifest["files"] else None
        else:
            path = F.safe_path(ckpt, f"{F.TRAIN_STATE}/rng/rank-{rank:05d}.json", "rng state")
            state = read_json(path) if path.is_file() else None
        if state is None:
            if not manifest.get("rng", True):
                log.info("rank %d: the checkpoint has no RNG state (imported); this rank keeps its fresh seed", rank)
            elif manifest["world_size"] == world:
                raise CheckpointError(f"{ckpt}: no RNG state for rank {rank}")
            else:
                log.warning(
                    "rank %d: the checkpoint was written by %d ranks; this rank's RNG keeps its fresh seed",
                    rank,
                    manifest["world_size"],
                )
        else:
            restore_rng(state)
    except CheckpointError as exc:
        error = f"restoring the RNG state: {exc}"
    return error
