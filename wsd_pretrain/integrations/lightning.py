"""Lightning: a ``Callback`` that writes our checkpoints, resumes at the right step, stops at the schedule's end.

::

    from wsd_pretrain.integrations.lightning import ResumableDataLoader, WSDCheckpoint

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = build_model()                      # checkpoints hold its names (no "model." prefix)
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=3e-4)
            sched = WSDScheduler(opt, WSDSchedule(total=10_000, warmup=500))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    loader = ResumableDataLoader(dataset, batch_size=8, shuffle=True)   # exact data position on resume
    trainer = L.Trainer(max_steps=10_000, callbacks=[WSDCheckpoint("runs/x")], enable_checkpointing=False)
    trainer.fit(Module(), loader)                           # run it again: it resumes

* The scheduler must be stepped once per optimizer update: ``"interval": "step"``, frequency 1 (Lightning's
  default interval is "epoch": the position would not move); anything else is refused.
* The checkpoint holds the inner model's names: the one child module that holds all the LightningModule's
  parameters (``module="auto"``), or the attribute named by ``module=``; ``from_pretrained`` loads the model
  folder of a Hugging Face inner model.
* Resume: the weights, optimizer, scheduler and RNG from our checkpoint, then Lightning's loop counters (global
  step, epoch, batch) through ``fit_loop.load_state_dict``, where Lightning itself restores them. Lightning
  restarts a plain ``DataLoader`` from its first batch (it warns); :class:`ResumableDataLoader` comes back at the
  next batch of its epoch, in the same order.
* The callback saves in ``on_train_batch_end``, after the optimizer and scheduler steps; on accumulation
  micro-batches the position has not moved and nothing is saved. It stops the run when the schedule ends or
  after a preemption checkpoint.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from ..checkpoint.guards import check_total, resolve_scheduler
from ..checkpoint.manager import CheckpointConfig, Stateful
from ..errors import ConfigError
from ._common import FrameworkCheckpointer, log_rank0, order_state, restore_order_state

__all__ = ["ResumableDataLoader", "WSDCheckpoint"]

log = logging.getLogger(__name__)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning resumes mid-epoch: the same order, from the first batch not yet trained.

    It follows Lightning's stateful-loader protocol (``state_dict``/``load_state_dict``, saved in the fit loop's
    state); :class:`WSDCheckpoint` tells it how many batches were trained (Lightning fetches one ahead). The
    skipped batches are skipped by index, not loaded. Under DDP, Lightning gives it a ``DistributedSampler`` (seeded,
    ``set_epoch``); on one process the order of a shuffled epoch comes from the torch generator at ``iter()``, which
    is recorded and put back.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained = 0  # batches of the current epoch trained (set by WSDCheckpoint)
        self._order: dict[str, Any] | None = None
        self._skip = 0
        self._resume_order: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"trained": self.trained, "order": self._order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trained = int(state.get("trained", 0))
        if trained >= len(self):
            return  # the checkpoint closed an epoch: the next one starts afresh
        self._skip, self._resume_order = trained, state.get("order")

    def __iter__(self) -> Iterator[Any]:
        if self._skip:
            restore_order_state(self, self._resume_order)
        self._order = order_state(self)
        self.trained = self._skip
        return super().__iter__()

    @property
    def _index_sampler(self) -> Any:  # type: ignore[override]
        sampler = super()._index_sampler
        if self._skip:  # read once, when the iterator is built
            sampler, skip = _Skip(sampler, self._skip), self._skip
            self._skip = 0
            log_rank0(logging.INFO, "ResumableDataLoader: skipping the %d batches the resumed epoch has trained", skip)
        return sampler


class _Skip:
    """An index sampler without its first ``n`` items."""

    def __init__(self, sampler: Any, n: int) -> None:
        self.sampler, self.n = sampler, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.n, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.n)


def _inner_module(pl_module: torch.nn.Module, module: str | None) -> torch.nn.Module:
    if module is None:
        return pl_module
    if module != "auto":
        inner = getattr(pl_module, module, None)
        if not isinstance(inner, torch.nn.Module):
            raise ConfigError(f"module={module!r}: the LightningModule has no such submodule", where="WSDCheckpoint")
        return inner
    everything = {id(p) for p in pl_module.parameters()}
    holders = [c for _, c in pl_module.named_children() if {id(p) for p in c.parameters()} == everything]
    return holders[0] if len(holders) == 1 and everything else pl_module


class WSDCheckpoint(pl.Callback):
    """Our checkpoints from a Lightning run; see the module docstring.

    Args:
        run_dir: the run directory: a local path, or ``s3://bucket/prefix`` with ``config.staging_dir`` set.
        config: :class:`CheckpointConfig`.
        module: ``"auto"`` (the child module holding every parameter, else the LightningModule), an attribute name,
            or None (the LightningModule itself, names with its attribute prefixes).
        data: a resumable data source besides the loader, restored on resume.
        check_max_steps: refuse a ``max_steps`` / ``max_epochs`` budget that disagrees with the schedule.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        config: CheckpointConfig | None = None,
        module: str | None = "auto",
        data: Stateful | None = None,
        check_max_steps: bool = True,
    ) -> None:
        from ..checkpoint.storage import parse_location

        self.run_dir = parse_location(run_dir)  # a local path, or s3://bucket/prefix with config.staging_dir
        self.config = config
        self.module = module
        self.data = data
        self.check_max_steps = check_max_steps
        self.ckpt: FrameworkCheckpointer | None = None

    @property
    def manager(self) -> Any:
        return self.ckpt.manager if self.ckpt is not None else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configs = trainer.lr_scheduler_configs
        if len(configs) != 1:
            raise ConfigError(
                f"configure_optimizers returned {len(configs)} LR schedulers; WSDCheckpoint needs one WSDScheduler: "
                'return {"optimizer": opt, "lr_scheduler": {"scheduler": WSDScheduler(opt, schedule), '
                '"interval": "step"}}',
                where="WSDCheckpoint",
            )
        config = configs[0]
        scheduler = resolve_scheduler(config)  # refuses interval != "step", frequency != 1, non-WSD schedulers
        inner = _inner_module(pl_module, self.module)
        self.ckpt = FrameworkCheckpointer(self.run_dir, config=self.config, data=self.data, framework="lightning")
        self.ckpt.framework_state = lambda: {"fit_loop": trainer.fit_loop.state_dict()}
        # the precision plugin's torch.amp.GradScaler under 16-mixed (FSDP's ShardedGradScaler under FSDP)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        self.ckpt.build(inner, scheduler.optimizer, config, scaler=scaler)
        if inner is not pl_module:
            log_rank0(logging.INFO, "lightning: checkpoints hold %s's names", type(inner).__name__)
        if self.ckpt.resume():
            # Lightning's own counters, loaded where Lightning loads them from its checkpoints (before the loop
            # runs; the fit loop then restarts at the saved batch)
            trainer.fit_loop.load_state_dict(self.ckpt.loop.framework["fit_loop"])
            per_epoch = self.ckpt.loop.framework.get("batches_per_epoch")
            if isinstance(per_epoch, int) and self.ckpt.loop.batch >= per_epoch:
                self.ckpt.apply_rng()  # the checkpoint closed an epoch: the next epoch's iterator draws from it

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ckpt is not None
        if self.check_max_steps:
            check_total(
                self.ckpt.scheduler,
                int(trainer.estimated_stepping_batches),
                done=trainer.global_step,
                framework="Lightning",
                setting="max_steps",
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ckpt is not None
        self.ckpt.loop.epoch = trainer.current_epoch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.ckpt is not None
        self.ckpt.apply_rng()  # a mid-epoch resume: the RNG as the interrupted run had it before this batch

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the optimizer and scheduler steps of a real update (nothing moves on accumulation batches)."""
        assert self.ckpt is not None
        self.ckpt.loop.batch = batch_idx + 1
        if isinstance(trainer.num_training_batches, int):
            self.ckpt.loop.framework["batches_per_epoch"] = trainer.num_training_batches
        for loader in _loaders(trainer):
            loader.trained = batch_idx + 1
        self.ckpt.maybe_save()
        if self.ckpt.should_stop:
            trainer.should_stop = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None


def _loaders(trainer: pl.Trainer) -> list[ResumableDataLoader]:
    loaders = trainer.train_dataloader
    if isinstance(loaders, ResumableDataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [x for x in loaders if isinstance(x, ResumableDataLoader)]
    return []
