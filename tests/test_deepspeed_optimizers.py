"""Every DeepSpeed optimizer and wrapper a ds_config can produce: a run stopped after its checkpoint and resumed in
a fresh engine ends bitwise equal to the run that went straight on (weights, masters, Adam moments, the step
counters that drive Adam's bias correction), or the configuration is refused when the manager is built.

All variants run in one pair of ranks (2, gloo), one after another, so DeepSpeed starts once."""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

# engine spec (tests/engines.py) -> (DeepSpeed wrapper, torch/DeepSpeed optimizer) it must produce
VARIANTS = {
    "ds0+fused": ("FusedAdam", "FusedAdam"),  # ZeRO-0 fp32: DeepSpeed's FusedAdam steps the parameters itself
    "ds1+fused": ("DeepSpeedZeroOptimizer", "FusedAdam"),
    "ds2+fused": ("DeepSpeedZeroOptimizer", "FusedAdam"),
    "ds3+fused": ("DeepSpeedZeroOptimizer_Stage3", "FusedAdam"),
    "ds2+cpuadam": ("DeepSpeedZeroOptimizer", "DeepSpeedCPUAdam"),  # ZeRO-Offload of the optimizer to the CPU
    "ds1+cpuadam": ("DeepSpeedZeroOptimizer", "DeepSpeedCPUAdam"),
    "ds3+cpuadam": ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),
    "ds3+cpuadam+paramoffload": ("DeepSpeedZeroOptimizer_Stage3", "DeepSpeedCPUAdam"),  # parameters offloaded too
    "ds1-bf16+bf16opt": ("BF16_Optimizer", "AdamW"),
    "ds0-bf16+fused": ("FP16_Optimizer", "FusedAdam"),  # bf16 at ZeRO-0: fused, one flat fp32 copy per group
    "ds0-fp16": ("FP16_UnfusedOptimizer", "AdamW"),
    "ds2-bf16+frozen": ("DeepSpeedZeroOptimizer", "AdamW"),  # a frozen parameter: model weight only
    "ds3-bf16+frozen+fused": ("DeepSpeedZeroOptimizer_Stage3", "FusedAdam"),
}


def _straight_and_resumed(rank, world, specs, root):
    from engines import assert_verified, build, full_state
    from wsd_pretrain import WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    schedule = WSDSchedule(total=8, warmup=2, decay_length=2)
    cfg = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    out = {}
    for spec in specs:
        run_dir = f"{root}/{spec}"
        engine, opt, sched, step = build(spec, schedule, rank)
        mgr = CheckpointManager(run_dir, engine, opt, sched, config=cfg)
        for i in range(4):
            step(i)
        path = mgr.save(["periodic"])
        if rank == 0:  # the invariant: a committed checkpoint always passes verify, on every engine
            assert_verified([path])
        straight_losses = [step(i) for i in range(4, 8)]
        straight = full_state(engine, opt)
        mgr.close()
        kinds = (type(engine.optimizer).__name__, type(engine.basic_optimizer).__name__)
        engine, opt, sched, step = build(spec, schedule, rank)  # a fresh engine, as after a restart
        mgr = CheckpointManager(run_dir, engine, opt, sched, config=cfg)
        mgr.load(path)
        resumed_losses = [step(i) for i in range(4, 8)]
        resumed = full_state(engine, opt)
        mgr.close()
        differ = sorted(k for k in straight if k not in resumed or not straight[k].equal(resumed[k]))
        out[spec] = {
            "refusals": _refusals(engine) if spec == "ds2+cpuadam" else None,
            "kinds": kinds,
            "losses_equal": straight_losses == resumed_losses,
            "keys": sorted(straight),
            "differ": differ + sorted(set(resumed) - set(straight)),
        }
    out["late-state"] = _state_created_after_the_manager(rank, root)
    out["muon"] = _muon(rank, root)
    return out


def _state_created_after_the_manager(rank, root):
    """Adafactor (a client optimizer at ZeRO-0) creates factored second moments at its first step: row and column
    vectors, neither per-element state nor a number. The manager is built before that step, so only the save can
    see them; it must refuse on every rank, naming the state, and leave nothing on disk."""
    from pathlib import Path

    import torch

    from engines import TinyLM, batch, ds_config, param_groups
    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler, deepspeed_initialize
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.Adafactor(param_groups(model), lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=8, warmup=2, decay_length=2))
    engine, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config(0, "fp32"))
    cfg = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False)
    run = Path(root, "late-state")
    mgr = CheckpointManager(run, engine, opt, sched, config=cfg)  # no optimizer state yet: nothing to refuse
    loss = engine(batch(0, rank))
    engine.backward(loss)
    engine.step()
    try:
        mgr.save(["periodic"])
        refused = ""
    except CheckpointError as exc:
        refused = str(exc)
    mgr.close()
    ckpts = run / "checkpoints"
    return {"refused": refused, "left": sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else []}


