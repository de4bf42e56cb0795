"""Hugging Face ``transformers.Trainer``: our checkpoints at every milestone, exact resume with
``resume_from_checkpoint``, a clean stop on preemption.

::

    from wsd_pretrain.integrations.hf import WSDTrainerCallback, last_checkpoint, wsd_scheduler

    args = TrainingArguments(output_dir="runs/x", max_steps=10_000, warmup_steps=500, save_strategy="no", ...)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = wsd_scheduler(optimizer, args, decay_fraction=0.2)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(optimizer, scheduler),
                      callbacks=[WSDTrainerCallback()])
    trainer.train(resume_from_checkpoint=last_checkpoint("runs/x"))   # None on the first run

On object storage: ``WSDTrainerCallback("s3://bucket/runs/x")`` and
``resume_from_checkpoint=last_checkpoint("s3://bucket/runs/x")`` on every rank (``output_dir`` stays local). Rank 0
picks the checkpoint and tells the others. With one rank a node, each node downloads, verified, only what the
Trainer opens itself (the model folder: config and weights) plus ``trainer_state.json``, into
``<cache>/hf-resume/<name>/`` (not a checkpoint: no manifest, never listed or resumed as one), and the callback's
manager restores the training state (optimizer, scheduler, RNG, data) in place from the bucket; with several ranks a
node (every rank of a replicated model restores the whole state) the node downloads the whole checkpoint once,
verified, and the manager reads it from disk (``training_state``; docs/integrations.md).

Every checkpoint is a Hugging Face model folder (``from_pretrained`` loads it) holding our training state, plus
the ``trainer_state.json`` that ``resume_from_checkpoint`` reads: the Trainer restores its counters from it and
skips the batches already seen; the callback restores the optimizer, the scheduler and the RNG from our state
(no pickled ``optimizer.pt`` or ``rng_state.pth``), the RNG at the moment the Trainer itself would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checkpoint import format as F
from ..checkpoint.guards import check_total
from ..checkpoint.manager import CheckpointConfig, Stateful
from ..errors import CheckpointError, ConfigError, WSDError
from ..schedule import WSDSchedule
from ..scheduler import WSDScheduler
from ._common import FrameworkCheckpointer, log_rank0

__all__ = ["TRAINER_STATE_NAME", "WSDTrainerCallback", "last_checkpoint", "wsd_scheduler"]

log = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"


def wsd_scheduler(
    optimizer: torch.optim.Optimizer,
    args: TrainingArguments,
    *,
    num_training_steps: int | None = None,
    **schedule: Any,
) -> WSDScheduler:
    """A :class:`WSDScheduler` built from the ``TrainingArguments``: ``total`` is ``args.max_steps`` (or
    ``num_training_steps`` when the run is given in epochs), the warmup is ``args.warmup_steps`` / the warmup
    ratio; any :class:`WSDSchedule` field can be given (``decay_fraction=0.2``, ``milestones=[...]``, ...).
    Pass it to the Trainer with ``optimizers=(optimizer, scheduler)``."""
    total = num_training_steps if num_training_steps is not None else args.max_steps
    if not isinstance(total, int) or total <= 0:
        raise ConfigError(
            f"max_steps={args.max_steps}: a WSD schedule needs the run's length in optimizer updates; set "
            "TrainingArguments(max_steps=...) or pass num_training_steps=",
            where="wsd_scheduler",
        )
    schedule.setdefault("warmup", args.get_warmup_steps(total))
    return WSDScheduler(optimizer, WSDSchedule(total=total, **schedule))


def last_checkpoint(
    run_dir: str | os.PathLike[str],
    *,
    local_dir: str | os.PathLike[str] | None = None,
    training_state: str = "auto",
) -> str | None:
    """The newest complete checkpoint of ``run_dir``, ready for ``trainer.train(resume_from_checkpoint=...)``, or
    None when the run has none (a fresh start). Writes its ``trainer_state.json`` from our saved state if a crash
    right after the commit left it out.

    A run on object storage (``s3://bucket/prefix``, ``az://``): the Trainer reads a local folder itself (its
    ``trainer_state.json`` and, for a plain or DDP model, its weights), so only those files are downloaded, every
    object verified against the manifest, into ``local_dir/hf-resume/<name>/`` (default ``local_dir``: the node-local
    cache folder of the URL, ``storage.cache_dir``); the training state (optimizer, scheduler, RNG, data) stays on the
    bucket, and the callback's manager reads each rank's ranges of it in place. That folder is not a checkpoint (no
    manifest; a marker file names the checkpoint it came from) and is never listed or resumed as one. With a
    process group running (the Trainer's), call this on every rank: rank 0 alone lists the bucket and picks the
    checkpoint, every rank gets its name (or rank 0's error, raised on every rank with the same message); the
    processes of one node share one download (a file lock), and a folder already there is reused when its
    checkpoint's manifest is the one picked.

    ``training_state``: ``"bucket"`` as above; ``"node"`` downloads the whole checkpoint instead (verified,
    committed locally into ``local_dir/checkpoints/<name>``), which the manager then reads from the node's disk;
    ``"auto"`` (the default) is ``"node"`` when a node runs several processes of the job, else ``"bucket"``. The
    Trainer's models are replicated (plain or DDP: every rank restores the whole state), so with N ranks a node
    one download a node reads the state once where reading in place reads it N times; with one rank a node both
    read it once, and in place skips the copy to disk."""
    from ..checkpoint.storage import ObjectURL, parse_location

    if training_state not in ("auto", "bucket", "node"):
        raise ConfigError(
            f"training_state={training_state!r}: 'bucket' (read in place by the manager), 'node' (the whole "
            "checkpoint downloaded onto each node) or 'auto' (node when a node runs several ranks)",
            where="last_checkpoint",
        )
    if training_state == "auto":
        from ..distributed import get_local_world_size

        training_state = "node" if get_local_world_size() > 1 else "bucket"
    location = parse_location(run_dir)
    if isinstance(location, ObjectURL):
        return _fetch_newest(location, local_dir, whole=training_state == "node")
    infos = [i for i in F.list_checkpoints(location) if i.state == "complete"]
    if not infos:
        return None
    path = infos[-1].path
    _ensure_sidecar(path)
    return str(path)


def _ensure_sidecar(path: Path) -> None:
    sidecar = path / TRAINER_STATE_NAME
    if not sidecar.is_file():
        trainer = json.loads((path / F.TRAIN_STATE / "trainer.json").read_text())
        saved = _saved_trainer_state(trainer)
        if saved is None:
            raise CheckpointError(_not_ours(path))
        _write_text(sidecar, saved)


def _not_ours(path: Any) -> str:
    return (
        f"{path} was not written by WSDTrainerCallback (no Trainer state in it); resume it with a "
        "CheckpointManager, or start the Trainer from its weights"
    )


def _saved_trainer_state(trainer: dict[str, Any]) -> str | None:
    return ((trainer.get("extra") or {}).get("loop") or {}).get("framework", {}).get("trainer_state")


# last_checkpoint's folder for the Trainer under local_dir, and the marker that names its checkpoint (written last)
HF_RESUME = "hf-resume"
HF_RESUME_MARK = "wsd-hf-resume.json"

# run URL -> (checkpoint name, global_step) that last_checkpoint picked in this process: the callback's resume
# then finds the checkpoint without listing the bucket again
_picked: dict[str, tuple[str, int]] = {}


def _decided_on_rank0(fn: Callable[[], Any], what: str, broadcast: Callable[[Any], Any] | None = None) -> Any:
    """``fn()`` (a plain-JSON value) on rank 0 only, sent to every rank; without a process group, ``fn()`` here.
    Any error on rank 0 is raised on every rank as a :class:`CheckpointError` with the same message, so that no rank
    raises alone while the others wait in a collective."""
    from .. import distributed as D

    if not D.is_distributed() or D.get_world_size() == 1:
        return fn()
    send = broadcast or D.broadcast_object
    out: Any = None
    failure: BaseException | None = None
    if D.get_rank() == 0:
        try:
            out = {"value": fn()}
        except Exception as exc:  # every rank raises it below, from the same broadcast
            failure = exc
            text = str(exc) if isinstance(exc, WSDError) else f"{type(exc).__name__}: {exc}"
            out = {"error": f"{what}: {text}"}
    out = send(out)
    if "error" in out:
        raise CheckpointError(out["error"]) from failure
    return out["value"]


def _newest_on_bucket(url: Any) -> dict[str, Any] | None:
    """Rank 0 of :func:`last_checkpoint`: the run's newest complete checkpoint, its manifest's hash and its saved
    Trainer state (``train_state/trainer.json`` checked against the manifest)."""
    from ..checkpoint import objstore
    from ..checkpoint.objread import RemoteCheckpoint
    from ..checkpoint.storage import store_for

    infos = [i for i in objstore.list_run(url) if i.state == "complete"]
    if not infos:
        return None
    newest = infos[-1]
    m, _, raw_hash = objstore.load_manifest(store_for(url), newest.path)  # type: ignore[arg-type]
    rel = f"{F.TRAIN_STATE}/trainer.json"
    if rel not in m["files"]:
        raise CheckpointError(_not_ours(newest.path))
    trainer = RemoteCheckpoint(newest.path, m).json(rel, "the saved Trainer state")  # type: ignore[arg-type]
    saved = _saved_trainer_state(trainer)
    if saved is None:
        raise CheckpointError(_not_ours(newest.path))
    return {
        "name": newest.name,
        "hash": raw_hash.decode("ascii", "replace").strip(),
        "trainer_state": saved,
        "global_step": json.loads(saved).get("global_step"),
    }


def _trainer_files(manifest: dict[str, Any]) -> list[str]:
    """The files of a checkpoint that ``Trainer.train(resume_from_checkpoint=...)`` opens itself for a plain or DDP
    model (``_load_from_checkpoint``, ``TrainerState.load_from_json``; decision 155): its Hugging Face model folder
    (``config.json``, the weights' index and shards, a PEFT adapter's files), never the training state under
    ``train_state/`` (optimizer, master weights, scheduler, RNG, data: the callback's manager restores those).
    ``trainer_state.json`` is written from our saved Trainer state."""
    return sorted(rel for rel in manifest["files"] if not rel.startswith(F.TRAIN_STATE + "/"))


def _fetch_newest(url: Any, local_dir: str | os.PathLike[str] | None, *, whole: bool) -> str | None:
    """:func:`last_checkpoint` of a run on object storage (see there)."""
    from .. import distributed as D
    from ..checkpoint import coord
    from ..checkpoint.storage import cache_dir

    picked = _decided_on_rank0(lambda: _newest_on_bucket(url), f"cannot pick the checkpoint to resume from {url}")
    if picked is None:
        return None
    local = Path(local_dir) if local_dir is not None else Path(cache_dir(url))
    error = None
    path = local / HF_RESUME / picked["name"]
    try:
        path = _whole_checkpoint(url, picked, local) if whole else _trainer_folder(url, picked, local)
    except Exception as exc:  # every rank learns it below: none goes on into the Trainer's collectives alone
        if not D.is_distributed():
            raise
        error = str(exc) if isinstance(exc, WSDError) else f"{type(exc).__name__}: {exc}"
    what = f"cannot fetch {'' if whole else 'the Trainer files of '}{url}/{F.CHECKPOINTS}/{picked['name']}"
    coord.agree(error, what)  # one small all-reduce when every node's fetch succeeded
    _picked[str(url)] = (picked["name"], picked["global_step"])
    return str(path)


def _whole_checkpoint(url: Any, picked: dict[str, Any], local: Path) -> Path:
    """``training_state="node"``: checkpoint ``picked`` downloaded whole into ``local/checkpoints/`` (every object
    verified, committed locally), reused when its ``manifest.hash`` is the one picked; one process of a node at a
    time (a file lock)."""
    import fcntl
    import shutil

    from ..checkpoint import objstore

    path = F.checkpoints_dir(local) / picked["name"]
    local.mkdir(parents=True, exist_ok=True)
    with open(local / ".wsd-fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait for this download, then reuse it
        if path.exists() and _held_hash(path) != picked["hash"]:  # not this checkpoint (or an interrupted copy)
            shutil.rmtree(path)
        if not path.exists():
            objstore.download(url / F.CHECKPOINTS / picked["name"], local)
            log.info(
                "transformers.Trainer: %s downloaded (verified) into %s", url / F.CHECKPOINTS / picked["name"], path
            )
            if _held_hash(path) != picked["hash"]:
                raise CheckpointError(f"{path}: its manifest changed on the bucket while the ranks resumed from it")
        if not (path / TRAINER_STATE_NAME).is_file():
            _write_text(path / TRAINER_STATE_NAME, picked["trainer_state"])
    return path


def _held_hash(path: Path) -> str | None:
    try:
        return (path / F.MANIFEST_HASH).read_bytes().decode("ascii", "replace").strip()
    except OSError:
        return None


def _trainer_folder(url: Any, picked: dict[str, Any], local: Path) -> Path:
    """The node's folder for the Trainer of checkpoint ``picked``: reused when its marker names the same manifest,
    else fetched into a temporary folder (verified), the marker written last, renamed into place; older folders of
    this run's ``hf-resume/`` are removed. One process of a node does it at a time (a file lock)."""
    import fcntl
    import shutil
    import uuid

    from ..checkpoint import objstore
    from ..checkpoint.storage import store_for

    root = local / HF_RESUME
    root.mkdir(parents=True, exist_ok=True)
    path = root / picked["name"]
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other processes wait for this download, then reuse it
        if _marker_hash(path) == picked["hash"]:
            return path
        ckpt = url / F.CHECKPOINTS / picked["name"]
        store = store_for(url)
        m, _, raw_hash = objstore.load_manifest(store, ckpt)
        if raw_hash.decode("ascii", "replace").strip() != picked["hash"]:
            raise CheckpointError(f"{ckpt}: its manifest changed on the bucket while the ranks resumed from it")
        rels = _trainer_files(m)
        tmp = root / f".tmp-{picked['name']}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            problems = objstore.fetch_files(store, ckpt, m, tmp, rels)
            ranged = {rel: m["files"][rel] for rel in rels if m["files"][rel].get("ranged")}
            if not problems and ranged:
                problems = F.check_files(tmp, {**m, "files": ranged}, checksums=True)
            if problems:
                raise CheckpointError(f"{ckpt}: damaged objects: " + "; ".join(problems))
            (tmp / TRAINER_STATE_NAME).write_text(picked["trainer_state"])
            mark = {
                "what": "the files transformers.Trainer reads to resume from this checkpoint (its model folder and "
                "trainer_state.json); not a checkpoint: the training state is read from the bucket",
                "checkpoint": str(ckpt),
                "manifest_hash": picked["hash"],
                "files": [*rels, TRAINER_STATE_NAME],
            }
            _write_text(tmp / HF_RESUME_MARK, json.dumps(mark, indent=2) + "\n")
            for old in root.iterdir():  # a previous resume's folder (or one interrupted): this run needs one
                if old.is_dir() and old != tmp:
                    shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("transformers.Trainer: the model folder of %s downloaded (verified) into %s", ckpt, path)
    return path


def _marker_hash(path: Path) -> str | None:
    try:
        return json.loads((path / HF_RESUME_MARK).read_text()).get("manifest_hash")
    except (OSError, ValueError, AttributeError):
        return None


def _write_text(path: Path, text: str) -> None:
    """Atomically, durably: a temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WSDTrainerCallback(TrainerCallback):
    """Writes our checkpoints from a ``transformers.Trainer`` run; see the module docstring.

    Args:
        run_dir: the run directory (default: ``args.output_dir``).
        config: :class:`CheckpointConfig` (milestones, ``every_steps``, async, retention, preemption signals).
        data: a resumable data source, when the Trainer's loader is not what holds the data position.
        check_max_steps: refuse a ``max_steps`` that disagrees with the schedule's end.

    The Trainer must get the WSD scheduler (``optimizers=(optimizer, wsd_scheduler(...))``). Set
    ``save_strategy="no"``: the Trainer's own checkpoints are pickles and are not needed to resume.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        config: CheckpointConfig | None = None,
        data: Stateful | None = None,
        check_max_steps: bool = True,
    ) -> None:
        self.run_dir = run_dir
        self.config = config
        self.data = data
        self.check_max_steps = check_max_steps
        self.ckpt: FrameworkCheckpointer | None = None
        self._state: TrainerState | None = None
        self._rng_at_epoch_begin = False
        self._sidecars: list[tuple[Path, str]] = []

    @property
    def manager(self) -> Any:
        return self.ckpt.manager if self.ckpt is not None else None

    # ------------------------------------------------------------------ start

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")  # a non-WSD scheduler is refused by the manager, saying what to pass
        # a local run, or one on object storage (s3://): the Trainer then resumes from the model folder that
        # last_checkpoint() downloads, and the manager loads the same checkpoint's training state from the bucket
        run_dir = self.run_dir if self.run_dir is not None else args.output_dir
        self.ckpt = FrameworkCheckpointer(run_dir, config=self.config, data=self.data, framework="transformers.Trainer")
        self._state = state
        mgr = self.ckpt.build(kwargs["model"], kwargs["optimizer"], scheduler)
        if state.global_step > 0:
            self._resume(self.ckpt.run_dir, state, args, kwargs.get("train_dataloader"))
        elif self.ckpt.has_checkpoints():
            raise CheckpointError(
                f"{run_dir} has checkpoints but the Trainer starts from step 0: resume with "
                "trainer.train(resume_from_checkpoint=wsd_pretrain.integrations.hf.last_checkpoint(run_dir)), or "
                "give this run its own output_dir"
            )
        if self.check_max_steps:
            check_total(mgr.scheduler, state.max_steps, done=state.global_step, framework="transformers.Trainer")
        if args.save_strategy != "no":
            log_rank0(
                logging.INFO,
                "save_strategy=%s: the Trainer writes its own (pickled) checkpoints too; WSDTrainerCallback's are "
                "enough to resume (save_strategy='no')",
                args.save_strategy,
            )

    def _resume(self, run_dir: Any, state: TrainerState, args: TrainingArguments, loader: Any) -> None:
        """The Trainer read ``trainer_state.json`` from one of our checkpoints: load the same checkpoint."""
        assert self.ckpt is not None
        target = _checkpoint_for_step(run_dir, state.global_step)
        if target is None:
            raise CheckpointError(
                f"the Trainer resumed at step {state.global_step}, but {run_dir} has no WSDTrainerCallback checkpoint "
                "of that step (a checkpoint the Trainer wrote itself?): resume with "
                "resume_from_checkpoint=wsd_pretrain.integrations.hf.last_checkpoint(run_dir)"
            )
        self.ckpt.resume(target, log_loop=False)  # the Trainer's counters say where its loop resumes (below)
        updates = self.ckpt.scheduler.last_epoch
        saved_step = int(self.ckpt.loop.framework.get("global_step", updates))
        if saved_step != state.global_step:
            raise CheckpointError(
                f"{target}: its trainer_state.json says step {state.global_step}, its training state step "
                f"{saved_step}; the folder was modified"
            )
        # The Trainer restores its own RNG files before the epoch's iterator when it resumes at an epoch
        # boundary, and after building the skipped iterator when mid-epoch; ours go back at the same points.
        per_epoch = None
        if loader is not None and hasattr(loader, "__len__"):
            n = len(loader)
            accum = args.gradient_accumulation_steps
            per_epoch = max(n // accum + int(n % accum > 0), 1)
        self._rng_at_epoch_begin = per_epoch is not None and state.global_step % per_epoch == 0
        if per_epoch is not None:
            epoch, done = divmod(state.global_step, per_epoch)
            where = f"epoch {epoch}, batch {min(done * args.gradient_accumulation_steps, len(loader))}"
        else:
            where = f"epoch {state.epoch:g}"
        log_rank0(
            logging.INFO,
            "transformers.Trainer: resumed at update %d from %s (the Trainer goes on at %s)",
            updates,
            Path(target).name,
            where,
        )
        if args.ignore_data_skip:
            log_rank0(logging.WARNING, "ignore_data_skip=True: the resumed run reads its epoch from the start")

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ckpt is not None and self._rng_at_epoch_begin:
            self.ckpt.apply_rng()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ckpt is not None:
            self.ckpt.apply_rng()

    # ------------------------------------------------------------------ saving

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """After the optimizer and scheduler steps: the schedule's points, periodic saves, preemption, the end."""
        assert self.ckpt is not None
        self.ckpt.loop.framework = {"global_step": state.global_step, "trainer_state": _state_json(state)}
        path = self.ckpt.maybe_save()
        if path is not None and not isinstance(path, Path):
            path = None  # committed on object storage: last_checkpoint() writes the sidecar into its download
        if path is not None and self.ckpt.manager is not None and self.ckpt.manager.config.async_save is False:
            self._write_sidecar(path, self.ckpt.loop.framework["trainer_state"])
        elif path is not None:
            self._sidecars.append((path, self.ckpt.loop.framework["trainer_state"]))
        self._flush_sidecars()
        if self.ckpt.should_stop:
            control.should_training_stop = True

    def _write_sidecar(self, path: Path, text: str) -> None:
        from .. import distributed as D

        if D.get_rank() == 0 and path.is_dir():
            _write_text(path / TRAINER_STATE_NAME, text)

    def _flush_sidecars(self, wait: bool = False) -> None:
        """Async saves: a checkpoint's trainer_state.json goes in once the checkpoint is committed."""
        keep = []
        for path, text in self._sidecars:
            if path.is_dir():
                self._write_sidecar(path, text)
            elif not wait:
                keep.append((path, text))
        self._sidecars = keep

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self._flush_sidecars(wait=True)


def _state_json(state: TrainerState) -> str:
    """The Trainer's own ``save_to_json`` text."""
    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"


def _checkpoint_for_step(run_dir: Any, global_step: int) -> Path | str | None:
    """The newest complete checkpoint whose trainer_state.json (ours) is at ``global_step`` (on object storage: its
    name, decided on rank 0 and sent to every rank: the one :func:`last_checkpoint` picked in this process when it
    is at that step, else found from each checkpoint's saved Trainer state on the bucket, newest first)."""
    from ..checkpoint.storage import ObjectURL

    if isinstance(run_dir, ObjectURL):
        from ..checkpoint import coord

        return _decided_on_rank0(
            lambda: _step_on_bucket(run_dir, global_step),
            f"cannot find the checkpoint of step {global_step} on {run_dir}",
            broadcast=coord.broadcast,
        )
    for info in reversed([i for i in F.list_checkpoints(run_dir) if i.state == "complete"]):
        sidecar = info.path / TRAINER_STATE_NAME
        if sidecar.is_file():
            try:
                step = json.loads(sidecar.read_text()).get("global_step")
            except ValueError:
                continue
            if step == global_step:
                return info.path
    return None


def _step_on_bucket(url: Any, global_step: int) -> str | None:
    """Rank 0 of :func:`_checkpoint_for_step` on object storage."""
    from ..checkpoint import objstore
    from ..checkpoint.storage import store_for

    picked = _picked.get(str(url))
    if picked is not None and picked[1] == global_step:
        return picked[0]  # the Trainer read this checkpoint's trainer_state.json: no listing needed
    store = store_for(url)
    for info in reversed([i for i in objstore.list_run(url) if i.state == "complete"]):
        raw, _ = store.get((info.path / F.TRAIN_STATE / "trainer.json").key, max_bytes=64 * 1024 * 1024)  # type: ignore[union-attr]
        saved = _saved_trainer_state(json.loads(raw))
        if saved is not None and json.loads(saved).get("global_step") == global_step:
            return info.name
    return None
