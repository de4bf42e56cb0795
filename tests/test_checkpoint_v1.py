"""Checkpoints written by format version 1 (every tensor whole; tests/data/, made by the release before format 2)
still resume, on any engine and world size, and `ckpt reshard` rewrites one as version 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distributed_helpers import run_distributed

DATA = Path(__file__).with_name("data")


def _saved(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fixture's tensors read with safetensors alone, keyed as engines.full_state keys them."""
    out = {}
    for group, key in (("model", "model"), ("train_state/master", "master"), ("train_state/optimizer", "optimizer")):
        index = ckpt / f"{group}.safetensors.index.json"
        if not index.exists():
            continue
        folder = index.parent
        for name, fname in json.loads(index.read_text())["weight_map"].items():
            with safe_open(str(folder / fname), framework="pt") as f:
                t = f.get_tensor(name).float()
            if key == "optimizer":
                param, _, k = name.rpartition("/")
                out[f"{param}:optimizer/{k}"] = t
            else:
                out[f"{name}:{key}"] = t
    return out


def _load(rank, world, engine, ckpt, run_dir):
    from engines import build, full_state
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    model, opt, sched, _ = build(engine, WSDSchedule(total=10, warmup=2, milestones=(5, 10), decay_length=(2, 2)), rank)
    mgr = CheckpointManager(run_dir, model, opt, sched)
    mgr.load(ckpt)
    mgr.close()
    state = {k: v.flatten().tolist() for k, v in full_state(model, opt).items()}
    module = getattr(model, "module", model)
    return {"position": sched.position, "state": state, "buffer": module.scale.float().tolist()}


@pytest.mark.distributed
@pytest.mark.parametrize(("fixture", "engine"), [("v1-ddp", "fsdp2"), ("v1-ds2-bf16", "ds3-bf16")])
def test_a_version_1_checkpoint_resumes_on_another_engine(tmp_path, fixture, engine):
    ckpt = DATA / fixture
    saved = _saved(ckpt)
    results = run_distributed(_load, args=(engine, str(ckpt), str(tmp_path)), timeout=600)
    for res in results:
        assert res["position"] == 3
        # every saved tensor is compared; the model's one buffer (``scale``) is not a parameter, checked below
        assert set(saved) - set(res["state"]) == {"scale:model"}, "the engine holds other tensors than the checkpoint"
        assert res["buffer"] == saved["scale:model"].tolist()
        for key, values in res["state"].items():
            assert values == saved[key].flatten().tolist(), key


def test_reshard_rewrites_version_1_as_version_2(tmp_path):
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint import tools

    out = tools.reshard(DATA / "v1-ds2-bf16", tmp_path / "v2", max_shard_size=10_000)
    manifest = F.load_manifest(out)
    assert manifest["format_version"] == F.FORMAT_VERSION >= 2
    assert tools.verify_checkpoint_files(out) == []
    from wsd_pretrain.checkpoint.store import CheckpointStore

    saved = _saved(DATA / "v1-ds2-bf16")
    with CheckpointStore(out, manifest) as store:
        for key, t in saved.items():
            name, _, what = key.partition(":")
            group, tensor = (what.split("/")[0], f"{name}/{what.split('/', 1)[1]}") if "/" in what else (what, name)
            assert torch.equal(store.read(group, tensor).float(), t), key
