"""wsd_pretrain.compat against the real seed (pytorch_accelerated 0.1.61): same LRs, same queries, fixed bugs."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wsd_pretrain import ConfigError
from wsd_pretrain.compat import SeedConfigError, WSDLrScheduler, estimate_checkpoint_steps

seed_mod = pytest.importorskip("pytorch_accelerated.schedulers.wsd_scheduler")
SeedScheduler = seed_mod.WSDLrScheduler
seed_estimate = seed_mod.estimate_checkpoint_steps


def make_optimizer(lrs=(0.01, 0.001)):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in lrs]
    return torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def run(cls, steps, lrs=(0.01, 0.001), **kwargs):
    """LRs of every group after each of `steps` step() calls; stops (returning what it has) where it raises."""
    sched = cls(make_optimizer(lrs), **kwargs)
    out = []
    try:
        for _ in range(steps):
            sched.step()
            out.append([g["lr"] for g in sched.optimizer.param_groups])
    except ZeroDivisionError:
        pass
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        for u, v in zip(x, y):
            assert math.isclose(u, v, rel_tol=1e-12, abs_tol=1e-20), (i, x, y)


CONFIGS = [
    dict(total_steps=100),
    dict(total_steps=100, num_warmup_steps=10, decay_phase_ratio=0.1),
    dict(total_steps=1000, num_warmup_steps=None, decay_phase_ratio=0.2, num_checkpoints=3),
    dict(total_steps=1000, num_warmup_steps=50, use_inverse_sqrt_decay=False, lr_min=0.01),
    dict(total_steps=1000, num_checkpoints=2, decay_phase_ratio=0.1, lr_min=0.1),  # the floor from step 500
    dict(total_steps=997, num_checkpoints=5, decay_phase_ratio=0.3, warmup_starting_lr=1e-4, num_warmup_steps=7),
    dict(total_steps=200, num_checkpoints=4, use_inverse_sqrt_decay=False, lr_min=1e-3),
    dict(num_epochs=3, num_update_steps_per_epoch=40, num_warmup_steps=12, num_checkpoints=3),
    dict(total_steps=150, num_warmup_steps=120, num_checkpoints=3),  # warmup reaching over the first decay
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_same_learning_rates_as_the_seed(kwargs):
    total = kwargs.get("total_steps") or kwargs["num_epochs"] * kwargs["num_update_steps_per_epoch"]
    # the seed's own tests read total_steps + 1 values; read a few more
    assert_same(run(WSDLrScheduler, total + 3, **kwargs), run(SeedScheduler, total + 3, **kwargs))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    total=st.integers(4, 300),
    warmup=st.one_of(st.none(), st.integers(0, 320)),
    ratio=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.33]) | st.floats(0.0, 0.33),
    lr_min=st.sampled_from([1e-6, 0.1, 0.5]) | st.floats(1e-6, 1.0),
    start=st.sampled_from([0.0, 1e-6, 1e-4]),
    inverse_sqrt=st.booleans(),
    n=st.integers(1, 5),
)
def test_same_learning_rates_as_the_seed_wherever_the_seed_runs(total, warmup, ratio, lr_min, start, inverse_sqrt, n):
    kwargs = dict(
        total_steps=total,
        num_warmup_steps=warmup,
        decay_phase_ratio=ratio,
        lr_min=lr_min,
        warmup_starting_lr=start,
        use_inverse_sqrt_decay=inverse_sqrt,
        num_checkpoints=n,
    )
    seed = run(SeedScheduler, total + 2, **kwargs)  # stops where the seed divides by zero
    try:
        ours = run(WSDLrScheduler, total + 2, **kwargs)
    except ConfigError:
        # refused up front: only where the seed itself crashes mid-run
        assert len(seed) < total + 2
        return
    assert len(ours) == total + 2, "compat never crashes mid-run"
    assert_same(ours[: len(seed)], seed)


def test_queries_match_the_seed():
    kwargs = dict(total_steps=1000, num_checkpoints=3, decay_phase_ratio=0.2, num_warmup_steps=30)
    ours, seed = WSDLrScheduler(make_optimizer(), **kwargs), SeedScheduler(make_optimizer(), **kwargs)
    assert ours.get_checkpoint_steps() == seed.get_checkpoint_steps() == [250, 500, 1000]
    assert ours.get_decay_info() == seed.get_decay_info()
    for step in (0, 1, 199, 200, 249, 250, 251, 499, 500, 999, 1000, 5000):
        assert ours.get_phase_info(step) == seed.get_phase_info(step)
    for _ in range(300):
        ours.step()
        seed.step()
    assert ours.get_current_step() == seed.get_current_step() == 299
    assert ours.get_current_phase_info() == seed.get_current_phase_info()
    assert ours.previous_checkpoint_step == seed.previous_checkpoint_step == 199
    seed_state = {k: v for k, v in seed.state_dict().items()}
    our_state = ours.state_dict()
    assert set(seed_state) <= set(our_state)
    for key in seed_state:
        assert our_state[key] == seed_state[key], key


@pytest.mark.parametrize(("total", "n"), [(100_000, 1), (100_000, 2), (200_000, 3), (200_000, 4), (100, 5), (7, 3)])
def test_estimate_checkpoint_steps_is_the_seeds(total, n, caplog):
    with caplog.at_level(logging.WARNING):
        got = estimate_checkpoint_steps(total, n)
    assert got == seed_estimate(total, n)
    assert ("places only" in caplog.text) == (len(got) < n)


def test_estimate_checkpoint_steps_refuses_nonsense():
    with pytest.raises(ConfigError, match="total_steps"):
        estimate_checkpoint_steps(0, 2)
    with pytest.raises(ConfigError, match="num_checkpoints"):
        estimate_checkpoint_steps(100, 0)


# ---------------------------------------------------------------------------------------------- fixed bugs


def test_first_update_no_longer_runs_at_the_peak():
    seed_opt, our_opt = make_optimizer(), make_optimizer()
    SeedScheduler(seed_opt, total_steps=100, num_warmup_steps=10, warmup_starting_lr=1e-6)
    WSDLrScheduler(our_opt, total_steps=100, num_warmup_steps=10, warmup_starting_lr=1e-6)
    assert seed_opt.param_groups[0]["lr"] == 0.01  # the seed's first update: the peak
    assert our_opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # ours: the warmup's start


def test_resume_continues_instead_of_restarting_warmup():
    kwargs = dict(total_steps=100, num_warmup_steps=20)
    straight = run(WSDLrScheduler, 100, **kwargs)
    first = WSDLrScheduler(make_optimizer(), **kwargs)
    for _ in range(50):
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON: nothing pickled
    second = WSDLrScheduler(make_optimizer(), **kwargs)
    second.load_state_dict(state)
    resumed = []
    for _ in range(50):
        second.step()
        resumed.append([g["lr"] for g in second.optimizer.param_groups])
    assert_same(resumed, straight[50:])
    # the seed restarts its warmup: LR back near 0 right after resuming at step 50
    seed1 = SeedScheduler(make_optimizer(), **kwargs)
    for _ in range(50):
        seed1.step()
    seed2 = SeedScheduler(make_optimizer(), **kwargs)
    seed2.load_state_dict(seed1.state_dict())
    seed2.step()
    assert seed2.optimizer.param_groups[0]["lr"] < 1e-5


def test_loading_a_seed_state_works_and_warns(caplog):
    seed = SeedScheduler(make_optimizer(), total_steps=100, num_warmup_steps=10)
    for _ in range(30):
        seed.step()
    ours = WSDLrScheduler(make_optimizer(), total_steps=100, num_warmup_steps=10)
    with caplog.at_level(logging.WARNING):
        ours.load_state_dict(seed.state_dict())
    assert "no step counter" in caplog.text


def test_continuation_keeps_no_warmup_after_load_state_dict():
    original = WSDLrScheduler(make_optimizer(), total_steps=1000, num_warmup_steps=50, decay_phase_ratio=0.1)
    for _ in range(899):
        original.step()
    cont = WSDLrScheduler(
        make_optimizer(),
        total_steps=500,
        num_warmup_steps=50,
        decay_phase_ratio=0.1,
        is_continuation_from_checkpoint=True,
    )
    cont.load_state_dict(original.state_dict())
    assert cont.is_continuation_from_checkpoint
    lrs = []
    for _ in range(500):
        cont.step()
        lrs.append(cont.optimizer.param_groups[0]["lr"])
    assert lrs[:450] == [0.01] * 450, "a fresh stable phase, no warmup"
    assert lrs[450] == 0.01 and lrs[451] < 0.01 and lrs[-1] < 0.01 * 0.2  # decay over the last 10% (50 steps)
    assert cont.get_checkpoint_steps() == [500]


def test_continuation_matches_the_seed_where_the_seed_has_no_warmup_bug():
    # with no warmup the seed's continuation is right: compare the whole curve
    def go(cls):
        first = cls(make_optimizer(), total_steps=1000, decay_phase_ratio=0.1, num_checkpoints=3)
        for _ in range(700):
            first.step()
        cont = cls(
            make_optimizer(),
            total_steps=400,
            decay_phase_ratio=0.1,
            num_checkpoints=3,
            is_continuation_from_checkpoint=True,
        )
        cont.load_state_dict(first.state_dict())
        out = []
        for _ in range(401):
            cont.step()
            out.append([g["lr"] for g in cont.optimizer.param_groups])
        return out

    assert_same(go(WSDLrScheduler), go(SeedScheduler))


def test_large_decay_ratio_with_several_checkpoints_is_allowed():
    with pytest.raises(ValueError, match="Maximum safe ratio"):
        SeedScheduler(make_optimizer(), total_steps=1000, num_checkpoints=3, decay_phase_ratio=0.5)
    lrs = run(WSDLrScheduler, 1000, total_steps=1000, num_checkpoints=3, decay_phase_ratio=0.5)
    assert len(lrs) == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=100, decay_phase_ratio=1.5), "decay_phase_ratio=1.5"),
        (dict(total_steps=100, lr_min=-1.0), "lr_min=-1.0"),
        (dict(total_steps=100, num_checkpoints=0), "num_checkpoints=0"),
        (dict(total_steps=100, warmup_starting_lr=1.0), "should not exceed"),
        (dict(total_steps=100, lr_min=0.0, use_inverse_sqrt_decay=False), "divides by lr_min"),
        (dict(total_steps=3, num_checkpoints=3), "too short"),
        (dict(num_epochs=3), "total_steps=None"),
        (dict(num_epochs=3, num_update_steps_per_epoch=5, total_steps=15), "Only num_epochs"),
    ],
)
def test_where_the_seed_asserts_or_crashes_we_refuse_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        WSDLrScheduler(make_optimizer(), **kwargs)
    # code written against the seed catches AssertionError (its asserts) or ValueError: both still work
    assert isinstance(info.value, SeedConfigError)
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "kwargs",
    [dict(total_steps=0), dict(total_steps=100, decay_phase_ratio=1.5), dict(total_steps=100, lr_min=-0.1)],
)
def test_settings_the_seed_asserts_on_raise_an_assertion_error_in_both(kwargs):
    with pytest.raises(AssertionError):
        SeedScheduler(make_optimizer(), **kwargs)
    with pytest.raises(AssertionError):
        WSDLrScheduler(make_optimizer(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "steps"),
    [
        (dict(total_steps=1000, num_checkpoints=3, decay_phase_ratio=0.2), range(0, 1200, 7)),
        (dict(total_steps=100, num_checkpoints=1), range(0, 130)),
        (dict(total_steps=200_000, num_checkpoints=4), range(0, 210_000, 997)),
    ],
)
def test_get_checkpoint_info_gives_the_seeds_results(kwargs, steps):
    ours, seed = WSDLrScheduler(make_optimizer(), **kwargs), SeedScheduler(make_optimizer(), **kwargs)
    for step in steps:
        # past the last checkpoint too, where the seed falls back to the first period
        assert ours._get_checkpoint_info(step) == seed._get_checkpoint_info(step), step
    ours._get_checkpoint_info.cache_clear()  # the seed's tests call it; there is nothing to clear
    # a continuation (the seed's own continuation branch) from a state saved in the stable phase
    state = seed.state_dict()
    cont_kwargs = {**kwargs, "total_steps": kwargs["total_steps"] // 2, "is_continuation_from_checkpoint": True}
    ours_c, seed_c = WSDLrScheduler(make_optimizer(), **cont_kwargs), SeedScheduler(make_optimizer(), **cont_kwargs)
    ours_c.load_state_dict(ours.state_dict())
    seed_c.load_state_dict(state)
    for step in steps:
        assert ours_c._get_checkpoint_info(step) == seed_c._get_checkpoint_info(step), step


def test_zero_length_decay_runs_to_the_end_without_crashing():
    lrs = run(SeedScheduler, 1001, total_steps=1000, num_checkpoints=2, decay_phase_ratio=0.0)
    assert len(lrs) < 1001  # the seed divides by zero at step 500
    ours = run(WSDLrScheduler, 1001, total_steps=1000, num_checkpoints=2, decay_phase_ratio=0.0)
    assert len(ours) == 1001
    assert_same(ours[: len(lrs)], lrs)


def test_create_scheduler_fn_builds_a_scheduler():
    fn = WSDLrScheduler.create_scheduler_fn(
        total_num_epochs=2, num_update_steps_per_epoch=50, num_warmup_epochs=1, num_checkpoints=1
    )
    sched = fn(make_optimizer())
    assert isinstance(sched, WSDLrScheduler)
    assert sched.total_steps == 100 and sched.num_warmup_steps == 50
    placeholder_fn = WSDLrScheduler.create_scheduler_fn()
    from pytorch_accelerated.trainer import TrainerPlaceholderValues

    assert placeholder_fn.keywords["num_epochs"] is TrainerPlaceholderValues.NUM_EPOCHS


def _trainer_lrs(scheduler_cls):
    from pytorch_accelerated import Trainer
    from pytorch_accelerated.callbacks import TrainerCallback
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    model = torch.nn.Linear(4, 1)
    lrs: list[float] = []

    class Record(TrainerCallback):
        def on_train_step_end(self, trainer, **kwargs):
            lrs.append(trainer.optimizer.param_groups[0]["lr"])

    trainer = Trainer(
        model=model,
        loss_func=torch.nn.MSELoss(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        callbacks=[Record()],
    )
    trainer.train(
        train_dataset=dataset,
        num_epochs=3,
        per_device_batch_size=8,
        create_scheduler_fn=scheduler_cls.create_scheduler_fn(num_warmup_epochs=1, decay_phase_ratio=0.25),
    )
    return trainer.scheduler, lrs


def test_create_scheduler_fn_in_pytorch_accelerated_trainer():
    ours, our_lrs = _trainer_lrs(WSDLrScheduler)
    seed, seed_lrs = _trainer_lrs(SeedScheduler)
    assert isinstance(ours, WSDLrScheduler)
    assert (ours.total_steps, ours.num_warmup_steps) == (seed.total_steps, seed.num_warmup_steps) == (24, 8)
    # the LR each update ran at: the same, but for the first update, which the seed ran at the peak
    assert seed_lrs[0] == 0.1 and our_lrs[0] == pytest.approx(1e-6)
    assert our_lrs[1:] == pytest.approx(seed_lrs[1:], rel=1e-12)
