"""`wsd-pretrain schedule`: the table, JSON, the plot, overrides and errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsd_pretrain.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _table(out: str, title: str) -> list[dict[str, str]]:
    """The rows of the table printed under the line starting with ``title``, as dicts by column name."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    split = [re.split(r"\s{2,}", line.strip()) for line in lines[start + 1 :]]
    rows = []
    for cells in split[1:]:
        if len(cells) != len(split[0]):
            break
        rows.append(dict(zip(split[0], cells)))
    return rows


def test_default_config_table(capsys):
    assert main(["schedule"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "WSD schedule: 300 steps, mode wsd-s, LR read at the end of each update"
    phases = _table(out, "phases:")
    assert [(r["phase"], r["period"], r["from"], r["to (excl.)"], r["length"]) for r in phases] == [
        ("warmup", "0", "0", "30", "30"),
        ("stable", "0", "30", "240", "210"),
        ("decay", "0", "240", "300", "60"),
    ]
    lr = 3e-3  # configs/tiny_cpu.yaml's base LR; the LR of an update is read at its end
    expected = [(lr / 30, lr), (lr, lr), (lr * (1 - math.sqrt(1 / 60)), 0.0)]
    for row, (first, last) in zip(phases, expected):
        assert float(row["LR first"]) == pytest.approx(first, rel=1e-3), row
        assert float(row["LR last"]) == pytest.approx(last, rel=1e-3, abs=1e-12), row
    assert _table(out, "milestones") == [
        {
            "milestone": "0",
            "budget": "300",
            "decay": "60",
            "pre-decay at": "240",
            "post-decay at": "300",
            "then": "end of run",
        }
    ]


def test_branching_table(capsys):
    assert main(["schedule", "schedule.milestones=[100,200,300]", "schedule.mode=branching"]) == 0
    out = capsys.readouterr().out
    phases = _table(out, "phases:")
    assert [(r["phase"], r["period"], r["from"], r["to (excl.)"]) for r in phases] == [
        ("warmup", "0", "0", "30"),
        ("stable", "0", "30", "80"),
        ("decay", "0", "80", "100"),
        ("stable", "1", "100", "180"),
        ("decay", "1", "180", "220"),
        ("stable", "2", "220", "300"),
        ("decay", "2", "300", "360"),
    ]
    milestones = _table(out, "milestones")
    assert [(r["budget"], r["decay"], r["pre-decay at"], r["post-decay at"], r["then"]) for r in milestones] == [
        ("100", "20", "80", "100", "rewind to pre-decay (80 trained)"),
        ("200", "40", "180", "220", "rewind to pre-decay (160 trained)"),
        ("300", "60", "300", "360", "end of run"),
    ]
    assert out.rstrip().endswith("the run does 360 steps of work in all, branches included")


def test_json_output_and_overrides(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("schedule:\n  total: 1000\n  warmup: 10\n")
    assert (
        main(
            [
                "schedule",
                "--config",
                str(cfg),
                "--json",
                "schedule.milestones=[500,1000]",
                "schedule.decay_fraction=0.1",
                "schedule.mode=branching",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["schedule"]["milestones"] == [500, 1000]
    assert [m["pre_decay"] for m in data["milestones"]] == [450, 950]
    assert [m["rewind"] for m in data["milestones"]] == [True, False]
    assert data["end"] == 1050


def test_total_steps_rescales(capsys):
    assert main(["schedule", "--json", "--total-steps", "60"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["schedule"]["total"], data["schedule"]["warmup"], data["end"]) == (60, 6, 60)
    assert [(p["name"], p["start"], p["length"]) for p in data["phases"]] == [
        ("warmup", 0, 6),
        ("stable", 6, 42),
        ("decay", 48, 12),
    ]
    assert [(m["at"], m["decay_length"], m["pre_decay"], m["final"]) for m in data["milestones"]] == [
        (60, 12, 48, True)
    ]


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lr.png"
    assert main(["schedule", "--plot", str(out), "schedule.milestones=geometric", "schedule.num_milestones=3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_bad_input_is_a_clear_error(capsys):
    assert main(["schedule", "schedule.warmup=-5"]) == 2
    err = capsys.readouterr().err
    assert "warmup=-5" in err
    assert main(["schedule", "schedule.warmpu=5"]) == 2
    assert "did you mean 'warmup'" in capsys.readouterr().err
    assert main(["schedule", "--config", "/nonexistent.yaml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_runs(capsys):
    exe = Path(sys.executable).with_name("wsd-pretrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "wsd_pretrain.cli"]
    res = subprocess.run([*cmd, "schedule"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert main(["schedule"]) == 0
    assert res.stdout == capsys.readouterr().out, "the installed command prints what main() prints"
