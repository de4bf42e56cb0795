"""pytorch_accelerated (the seed's framework): ``wsd_pretrain.compat.WSDCheckpointCallback``.

The seed's ``WSDCheckpointCallback`` with the same arguments, writing our checkpoints::

    from wsd_pretrain.compat import WSDCheckpointCallback, WSDLrScheduler

    trainer = Trainer(model, loss_func, optimizer, callbacks=[*DEFAULT_CALLBACKS, WSDCheckpointCallback("runs/x")])
    trainer.train(train_dataset=ds, num_epochs=8, per_device_batch_size=4,
                  create_scheduler_fn=WSDLrScheduler.create_scheduler_fn(num_checkpoints=3))

What differs from the seed's callback, on purpose:

* It saves where the optimizer step has happened: at the next ``on_train_step_start`` and at the end of the
  epoch (``on_training_run_epoch_end``, after evaluation). The seed saves in ``on_train_step_end``, before the
  backward pass and the optimizer step, so its "pre-decay" state was one update short, and it fired on every
  micro-batch of an accumulation.
* Every checkpoint (pre-decay, post-decay, final, periodic, preemption) is our format: a Hugging Face model folder
  and the full training state in safetensors and JSON (the seed wrote an Accelerate folder for pre-decay points and
  a pickled ``.pt`` for post-decay ones). ``save_dir`` is the run directory: checkpoints go to
  ``save_dir/checkpoints/step-...``.
* Running the same script again resumes exactly from the newest checkpoint in ``save_dir``: the epoch, the
  batches already trained in it, the optimizer, the scheduler's step counter, the RNG. ``initial_checkpoint`` (one
  of our checkpoint folders, e.g. another run's pre-decay point) starts a new run from it, for a continuation
  (``WSDLrScheduler(is_continuation_from_checkpoint=True)``) or a WSD-S run; a missing path is an error (the seed
  ignored it).
* The run stops cleanly at the end of the schedule and on preemption (SIGTERM/SIGUSR1: a checkpoint, then
  ``StopTrainingError``).
* ``num_checkpoints=3`` decays at a quarter, a half and the end of the run; the seed's series stops early for
  ``num_checkpoints=2`` (decays at a quarter and a half, then the second half at ``lr_min``), which the scheduler
  warns about. ``create_scheduler_fn(num_warmup_steps=N)`` gives the warmup in updates.
* Several CPU processes: ``ACCELERATE_USE_CPU=true torchrun --nproc-per-node N script.py``
  (``accelerate launch --cpu --num_processes N`` starts one process, refused).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from pytorch_accelerated.callbacks import StopTrainingError, TrainerCallback

from ..checkpoint.guards import check_total
from ..checkpoint.manager import CheckpointConfig
from ..errors import CheckpointError
from ._common import FrameworkCheckpointer, check_launch, check_world, log_rank0

__all__ = ["WSDCheckpointCallback"]

log = logging.getLogger(__name__)

_SCHEDULER_FIX = (
    "pass trainer.train(..., create_scheduler_fn=wsd_pretrain.compat.WSDLrScheduler.create_scheduler_fn("
    "num_checkpoints=..., num_warmup_steps=...)) (pytorch_accelerated builds the scheduler from that function)"
)


class WSDCheckpointCallback(TrainerCallback):
    """Checkpoints at every decay of a pytorch_accelerated run; see the module docstring.

    Args:
        save_dir: the run directory (checkpoints in ``save_dir/checkpoints``).
        save_optimizer, save_scheduler: accepted for the seed's signature. Our post-decay checkpoints keep the
            optimizer and scheduler state (a WSD-S continuation from them needs it); ``False`` logs that (export the
            weights alone with ``wsd-pretrain ckpt export-hf``).
        initial_checkpoint: one of our checkpoint folders to start a new run from (ignored once ``save_dir`` has
            checkpoints of its own: the run then resumes).
        config: :class:`CheckpointConfig` (what to save besides the milestones, retention, async, signals).
        check_total: refuse a run length (epochs x updates, ``max_num_train_steps``) that disagrees with the schedule.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "checkpoints",
        save_optimizer: bool = True,
        save_scheduler: bool = True,
        initial_checkpoint: str | os.PathLike[str] | None = None,
        *,
        config: CheckpointConfig | None = None,
        check_total: bool = True,
    ) -> None:
        from ..checkpoint.storage import parse_location

        self.save_dir = parse_location(save_dir)  # a local path, or s3://bucket/prefix with config.staging_dir
        self.save_optimizer = save_optimizer
        self.save_scheduler = save_scheduler
        self.initial_checkpoint = Path(initial_checkpoint) if initial_checkpoint else None
        self.config = config
        self.check = check_total
        self.ckpt: FrameworkCheckpointer | None = None
        self._skip = 0
        self._full_loader: Any = None

    @property
    def manager(self) -> Any:
        return self.ckpt.manager if self.ckpt is not None else None

    # ------------------------------------------------------------------ start

    def on_training_run_start(self, trainer: Any, **kwargs: Any) -> None:
        if trainer.scheduler is None:
            raise CheckpointError(f"WSDCheckpointCallback needs the WSD scheduler: {_SCHEDULER_FIX}")
        if not (self.save_optimizer and self.save_scheduler):
            log_rank0(
                logging.INFO,
                "save_optimizer/save_scheduler=False: wsd_pretrain checkpoints keep both (a continuation needs them); "
                "export the weights alone with `wsd-pretrain ckpt export-hf`",
            )
        check_launch(trainer._accelerator.num_processes, "pytorch_accelerated")
        check_world(
            trainer._accelerator.num_processes,
            "pytorch_accelerated",
            "on CPU, set ACCELERATE_USE_CPU=true (pytorch_accelerated builds Accelerator() itself)",
        )
        self.ckpt = FrameworkCheckpointer(
            self.save_dir, config=self.config, framework="pytorch_accelerated", scheduler_fix=_SCHEDULER_FIX
        )
        mgr = self.ckpt.build(trainer.model, trainer.optimizer, trainer.scheduler)
        has_own = self.ckpt.has_checkpoints()
        if has_own:
            self.ckpt.resume("auto")
            self._continue_loop(trainer)
        elif self.initial_checkpoint is not None:
            if not self.initial_checkpoint.is_dir() or not (self.initial_checkpoint / "manifest.json").is_file():
                raise CheckpointError(
                    f"initial_checkpoint={self.initial_checkpoint}: not a wsd_pretrain checkpoint folder (the seed's "
                    "Accelerate folders and .pt exports cannot be read: they are pickles)"
                )
            mgr.load(self.initial_checkpoint)  # a continuation scheduler keeps its own length
            log_rank0(logging.INFO, "pytorch_accelerated: started from %s", self.initial_checkpoint)
        if self.check and not has_own:  # a resumed run was checked when it started
            rc = trainer.run_config
            planned = min(rc.max_num_train_steps, rc.num_epochs * rc.num_local_update_steps_per_epoch)
            check_total(mgr.scheduler, planned, framework="pytorch_accelerated", setting="num_epochs x updates")

    def _continue_loop(self, trainer: Any) -> None:
        """Run the remaining epochs only, the first of them without the batches it has trained."""
        assert self.ckpt is not None
        loader = trainer._train_dataloader
        epoch, skip = self.ckpt.loop.normalized(len(loader))
        trainer.run_config = dataclasses.replace(trainer.run_config, num_epochs=trainer.run_config.num_epochs - epoch)
        trainer.run_history._set_epoch(epoch + 1)
        self.ckpt.loop.epoch, self.ckpt.loop.batch = epoch, skip
        self._skip = skip
        if skip:
            self._full_loader = loader
            trainer._train_dataloader = trainer._accelerator.skip_first_batches(loader, skip)

    # ------------------------------------------------------------------ the loop

    def on_train_epoch_start(self, trainer: Any, **kwargs: Any) -> None:
        assert self.ckpt is not None
        self._stop_if_done()
        loader = trainer._train_dataloader
        if self._skip:  # the resumed epoch, drawn in the order the interrupted run drew it, less what it trained
            self.ckpt.before_epoch(loader, mid_epoch=True)
            self._skip = 0
            return
        self.ckpt.before_epoch(loader, mid_epoch=False)
        self.ckpt.loop.epoch, self.ckpt.loop.batch = trainer.run_history.current_epoch - 1, 0

    def on_train_step_start(self, trainer: Any, **kwargs: Any) -> None:
        """The previous batch's optimizer step is done: save if the schedule says so."""
        assert self.ckpt is not None
        self.ckpt.apply_rng()  # a mid-epoch resume: after the skipped iterator is built
        self._save(trainer)

    def on_train_step_end(self, trainer: Any, **kwargs: Any) -> None:
        assert self.ckpt is not None
        self.ckpt.loop.batch += 1  # trained (forward done; its update, if any, follows)

    def on_train_epoch_end(self, trainer: Any, **kwargs: Any) -> None:
        if self._full_loader is not None:
            trainer._train_dataloader, self._full_loader = self._full_loader, None

    def on_training_run_epoch_end(self, trainer: Any, **kwargs: Any) -> None:
        """After the epoch's last update and its evaluation (a finished schedule stops at the next epoch's start,
        so that a run whose last epoch ends with the schedule ends as usual)."""
        assert self.ckpt is not None
        self.ckpt.maybe_save()
        if self.ckpt.manager is not None and self.ckpt.manager.should_stop:
            self._stop_if_done()

    def on_training_run_end(self, trainer: Any, **kwargs: Any) -> None:
        if self.ckpt is not None:
            self.ckpt.close()

    def _save(self, trainer: Any) -> None:
        assert self.ckpt is not None
        self.ckpt.maybe_save()
        self._stop_if_done()

    def _stop_if_done(self) -> None:
        assert self.ckpt is not None
        if self.ckpt.should_stop:
            why = "preempted" if self.ckpt.manager is not None and self.ckpt.manager.should_stop else "schedule done"
            raise StopTrainingError(f"WSDCheckpointCallback: {why} at update {self.ckpt.scheduler.last_epoch}")
