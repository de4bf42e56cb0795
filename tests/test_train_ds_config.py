"""The main job runs a user's ds_config as written: its optimizer section (DeepSpeed builds the optimizer) and its
WSD scheduler section; conflicting or unusable sections are refused with a clear error (docs/training.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_helpers import free_port
from wsd_pretrain import WSDSchedule, WSDScheduler
from wsd_pretrain.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUICK = ["train.progress=false", "train.eval_every=8", "train.eval_batches=2", "data.max_bytes=2000000"]

OPTIMIZER = {"type": "AdamW", "params": {"lr": 0.002, "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.05}}
WSD = {"type": "WSD", "params": {"total": 8, "warmup": 2, "decay_length": 2, "decay_shape": "linear"}}


def _ds_config(tmp_path: Path, **sections) -> Path:
    cfg = {"zero_optimization": {"stage": 2}, **sections}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("torch_adam", "built"),
    [
        # "torch_adam": DeepSpeed builds torch's AdamW from the section: no kernel to compile
        (True, "AdamW"),
        # DeepSpeed's default: its FusedAdam, a kernel compiled on first use (about a minute on 2 cores): slow
        pytest.param(False, "FusedAdam", marks=pytest.mark.slow),
    ],
)
def test_the_ds_config_optimizer_and_wsd_scheduler_run_as_written_on_two_ranks(tmp_path, torch_adam, built):
    pytest.importorskip("deepspeed")
    optimizer = {"type": "AdamW", "params": {**OPTIMIZER["params"], "torch_adam": torch_adam}}
    ds = _ds_config(tmp_path, optimizer=optimizer, scheduler=WSD)
    run_dir = tmp_path / "run"
    cmd = [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "wsd_pretrain.train",
        "--run-dir",
        str(run_dir),
        "train.engine=deepspeed",
        f"train.ds_config={ds}",
        "train.micro_batch_size=8",
        *QUICK,
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-6000:]
    # the engine's optimizer, as the job logs it: DeepSpeed's own, with the ds_config's hyperparameters
    [line] = re.findall(r"INFO wsd_pretrain: optimizer: (\{.*\})", res.stderr)
    opt = json.loads(line)
    assert (opt["class"], opt["from"]) == (built, "ds_config")
    assert opt.get("adam_w_mode", True) is True, "AdamW: decoupled weight decay"
    decay, no_decay = opt["param_groups"]
    for group in (decay, no_decay):
        assert group["initial_lr"] == 0.002 and group["betas"] == [0.8, 0.99] and group["eps"] == 1e-7
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0, "no decay on norms and biases"
    # the ds_config's WSD section is the schedule (the job's default would be 300 steps), on the ds_config's LR
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert names == ["step-000000006-pre-decay", "step-000000008-post-decay+final"]
    lrs = [m["lr"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    ref = WSDScheduler(ref_opt, WSDSchedule.from_dict(WSD["params"]))
    expected = []
    for _ in range(8):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref.step()
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0) and max(lrs) == pytest.approx(0.002)
    assert "# optimizer: the ds_config's optimizer section" in (run_dir / "config.yaml").read_text()


def _dry_run(capsys, *args: str) -> tuple[int, str, str]:
    code = train_main(["--dry-run", "train.engine=deepspeed", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_non_wsd_ds_scheduler_is_refused(tmp_path, capsys):
    ds = _ds_config(tmp_path, scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 100}})
    code, _, err = _dry_run(capsys, f"train.ds_config={ds}")
    assert code == 2 and "type 'WarmupDecayLR' is not a WSD schedule" in err and "remove the section" in err


def test_two_optimizer_definitions_are_refused(tmp_path, capsys):
    ds = _ds_config(tmp_path, optimizer=OPTIMIZER)
    code, _, err = _dry_run(capsys, f"train.ds_config={ds}", "optimizer.lr=0.1")
    assert code == 2 and "has an optimizer section (type 'AdamW') and the job config an optimizer: section" in err
    code, out, _ = _dry_run(capsys, f"train.ds_config={ds}")
    assert code == 0 and out.startswith("# optimizer: the ds_config's optimizer section, built by DeepSpeed")
    assert "\noptimizer:" not in out, "the job's unused optimizer defaults are not shown as if they applied"


def test_the_schedule_is_defined_once(tmp_path, capsys):
    ds = _ds_config(tmp_path, scheduler=WSD)
    code, _, err = _dry_run(capsys, f"train.ds_config={ds}", "schedule.total=100", "schedule.warmup=2")
    assert code == 2 and "disagree: total (100 in the job, 8 in the ds_config)" in err and "warmup" not in err
    # settings that agree are no conflict; the ds_config's schedule is the job's, rescaled by --total-steps
    code, out, _ = _dry_run(capsys, f"train.ds_config={ds}", "schedule.total=8", "--total-steps", "16")
    assert code == 0 and "total: 16" in out and "warmup: 4" in out


def test_wsd_pretrain_schedule_shows_what_the_job_runs(tmp_path, capsys):
    from wsd_pretrain.cli import main as cli

    _ds_config(tmp_path, optimizer=OPTIMIZER, scheduler=WSD)
    job = tmp_path / "job.yaml"
    job.write_text("train:\n  engine: deepspeed\n  ds_config: ds.json\n")  # relative to the job file
    assert cli(["schedule", "--config", str(job), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schedule"]["total"] == 8
    assert cli(["schedule", "--config", str(job)]) == 0
    assert "base LR 0.002" in capsys.readouterr().out, "the ds_config optimizer's LR"


def test_batch_clipping_and_precision_that_disagree_with_the_job_are_refused(tmp_path, capsys):
    # the loop and the data sampler use train:, so a ds_config saying otherwise would train another job than it says
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": 4,
                "gradient_clipping": 0.5,
                "bf16": {"enabled": True},
            }
        )
    )
    code, _, err = _dry_run(capsys, f"train.ds_config={ds}", "train.micro_batch_size=8")
    assert code == 2
    assert "train_micro_batch_size_per_gpu is 4 in the ds_config, 8 from train.micro_batch_size" in err
    assert "gradient_clipping is 0.5 in the ds_config, 1.0 from train.grad_clip" in err
    assert "bf16.enabled is True in the ds_config, False from train.dtype ('fp32')" in err
    assert "gradient_accumulation_steps" not in err, "a key the ds_config leaves out is no disagreement"
    # the same values in both places, or "auto", run
    ds.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 2},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_clipping": 0.5,
                "bf16": {"enabled": True},
            }
        )
    )
    code, out, _ = _dry_run(capsys, f"train.ds_config={ds}", "train.grad_clip=0.5", "train.dtype=bf16")
    assert code == 0, out
