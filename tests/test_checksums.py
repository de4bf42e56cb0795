"""Both checksum algorithms end to end (``checkpoint.checksum``): a 2-rank save through CheckpointManager, resume on
2 ranks, ``wsd-pretrain ckpt`` verify / list / inspect / export-hf / reshard / to-dcp, and a flipped byte caught by
verify and by resume. The manifest's hashes are recomputed here with hashlib/xxhash, not with our own code."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from distributed_helpers import run_distributed
from engines import build, full_state
from wsd_pretrain import CheckpointError, WSDSchedule
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.cli import main as cli

pytestmark = pytest.mark.distributed

ALGOS = ("xxh3_128", "sha256")
HF = {"model_type": "tiny", "architectures": ["TinyLM"]}


def _digest(algo: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if algo == "sha256" else xxhash.xxh3_128(data).hexdigest()


def _save_and_resume(rank: int, world: int, root: str) -> dict[str, bool]:
    """For each algorithm: train 4 updates on 2 ranks (DDP), save through the manager, then resume into a fresh
    model and optimizer on the same 2 ranks; True where every restored tensor equals the saved one."""
    out = {}
    for algo in ALGOS:
        run = Path(root) / algo
        cfg = CheckpointConfig(checksum=algo, at_milestones=False, at_end=False, on_preemption=False)
        schedule = WSDSchedule(total=8, warmup=1, decay_length=2)
        model, opt, sched, step = build("ddp", schedule, rank)
        mgr = CheckpointManager(run, model, opt, sched, config=cfg, hf_config=HF)
        for i in range(4):
            step(i)
        mgr.save(["periodic"])
        saved = full_state(model, opt)
        mgr.close()
        model2, opt2, sched2, _ = build("ddp", schedule, rank)
        with torch.no_grad():
            for p in model2.parameters():
                p.add_(1.0)  # not the saved weights until resumed
        mgr2 = CheckpointManager(run, model2, opt2, sched2, config=cfg)
        assert mgr2.resume("latest"), "a checkpoint was found"
        restored = full_state(model2, opt2)
        mgr2.close()
        out[algo] = sched2.position == 4 and saved.keys() == restored.keys()
        out[algo] = out[algo] and all(torch.equal(saved[k], restored[k]) for k in saved)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checksums")
    results = run_distributed(_save_and_resume, 2, args=(str(root),))
    assert results == [dict.fromkeys(ALGOS, True)] * 2, "every rank resumed the exact saved state"
    return root


@pytest.mark.parametrize("algo", ALGOS)
def test_manifest_names_the_algorithm_its_hashes_were_made_with(runs, algo):
    ckpt = F.resolve_checkpoint(runs / algo)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["checksum"] == algo and manifest["world_size"] == 2
    for rel, entry in manifest["files"].items():
        assert entry["hash"] == _digest(algo, (ckpt / rel).read_bytes()), rel
    algo_name, digest = (ckpt / "manifest.hash").read_text().split()
    assert (algo_name, digest) == (algo, _digest(algo, (ckpt / "manifest.json").read_bytes()))


@pytest.mark.parametrize("algo", ALGOS)
def test_every_ckpt_tool_accepts_the_checkpoint(runs, algo, tmp_path, capsys):
    run = runs / algo
    ckpt = F.resolve_checkpoint(run)
    assert cli(["ckpt", "verify", str(ckpt)]) == 0
    assert f"({algo})" in capsys.readouterr().out
    assert cli(["ckpt", "list", str(run), "--checksums", "--json"]) == 0
    [info] = json.loads(capsys.readouterr().out)
    assert (info["name"], info["state"], info["problem"]) == (ckpt.name, "complete", None)
    assert cli(["ckpt", "inspect", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["position"] == 4
    assert cli(["ckpt", "export-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert cli(["ckpt", "reshard", str(ckpt), str(tmp_path / "re"), "--dtype", "bf16"]) == 0
    assert cli(["ckpt", "verify", str(tmp_path / "re")]) == 0
    assert cli(["ckpt", "to-dcp", str(ckpt), str(tmp_path / "dcp")]) == 0
    assert (tmp_path / "dcp" / ".metadata").is_file()


@pytest.mark.parametrize("algo", ALGOS)
def test_a_flipped_byte_is_caught_by_verify_and_by_resume(runs, algo, tmp_path, capsys):
    ckpt = tmp_path / "step-000000004-periodic"
    shutil.copytree(F.resolve_checkpoint(runs / algo), ckpt)
    victim = sorted(ckpt.rglob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01  # a tensor byte: the file's size and header stay valid
    victim.write_bytes(bytes(data))
    assert cli(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and "does not match" in out
    model, opt, sched, _ = build("torch", WSDSchedule(total=8, warmup=1, decay_length=2))
    mgr = CheckpointManager(tmp_path / "resumer", model, opt, sched, config=CheckpointConfig(on_preemption=False))
    try:
        with pytest.raises(CheckpointError, match=victim.name):
            mgr.load(ckpt)
    finally:
        mgr.close()
