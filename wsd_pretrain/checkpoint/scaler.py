"""Loss scalers in the checkpoint: ``CheckpointManager(..., scaler=...)``.

An fp16 run's ``torch.amp.GradScaler`` (or FSDP2's ``ShardedGradScaler``) carries state the next steps depend on:
the current scale and the growth tracker (updates since the last overflow). Lost on a resume, the scale starts
again at its initial value and the run skips updates it would not have skipped. Its ``state_dict()`` is plain JSON
(numbers), saved in ``train_state/trainer.json`` (``scaler``) from rank 0 (every rank's scaler agrees: the
overflow check is all-reduced) and given back with ``load_state_dict`` on every rank. DeepSpeed's own fp16 scaler
is part of its engine (engine.json) and needs no argument.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from ..errors import ConfigError

__all__ = ["check_scaler", "restore_scaler"]

log = logging.getLogger(__name__)


def check_scaler(scaler: Any) -> Any:
    """``scaler`` when the checkpoint can carry it (``state_dict``/``load_state_dict`` of finite JSON numbers),
    refused when the manager is built otherwise."""
    if scaler is None:
        return None
    if not (callable(getattr(scaler, "state_dict", None)) and callable(getattr(scaler, "load_state_dict", None))):
        raise ConfigError(
            f"scaler={type(scaler).__name__}: pass the loss scaler itself (torch.amp.GradScaler, ShardedGradScaler, "
            "anything with state_dict() and load_state_dict())",
            where="CheckpointManager",
        )
    state = scaler.state_dict()
    try:
        text = json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"scaler {type(scaler).__name__}: its state_dict() is not plain JSON ({exc}), so it cannot be saved "
            "without pickling",
            where="CheckpointManager",
        ) from exc
    del text
    if isinstance(state, dict) and state.get("scale") is not None and not math.isfinite(float(state["scale"])):
        raise ConfigError(f"scaler {type(scaler).__name__}: scale {state['scale']}", where="CheckpointManager")
    return scaler


def restore_scaler(scaler: Any, saved: Any, name: str) -> None:
    """Give the saved state back; say so when the checkpoint and the job disagree on having a scaler."""
    if scaler is not None and saved is not None:
        scaler.load_state_dict(saved)
    elif scaler is not None and scaler.state_dict():
        log.warning(
            "checkpoint %s holds no loss scaler state (saved without scaler=): %s keeps its initial scale",
            name,
            type(scaler).__name__,
        )
    elif scaler is None and saved:
        log.warning(
            "checkpoint %s holds a loss scaler's state (scale %s) and this manager has no scaler=: pass the run's "
            "GradScaler to resume it",
            name,
            saved.get("scale") if isinstance(saved, dict) else saved,
        )
