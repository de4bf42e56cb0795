"""Experiment tracking for the main job: TensorBoard event files and Weights & Biases runs beside metrics.jsonl.

The ``tracking:`` config section turns them on::

    tracking:
      tensorboard: true                               # <run>/tensorboard/events.out.tfevents.*
      wandb: {project: my-project, mode: offline}     # <run>/wandb/offline-run-*/run-*.wandb
      on_error: warn                                  # a tracker that raises: warn, drop it, train on (or: stop)

What is logged (rank 0 only; every other rank holds a tracker that does nothing): every update's ``train/loss``,
``train/lr`` (the LR the update used), ``train/phase`` (0 warmup, 1 stable, 2 decay), ``train/tokens`` and, at
each ``log_every`` step, ``train/tokens_per_s``; ``eval/loss``; the schedule's decay points as ``lr/pre-decay`` and
``lr/post-decay`` (the LR at that step: markers on the LR curve); every committed checkpoint as
``checkpoint/seconds`` (from the save's start to its commit), ``checkpoint/blocked_seconds`` (how long training
waited for it), ``checkpoint/bytes`` (its files on disk) and ``checkpoint/kind`` (text: its kinds and name). The
x-axis is the optimizer update (``step``). metrics.jsonl stays the record; a tracker is a view of it
(docs/decisions.md: a tracker that raises never stops training unless ``on_error: stop``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["PHASE_CODES", "Tracker", "TrackingConfig", "check_available"]

log = logging.getLogger("wsd_pretrain")

PHASE_CODES = {"warmup": 0, "stable": 1, "decay": 2}
"""``train/phase`` as a number (a scalar chart): 0 warmup, 1 stable, 2 decay."""

INSTALL_HINT = "pip install 'wsd_pretrain[tracking]' (or pip install tensorboard wandb)"

WANDB_KEYS = {
    "project": str,
    "name": str,
    "entity": str,
    "group": str,
    "notes": str,
    "tags": list,
    "mode": str,
}
WANDB_MODES = ("offline", "online", "disabled")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """The ``tracking:`` section."""

    tensorboard: bool = False
    """TensorBoard event files in ``<run>/tensorboard`` (needs the ``tensorboard`` package)."""
    wandb: dict[str, Any] | None = None
    """A Weights & Biases run (needs ``wandb``): ``project``, ``name``, ``entity``, ``group``, ``notes``, ``tags``
    and ``mode`` (``offline``, the default: files in ``<run>/wandb``, no network; ``wandb sync`` uploads them
    later; ``online``; ``disabled``). None: no W&B run."""
    on_error: Literal["warn", "stop"] = "warn"
    """A tracker that raises while training: ``warn`` logs it once, drops that tracker and trains on; ``stop``
    re-raises (the job ends as any error ends it: checkpoints committed so far stay)."""
    flush_seconds: float = 10.0
    """How often TensorBoard's writer flushes its events to disk (every exit path flushes too)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.wandb is not None:
            for key, value in self.wandb.items():
                if key not in WANDB_KEYS:
                    problems.append(f"wandb: unknown key {key!r}; valid keys: {sorted(WANDB_KEYS)}")
                elif not isinstance(value, WANDB_KEYS[key]) or (
                    key == "tags" and not all(isinstance(t, str) for t in value)
                ):
                    kind = "a list of strings" if key == "tags" else "a string"
                    problems.append(f"wandb.{key}={value!r}: expected {kind}")
            mode = self.wandb.get("mode", "offline")
            if isinstance(mode, str) and mode not in WANDB_MODES:
                problems.append(f"wandb.mode={mode!r}: one of {list(WANDB_MODES)} (offline: no network)")
        if not self.flush_seconds > 0:
            problems.append(f"flush_seconds={self.flush_seconds}: must be > 0")
        if problems:
            raise ConfigError(problems, where="tracking section")

    @property
    def enabled(self) -> bool:
        return self.tensorboard or self.wandb is not None


def check_available(cfg: TrackingConfig) -> None:
    """Refuse, before any work, a tracker whose package is not installed (every rank: the same answer)."""
    missing = []
    if cfg.tensorboard and not _installed("tensorboard"):
        missing.append("tracking.tensorboard is on but the tensorboard package is not installed")
    if cfg.wandb is not None and not _installed("wandb"):
        missing.append("tracking.wandb is set but the wandb package is not installed")
    if missing:
        raise ConfigError(
            [f"{m}: {INSTALL_HINT}, or turn it off in the config" for m in missing], where="tracking section"
        )


