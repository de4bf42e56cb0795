"""Warmup and decay shapes: functions of a phase's progress ``t`` in [0, 1].

A warmup shape ``w(t)`` rises from 0 (start LR) to 1 (base LR); the warmup factor is
``start + (1 - start) * w(t)``. A decay shape gives the LR factor itself, from 1 (base LR) at ``t = 0`` to
``m`` (``min_lr_ratio``) at ``t = 1``:

========================  ==============================================  ==============================
name (aliases)            factor at progress t                            source
========================  ==============================================  ==============================
``linear``                ``m + (1 - m) (1 - t)``                         MiniCPM, Hägele et al. 2024
``cosine`` (``cos``)      ``m + (1 - m) (1 + cos(pi t)) / 2``             transformers, torchtitan
``1-sqrt`` (``sqrt``)     ``m + (1 - m) (1 - sqrt(t))``                   Hägele et al. 2024
``inverse`` (``inv``)     ``1 / (t / m + (1 - t))``                       Wen et al. 2024 (needs m > 0)
``exponential`` (``exp``) ``m ** t`` (geometric from 1 to m)              Megatron-style (needs m > 0)
callable ``g``            ``m + (1 - m) g(t)``, ``g`` from 1 down to 0    your own
========================  ==============================================  ==============================

The inverse-proportional form is written as in the paper's and the seed's code, ``1 / (t * (1/m) + (1 - t))``,
so compat reproduces the seed's numbers to the last bit where the seed computes the same expression.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = [
    "DECAY_SHAPES",
    "WARMUP_SHAPES",
    "canonical_decay_shape",
    "canonical_warmup_shape",
    "decay_factor",
    "warmup_weight",
]

WARMUP_SHAPES = ("linear", "cosine", "1-sqrt")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "inverse", "exponential")
# Shapes whose formula needs a strictly positive floor (the inverse form divides by m; m ** t is 0 at m = 0).
POSITIVE_FLOOR_SHAPES = ("inverse", "exponential")

_ALIASES = {
    "cos": "cosine",
    "sqrt": "1-sqrt",
    "one-minus-sqrt": "1-sqrt",
    "minus_sqrt": "1-sqrt",
    "inv": "inverse",
    "inverse-proportional": "inverse",
    "inverse_proportional": "inverse",
    "exp": "exponential",
}


def canonical_warmup_shape(name: str) -> str | None:
    """The canonical name of a warmup shape, or None when ``name`` is not one."""
    name = _ALIASES.get(name, name)
    return name if name in WARMUP_SHAPES else None


def canonical_decay_shape(name: str) -> str | None:
    """The canonical name of a decay shape, or None when ``name`` is not one."""
    name = _ALIASES.get(name, name)
    return name if name in DECAY_SHAPES else None


def warmup_weight(shape: str, t: float) -> float:
    """How far the warmup has come at progress ``t`` in [0, 1]: 0 at the start LR, 1 at the base LR."""
    if shape == "linear":
        return t
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * t))
    # "1-sqrt": slow at first, fast near the base LR (the 1-sqrt decay reflected in time and value), as
    # transformers' warmup_type="1-sqrt".
    return 1.0 - math.sqrt(1.0 - t)


def decay_factor(shape: str | Callable[[float], float], t: float, floor: float) -> float:
    """The LR factor at progress ``t`` in [0, 1] of a decay from 1 down to ``floor``."""
    if shape == "1-sqrt":
        return floor + (1.0 - floor) * (1.0 - math.sqrt(t))
    if shape == "linear":
        return floor + (1.0 - floor) * (1.0 - t)
    if shape == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if shape == "inverse":
        return 1.0 / (t * (1.0 / floor) + (1.0 - t))
    if shape == "exponential":
        return floor**t
    return floor + (1.0 - floor) * float(shape(t))  # type: ignore[operator]
