"""DeepSpeed glue: a ds_config ``"scheduler": {"type": "WSD", "params": {...}}`` section.

DeepSpeed builds a configured scheduler only from its own ``lr_schedules`` or ``torch.optim.lr_scheduler`` and
refuses any other ``type``. :func:`split_ds_config` reads the WSD section, validates it, removes it and returns a
factory that DeepSpeed calls with the optimizer it really steps (``deepspeed.initialize(lr_scheduler=factory)``);
:func:`deepspeed_initialize` does both in one call. ``params`` are :class:`~wsd_pretrain.WSDSchedule`'s fields
plus the scheduler's ``warmup_start_lr`` and ``tokens_per_step``::

    "scheduler": {"type": "WSD", "params": {"total": 10000, "warmup": 500, "decay_fraction": 0.2,
                                            "decay_shape": "1-sqrt", "min_lr_ratio": 0.0}}

DeepSpeed steps the scheduler once per real optimizer step: at gradient-accumulation boundaries only, and not on
a step it skips for an fp16 overflow (``engine._take_model_step``); ``engine.step(lr_kwargs={"tokens": n})``
reaches ``WSDScheduler.step(tokens=n)``. Its checkpoints carry ``state_dict()`` under ``lr_scheduler``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.optim import Optimizer

from .errors import ConfigError
from .schedule import WSDSchedule
from .scheduler import WSDScheduler

__all__ = ["SCHEDULER_TYPE", "deepspeed_initialize", "split_ds_config"]

SCHEDULER_TYPE = "WSD"
_SCHEDULER_ARGS = ("warmup_start_lr", "tokens_per_step")


def split_ds_config(
    config: dict[str, Any] | str | os.PathLike[str],
) -> tuple[dict[str, Any], Callable[[Optimizer], WSDScheduler] | None]:
    """Return ``(config without the WSD scheduler section, factory or None)``.

    ``config`` is a ds_config dict (not modified) or the path of a ds_config JSON file. The factory is None when
    the config has no scheduler section or one of another type (DeepSpeed then handles it as usual).
    """
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"ds_config file {str(path)!r} does not exist", where="ds_config") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{str(path)!r} is not valid JSON: {exc}", where="ds_config") from None
    if not isinstance(config, dict):
        raise ConfigError(f"expected a ds_config dict or JSON path, got {type(config).__name__}", where="ds_config")
    config = copy.deepcopy(config)
    section = config.get("scheduler")
    if not isinstance(section, dict) or str(section.get("type", "")).upper() != SCHEDULER_TYPE:
        return config, None
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"scheduler.params must be an object, got {type(params).__name__}", where="ds_config")
    params = dict(params)
    scheduler_args = {k: params.pop(k) for k in _SCHEDULER_ARGS if k in params}
    schedule = WSDSchedule.from_dict(params)
    del config["scheduler"]
    return config, WSDScheduler.factory(schedule, **scheduler_args)


def deepspeed_initialize(*, config: Any = None, args: Any = None, lr_scheduler: Any = None, **kwargs: Any) -> Any:
    """``deepspeed.initialize`` that understands a WSD scheduler section.

    ``config`` (dict or JSON path) or ``args.deepspeed_config``; every other argument goes to
    ``deepspeed.initialize`` unchanged. Returns its ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed  # an optional dependency: only this function needs it

    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)
        args.deepspeed_config = None
    if config is None:
        raise ConfigError("pass config= (a dict or a JSON path) or args.deepspeed_config", where="ds_config")
    config, factory = split_ds_config(config)
    if factory is not None and lr_scheduler is not None:
        raise ConfigError(
            "the ds_config has a WSD scheduler section and lr_scheduler= was passed too: keep one of them",
            where="ds_config",
        )
    return deepspeed.initialize(
        args=args, config=config, lr_scheduler=lr_scheduler if lr_scheduler is not None else factory, **kwargs
    )
