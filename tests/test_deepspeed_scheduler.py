"""WSDScheduler with real DeepSpeed engines: ZeRO 0-3, 2 ranks, gloo on CPU.

Checked for every stage: the scheduler given as an object, as a callable and as a ds_config "WSD" section; the LR
the basic optimizer really runs at; one advance per real optimizer step (gradient accumulation); no advance on a
step skipped for an fp16 overflow; DeepSpeed's own checkpoints carrying the scheduler's state.
"""

from __future__ import annotations

import pytest

from distributed_helpers import run_distributed

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

SCHEDULE = dict(total=8, warmup=2, milestones=(4, 8), decay_length=(1, 2), decay_shape="linear", min_lr_ratio=0.1)
BASE_LR = 0.01


def test_a_ds_config_section_is_split_off_with_the_schedulers_own_arguments():
    import torch

    from wsd_pretrain import ConfigError, WSDSchedule, split_ds_config

    params = {**SCHEDULE, "milestones": [4, 8], "decay_length": [1, 2], "warmup_start_lr": 1e-3, "tokens_per_step": 64}
    config = {"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "wsd", "params": params}}
    rest, factory = split_ds_config(config)
    assert rest == {"train_micro_batch_size_per_gpu": 2} and "scheduler" in config, "a copy, the input untouched"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    sched = factory(opt)
    assert sched.schedule == WSDSchedule(**SCHEDULE) and (sched.warmup_start_lr, sched.tokens_per_step) == (1e-3, 64)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 + (BASE_LR - 1e-3) / 2)  # warmup read at the update's end
    other = {"scheduler": {"type": "WarmupLR", "params": {}}}
    assert split_ds_config(other) == (other, None), "another type is left to DeepSpeed"
    with pytest.raises(ConfigError, match="did you mean 'warmup'"):
        split_ds_config({"scheduler": {"type": "WSD", "params": {**SCHEDULE, "warmpu": 3}}})


def _tiny_model():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _ds_config(stage: int, dtype: str = "fp32", gas: int = 1) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        # 2**32 overflows on the first steps, so the loss scaler skips some updates
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 32, "hysteresis": 1, "min_loss_scale": 1}
    return cfg


def _micro_steps(engine, n, dtype, rank, lr_kwargs=None):
    import torch

    g = torch.Generator().manual_seed(rank)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    seen = []
    for _ in range(n):
        seen.append(engine.basic_optimizer.param_groups[0]["lr"])
        x = torch.randn(2, 8, generator=g).to(torch_dtype)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step(lr_kwargs=lr_kwargs)
    return seen


def _three_ways(rank: int, world: int, stage: int, dtype: str) -> dict:
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler, deepspeed_initialize

    schedule = WSDSchedule(**SCHEDULE)
    out = {}
    # 1. an object built on the client optimizer
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    sched = WSDScheduler(opt, schedule)
    engine, _, _, ds_sched = deepspeed_initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=_ds_config(stage, dtype, gas=2)
    )
    assert ds_sched is sched
    lrs = _micro_steps(engine, 2 * schedule.total, dtype, rank)
    out["object"] = {"lrs": lrs[::2], "lrs_mid": lrs[1::2], "position": sched.position, "steps": engine.global_steps}
    # 2. a callable: DeepSpeed builds it on the optimizer it steps
    model = _tiny_model()
    engine, _, _, ds_sched = deepspeed_initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=BASE_LR),
        lr_scheduler=WSDScheduler.factory(schedule),
        config=_ds_config(stage, dtype),
    )
    assert isinstance(ds_sched, WSDScheduler) and ds_sched.optimizer is engine.basic_optimizer
    out["callable"] = {"lrs": _micro_steps(engine, schedule.total, dtype, rank), "position": ds_sched.position}
    # 3. a ds_config section, which plain DeepSpeed refuses
    cfg = _ds_config(stage, dtype)
    cfg["scheduler"] = {"type": "WSD", "params": SCHEDULE}
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": BASE_LR, "torch_adam": True}}
    engine, _, _, ds_sched = deepspeed_initialize(model=_tiny_model(), model_parameters=None, config=cfg)
    out["ds_config"] = {
        "lrs": _micro_steps(engine, schedule.total, dtype, rank),
        "position": ds_sched.position,
        "type": type(ds_sched).__name__,
    }
    if stage == 0:  # 4. DeepSpeed's own scheduler given to the manager: the fix names the ds_config section
        import tempfile

        from wsd_pretrain import CheckpointManager, ConfigError

        cfg = _ds_config(stage, dtype)
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
        model = _tiny_model()
        engine, _, _, ds_sched = deepspeed_initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=BASE_LR), config=cfg
        )
        try:
            CheckpointManager(tempfile.mkdtemp(), engine, None, ds_sched)
        except ConfigError as exc:
            out["wrong_scheduler"] = str(exc)
    return out


