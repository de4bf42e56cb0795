"""The checkpoint manager with real engines on 2 ranks: layouts that do not depend on the world size or the engine,
Hugging Face folders, async and rank-0 writing, retention, preemption, branching rewinds, locks, corruption."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distributed_helpers import run_distributed

pytestmark = pytest.mark.distributed

SCHEDULE = dict(total=10, warmup=2, milestones=(5, 10), decay_length=(2, 2))


def _train(rank, world, engine, run_dir, stop=None, resume=None, config=None, schedule=None, preempt_at=None):
    """Training that draws from every random stream (engines.build(stochastic=True)): an exact resume or rewind
    needs the model, optimizer, data position and every rank's RNG back."""
    from engines import assert_verified, build, full_state, rng_digests
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    sched_kwargs = schedule or SCHEDULE
    model, opt, sched, step = build(engine, WSDSchedule(**sched_kwargs), rank, stochastic=True)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=CheckpointConfig(**(config or {})))
    loaded = mgr.resume(resume) if resume else False
    losses = {}
    while not sched.finished and not mgr.should_stop:
        i = sched.schedule.trajectory_position(sched.position)  # the data follows the trajectory (rewinds included)
        losses[sched.position] = step(i)
        if preempt_at is not None and sched.position == preempt_at and rank == world - 1:
            import signal

            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM would, to one rank only
        mgr.maybe_save()
        if stop is not None and sched.position == stop:
            break
    mgr.close()
    if rank == 0 and mgr.saves:  # the invariant: a committed checkpoint always passes verify, on every engine
        assert_verified(mgr.saves)
    state = full_state(model, opt)
    return {
        "loaded": loaded,
        "losses": losses,
        "position": sched.position,
        "stopped": mgr.should_stop,
        "saves": [p.name for p in mgr.saves],
        "state": {k: v.flatten().tolist() for k, v in state.items()},
        "rng": rng_digests(),
    }


def _load_only(rank, world, engine, ckpt):
    from engines import build, full_state
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    model, opt, sched, _ = build(engine, WSDSchedule(**SCHEDULE), rank)
    mgr = CheckpointManager(Path(ckpt).parent.parent, model, opt, sched)
    mgr.load(ckpt)
    mgr.close()
    return {"position": sched.position, "state": {k: v.flatten().tolist() for k, v in full_state(model, opt).items()}}


