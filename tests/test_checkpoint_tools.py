"""wsd-pretrain ckpt: list, inspect, verify, export-hf, from-deepspeed (against DeepSpeed's own zero_to_fp32 and
its own resume), reshard, to-dcp/from-dcp. Checkpoints come from real engines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distributed_helpers import run_distributed
from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint import tools
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.cli import main as cli
from wsd_pretrain.model import LlamaLM, ModelConfig


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small Llama trained for a few updates in one process, with its checkpoint (two model shards)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    model = LlamaLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=6, decay_length=2))
    mgr = CheckpointManager(
        run, model, opt, sched, config=CheckpointConfig(max_shard_size=60_000), hf_config=cfg.hf_config()
    )
    while not sched.finished:
        x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(sched.position))
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.maybe_save()
    mgr.close()
    return run


def _final(run: Path) -> Path:
    return F.resolve_checkpoint(run)


def test_list_inspect_verify(trained, tmp_path, capsys):
    assert cli(["ckpt", "list", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "step-000000004-pre-decay" in out and "*  step-000000006-post-decay+final" in out
    assert cli(["ckpt", "inspect", str(trained), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["position"] == 6 and info["schedule"]["phase"] == "decay" and info["tensors"]["model"]["float32"]
    ckpt = tmp_path / "copy"
    shutil.copytree(_final(trained), ckpt)
    assert cli(["ckpt", "verify", str(ckpt)]) == 0
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    assert cli(["ckpt", "verify", str(ckpt)]) == 1
    out = capsys.readouterr().out
    assert shard.name in out and "does not match" in out
    assert cli(["ckpt", "verify", str(ckpt), "--sizes-only"]) == 0


def test_verify_finds_a_slice_its_file_misplaces(trained, tmp_path):
    """A state file whose own metadata puts a slice at another start than the state index (its checksums resealed,
    so only the structural check can see it) is named by verify and refused by the reader."""
    import struct

    import xxhash

    from wsd_pretrain.checkpoint.store import CheckpointStore

    ckpt = tmp_path / "copy"
    shutil.copytree(_final(trained), ckpt)
    state = sorted(ckpt.glob("train_state/state-r*.safetensors"))[0]
    raw = state.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["wsd_pretrain"])
    key = sorted(meta["starts"])[0]
    meta["starts"][key] += 1
    header["__metadata__"]["wsd_pretrain"] = json.dumps(meta, separators=(",", ":"))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    data = struct.pack("<Q", len(head)) + head + raw[8 + n :]
    state.write_bytes(data)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    rel = str(state.relative_to(ckpt))
    manifest["files"][rel].update(size=len(data), hash=xxhash.xxh3_128_hexdigest(data))
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    digest = xxhash.xxh3_128_hexdigest((ckpt / "manifest.json").read_bytes())
    (ckpt / "manifest.hash").write_text(f"xxh3_128 {digest}\n")
    problems = tools.verify_checkpoint_files(ckpt)
    assert len(problems) == 1 and key in problems[0] and "is not a slice the state index gives this rank" in problems[0]
    with CheckpointStore(ckpt, F.load_manifest(ckpt)) as store, pytest.raises(CheckpointError, match=state.name):
        group, _, name = key.partition("/")
        store.read(group, name)


def test_export_hf_loads_with_transformers_and_casts(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tools.export_hf(_final(trained), tmp_path / "hf", max_shard_size=50_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "config.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = LlamaLM(ModelConfig(**json.loads((out / "config.json").read_text())["wsd_pretrain"])).eval()
    ours.load_state_dict({k: v for k, v in load_all(out).items()})
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x))
    bf16 = tools.export_hf(_final(trained), tmp_path / "hf16", dtype="bf16")
    assert {t.dtype for t in load_all(bf16).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(CheckpointError, match="not empty"):
        tools.export_hf(_final(trained), tmp_path / "hf")
    assert not list(tmp_path.glob(".hf*")), "no staging folder left behind"


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for fname in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / fname)))
    return out


def test_reshard_to_bf16_and_back_loses_nothing_that_matters(trained, tmp_path):
    src = _final(trained)
    out = tools.reshard(src, tmp_path / "re", max_shard_size=10**9, dtype="bf16")
    assert tools.verify_checkpoint_files(out) == []
    m = F.load_manifest(out)
    assert m["groups"]["model"]["dtypes"] == ["bfloat16"] and m["groups"]["model"]["shards"] == 1
    assert m["master_weights"] == "master", "the fp32 weights are kept as the master"
    # resuming from the resharded checkpoint restores the exact fp32 weights and optimizer state
    cfg = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
    loaded = []
    for path in (src, out):
        torch.manual_seed(len(loaded) + 1)  # other initial weights each time: the load must replace them all
        model = LlamaLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mgr = CheckpointManager(
            tmp_path / f"load-{len(loaded)}", model, opt, WSDScheduler(opt, WSDSchedule(total=6, decay_length=2))
        )
        mgr.load(path)
        mgr.close()
        loaded.append((model, opt))
    (a, opt_a), (b, opt_b) = loaded
    names = [n for n, _ in a.named_parameters()]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    # the optimizer state too: every parameter's exp_avg, exp_avg_sq and step, the trained values
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sorted(state_a) == sorted(state_b) == list(range(len(names)))
    for i, n in enumerate(names):
        assert state_a[i].keys() == state_b[i].keys() == {"step", "exp_avg", "exp_avg_sq"}, n
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[i][key], state_b[i][key]), f"{n} {key}"
        assert float(state_b[i]["step"]) == 6.0 and state_b[i]["exp_avg_sq"].abs().sum() > 0, n


def test_dcp_round_trip_streams_each_tensor(trained, tmp_path):
    src = _final(trained)
    dcp_dir = tools.to_dcp(src, tmp_path / "dcp")
    assert (dcp_dir / ".metadata").exists()
    hf = tools.from_dcp(dcp_dir, tmp_path / "hf", prefix="model.", max_shard_size=40_000)
    back = load_all(hf)
    original = load_all_ckpt(src)
    assert back.keys() == original.keys()
    for k in back:
        assert torch.equal(back[k], original[k]), k
    import torch.distributed.checkpoint as dcp

    probe = {"optimizer.model.norm.weight/exp_avg": torch.empty(64)}
    dcp.load(probe, checkpoint_id=str(dcp_dir), no_dist=True)
    assert probe["optimizer.model.norm.weight/exp_avg"].abs().sum() > 0
    with pytest.raises(CheckpointError, match=r"not a torch\.distributed\.checkpoint"):
        tools.from_dcp(tmp_path, tmp_path / "x")


def load_all_ckpt(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_all(ckpt)


# ---------------------------------------------------------------------------------------------- DeepSpeed


def _ds_train_and_save(rank, world, stage, dtype, ds_dir):
    import deepspeed

    from engines import TinyLM, batch, ds_config, param_groups
    from wsd_pretrain import deepspeed_initialize

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(param_groups(model), lr=3e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=12, warmup=2, decay_length=4))
    engine, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(stage, dtype))
    for i in range(4):
        engine.backward(engine(batch(i, rank)))
        engine.step()
    engine.save_checkpoint(ds_dir, tag="global_step4")
    # the live engine's full state, through DeepSpeed's per-parameter API (safe_get_full_*)
    from engines import full_state

    del deepspeed
    return {
        k.replace(":optimizer/", ":"): v.flatten().tolist()
        for k, v in full_state(engine, opt).items()
        if ":model" not in k or dtype == "fp32"
    }


def _continue(rank, world, stage, dtype, ds_dir, ours_dir):
    """Resume DeepSpeed's checkpoint two ways, DeepSpeed's own load and ours, and train 3 more updates each."""
    from engines import TinyLM, batch, ds_config, full_state, param_groups
    from wsd_pretrain import deepspeed_initialize

    def build():
        torch.manual_seed(1)  # other initial weights: the load must replace them all
        model = TinyLM()
        opt = torch.optim.AdamW(param_groups(model), lr=3e-3)
        sched = WSDScheduler(opt, WSDSchedule(total=12, warmup=2, decay_length=4))
        engine, *_ = deepspeed_initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(stage, dtype)
        )
        return engine, opt, sched

    results = []
    for mode in ("deepspeed", "ours"):
        engine, opt, sched = build()
        if mode == "deepspeed":
            engine.load_checkpoint(ds_dir)
        else:
            mgr = CheckpointManager(
                ours_dir + f"-rank-scratch-{rank}", engine, opt, sched, config=CheckpointConfig(on_preemption=False)
            )
            mgr.load(F.resolve_checkpoint(ours_dir))
            mgr.close()
        position = sched.position
        for i in range(4, 7):
            engine.backward(engine(batch(i, rank)))
            engine.step()
        results.append(
            {"position": position, "state": {k: v.flatten().tolist() for k, v in full_state(engine, opt).items()}}
        )
    return results


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("stage", "dtype"), [pytest.param(1, "bf16", marks=pytest.mark.slow), (2, "fp32"), (3, "bf16"), (0, "fp32")]
)
def test_from_deepspeed_matches_zero_to_fp32_and_resumes_like_deepspeed(tmp_path, stage, dtype):
    pytest.importorskip("deepspeed")
    ds_dir = tmp_path / "ds"
    live = run_distributed(_ds_train_and_save, args=(stage, dtype, str(ds_dir)), timeout=600)[0]
    out = tmp_path / "ours"
    tools.from_deepspeed(ds_dir, out, max_shard_size=20_000)
    ckpt = F.resolve_checkpoint(out)
    assert ckpt.name == "step-000000004-imported" and tools.verify_checkpoint_files(ckpt) == []
    if (stage, dtype) == (2, "fp32"):  # tools/from_deepspeed.py, as a user runs it, writes the same files
        import os

        from distributed_helpers import run_script

        script = Path(__file__).resolve().parent.parent / "tools" / "from_deepspeed.py"
        args = [str(ds_dir), str(tmp_path / "by-script"), "--max-shard-size", "20000"]
        res = run_script(script, args, cwd=tmp_path, env=dict(os.environ), timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        by_script = F.resolve_checkpoint(tmp_path / "by-script")
        assert by_script.name == ckpt.name
        assert F.load_manifest(by_script)["files"] == F.load_manifest(ckpt)["files"]
    master_group = "master" if dtype != "fp32" else "model"
    ours = read_all(ckpt)
    # DeepSpeed's partitions stay the slices of the ranks that held them (nothing reassembled)
    index = json.loads((ckpt / F.STATE_INDEX).read_text())
    assert len(index["files_per_rank"]) == (2 if stage > 0 else 1)
    partitions = [t["partition"] for t in index["tensors"].values()]
    if stage == 3:
        assert all("chunk" in p for k, p in zip(index["tensors"], partitions) if not k.endswith("/step"))
    elif stage in (1, 2):
        assert {r for p in partitions for _, _, r in p.get("parts", [])} == {0, 1}
    # bit for bit against DeepSpeed's own reconstruction
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if stage > 0:
        reference = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir))
        for name, tensor in reference.items():
            if name in ours[master_group]:
                assert torch.equal(ours[master_group][name].float(), tensor.float()), name
    # and against the live engine's full optimizer state
    for key, values in live.items():
        name, _, what = key.partition(":")
        t = ours[master_group][name] if what in ("master", "model") else ours["optimizer"][f"{name}/{what}"]
        assert t.float().flatten().tolist() == values, key
    if stage == 0:
        return
    a, b = run_distributed(_continue, args=(stage, dtype, str(ds_dir), str(out)), timeout=600)[0]
    assert a["position"] == b["position"] == 4
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert a["state"][key] == b["state"][key], key


def read_all(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of a checkpoint, whole, by group (assembled from its slices by the reader)."""
    from wsd_pretrain.checkpoint.store import CheckpointStore

    with CheckpointStore(ckpt, F.load_manifest(ckpt)) as store:
        return {g: {n: store.read(g, n) for n in store.names(g)} for g in F.GROUP_NAMES}


def test_from_deepspeed_refuses_what_is_not_a_deepspeed_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        tools.from_deepspeed(tmp_path, tmp_path / "out", max_shard_size=10**9)
    (tmp_path / "latest").write_text("../etc")
    with pytest.raises(CheckpointError, match=r"not a tag folder|not a folder"):
        tools.from_deepspeed(tmp_path, tmp_path / "out", max_shard_size=10**9)
