"""Plots of a schedule (and, for training runs, of loss and LR), with the decay points marked.

matplotlib is an optional dependency (``pip install 'wsd_pretrain[plot]'``); only these functions import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .schedule import WSDSchedule

__all__ = ["plot_schedule", "schedule_curve"]

_MAX_POINTS = 4000


def schedule_curve(schedule: WSDSchedule, base_lr: float = 1.0) -> tuple[list[int], list[float]]:
    """Positions and LRs over the whole run: every position for short runs, an even sample of at most 4000 plus
    every phase boundary (so no corner is cut) for long ones."""
    start, end = schedule.origin, schedule.end
    stride = max(1, (end - start) // _MAX_POINTS)
    points = set(range(start, end, stride))
    for phase in schedule.segments():
        points.update({phase.start, max(phase.start, phase.start + phase.length - 1)})
    for ms in schedule.milestones_info:
        points.update({ms.pre_decay, ms.post_decay - 1, ms.post_decay})
    xs = sorted(p for p in points if start <= p < end)
    return xs, [base_lr * schedule.factor(p) for p in xs]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'wsd_pretrain[plot]'", where="plot") from None
    return plt


def plot_schedule(
    schedule: WSDSchedule,
    out: str | Path,
    *,
    base_lr: float = 1.0,
    title: str | None = None,
    losses: Sequence[tuple[int, float]] | None = None,
    eval_losses: Sequence[tuple[int, float]] | None = None,
) -> Path:
    """Draw the LR curve to ``out`` (PNG, SVG or PDF by suffix): decays shaded, pre-decay points as downward
    triangles, post-decay points as circles, rewinds (branching) as dotted lines. ``losses`` and ``eval_losses``
    ((position, loss) pairs) go on a second axis."""
    plt = _pyplot()
    xs, ys = schedule_curve(schedule, base_lr)
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    ax.plot(xs, ys, color="tab:blue", lw=1.6, label="learning rate")
    label_pre, label_post = "pre-decay checkpoint", "post-decay checkpoint"
    for ms in schedule.milestones_info:
        if ms.decay_length:
            ax.axvspan(ms.pre_decay, ms.post_decay, color="tab:orange", alpha=0.12, lw=0)
        # A point marks the state after the update before it: its LR is that update's.
        for pos, marker, colour, ms_size, label in (
            (ms.pre_decay, "v", "tab:green", 8, label_pre),
            (ms.post_decay, "o", "tab:red", 7, label_post),
        ):
            y = base_lr * schedule.factor(max(schedule.origin, pos - 1))
            ax.plot([pos], [y], marker, color=colour, ms=ms_size, label=label)
        if ms.rewind:
            ax.axvline(ms.post_decay, color="gray", ls=":", lw=1)
            ax.annotate(
                f"rewind to {ms.trajectory_pre_decay}",
                (ms.post_decay, base_lr * 0.5),
                rotation=90,
                fontsize=7,
                color="gray",
                ha="right",
                va="center",
            )
        label_pre = label_post = None  # one legend entry each
    ax.set_xlabel(f"position ({schedule.units}{', branches included' if schedule.mode == 'branching' else ''})")
    ax.set_ylabel("learning rate" if base_lr != 1.0 else "LR / base LR")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if losses or eval_losses:
        ax2 = ax.twinx()
        if losses:
            ax2.plot(
                [p for p, _ in losses],
                [v for _, v in losses],
                color="tab:purple",
                lw=0.8,
                alpha=0.6,
                label="training loss",
            )
        if eval_losses:
            ax2.plot(
                [p for p, _ in eval_losses],
                [v for _, v in eval_losses],
                "s-",
                color="black",
                ms=3,
                lw=1,
                label="validation loss",
            )
        ax2.set_ylabel("loss")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(
        title
        or f"WSD schedule: {schedule.decay_shape if isinstance(schedule.decay_shape, str) else 'custom'}"
        f" decay, {len(schedule.milestones_info)} milestone(s), mode {schedule.mode}"
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
