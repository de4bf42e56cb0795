"""What the checkpoint's checksums and version promise (docs/checkpoint-format.md), checked from outside: every
digest recomputed with the xxhash package itself, a manifest edited into other valid JSON refused by its
manifest.hash, a newer format_version refused with the documented message, sha256 checkpoints readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.cli import main as cli


def _setup(run: Path, config: CheckpointConfig | None = None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=4, decay_length=1))
    mgr = CheckpointManager(run, model, opt, sched, config=config or CheckpointConfig(every_steps=2))
    return model, opt, sched, mgr


def _train(run: Path, config: CheckpointConfig | None = None) -> None:
    model, opt, sched, mgr = _setup(run, config)
    while not sched.finished:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(sched.position))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.maybe_save()
    mgr.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with three checkpoints: step 2 (periodic), 3 (pre-decay), 4 (post-decay, final)."""
    run = tmp_path_factory.mktemp("run")
    _train(run)
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _newest(run: Path) -> Path:
    return run / "checkpoints" / "step-000000004-post-decay+periodic+final"


def _resume(run: Path, which: str = "auto", fallback: bool = False) -> int:
    _, _, sched, mgr = _setup(run, CheckpointConfig(fallback=fallback))
    try:
        mgr.resume(which)
        return sched.position
    finally:
        mgr.close()


def test_every_digest_is_xxh3_128_of_the_file_as_the_xxhash_package_computes_it(run):
    ckpt = _newest(run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["checksum"] == "xxh3_128"
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json", "manifest.hash"}, "every file is listed"
    assert {"train_state/trainer.json", "train_state/rng/rank-00000.json"} < set(manifest["files"])
    for rel, record in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        # size, digest and the rank that wrote it (one process here: rank 0)
        assert record == {"size": len(data), "hash": xxhash.xxh3_128_hexdigest(data), "rank": 0}, rel
    manifest_bytes = (ckpt / "manifest.json").read_bytes()
    assert (ckpt / "manifest.hash").read_text() == f"xxh3_128 {xxhash.xxh3_128_hexdigest(manifest_bytes)}\n"


def test_a_manifest_edited_into_other_valid_json_is_refused_by_its_hash(run, capsys):
    ckpt = _newest(run)
    text = (ckpt / "manifest.json").read_text()
    edited = text.replace('"position": 4,', '"position": 5,')  # one digit: still valid JSON, still plausible
    assert edited != text and json.loads(edited)["position"] == 5
    (ckpt / "manifest.json").write_text(edited)
    with pytest.raises(CheckpointError, match="the manifest is corrupt"):
        F.load_manifest(ckpt)
    assert cli(["ckpt", "verify", str(ckpt)]) == 1
    assert "manifest is corrupt" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="the manifest is corrupt"):
        _resume(run, str(ckpt))
    with pytest.raises(CheckpointError, match=r"is damaged.*the manifest is corrupt"):
        _resume(run)  # resume("auto") names the damage instead of loading it
    assert [i.state for i in F.list_checkpoints(run)] == ["complete", "complete", "corrupt"]
    assert _resume(run, fallback=True) == 3, "with fallback, the previous checkpoint"


def _rewrite_manifest(ckpt: Path, **changes) -> None:
    """Change manifest fields and write manifest.hash to match, as a genuine writer of that manifest would."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest.update(changes)
    raw = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
    (ckpt / "manifest.json").write_bytes(raw)
    (ckpt / "manifest.hash").write_text(f"xxh3_128 {xxhash.xxh3_128_hexdigest(raw)}\n")


def test_a_newer_format_version_is_refused_with_the_documented_message(run, capsys):
    ckpt = _newest(run)
    _rewrite_manifest(ckpt)  # the same manifest, rewritten with its hash: still accepted
    assert F.load_manifest(ckpt)["format_version"] == F.FORMAT_VERSION and _resume(run) == 4
    newer = F.FORMAT_VERSION + 1
    _rewrite_manifest(ckpt, format_version=newer)
    message = rf"format version {newer} is newer than this release reads \({F.FORMAT_VERSION}\); upgrade wsd_pretrain"
    with pytest.raises(CheckpointError, match=message):
        F.load_manifest(ckpt)
    with pytest.raises(CheckpointError, match=message):
        _resume(run, str(ckpt))
    assert cli(["ckpt", "verify", str(ckpt)]) == 1
    assert f"format version {newer} is newer" in capsys.readouterr().out
    assert F.list_checkpoints(run)[-1].state == "corrupt"


def test_sha256_checkpoints_are_written_and_resumed(tmp_path):
    _train(tmp_path, CheckpointConfig(every_steps=2, checksum="sha256"))
    ckpt = _newest(tmp_path)
    manifest = F.load_manifest(ckpt)
    assert manifest["checksum"] == "sha256"
    import hashlib

    for rel, record in manifest["files"].items():
        assert record["hash"] == hashlib.sha256((ckpt / rel).read_bytes()).hexdigest(), rel
    assert _resume(tmp_path) == 4
