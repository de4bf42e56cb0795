"""The main job's decay-free mode (WSM, Tian et al., arXiv 2507.17634): the ``wsm:`` section of a job config.

With ``wsm.enabled``, the job trains at the stable LR to the end (warmup, then no decay: the schedule's milestones
are kept only as the points where a finished model comes out) and, at each milestone ``m``, writes the merge of
the model-only snapshots in the window ``[m - window, m]`` to ``<run>/merged/step-<m>-wsm/`` (a Hugging Face
folder; on a run on object storage, the snapshots are read in place and the folder is uploaded there), with coefficients that emulate the schedule's decay (or uniform / EMA ones). ``window`` defaults to the
milestone's decay length: the merge stands in for the decay the schedule would have run there. Snapshots come from
``checkpoint.snapshot_every`` (required); one is also taken at each milestone. The merge runs on rank 0 while the
other ranks wait (as in a synchronous save), and its outcome is agreed by every rank.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from . import distributed as D
from .checkpoint.storage import ObjectURL
from .errors import CheckpointError, ConfigError
from .schedule import WSDSchedule

__all__ = ["MERGED", "WSMConfig", "WSMPlan"]

log = logging.getLogger(__name__)
MERGED = "merged"


@dataclass(frozen=True, kw_only=True)
class WSMConfig:
    """The ``wsm:`` section: merge snapshots at each milestone instead of decaying (docs/training.md)."""

    enabled: bool = False
    """Train at the stable LR to the end and write a merged model at each milestone of the schedule."""
    coefficients: Literal["decay", "uniform", "ema"] = "decay"
    """decay: emulate the schedule's decay shape over the window; uniform; ema (``ema_decay``)."""
    window: int | None = None
    """Units before each milestone whose snapshots are merged (default: that milestone's decay length)."""
    shape: str | None = None
    """The decay shape to emulate (default: the schedule's ``decay_shape``)."""
    min_lr_ratio: float | None = None
    """The emulated decay's floor (default: the schedule's ``min_lr_ratio``)."""
    ema_decay: float = 0.9
    """EMA factor for ``coefficients: ema``."""

    def __post_init__(self) -> None:
        problems = []
        if self.coefficients not in ("decay", "uniform", "ema"):
            problems.append(f"coefficients={self.coefficients!r}: 'decay', 'uniform' or 'ema'")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            problems.append(f"window={self.window!r}: a whole number of units > 0, or null (each decay's length)")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            problems.append(f"ema_decay={self.ema_decay!r}: in [0, 1)")
        if problems:
            raise ConfigError(problems, where="wsm section")