def _installed(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: blocked (``import`` raises ImportError)
    return importlib.util.find_spec(name) is not None


class Tracker:
    """The trackers of one run (rank 0; a Tracker built with ``active=False`` does nothing). Every call is
    guarded: see :class:`TrackingConfig`'s ``on_error``. :meth:`close` flushes and closes; a second call does
    nothing."""

    def __init__(
        self, cfg: TrackingConfig, run_dir: Path, *, active: bool, config: dict[str, Any] | None = None
    ) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._tb: Any = None
        self._wandb: Any = None
        self._closed = False
        if not active or not cfg.enabled:
            return
        # building a tracker is the start of the job: an error here is an error of the job (nothing trained yet)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), flush_secs=cfg.flush_seconds)
        if cfg.wandb is not None:
            self._wandb = self._start_wandb(cfg.wandb, config or {})

    def _start_wandb(self, section: dict[str, Any], config: dict[str, Any]) -> Any:
        mode = section.get("mode", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode == "offline":
            os.environ["WANDB_MODE"] = "offline"  # wandb's own switch: no network at all (its docs)
        import wandb

        directory = self.run_dir / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=section.get("project", "wsd-pretrain"),
            name=section.get("name", self.run_dir.name),
            entity=section.get("entity"),
            group=section.get("group"),
            notes=section.get("notes"),
            tags=section.get("tags"),
            mode=mode,
            dir=str(self.run_dir),  # wandb writes <dir>/wandb/
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
            reinit="create_new",
        )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb is not None

    def _guard(self, what: str, backend: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            if self.cfg.on_error == "stop":
                raise
            log.warning(
                "tracking: %s failed in %s (%s: %s); %s is off for the rest of this run (metrics.jsonl is complete)",
                what,
                backend,
                type(exc).__name__,
                exc,
                backend,
            )
            self._drop(backend)

    def _drop(self, backend: str) -> None:
        if backend == "tensorboard":
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except Exception:
                pass
        else:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=1)
            except Exception:
                pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalars at optimizer update ``step`` (tags as TensorBoard shows them: ``train/loss``)."""
        if self._tb is not None:
            tb = self._tb
            self._guard("logging", "tensorboard", lambda: [tb.add_scalar(k, v, step) for k, v in values.items()])
        if self._wandb is not None:
            run = self._wandb
            self._guard("logging", "wandb", lambda: run.log({**values, "step": step}))

    def log_update(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record of an update. A decay point reached by it (``events``) is marked at its step
        with the LR the update used: ``lr/pre-decay`` (the stable LR) and ``lr/post-decay`` (the decay's last)."""
        if not self.active:
            return
        values = {
            "train/loss": float(record["loss"]),
            "train/lr": float(record["lr"]),
            "train/phase": float(PHASE_CODES.get(record["phase"], -1)),
            "train/tokens": float(record["tokens"]),
        }
        if "tokens_per_s" in record:
            values["train/tokens_per_s"] = float(record["tokens_per_s"])
        if record.get("eval_loss") is not None:
            values["eval/loss"] = float(record["eval_loss"])
        for event in record.get("events", ()):
            kind = event.split("@")[0]
            if kind in ("pre-decay", "post-decay"):
                values[f"lr/{kind}"] = float(record["lr"])
        self.scalars(int(record["step"]), values)

    def log_eval(self, step: int, loss: float | None) -> None:
        if loss is not None:
            self.scalars(step, {"eval/loss": float(loss)})

    def log_checkpoint(self, step: int, path: Path, kinds: list[str], seconds: float, blocked: float) -> None:
        """A committed checkpoint: its kinds, seconds from start to commit, seconds training waited, bytes."""
        if not self.active:
            return
        nbytes = _checkpoint_bytes(path)
        text = f"{'+'.join(kinds)}: {path.name} ({nbytes} bytes, {seconds:.3f} s)"
        values = {"checkpoint/seconds": seconds, "checkpoint/blocked_seconds": blocked, "checkpoint/bytes": nbytes}
        if self._tb is not None:
            tb = self._tb

            def tb_log() -> None:
                for k, v in values.items():
                    tb.add_scalar(k, v, step)
                tb.add_text("checkpoint/kind", text, step)

            self._guard("logging a checkpoint", "tensorboard", tb_log)
        if self._wandb is not None:
            run = self._wandb
            self._guard(
                "logging a checkpoint",
                "wandb",
                lambda: run.log(
                    {**values, "checkpoint/kind": "+".join(kinds), "checkpoint/name": path.name, "step": step}
                ),
            )

    def flush(self) -> None:
        if self._tb is not None:
            tb = self._tb
            self._guard("flushing", "tensorboard", tb.flush)

    def close(self, *, failed: bool = False) -> None:
        """Flush and close every tracker (every exit path calls it; errors are logged, never raised)."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        if self._tb is not None:
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except Exception as exc:
                log.warning("tracking: closing tensorboard failed (%s: %s)", type(exc).__name__, exc)
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=1 if failed else 0)
                import wandb

                # finish() returns before W&B's service has written the run's last records (the exit record) to
                # the .wandb file; teardown stops the service, which closes the file, so the run is complete on
                # disk when the job returns (the main job is a process of its own; a later init starts a new one)
                wandb.teardown()
            except Exception as exc:
                log.warning("tracking: closing the wandb run failed (%s: %s)", type(exc).__name__, exc)
        log.debug("tracking closed in %.2fs", time.monotonic() - t0)


def _checkpoint_bytes(path: Any) -> int:
    """A committed checkpoint's bytes: its folder's, or on object storage (an ``ObjectURL``) its manifest's sum (one
    GET; 0 when it cannot be read: the number is a record, the job goes on)."""
    from .checkpoint.format import disk_usage

    if isinstance(path, Path):
        return disk_usage(path)
    from .checkpoint import objstore
    from .checkpoint.storage import store_for
    from .errors import WSDError

    try:
        m, _, _ = objstore.load_manifest(store_for(path), path)
    except (OSError, WSDError):
        return 0
    return sum(int(rec["size"]) for rec in m["files"].values())
