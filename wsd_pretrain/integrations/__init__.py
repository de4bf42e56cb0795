"""wsd_pretrain checkpoints inside the trainers people already use; each module imports its framework itself.

* :mod:`wsd_pretrain.integrations.hf` - ``transformers.Trainer``: :class:`~.hf.WSDTrainerCallback`,
  :func:`~.hf.wsd_scheduler`, :func:`~.hf.last_checkpoint` (extra ``wsd_pretrain[hf]``);
* :mod:`wsd_pretrain.integrations.accelerate` - a loop with ``accelerate``: :class:`~.accelerate.AccelerateCheckpointer`
  (extra ``wsd_pretrain[accelerate]``);
* :mod:`wsd_pretrain.integrations.lightning` - Lightning: :class:`~.lightning.WSDCheckpoint`
  (extra ``wsd_pretrain[lightning]``);
* :mod:`wsd_pretrain.integrations.pytorch_accelerated` - the seed's framework:
  ``wsd_pretrain.compat.WSDCheckpointCallback``.

Importing this package imports no framework. See docs/integrations.md.
"""

from ._common import FrameworkCheckpointer, LoopPosition

__all__ = ["FrameworkCheckpointer", "LoopPosition"]
