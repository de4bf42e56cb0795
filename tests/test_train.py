"""The main job end to end: real launchers (torchrun on one and two simulated nodes, the deepspeed launcher), real
processes, real files. Runs are short (--total-steps) but pass through warmup, stable and decay."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from distributed_helpers import free_port

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
QUICK = ["train.progress=false", "train.eval_every=8", "train.eval_batches=2", "data.max_bytes=2000000"]


def _env() -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{cmd}\n--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-6000:]}"
    return res


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        str(BIN / "torchrun"),
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "wsd_pretrain.train",
        *args,
    ]


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_run_on_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    track = ["tracking.tensorboard=true"] if importlib.util.find_spec("tensorboard") is not None else []
    _run(torchrun(2, "--run-dir", str(run_dir), "--total-steps", "16", *QUICK, *track))
    if track:  # only rank 0 writes events (one writer, one file; tests/test_tracking.py reads them back)
        assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # 16 updates: warmup 2, stable, a 3-update 1-sqrt decay (20%)
    assert _checkpoints(run_dir) == ["step-000000013-pre-decay", "step-000000016-post-decay+final"]
    manifest = json.loads((run_dir / "checkpoints/step-000000016-post-decay+final/manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["layout"]["engine"] == "ddp"
    assert manifest["tokens"] == 16 * 2 * 16 * 128
    steps = [m for m in _metrics(run_dir) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 17))
    assert {m["phase"] for m in steps} == {"warmup", "stable", "decay"}
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0, "the model learns"
    assert (run_dir / "curves.png").stat().st_size > 10_000 and (run_dir / "config.yaml").exists()
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints/step-000000016-post-decay+final")
    assert model.config.vocab_size == 256


def test_two_nodes_simulated_with_two_torchrun_agents(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    cmd = [
        str(BIN / "torchrun"),
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "wsd-test",
        "-m",
        "wsd_pretrain.train",
        "--run-dir",
        str(run_dir),
        "--total-steps",
        "10",
        *QUICK,
    ]
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outs)
    manifest = json.loads((run_dir / "checkpoints/step-000000010-post-decay+final/manifest.json").read_text())
    assert manifest["world_size"] == 2


def test_deepspeed_launcher_on_one_node(tmp_path):
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    _run(
        [
            str(BIN / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "--no_local_rank",
            "--module",
            "wsd_pretrain.train",
            "--config",
            "configs/tiny_cpu_deepspeed.yaml",
            "--run-dir",
            str(run_dir),
            "--total-steps",
            "10",
            "train.zero_stage=3",
            *QUICK,
        ]
    )
    assert _checkpoints(run_dir) == ["step-000000008-pre-decay", "step-000000010-post-decay+final"]
    layout = json.loads((run_dir / "checkpoints/step-000000010-post-decay+final/manifest.json").read_text())["layout"]
    assert (layout["engine"], layout["zero_stage"], layout["world_size"]) == ("deepspeed", 3, 2)


def _files(run_dir: Path, name: str) -> dict[str, str]:
    manifest = json.loads((run_dir / "checkpoints" / name / "manifest.json").read_text())
    return {k: v["hash"] for k, v in manifest["files"].items()}


def _kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process under it. torchrun starts each worker in a session of its own, so
    killing the launcher's process group would leave the workers running (they would finish the run)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float) -> None:
    """Start ``cmd`` (a launcher), wait until ``ready()`` holds, then SIGKILL the launcher and every process under
    it; fails if the run ends (or ``timeout`` seconds pass) first."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        _kill_tree(proc.pid)  # the launcher and its ranks, mid-run
        proc.wait(30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    # attention dropout draws from each rank's torch generator at every update: the weights come out the same only
    # if the resume restored every rank's RNG
    args = ["--total-steps", "20", "--save-every", "4", "model.attention_dropout=0.1", *QUICK]
    _run(torchrun(2, "--run-dir", str(tmp_path / "straight"), *args))
    victim = tmp_path / "killed"
    kill_when(
        torchrun(2, "--run-dir", str(victim), *args),
        (victim / "checkpoints" / "step-000000008-periodic").exists,
        timeout=300,
    )
    final = "step-000000020-post-decay+periodic+final"
    assert final not in _checkpoints(victim), "the run was killed before its end"
    res = _run(torchrun(2, "--run-dir", str(victim), *args))  # the same command resumes
    assert "resumed" in res.stderr
    resumed, straight = _files(victim, final), _files(tmp_path / "straight", final)
    assert {"train_state/rng/rank-00000.json", "train_state/rng/rank-00001.json"} < resumed.keys()
    assert resumed["train_state/rng/rank-00000.json"] != resumed["train_state/rng/rank-00001.json"], "own streams"
    assert any(k.startswith("model-") for k in resumed) and any(k.startswith("train_state/state-") for k in resumed)
    # every file: weights, optimizer state, trainer and engine state, and each rank's RNG streams
    assert resumed == straight, "bitwise equal weights, optimizer, trainer and RNG state"


@pytest.mark.slow  # the default suite runs continuation and cooldown in tests/test_workflow.py (every pre-decay point)
def test_continuation_cooldown_and_branching_modes(tmp_path):
    base = tmp_path / "base"
    _run(torchrun(1, "--run-dir", str(base), "--total-steps", "20", "--save-every", "10", *QUICK))
    assert "step-000000016-pre-decay" in _checkpoints(base)
    # WSD: continue from the pre-decay checkpoint to 40 updates, no re-warmup, the decay placed by the new length
    cont = tmp_path / "cont"
    _run(
        torchrun(
            1,
            "--run-dir",
            str(cont),
            "--continue-from",
            str(base / "checkpoints/step-000000016-pre-decay"),
            "--total-steps",
            "40",
            *QUICK,
        )
    )
    steps = [m for m in _metrics(cont) if "loss" in m]
    assert steps[0]["step"] == 17 and steps[0]["phase"] == "stable" and steps[0]["lr"] == pytest.approx(3e-3)
    # the new period runs from 16 to 40: a 20% decay is 4 updates
    assert _checkpoints(cont) == ["step-000000036-pre-decay", "step-000000040-post-decay+final"]
    # WSD-S: continue from the post-decay (decayed) weights
    cont_s = tmp_path / "cont_s"
    _run(
        torchrun(
            1,
            "--run-dir",
            str(cont_s),
            "--continue-from",
            str(base / "checkpoints/step-000000020-post-decay+periodic+final"),
            "--total-steps",
            "30",
            *QUICK,
        )
    )
    assert _checkpoints(cont_s)[-1] == "step-000000030-post-decay+final"
    # a cooldown branch from a stable checkpoint
    cool = tmp_path / "cool"
    _run(
        torchrun(
            1,
            "--run-dir",
            str(cool),
            "--cooldown-from",
            str(base / "checkpoints/step-000000010-periodic"),
            "--cooldown-steps",
            "4",
            *QUICK,
        )
    )
    lrs = [m["lr"] for m in _metrics(cool) if "loss" in m]
    assert len(lrs) == 4 and lrs == sorted(lrs, reverse=True) and lrs[-1] == 0.0
    assert _checkpoints(cool) == ["step-000000014-post-decay+final"]
    # branching WSD: side branches, each rewound
    branch = tmp_path / "branch"
    _run(
        torchrun(
            1, "--run-dir", str(branch), "--config", "configs/tiny_cpu_branching.yaml", "--total-steps", "40", *QUICK
        )
    )
    names = _checkpoints(branch)
    assert names == [
        "step-000000008-pre-decay",
        "step-000000010-post-decay",
        "step-000000018-pre-decay",
        "step-000000022-post-decay",
        "step-000000038-pre-decay",
        "step-000000046-post-decay+final",
    ]
    trajectory = [m["trajectory"] for m in _metrics(branch) if "loss" in m]
    assert trajectory[9] == 8, "after the first branch the run went back to its pre-decay state"


def test_dry_run_and_bad_arguments():
    res = _run([sys.executable, "-m", "wsd_pretrain.train", "--dry-run", "schedule.total=1000"])
    assert "total: 1000" in res.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "wsd_pretrain.train", "--dry-run", "train.engine=horovod"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "engine='horovod'" in bad.stderr
