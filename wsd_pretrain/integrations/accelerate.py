"""A training loop written with ``accelerate``: our checkpoints from its prepared objects, exact resume.

::

    from wsd_pretrain.integrations.accelerate import AccelerateCheckpointer

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ckpt = AccelerateCheckpointer(accelerator, "runs/x", model, optimizer, scheduler)
    ckpt.resume()                                   # the newest checkpoint, or a fresh start
    for epoch in ckpt.epochs(num_epochs):
        for batch in ckpt.batches(loader, epoch):   # skips the batches a resumed epoch has seen
            with accelerator.accumulate(model):
                accelerator.backward(loss_of(model, batch))
                optimizer.step(); scheduler.step(); optimizer.zero_grad()
            ckpt.maybe_save()
            if ckpt.should_stop:                     # preempted, or the schedule has ended
                break
        if ckpt.should_stop:
            break
    ckpt.close()

**Per-process stepping.** A prepared ``AcceleratedScheduler`` steps its scheduler once per process per update
(``step_scheduler_with_optimizer=True``, ``split_batches=False``: accelerate assumes a schedule written for one
process's batch count). A WSD position counts optimizer updates, so the checkpointer sets the prepared scheduler's
``split_batches`` to True: one step per real update, still skipped on accumulation micro-batches and on steps the
optimizer skipped (fp16 overflow). A bare :class:`CheckpointManager` refuses such a scheduler instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler

from ..checkpoint.manager import CheckpointConfig, Stateful
from ._common import FrameworkCheckpointer, check_launch, check_world, log_rank0

__all__ = ["AccelerateCheckpointer"]

log = logging.getLogger(__name__)


class AccelerateCheckpointer(FrameworkCheckpointer):
    """:class:`~wsd_pretrain.CheckpointManager` for accelerate's prepared objects; see the module docstring.

    Args:
        accelerator: the ``Accelerator``.
        run_dir: the run directory.
        model, optimizer, scheduler: as ``accelerator.prepare`` returned them (or unprepared).
        config: :class:`CheckpointConfig`; data, extra_state, load_extra_state: as for the manager.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: str | os.PathLike[str],
        model: Any,
        optimizer: Any,
        scheduler: Any,
        *,
        config: CheckpointConfig | None = None,
        data: Stateful | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        load_extra_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(
            run_dir,
            config=config,
            data=data,
            extra_state=extra_state,
            load_extra_state=load_extra_state,
            framework="accelerate",
        )
        self.accelerator = accelerator
        check_launch(accelerator.num_processes, "accelerate")
        check_world(
            accelerator.num_processes,
            "accelerate",
            "on CPU, build Accelerator(cpu=True) or set ACCELERATE_USE_CPU=true",
        )
        if (
            isinstance(scheduler, AcceleratedScheduler)
            and scheduler.step_with_optimizer
            and not scheduler.split_batches
            and accelerator.num_processes > 1
        ):
            scheduler.split_batches = True  # one step per optimizer update, not one per process
            log_rank0(
                logging.INFO,
                "accelerate: the prepared scheduler now steps once per optimizer update (not %d times)",
                accelerator.num_processes,
            )
        self.build(accelerator.unwrap_model(model), optimizer, scheduler)
        self._resuming = False

    def resume(self, which: str | os.PathLike[str] = "auto") -> bool:
        """Load the newest checkpoint (or ``which``); :meth:`epochs` and :meth:`batches` then continue from its
        data position. Returns True when one was loaded."""
        self._resuming = super().resume(which)
        return self._resuming

    def epochs(self, num_epochs: int) -> range:
        """The epochs still to run: ``range(resumed epoch, num_epochs)``."""
        return range(self.loop.epoch if self._resuming else 0, num_epochs)

    def batches(self, loader: Any, epoch: int) -> Iterator[Any]:
        """Epoch ``epoch`` of a prepared data loader: ``set_epoch``, the batches a resumed epoch has already
        trained skipped, the RNG put back where the uninterrupted run had it; counts what it yields (call
        :meth:`maybe_save` after each batch)."""
        skip = 0
        if self._resuming:
            if epoch < self.loop.epoch:
                return
            if epoch == self.loop.epoch:
                skip = self.loop.batch
            self._resuming = False
        if skip and hasattr(loader, "__len__") and skip >= len(loader):
            return  # the checkpoint closed this epoch: the next one starts with the checkpoint's RNG
        self.before_epoch(loader, mid_epoch=skip > 0)
        self.loop.epoch, self.loop.batch = epoch, skip
        source = self.accelerator.skip_first_batches(loader, skip) if skip else loader
        for target in {id(loader): loader, id(source): source}.values():
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        for batch in source:
            self.apply_rng()  # mid-epoch resume: after the skipped iterator is built
            self.loop.batch += 1
            yield batch