@dataclass(frozen=True)
class WSMPlan:
    """The merge points of a schedule and the decay-free schedule the job trains with."""

    config: WSMConfig
    schedule: WSDSchedule
    """The schedule the job trains with: the given one's warmup and stable LR, no decay."""
    points: tuple[tuple[int, int], ...]
    """``(milestone, window start)`` for each merge, in positions."""
    shape: str
    min_lr_ratio: float

    @classmethod
    def build(cls, config: WSMConfig, schedule: WSDSchedule, checkpoint: Any) -> WSMPlan:
        """Check the configuration against the schedule and the checkpoint section; every problem names its fix."""
        from .checkpoint.merge import merge_coefficients

        problems = []
        every, keep = checkpoint.snapshot_every, checkpoint.snapshot_keep
        if not every:
            problems.append("wsm.enabled needs checkpoint.snapshot_every (the snapshots it merges), e.g. 10")
        if schedule.units != "steps":
            problems.append("wsm.enabled needs schedule.units: steps (snapshots are taken every N updates)")
        if not isinstance(schedule.decay_shape, str):
            problems.append("wsm.enabled needs a named decay shape (set wsm.shape)")
        points = []
        for ms in schedule.milestones_info:
            window = config.window or ms.decay_length
            if window == 0:
                problems.append(f"the milestone at {ms.at} has no decay: set wsm.window (units to merge over)")
                continue
            start = max(ms.at - window, schedule.origin)
            if start < schedule.warmup:
                problems.append(
                    f"the merge window of the milestone at {ms.at} ({start} to {ms.at}) reaches into the warmup "
                    f"(to {schedule.warmup}): set a shorter wsm.window"
                )
            if every and window < every:
                problems.append(
                    f"wsm window {window} (milestone {ms.at}) holds one snapshot at checkpoint.snapshot_every={every}: "
                    "snapshot more often or set a longer wsm.window"
                )
            held = len({p for p in range(start, ms.at + 1) if every and p % every == 0} | {ms.at})
            if every and held > keep:
                problems.append(
                    f"the merge window of the milestone at {ms.at} holds {held} snapshots, "
                    f"checkpoint.snapshot_keep={keep} keeps fewer: set snapshot_keep >= {held}"
                )
            points.append((ms.at, start))
        if not points and not problems:
            problems.append("wsm.enabled, but the schedule has no milestone to merge at (schedule.milestones)")
        shape = config.shape or (schedule.decay_shape if isinstance(schedule.decay_shape, str) else "1-sqrt")
        floor = schedule.min_lr_ratio if config.min_lr_ratio is None else config.min_lr_ratio
        if config.coefficients == "decay":
            try:
                merge_coefficients([0, 1], "decay", shape=shape, min_lr_ratio=floor)
            except CheckpointError as exc:
                problems.append(str(exc).replace("--min-lr-ratio", "wsm.min_lr_ratio"))
        if problems:
            raise ConfigError(problems, where="wsm section")
        train = replace(
            schedule,
            milestones="none",
            num_milestones=None,
            decay_fraction=None,
            decay_length=None,
            mode="wsd-s",
            after_last=None,
        )
        return cls(config, train, tuple(points), shape, floor)

    def after_step(self, manager: Any, position: int) -> Path | ObjectURL | None:
        """Call after ``manager.maybe_save()`` (every rank): at a milestone, snapshot if none was taken here, then
        rank 0 merges the window into ``<run>/merged/`` (a run on object storage: reading the snapshots in place,
        or from the staging run, then uploading the folder); a failure raises on every rank. Returns the merged
        folder (a local path, or its URL)."""
        from .checkpoint import format as F

        if not any(at == position for at, _ in self.points):
            return None
        if not manager.snapshots or manager.snapshots[-1].name != F.checkpoint_name(position, [F.SNAPSHOT_KIND]):
            manager.snapshot()
        manager.wait()
        return self._merge_at(manager, position)

    def catch_up(self, manager: Any, position: int) -> list[Path | ObjectURL]:
        """Call after a resume at ``position`` (every rank): a milestone at or before it whose merged folder is
        missing or unfinished (no ``config.json``: a job killed during that merge, after a checkpoint at the
        milestone was committed, resumes past it and would never merge it) is merged now, when every snapshot its
        window held is still committed (never a merge of fewer inputs than the first one); otherwise a warning
        names the snapshots retention removed. Returns the folders merged."""
        from .checkpoint import coord

        due: list[int] = []
        problem = None
        if D.get_rank() == 0:
            try:
                for at, start in self.points:
                    if at > position or self._merged(manager, at):
                        continue
                    every = manager.config.snapshot_every
                    expected = {
                        p
                        for p in range(max(start, self.schedule.origin + 1), at + 1)
                        if p % every == 0 and self.schedule.phase_at(p - 1).name == "stable"
                    } | {at}
                    gone = sorted(p for p in expected if not self._snapshot_committed(manager, p))
                    if not gone:
                        log.info("WSM: the merge at %d is missing or unfinished (interrupted): merging it now", at)
                        due.append(at)
                    else:
                        log.warning(
                            "WSM: the merge at %d is missing or unfinished and its window's snapshots at %s are gone "
                            "(retention): not merged again; merge the snapshots there are with `wsd-pretrain ckpt "
                            "merge`",
                            at,
                            gone,
                        )
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        coord.agree(problem, "WSM: checking the merges before the resumed position failed")
        return [self._merge_at(manager, at) for at in coord.broadcast(due)]

    @staticmethod
    def _merged(manager: Any, at: int) -> bool:
        return _run_has(manager, MERGED, f"step-{at:09d}-wsm", "config.json")

    @staticmethod
    def _snapshot_committed(manager: Any, at: int) -> bool:
        from .checkpoint import format as F

        return _run_has(manager, F.SNAPSHOTS, F.checkpoint_name(at, [F.SNAPSHOT_KIND]), F.MANIFEST)

    def _merge_at(self, manager: Any, at: int) -> Path | ObjectURL:
        """Every rank: rank 0 merges the window of the milestone ``at``; the outcome is agreed."""
        from .checkpoint import coord
        from .checkpoint import format as F

        start = next(s for a, s in self.points if a == at)
        name = f"step-{at:09d}-wsm"
        remote = getattr(manager, "_remote", None)  # a run on object storage (objstore_tier.RemoteTier)
        out: Path | ObjectURL = Path(manager.run_dir) / MERGED / name if remote is None else remote.url / MERGED / name
        problem = None
        if D.get_rank() == 0:
            try:
                if remote is None:
                    window: list[Any] = [
                        i.path
                        for i in F.list_snapshots(manager.run_dir)
                        if i.state == "complete" and start <= int(i.position or 0) <= at
                    ]
                    self._merge_locally(window, Path(manager.run_dir) / MERGED / name)
                else:
                    window = self._merge_on_bucket(remote, Path(manager.run_dir), start, at, name)
                log.info("WSM: merged %d snapshots (%d to %d) into %s", len(window), start, at, out)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
        coord.agree(problem, f"WSM merge at position {at} failed")
        return out

    def _merge_locally(self, window: list[Any], out: Path) -> None:
        """Rank 0: merge ``window`` (local folders or URLs) into the local folder ``out``, replacing a merge left there
        before a resume replayed this position and any staging folder a killed merge left (we hold the run lock)."""
        from .checkpoint.merge import merge_checkpoints

        if out.parent.is_dir():  # a merge's staging folder left by a killed run
            for entry in out.parent.iterdir():
                if entry.name.startswith(".") and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
        if out.exists():  # written before a resume replayed this position: replaced
            trash = out.parent / f".deleting-{out.name}"
            os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        merge_checkpoints(
            window,
            out,
            coefficients=self.config.coefficients,
            shape=self.shape,
            min_lr_ratio=self.min_lr_ratio,
            ema_decay=self.config.ema_decay,
        )

    def _merge_on_bucket(self, remote: Any, local_run: Path, start: int, at: int, name: str) -> list[Any]:
        """Rank 0 of a run on object storage (we hold its lease): the window's snapshots are the bucket's committed
        ones (its listing decides, each manifest validated); one the staging run holds with the same
        ``manifest.hash`` is read from local disk, the others in place by ranged GETs. The merge is written into
        the local run (the staging folder, else the node-local cache), then uploaded to ``<url>/merged/<name>/``
        with the folder upload (each object created only if absent, ``config.json`` last, sizes checked on the
        server) after removing what a run that replayed this position left there (``config.json`` first). The
        local copy is kept in a staging folder, removed from the cache."""
        from .checkpoint import format as F
        from .checkpoint import objstore
        from .checkpoint.storage import store_for

        store = store_for(remote.url)
        window: list[Any] = []
        for info in objstore.list_run(remote.url, snapshots=True):
            if info.state != "complete" or not start <= int(info.position or 0) <= at:
                continue
            local = F.snapshots_dir(local_run) / info.name
            if not remote.direct and (local / F.MANIFEST_HASH).is_file():
                theirs, _ = store.get((info.path / F.MANIFEST_HASH).key, max_bytes=4096)
                if (local / F.MANIFEST_HASH).read_bytes() == theirs:
                    window.append(local)  # the staging run's copy of the same commit: read from local disk
                    continue
            window.append(info.path)
        out = local_run / MERGED / name
        self._merge_locally(window, out)
        dest = remote.url / MERGED / name
        try:
            if objstore.remove_folder(store, dest):
                log.info("WSM: replaced %s, written before the run resumed from an earlier checkpoint", dest)
            objstore.upload_folder(store, out, dest)
        except BaseException:
            try:  # no half folder left for a reader (the next run's replay of this position would remove it too)
                objstore.remove_folder(store, dest)
            except Exception as exc:
                log.warning("WSM: could not remove the unfinished upload %s: %s", dest, exc)
            raise
        finally:
            if remote.direct:  # the node-local cache keeps what a resume fetched, not merges
                shutil.rmtree(out, ignore_errors=True)
        return window


def _run_has(manager: Any, *parts: str) -> bool:
    """Whether the manager's run holds the file ``<run>/<parts...>``: on disk, or on the bucket of a run on object
    storage (a HEAD: the object decides, never a listing)."""
    remote = getattr(manager, "_remote", None)  # a run on object storage (objstore_tier.RemoteTier)
    if remote is None:
        return Path(manager.run_dir, *parts).is_file()
    from .checkpoint.storage import store_for

    url = remote.url
    for part in parts:
        url = url / part
    return store_for(remote.url).head(url.key) is not None