def _assert_same_state(a: dict, b: dict):
    """The same tensors (parameters, master weights, every optimizer state key), bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key


OPTIMIZER_KEYS = {"optimizer/exp_avg", "optimizer/exp_avg_sq", "optimizer/step"}


@pytest.mark.parametrize(
    ("saver", "save_world", "loader", "load_world"),
    [("ds2", 2, "ds3", 2), ("ds2", 2, "torch", 1), ("ddp", 4, "ds1", 2), ("ds3", 2, "fsdp2", 2)],
)
def test_a_checkpoint_resumes_on_another_world_size_and_engine(tmp_path, saver, save_world, loader, load_world):
    saved = run_distributed(
        _train, world_size=save_world, args=(saver, str(tmp_path), 4, None, {"every_steps": 4}), timeout=600
    )
    ckpt = tmp_path / "checkpoints" / "step-000000004-periodic"
    loaded = run_distributed(_load_only, world_size=load_world, args=(loader, str(ckpt)), timeout=600)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == save_world
    ref = saved[0]["state"]
    # every engine here trains in fp32: each parameter has its weight and AdamW's exp_avg, exp_avg_sq and step
    params = {k.partition(":")[0] for k in ref}
    assert len(params) == 13 and ref.keys() == {f"{p}:{k}" for p in params for k in {"model", *OPTIMIZER_KEYS}}
    assert {v[0] for k, v in ref.items() if k.endswith(":optimizer/step")} == {4.0}
    for res in loaded:
        assert res["position"] == manifest["position"]
        # weights and the whole optimizer state, the same tensors bit for bit, on every rank of the new layout
        _assert_same_state(ref, res["state"])


def test_hugging_face_folder_loads_with_plain_safetensors_and_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_distributed(_hf_run, world_size=2, args=(str(tmp_path),), timeout=600)
    ckpt = sorted((tmp_path / "checkpoints").glob("step-*final*"))[-1]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    total = 0
    for name, fname in index["weight_map"].items():
        with safe_open(str(ckpt / fname), framework="pt") as f:
            t = f.get_tensor(name)
            total += t.numel() * t.element_size()
    assert total == index["metadata"]["total_size"]
    assert len({*index["weight_map"].values()}) > 1, "the test model is split over several shards"
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    reference = json.loads((tmp_path / "reference.json").read_text())
    import torch

    tokens = torch.arange(10).reshape(1, 10)
    assert model(tokens).logits.flatten()[:20].tolist() == pytest.approx(reference["logits"], rel=1e-5, abs=1e-6)


def _hf_run(rank, world, run_dir):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=4, decay_length=2))
    mgr = CheckpointManager(
        run_dir, ddp, opt, sched, config=CheckpointConfig(max_shard_size=20_000), hf_config=config.to_dict()
    )
    while not sched.finished:
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(sched.position * 10 + rank))
        ddp(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        mgr.maybe_save()
    mgr.close()
    if rank == 0:
        model.eval()
        logits = model(torch.arange(10).reshape(1, 10)).logits.flatten()[:20].tolist()
        Path(run_dir, "reference.json").write_text(json.dumps({"logits": logits}))
    return None


# rank-0 writing saves and resumes in the default suite in tests/test_device_only_backend.py (DDP: every rank's
# slices sent to rank 0), async saves of ZeRO-2 in tests/test_async_snapshot.py; both ZeRO-2 runs here are `slow`,
# for the suite's time
@pytest.mark.parametrize("mode", [pytest.param(m, marks=pytest.mark.slow) for m in ("async", "rank0")])
def test_async_and_rank0_saves_resume_exactly(tmp_path, mode):
    config = {"async_save": True} if mode == "async" else {"write_mode": "rank0"}
    config["every_steps"] = 3
    straight = run_distributed(_train, args=("ds2", str(tmp_path / "a"), None, None, config), timeout=600)
    run_distributed(_train, args=("ds2", str(tmp_path / "b"), 6, None, config), timeout=600)
    resumed = run_distributed(_train, args=("ds2", str(tmp_path / "b"), None, "auto", config), timeout=600)
    for s, r in zip(straight, resumed):
        assert r["loaded"]
        _assert_same_state(s["state"], r["state"])
        assert r["rng"] == s["rng"], "every random stream of this rank"
    names = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*"))
    assert "step-000000010-post-decay+final" in names and "step-000000003-pre-decay+periodic" in names
    assert not list((tmp_path / "a" / "checkpoints").glob(".staging-*")), "no staging directory is left behind"


def test_retention_keeps_the_last_k_periodic_and_every_milestone(tmp_path):
    run_distributed(_train, args=("ddp", str(tmp_path), None, None, {"every_steps": 1, "keep_last": 2}), timeout=600)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    # periodic ones rotate (the newest 2 stay); those at a decay point or the end stay
    assert names == [
        "step-000000003-pre-decay+periodic",
        "step-000000005-post-decay+periodic",
        "step-000000007-periodic",
        "step-000000008-pre-decay+periodic",
        "step-000000009-periodic",
        "step-000000010-post-decay+periodic+final",
    ]
    assert not list((tmp_path / "checkpoints").glob(".deleting-*"))


def test_preemption_signal_on_one_rank_saves_everywhere_and_resume_continues(tmp_path):
    straight = run_distributed(_train, args=("ddp", str(tmp_path / "a")), timeout=600)
    first = run_distributed(_train, args=("ddp", str(tmp_path / "b"), None, None, None, None, 6), timeout=600)
    assert all(r["stopped"] for r in first)
    assert first[0]["saves"][-1] == "step-000000006-preempt" == first[1]["saves"][-1]
    resumed = run_distributed(_train, args=("ddp", str(tmp_path / "b"), None, "auto"), timeout=600)
    for s, f, r in zip(straight, first, resumed):
        assert {**f["losses"], **r["losses"]} == s["losses"]
        _assert_same_state(s["state"], r["state"])
        assert r["rng"] == s["rng"], "every random stream of this rank"


def test_branching_leaves_the_main_trajectory_untouched(tmp_path):
    branching = dict(total=12, warmup=2, milestones=(4, 8, 12), decay_fraction=0.25, mode="branching")
    main_only = dict(total=12, warmup=2, milestones=(12,), decay_length=3)
    with_branches = run_distributed(
        _train, args=("ds1-bf16", str(tmp_path / "a"), None, None, None, branching), timeout=600
    )
    without = run_distributed(_train, args=("ds1-bf16", str(tmp_path / "b"), None, None, None, main_only), timeout=600)
    for a, b in zip(with_branches, without):
        # each rewind restored the model, the optimizer, the data position and every random stream
        _assert_same_state(b["state"], a["state"])
        assert a["rng"] == b["rng"]
    names = with_branches[0]["saves"]
    assert names == [
        "step-000000003-pre-decay",
        "step-000000004-post-decay",
        "step-000000007-pre-decay",
        "step-000000009-post-decay",
        "step-000000012-pre-decay",
        "step-000000015-post-decay+final",
    ]


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    import torch

    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = WSDSchedule(total=4, decay_length=1)
    first = CheckpointManager(tmp_path, model, opt, WSDScheduler(opt, schedule))
    # in this same process: said so, with how to close the first (another process: tests/test_run_lock.py)
    with pytest.raises(CheckpointError, match="locked by another CheckpointManager in this same process"):
        CheckpointManager(tmp_path, model, opt, WSDScheduler(opt, schedule))
    first.close()
    CheckpointManager(tmp_path, model, opt, WSDScheduler(opt, schedule)).close()


def test_corruption_is_named_and_sizes_only_catch_truncation(tmp_path):
    run_distributed(_train, args=("ddp", str(tmp_path), 4, None, {"every_steps": 2}), timeout=600)
    ckpt = tmp_path / "checkpoints" / "step-000000004-periodic"
    shard = sorted(ckpt.glob("train_state/state-r00001-*.safetensors"))[0]  # rank 1's slices
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    from wsd_pretrain.checkpoint import format as F

    manifest = F.load_manifest(ckpt)
    problems = F.check_files(ckpt, manifest, checksums=True)
    assert len(problems) == 1 and shard.name in problems[0] and "xxh3_128" in problems[0]
    assert F.check_files(ckpt, manifest, checksums=False) == []
    # a flipped byte keeps every size and every header valid: only the resume's checksum verification refuses it
    with pytest.raises(pytest.fail.Exception, match=rf"failed verification: .*{shard.name}.*xxh3_128"):
        run_distributed(_load_only, world_size=2, args=("ddp", str(ckpt)), timeout=600)
    shard.write_bytes(bytes(data[:-10]))
    assert shard.name in F.check_files(ckpt, manifest, checksums=False)[0]
    infos = {i.name: i for i in F.list_checkpoints(tmp_path)}
    assert infos[ckpt.name].state == "corrupt"
    assert F.resolve_checkpoint(tmp_path).name == "step-000000003-pre-decay", "resume falls back to the last good one"


@pytest.mark.parametrize("phase", ["shard", "manifest", "rename", "latest"])
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, phase):
    import signal
    import time

    from distributed_helpers import start_script
    from wsd_pretrain.checkpoint import format as F

    marker = tmp_path / "marker"
    # forked from the session's fork server (torch and the library imported once), as `python kill_child.py ...`
    child = start_script(Path(__file__).with_name("kill_child.py"), [str(tmp_path / "run"), phase, str(marker)])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the child ended before reaching the kill point"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    infos = F.list_checkpoints(tmp_path / "run")
    complete = [i.name for i in infos if i.state == "complete"]
    if phase == "latest":  # renamed: the new checkpoint is complete, though `latest` still names the old one
        assert complete == ["step-000000002-periodic", "step-000000004-periodic"]
        assert F.read_latest(tmp_path / "run") == "step-000000002-periodic"
    else:
        assert complete == ["step-000000002-periodic"]
        assert [i.state for i in infos if i.name.startswith(".staging-")] == ["in progress"]
    newest = F.resolve_checkpoint(tmp_path / "run")
    assert newest.name == complete[-1]
    assert F.check_files(newest, F.load_manifest(newest), checksums=True) == []
    # the next run cleans up what the killed one left and saves that step again
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    mgr = CheckpointManager(tmp_path / "run", model, opt, sched, config=CheckpointConfig(every_steps=2))
    assert not list((tmp_path / "run" / "checkpoints").glob(".staging-*"))
    assert mgr.resume("auto") and sched.position == int(complete[-1][5:14])
    mgr.close()


def test_an_async_save_that_fails_raises_at_the_next_save_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    import torch

    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import faults
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    saves = {"n": 0}

    def failing(point: str) -> None:  # the second save's first file finds the disk full
        if point == "save-begin":
            saves["n"] += 1
        if saves["n"] == 2 and point.startswith("shard-begin:"):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(faults, "fault_hook", failing)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    mgr = CheckpointManager(
        tmp_path, model, opt, sched, config=CheckpointConfig(every_steps=2, async_save=True, at_milestones=False)
    )
    with pytest.raises(CheckpointError, match="No space left on device"):
        while not sched.finished:
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            mgr.maybe_save()  # the failure of step 4's save surfaces here, at step 6
    assert sched.position == 6
    assert [i.name for i in F.list_checkpoints(tmp_path)] == ["step-000000002-periodic"]
    mgr.close()
