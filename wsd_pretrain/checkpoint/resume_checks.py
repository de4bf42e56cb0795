"""What a resume compares between the checkpoint and the job before anything is restored: the optimizer's class and
state keys, and its hyperparameters (docs/training.md, "Changed settings on resume").

Every rank runs these on the same plain-JSON data (rank 0 read it and broadcast it), so every rank decides the same
and a refusal raises on every rank at the same point, before a tensor is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

__all__ = [
    "APPLIED_ON_RESUME",
    "Change",
    "class_problem",
    "decide",
    "hyperparameter_changes",
    "state_keys_problem",
]

log = logging.getLogger(__name__)

APPLIED_ON_RESUME = frozenset({"eps", "grad_clip"})
"""Settings whose new value a resume applies (and logs): numerical-stability knobs a user turns after a loss spike.
Every other changed hyperparameter (lr, betas, weight_decay, momentum, ...) is refused unless allowed on purpose."""

IMPLEMENTATION_KEYS = frozenset(
    {"params", "lr", "initial_lr", "step", "foreach", "fused", "capturable", "differentiable"}
)
"""Group keys that are not hyperparameters of the update: counters (FusedAdam keeps ``step`` in its groups),
implementation switches, and ``lr`` (the scheduler's: its base LR is compared)."""

# DeepSpeed's Adam kernels (GPU FusedAdam, ZeRO-Offload's CPU Adam) keep torch Adam's state (exp_avg, exp_avg_sq,
# step) and say with ``adam_w_mode`` whether they decay like AdamW: a checkpoint moves between them and torch's
# Adam/AdamW (a GPU run resumed on another machine). torch's Adam and AdamW differ in the update: refused.
_DEEPSPEED_ADAMS = frozenset({"FusedAdam", "DeepSpeedCPUAdam"})
_ADAMS = frozenset({"Adam", "AdamW"}) | _DEEPSPEED_ADAMS
# state keys of torch's own optimizers (any subset may be present: SGD without momentum has none)
_STATE_KEYS = {
    "Adam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "AdamW": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "FusedAdam": {"step", "exp_avg", "exp_avg_sq"},
    "DeepSpeedCPUAdam": {"step", "exp_avg", "exp_avg_sq"},
    "SGD": {"momentum_buffer"},
    "Adagrad": {"step", "sum"},
    "RMSprop": {"step", "square_avg", "momentum_buffer", "grad_avg"},
}


def class_problem(saved: str | None, live: str | None) -> str | None:
    """Why a checkpoint of optimizer class ``saved`` cannot resume into ``live``, or None."""
    if not saved or not live or saved == live:
        return None
    if not saved.isidentifier():  # not a class name: an import that could not tell ("unknown (DeepSpeed import)")
        return None
    if saved in _ADAMS and live in _ADAMS and (saved in _DEEPSPEED_ADAMS or live in _DEEPSPEED_ADAMS):
        return None
    return (
        f"the checkpoint's optimizer is {saved} and this one is {live}: its state (and its update rule) do not "
        f"carry over. Build the job with {saved} to resume, or load only the model weights (the HF folder, or "
        f"load_optimizer=False) to start {live} afresh"
    )


def state_keys_problem(saved_class: str | None, live_class: str, saved: dict[str, Any], live_state: Any) -> str | None:
    """Why the checkpoint's per-parameter optimizer state keys (``saved``: ``{param: {key: shape}}``) do not fit the
    live optimizer: keys the live optimizer already holds for that parameter, or those its class keeps."""
    expected = _STATE_KEYS.get(live_class)
    for name, keys in sorted(saved.items()):
        have = set(live_state.get(name, {})) if live_state else set()
        want = have or expected
        if want is None:
            continue
        extra = sorted(set(keys) - want)
        if extra:
            return (
                f"the checkpoint's optimizer state for {name} holds {sorted(keys)} (written by "
                f"{saved_class or 'an unnamed optimizer'}), which {live_class} does not keep ({extra}): build the "
                f"job with the optimizer that wrote it"
            )
    return None


@dataclass(frozen=True)
class Change:
    """One hyperparameter that differs: ``group`` is the param group's index (None: a job setting)."""

    field: str
    group: int | None
    old: Any
    new: Any

    def describe(self) -> str:
        where = f" (param group {self.group})" if self.group is not None else ""
        return f"{self.field}{where}: {self.old!r} -> {self.new!r}"


def _plain(value: Any) -> Any:
    from .adapters import _jsonable

    return json.loads(json.dumps(_jsonable(value)))


def hyperparameter_changes(
    saved_groups: list[dict[str, Any]],
    saved_base_lrs: list[float] | None,
    live_groups: list[dict[str, Any]],
    live_base_lrs: list[float] | None,
) -> list[Change]:
    """Each hyperparameter of each param group whose value in the checkpoint differs from the live optimizer's (keys
    both have), and each base LR (the scheduler's) that differs."""
    changes = []
    if saved_base_lrs is not None and live_base_lrs is not None and len(saved_base_lrs) == len(live_base_lrs):
        for i, (old, new) in enumerate(zip(saved_base_lrs, live_base_lrs)):
            if float(old) != float(new):
                changes.append(Change("lr", i, float(old), float(new)))
    if len(saved_groups) != len(live_groups):
        return changes  # the param-group count is refused by the restore, naming both
    for i, (saved, live) in enumerate(zip(saved_groups, live_groups)):
        for key in sorted(set(saved) & set(live) - IMPLEMENTATION_KEYS):
            old, new = _plain(saved[key]), _plain(live[key])
            if old != new:
                changes.append(Change(key, i, old, new))
    return changes


def decide(changes: Iterable[Change], allow: bool | Iterable[str]) -> list[Change]:
    """The changes a resume applies; raises CheckpointError naming every refused one with both values and the fix.
    ``allow``: True applies every change; a list of field names applies those too."""
    allowed = set(APPLIED_ON_RESUME) | (set() if isinstance(allow, bool) else set(allow))
    changes = list(changes)
    refused = [c for c in changes if not (allow is True or c.field in allowed)]
    if refused:
        fields = sorted({c.field for c in refused})
        raise CheckpointError(
            "the job's optimizer settings differ from the checkpoint's: "
            + "; ".join(c.describe() for c in refused)
            + " (checkpoint -> this job). A resume does not change them silently: to apply the new values on purpose "
            "run with --allow-optimizer-change (wsd-pretrain train) or pass allow_changes=True (or "
            f"allow_changes={fields}) to CheckpointManager.resume/load; to keep the checkpoint's, set them back"
        )
    return changes
