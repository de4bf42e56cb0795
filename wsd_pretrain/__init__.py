"""wsd_pretrain: Warmup-Stable-Decay pretraining with checkpoints at every decay.

Public surface:

* :class:`WSDSchedule` - the schedule, a frozen value and a pure function of the position;
* :class:`WSDScheduler` - the torch LR scheduler around it (plain torch, DDP, FSDP2, DeepSpeed);
* :func:`split_ds_config` / :func:`deepspeed_initialize` - a ds_config ``"scheduler": {"type": "WSD"}`` section;
* :class:`CheckpointManager` / :class:`CheckpointConfig` - sharded safetensors checkpoints at every decay, exact
  resume (docs/manager.md); :class:`Stateful` is what ``data=`` takes;
* :mod:`wsd_pretrain.integrations` - the Hugging Face Trainer, accelerate, Lightning and pytorch_accelerated;
* :mod:`wsd_pretrain.compat` - drop-in replacements for pytorch_accelerated's ``WSDLrScheduler``;
* the errors: :class:`WSDError`, :class:`ConfigError`, :class:`CheckpointError`.
"""

from .checkpoint import CheckpointConfig, CheckpointManager, Stateful
from .deepspeed_scheduler import deepspeed_initialize, split_ds_config
from .errors import CheckpointError, ConfigError, WSDError
from .schedule import Event, Milestone, Phase, WSDSchedule
from .scheduler import WSDScheduler

__version__ = "0.1.0"

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointManager",
    "ConfigError",
    "Event",
    "Milestone",
    "Phase",
    "Stateful",
    "WSDError",
    "WSDSchedule",
    "WSDScheduler",
    "__version__",
    "deepspeed_initialize",
    "split_ds_config",
]
