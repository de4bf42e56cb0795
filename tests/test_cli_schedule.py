"""`wsd-pretrain schedule`: the table, JSON, the plot, overrides and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wsd_pretrain.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_table(capsys):
    assert main(["schedule"]) == 0
    out = capsys.readouterr().out
    assert "phases:" in out and "milestones" in out
    for name in ("warmup", "stable", "decay"):
        assert name in out
    assert "pre-decay at" in out and "end of run" in out


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
    assert data["schedule"]["total"] == 60
    assert {p["name"] for p in data["phases"]} == {"warmup", "stable", "decay"}


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


def test_console_script_runs():
    exe = Path(sys.executable).with_name("wsd-pretrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "wsd_pretrain.cli"]
    res = subprocess.run([*cmd, "schedule"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "milestones" in res.stdout