def _refusals(engine) -> dict[str, str]:
    """The settings the checkpoint cannot carry, each set on a real engine's config (NVMe offload needs an NVMe
    device and libaio to build, which this machine lacks): the adapter refuses each, naming it."""
    from wsd_pretrain import CheckpointError
    from wsd_pretrain.checkpoint.deepspeed_adapter import DeepSpeedAdapter

    zc = engine._config.zero_config
    wrapper = engine.optimizer
    out = {}
    for what, apply, undo in (
        (
            "nvme",
            lambda: setattr(zc.offload_optimizer, "device", "nvme"),
            lambda: setattr(zc.offload_optimizer, "device", "cpu"),
        ),
        ("hpz", lambda: setattr(zc, "zero_hpz_partition_size", 2), lambda: setattr(zc, "zero_hpz_partition_size", 1)),
        (
            "mics",
            lambda: setattr(engine._config, "mics_shard_size", 2),
            lambda: setattr(engine._config, "mics_shard_size", -1),
        ),
        ("moe", lambda: setattr(engine, "has_moe_layers", True), lambda: setattr(engine, "has_moe_layers", False)),
        ("dp", lambda: setattr(engine, "dp_world_size", 1), lambda: setattr(engine, "dp_world_size", 2)),
        ("zenflow", lambda: setattr(wrapper, "zenflow", True), lambda: setattr(wrapper, "zenflow", False)),
        (
            "wrapper",
            lambda: setattr(engine, "optimizer", _OtherWrapper(wrapper)),
            lambda: setattr(engine, "optimizer", wrapper),
        ),
    ):
        apply()
        try:
            DeepSpeedAdapter(engine)
            out[what] = "accepted"
        except CheckpointError as exc:
            out[what] = str(exc)
        finally:
            undo()
    return out


class _OtherWrapper:
    """A DeepSpeed optimizer wrapper the adapter does not know (a future DeepSpeed's, or a plugin's)."""

    def __init__(self, inner):
        self.optimizer = inner.optimizer


def _muon(rank, root):
    """DeepSpeed's Muon keeps its momentum where the checkpoint does not read ZeRO state (a resume would fail, and
    an async save's copy would race the momentum Muon updates before its inner step): refused on every rank."""
    from engines import build
    from wsd_pretrain import CheckpointError, WSDSchedule
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    engine, opt, sched, step = build("ds2-bf16+muon", WSDSchedule(total=10, milestones="none"), rank)
    step(0)
    try:
        CheckpointManager(f"{root}/muon", engine, opt, sched)
    except CheckpointError as exc:
        return str(exc)
    return "accepted"


def test_every_deepspeed_optimizer_resumes_bitwise(tmp_path):
    results = run_distributed(_straight_and_resumed, args=(list(VARIANTS), str(tmp_path)), timeout=900)
    for rank, res in enumerate(results):
        for spec, (wrapper, optimizer) in VARIANTS.items():
            r = res[spec]
            assert r["kinds"] == [wrapper, optimizer], f"{spec} built {r['kinds']}, the test expects another path"
            assert any(k.endswith(":optimizer/exp_avg") for k in r["keys"]), f"{spec}: no optimizer state compared"
            assert r["differ"] == [], f"rank {rank}, {spec}: differs after resume: {r['differ'][:5]}"
            assert r["losses_equal"], f"rank {rank}, {spec}: losses differ after resume"
        late = res["late-state"]
        assert "cannot save checkpoint step-000000001-periodic" in late["refused"], late
        assert "row_var" in late["refused"] or "col_var" in late["refused"], late
        assert late["left"] == [], f"a refused save left {late['left']}"
        refused = res["ds2+cpuadam"]["refusals"]
        assert "zero_optimization.offload_optimizer.device is nvme" in refused["nvme"]
        assert "zero_hpz_partition_size" in refused["hpz"]
        assert "mics_shard_size is set (MiCS)" in refused["mics"]
        assert "MoE layers" in refused["moe"]
        assert "the data-parallel group has 1 ranks of 2" in refused["dp"]
        assert "ZenFlow is on" in refused["zenflow"]
        assert "wrapper _OtherWrapper" in refused["wrapper"] and "not supported" in refused["wrapper"]
        assert "DeepSpeed's Muon (MuonWithAuxAdam)" in res["muon"] and "use AdamW" in res["muon"], res["muon"]
