"""Run a training script to the end, or kill it (SIGKILL) after its pre-decay checkpoint, and compare the final
checkpoints of two runs bit for bit; used by the integration and example tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
HANG = Path(__file__).resolve().parent / "hang_after_pre_decay.py"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def torchrun(nproc: int) -> list[str]:
    from distributed_helpers import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env or child_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"timed out; log:\n{log.read_text()[-4000:]}") from None
    text = log.read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}; log:\n{text[-6000:]}"
    return text


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (torchrun's workers run in their own sessions)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)


def hang_cmd(marker: Path, updates: int, script: Path, args: list[str], nproc: int = 0) -> list[str]:
    launcher = torchrun(nproc) if nproc else [sys.executable]
    return [*launcher, str(HANG), str(marker), str(updates), str(script), *args]


def wait_and_kill(proc: subprocess.Popen, markers: list[Path], log: Path, timeout: float = 240) -> None:
    """Wait until every rank stands after its pre-decay checkpoint (its marker file), then SIGKILL the run."""
    deadline = time.monotonic() + timeout
    while not all(m.exists() for m in markers):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the kill (exit {proc.returncode}):\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc)
            raise AssertionError(f"no marker after {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    kill_tree(proc)


def checkpoints(run_dir: Path) -> list[str]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def final_checkpoint(run_dir: Path) -> Path:
    finals = [n for n in checkpoints(run_dir) if "final" in n]
    assert finals, f"no final checkpoint in {run_dir}: {checkpoints(run_dir)}"
    return Path(run_dir) / "checkpoints" / finals[-1]


def checkpoint_state(ckpt: Path) -> dict[str, Any]:
    """Every tensor (weights, optimizer state), the scheduler state, the optimizer's hyperparameters (its LRs)
    and each rank's RNG streams of one checkpoint."""
    out: dict[str, Any] = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                out[f"{f.relative_to(ckpt)}:{key}"] = st.get_tensor(key)
    trainer = json.loads((ckpt / "train_state" / "trainer.json").read_text())
    out["scheduler"] = trainer["scheduler"]
    out["position"] = trainer["position"]
    engine = json.loads((ckpt / "train_state" / "engine.json").read_text())
    out["optimizer_groups"] = (engine.get("optimizer") or {}).get("param_groups")
    for f in sorted((ckpt / "train_state").rglob("rng/*.json")):
        out[f"rng:{f.name}"] = json.loads(f.read_text())
    return out


def assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = checkpoint_state(a), checkpoint_state(b)
    assert sorted(sa) == sorted(sb), f"different contents: {sorted(set(sa) ^ set(sb))[:6]}"
    tensors = 0
    for key, va in sa.items():
        vb = sb[key]
        if isinstance(va, torch.Tensor):
            assert va.dtype == vb.dtype and va.shape == vb.shape, key
            assert torch.equal(va.view(torch.uint8) if va.dim() else va, vb.view(torch.uint8) if vb.dim() else vb), (
                f"{key} differs: max |a-b| = {(va.double() - vb.double()).abs().max().item():.3g}"
            )
            tensors += 1
        else:
            assert va == vb, f"{key} differs:\n{va}\n{vb}"
    assert tensors > 0


PREEMPT = Path(__file__).resolve().parent / "preempt_at.py"


def preempt_cmd(updates: int, script: Path, args: list[str]) -> list[str]:
    """The script run in one process that sends itself SIGUSR1 after ``updates`` updates (tests/preempt_at.py)."""
    return [sys.executable, str(PREEMPT), str(updates), str(script), *args]


@contextmanager
def preempted_at(position: int) -> Iterator[None]:
    """Within the block, every ``CheckpointManager.maybe_save`` at scheduler position ``position`` first requests
    preemption (what a SIGTERM does, at a known update): an in-process job saves a ``preempt`` checkpoint there and
    stops."""
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    real = CheckpointManager.maybe_save

    def maybe_save(self: Any) -> Any:
        if self.scheduler.position == position:
            self.request_preemption()
        return real(self)

    CheckpointManager.maybe_save = maybe_save  # type: ignore[method-assign]
    try:
        yield
    finally:
        CheckpointManager.maybe_save = real  # type: ignore[method-assign]
