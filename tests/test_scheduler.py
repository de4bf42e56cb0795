"""WSDScheduler in plain torch loops: the LR each update really runs at, param groups, state, resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from wsd_pretrain import CheckpointError, ConfigError, WSDError, WSDSchedule, WSDScheduler

SCHEDULE = WSDSchedule(
    total=40, warmup=5, milestones=(20, 40), decay_fraction=0.25, decay_shape="1-sqrt", min_lr_ratio=0.1
)


def sgd(lrs=(0.1, 0.01)):
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in lrs]
    return params, torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def test_each_update_runs_at_the_scheduled_lr_for_every_group():
    # loss = sum(p) has gradient 1, so plain SGD moves each parameter by exactly -lr: the LR really used
    params, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    assert isinstance(sched, LRScheduler)
    for step in range(SCHEDULE.total):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        sum(p.sum() for p in params).backward()
        opt.step()
        sched.step()
        for p, b, base in zip(params, before, (0.1, 0.01)):
            used = (b - p.detach())[0].item()
            assert used == pytest.approx(base * SCHEDULE.factor(step), rel=1e-9), step
    assert sched.finished and sched.position == 40


def test_get_last_lr_and_phase():
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    assert sched.get_last_lr() == pytest.approx([0.1 * SCHEDULE.factor(0), 0.01 * SCHEDULE.factor(0)])
    for _ in range(15):
        sched.step()
    assert sched.phase.name == "decay" and sched.phase.period == 0


def test_events_after_each_step():
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    seen = []
    for _ in range(SCHEDULE.total):
        sched.step()
        seen += [(e.kind, e.position) for e in sched.events()]
    assert seen == [("pre-decay", 15), ("post-decay", 20), ("pre-decay", 35), ("post-decay", 40)]


@pytest.mark.parametrize("stop", [1, 4, 5, 15, 19, 20, 33, 39])
def test_save_reload_continue_gives_the_identical_sequence(stop):
    _, opt = sgd()
    straight = WSDScheduler(opt, SCHEDULE)
    expected = []
    for _ in range(SCHEDULE.total):
        straight.step()
        expected.append(list(straight.get_last_lr()))
    _, opt1 = sgd()
    first = WSDScheduler(opt1, SCHEDULE)
    for _ in range(stop):
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, nothing pickled
    _, opt2 = sgd()
    second = WSDScheduler(opt2, SCHEDULE)
    second.load_state_dict(state)
    got = []
    for _ in range(SCHEDULE.total - stop):
        second.step()
        got.append(list(second.get_last_lr()))
    assert got == expected[stop:]
    assert second.state_dict() == straight.state_dict()


def test_resume_under_another_schedule_is_refused_naming_the_change():
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    for _ in range(10):
        sched.step()
    _, opt2 = sgd()
    other = WSDScheduler(opt2, SCHEDULE.with_changes(total=80, milestones=(40, 80)))
    with pytest.raises(CheckpointError, match="total: 40 -> 80"):
        other.load_state_dict(sched.state_dict())


def test_continuation_and_cooldown_accept_the_state_they_were_built_from():
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    for _ in range(25):
        sched.step()
    _, opt2 = sgd()
    cont = WSDScheduler(opt2, SCHEDULE.continued(at=25, total=100))
    cont.load_state_dict(sched.state_dict())
    assert cont.position == 25 and cont.get_last_lr()[0] == pytest.approx(0.1)  # no new warmup
    _, opt3 = sgd()
    cool = WSDScheduler(opt3, SCHEDULE.cooldown(at=25, length=5))
    cool.load_state_dict(sched.state_dict())
    for _ in range(5):
        cool.step()
    assert cool.finished and cool.events()[-1].kind == "post-decay"
    _, opt4 = sgd()
    wrong = WSDScheduler(opt4, SCHEDULE.continued(at=30, total=100))
    with pytest.raises(CheckpointError, match="continued"):
        wrong.load_state_dict(sched.state_dict())


def test_load_refuses_garbage_and_mismatched_groups():
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    with pytest.raises(CheckpointError, match="not a WSDScheduler state"):
        sched.load_state_dict({"last_epoch": 3})
    state = sched.state_dict()
    state["position"] = "12"
    with pytest.raises(CheckpointError, match="malformed"):
        sched.load_state_dict(state)
    _, opt3 = sgd(lrs=(0.1, 0.01, 0.001))
    with pytest.raises(CheckpointError, match="param groups"):
        WSDScheduler(opt3, SCHEDULE).load_state_dict(sched.state_dict())


def test_step_never_raises_type_error():
    # DeepSpeed answers a TypeError from step(**lr_kwargs) by calling step(batch_size) again
    _, opt = sgd()
    sched = WSDScheduler(opt, SCHEDULE)
    for call, message in [
        (lambda: sched.step(8), "takes no epoch"),
        (lambda: sched.step(increment=3), "unknown argument"),
        (lambda: sched.step(tokens="many"), "tokens="),
        (lambda: sched.step(tokens=1.5), "tokens="),
    ]:
        with pytest.raises(WSDError, match=message) as info:
            call()
        assert not isinstance(info.value, TypeError)
    assert sched.position == 0, "a refused step does not advance"


def test_a_type_error_inside_step_reaches_deepspeed_as_another_error():
    def picky(t: float) -> float:  # passes the construction check (t = 0, 0.25, 0.5, 0.75, 1), fails between
        if t not in (0.0, 0.25, 0.5, 0.75, 1.0):
            raise TypeError(f"picky about {t}")
        return 1.0 - t

    _, opt = sgd()
    sched = WSDScheduler(opt, WSDSchedule(total=20, decay_length=10, decay_shape=picky))
    for _ in range(9):
        sched.step()  # stable: the shape is not called
    with pytest.raises(WSDError, match=r"picky about 0\.1") as info:
        sched.step()  # the first decay update
    assert not isinstance(info.value, TypeError), "DeepSpeed would retry step(batch_size): a second advance"


def test_token_based_schedule():
    s = WSDSchedule(total=1000, units="tokens", warmup=100, decay_length=200, decay_shape="linear")
    _, opt = sgd()
    sched = WSDScheduler(opt, s)
    with pytest.raises(ConfigError, match="counts tokens"):
        sched.step()
    reached = []
    for tokens in [60, 60, 300, 300, 100, 100, 80]:  # a batch size that changes
        sched.step(tokens=tokens)
        reached += [e.kind for e in sched.events()]
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * s.factor(sched.position))
    assert sched.position == sched.tokens == 1000
    assert reached == ["pre-decay", "post-decay"]
    fixed = WSDScheduler(sgd()[1], s, tokens_per_step=50)
    for _ in range(4):
        fixed.step()
    assert fixed.position == 200


def test_absolute_warmup_start_lr_per_group():
    s = WSDSchedule(total=100, warmup=10, progress="start")
    _, opt = sgd()
    sched = WSDScheduler(opt, s, warmup_start_lr=0.005)
    assert sched.get_last_lr() == pytest.approx([0.005, 0.005])  # both groups start at the same absolute LR
    for _ in range(10):
        sched.step()
    assert sched.get_last_lr() == pytest.approx([0.1, 0.01])
    with pytest.raises(ConfigError, match="above param group 1's base LR"):
        WSDScheduler(sgd()[1], s, warmup_start_lr=0.05)


def test_bad_constructor_arguments():
    with pytest.raises(ConfigError, match="WSDSchedule"):
        WSDScheduler(sgd()[1], {"total": 10})
    with pytest.raises(ConfigError, match="tokens_per_step"):
        WSDScheduler(sgd()[1], SCHEDULE, tokens_per_step=0)


def test_tensor_learning_rates_are_updated_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    sched = WSDScheduler(opt, SCHEDULE)
    sched.step()
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert lr_tensor.item() == pytest.approx(0.01 * SCHEDULE.factor(1))