@pytest.mark.parametrize(("stage", "dtype"), [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_three_ways_to_give_deepspeed_the_scheduler(stage, dtype):
    from wsd_pretrain import WSDSchedule

    schedule = WSDSchedule(**SCHEDULE)
    expected = [BASE_LR * schedule.factor(p) for p in range(schedule.total)]
    for res in run_distributed(_three_ways, args=(stage, dtype), timeout=400):
        obj = res["object"]
        # gradient accumulation 2: the LR moves once per real optimizer step, not per micro-batch
        assert obj["lrs"] == pytest.approx(expected) and obj["lrs_mid"] == pytest.approx(expected)
        assert obj["position"] == obj["steps"] == schedule.total
        assert res["callable"]["lrs"] == pytest.approx(expected) and res["callable"]["position"] == schedule.total
        assert res["ds_config"]["type"] == "WSDScheduler"
        assert res["ds_config"]["lrs"] == pytest.approx(expected) and res["ds_config"]["position"] == schedule.total
        if stage == 0:
            assert 'got WarmupLR; give the ds_config a "scheduler": {"type": "WSD", "params"' in res["wrong_scheduler"]
            assert "deepspeed_initialize" in res["wrong_scheduler"] and "WSDScheduler(" not in res["wrong_scheduler"]


def _fp16_overflow(rank: int, world: int, stage: int) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator

    from wsd_pretrain import WSDSchedule, WSDScheduler, deepspeed_initialize

    # DeepSpeed's CPU accelerator reports fp16 unsupported unless the CPU has AVX512-FP16 (mkldnn); torch itself
    # computes fp16 on any CPU, so the probe is overridden and the real fp16 optimizer and loss scaler run.
    get_accelerator().is_fp16_supported = lambda: True
    schedule = WSDSchedule(total=40, warmup=4, decay_length=8)
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
    sched = WSDScheduler(opt, schedule)
    engine, _, _, _ = deepspeed_initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=_ds_config(stage, "fp16")
    )
    _micro_steps(engine, 30, "fp16", rank)
    return {
        "steps": engine.global_steps,
        "skipped": engine.skipped_steps,
        "position": sched.position,
        "lr": opt.param_groups[0]["lr"],
        "expected_lr": BASE_LR * schedule.factor(sched.position),
    }


@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_step_skipped_for_fp16_overflow_does_not_advance_the_schedule(stage):
    for res in run_distributed(_fp16_overflow, args=(stage,), timeout=400):
        assert res["skipped"] > 0, "the test needs overflows"
        assert res["position"] == res["steps"] - res["skipped"]
        assert res["lr"] == pytest.approx(res["expected_lr"])


def _checkpoint_round_trip(rank: int, world: int, stage: int, ckpt_dir: str) -> dict:
    import torch

    from wsd_pretrain import WSDSchedule, WSDScheduler, deepspeed_initialize

    # stage 2 runs a token-based schedule: engine.step(lr_kwargs={"tokens": n}) reaches WSDScheduler.step(tokens=n)
    units = "tokens" if stage == 2 else "steps"
    schedule = WSDSchedule(total=12 * (16 if units == "tokens" else 1), warmup=2, decay_length=4, units=units)
    tokens = {"tokens": 16} if units == "tokens" else None

    def build():
        model = _tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=BASE_LR)
        sched = WSDScheduler(opt, schedule)
        engine, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config=_ds_config(stage))
        return engine, sched

    engine, _ = build()
    _micro_steps(engine, 5, "fp32", rank, lr_kwargs=tokens)
    engine.save_checkpoint(ckpt_dir, tag="t5")
    straight = _micro_steps(engine, 7, "fp32", rank + 10, lr_kwargs=tokens)
    engine2, sched2 = build()
    engine2.load_checkpoint(ckpt_dir, tag="t5")
    after_load = sched2.position
    resumed = _micro_steps(engine2, 7, "fp32", rank + 10, lr_kwargs=tokens)
    return {
        "after_load": after_load,
        "straight": straight,
        "resumed": resumed,
        "end": sched2.position,
        "total": schedule.total,
        "per_step": 16 if units == "tokens" else 1,
    }


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2, 3])
def test_deepspeed_checkpoints_carry_the_scheduler_state(stage, tmp_path):
    for res in run_distributed(_checkpoint_round_trip, args=(stage, str(tmp_path)), timeout=400):
        assert res["after_load"] == 5 * res["per_step"]
        assert res["resumed"] == res["straight"]
        assert res["end"] == res["total"]
