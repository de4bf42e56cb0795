"""The ``wsd-pretrain`` command: thin argument parsing over library functions.

Subcommands:
  train      train (see ``wsd-pretrain train --help``; also ``python -m wsd_pretrain.train``)
  schedule   print a schedule's phases and milestones (``--plot out.png`` draws it)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import apply_overrides, load_config
from .errors import WSDError
from .schedule import WSDSchedule

__all__ = ["main"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"


def _default_config_path() -> Path | None:
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


# ---------------------------------------------------------------------------------------------- schedule


def schedule_from_config(config: dict[str, Any], total_steps: int | None = None) -> WSDSchedule:
    """The ``schedule:`` section as a :class:`WSDSchedule`; ``total_steps`` rescales it (``--total-steps``)."""
    from .config import build

    schedule = build(WSDSchedule, config.get("schedule"), where="schedule section")
    return schedule.rescaled(total_steps) if total_steps is not None else schedule


def format_schedule(schedule: WSDSchedule, base_lr: float | None) -> str:
    """The table ``wsd-pretrain schedule`` prints."""
    lr = base_lr if base_lr is not None else 1.0
    unit = schedule.units
    shape = schedule.decay_shape if isinstance(schedule.decay_shape, str) else "custom"
    head = [
        f"WSD schedule: {schedule.total} {unit}"
        + (f" from {schedule.origin} (continuation)" if schedule.origin else "")
        + f", mode {schedule.mode}, LR read at the {schedule.progress} of each update",
        f"  warmup {schedule.warmup} ({schedule.warmup_shape} from {schedule.warmup_start_ratio:g} x base), "
        f"decay {shape} to {schedule.min_lr_ratio:g} x base"
        + (f", base LR {base_lr:g}" if base_lr is not None else " (LRs shown as factors of the base LR)"),
    ]
    rows = [("phase", "period", "from", "to (excl.)", "length", "LR first", "LR last")]
    for ph in schedule.segments():
        first = ph.start if ph.start >= schedule.origin else schedule.origin
        last = ph.start + ph.length - 1
        rows.append(
            (
                ph.name,
                str(ph.period),
                str(first),
                str(ph.start + ph.length),
                str(ph.start + ph.length - first),
                f"{lr * schedule.factor(first):.4g}",
                f"{lr * schedule.factor(last):.4g}",
            )
        )
    ms_rows = [("milestone", "budget", "decay", "pre-decay at", "post-decay at", "then")]
    for ms in schedule.milestones_info:
        if ms.final:
            then = "end of run"
        elif ms.rewind:
            then = f"rewind to pre-decay ({ms.trajectory_pre_decay} trained)"
        else:
            then = "continue from decayed weights" if schedule.mode == "wsd-s" else "continue"
        ms_rows.append((str(ms.index), str(ms.at), str(ms.decay_length), str(ms.pre_decay), str(ms.post_decay), then))
    out = [*head, "", "phases:", *_table(rows), "", "milestones (checkpoints at pre-decay and post-decay points):"]
    out += _table(ms_rows) if len(ms_rows) > 1 else ["  none (no decay: cool down later with a branch)"]
    if schedule.mode == "branching":
        out.append(f"  the run does {schedule.end} {unit} of work in all, branches included")
    return "\n".join(out)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def _cmd_schedule(args: argparse.Namespace) -> int:
    config_path = args.config if args.config is not None else _default_config_path()
    config = load_config(config_path, [])
    config = apply_overrides(config, args.overrides)
    schedule = schedule_from_config(config, args.total_steps)
    base_lr = args.lr if args.lr is not None else (config.get("optimizer") or {}).get("lr")
    if args.json:
        payload = {
            "schedule": schedule.to_dict(),
            "end": schedule.end,
            "milestones": [
                ms.__dict__ | {"trajectory_pre_decay": ms.trajectory_pre_decay} for ms in schedule.milestones_info
            ],
            "phases": [ph.__dict__ for ph in schedule.segments()],
        }
        print(json.dumps(payload, indent=2))
    else:
        print(format_schedule(schedule, base_lr))
    if args.plot:
        from .plotting import plot_schedule

        path = plot_schedule(schedule, args.plot, base_lr=base_lr or 1.0)
        print(f"plot written to {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsd-pretrain", description="Warmup-Stable-Decay pretraining: schedules, checkpoints, tools."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train a model (wsd-pretrain train --help)", add_help=False)
    p = sub.add_parser(
        "schedule",
        help="print a schedule's phases and milestones, optionally plot it",
        description="Print the phases and milestones of the schedule in a config file (default: the tiny CPU "
        "config) after overrides such as schedule.decay_shape=linear.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON config (default: configs/tiny_cpu.yaml)")
    p.add_argument("--total-steps", type=int, default=None, help="rescale the schedule to this many steps")
    p.add_argument("--lr", type=float, default=None, help="base LR to show (default: optimizer.lr of the config)")
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="draw the LR curve to this file")
    p.add_argument("--json", action="store_true", help="print the schedule, phases and milestones as JSON")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.set_defaults(func=_cmd_schedule)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        from .train import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except WSDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
