"""The schedule: exact LR factors at every position, phases, milestones, events, validation, derived schedules."""

from __future__ import annotations

import math

import pytest

from wsd_pretrain import ConfigError, WSDSchedule


def factors(s: WSDSchedule, start: int | None = None, stop: int | None = None) -> list[float]:
    return [s.factor(p) for p in range(s.origin if start is None else start, s.end if stop is None else stop)]


# ---------------------------------------------------------------------------------------------- exact values


def test_exact_factors_every_step_end_convention():
    s = WSDSchedule(total=10, warmup=2, warmup_shape="linear", decay_length=4, decay_shape="linear")
    # warmup (k+1)/2; stable; decay 1-(k+1)/4 reaching the floor on the decay's last update
    assert factors(s) == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0])


def test_exact_factors_every_step_start_convention():
    s = WSDSchedule(
        total=10,
        warmup=2,
        warmup_start_ratio=0.1,
        decay_length=4,
        decay_shape="linear",
        min_lr_ratio=0.2,
        progress="start",
    )
    assert factors(s) == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4])
    # past the end the run is over: the floor
    assert s.factor(10) == pytest.approx(0.2)
    assert s.factor(10_000) == pytest.approx(0.2)


def test_start_and_end_conventions_are_one_update_apart_inside_phases():
    kw = dict(total=200, warmup=20, decay_fraction=0.25, decay_shape="cosine", min_lr_ratio=0.05)
    end, start = WSDSchedule(**kw), WSDSchedule(**kw, progress="start")
    for p in range(0, 199):
        if p in (19, 149):  # last update of a phase: "end" reaches the phase's target, "start" moves on
            continue
        assert end.factor(p) == pytest.approx(start.factor(p + 1)), p


@pytest.mark.parametrize(
    ("shape", "floor", "expected_mid"),
    [
        ("linear", 0.1, 0.1 + 0.9 * 0.5),
        ("cosine", 0.1, 0.1 + 0.9 * 0.5),
        ("1-sqrt", 0.1, 0.1 + 0.9 * (1 - math.sqrt(0.5))),
        ("inverse", 0.1, 1 / (0.5 * 10 + 0.5)),
        ("exponential", 0.1, 0.1**0.5),
    ],
)
def test_decay_shapes_endpoints_and_midpoint(shape, floor, expected_mid):
    s = WSDSchedule(total=100, decay_length=100, decay_shape=shape, min_lr_ratio=floor, progress="start")
    assert s.factor(0) == pytest.approx(1.0)  # t = 0
    assert s.factor(50) == pytest.approx(expected_mid)  # t = 0.5
    assert s.factor(100) == pytest.approx(floor)  # t = 1 (past the end)
    values = factors(s)
    assert all(a >= b for a, b in zip(values, values[1:])), "a decay never goes up"


def test_inverse_shape_is_the_papers_formula():
    m = 0.01
    s = WSDSchedule(total=1000, decay_length=1000, decay_shape="inverse", min_lr_ratio=m, progress="start")
    for p in (0, 1, 10, 500, 999):
        t = p / 1000
        assert s.factor(p) == pytest.approx(1 / (t * (1 / m - 1) + 1), rel=1e-12)


WARMUP_WEIGHTS = {
    "linear": lambda t: t,
    "cosine": lambda t: (1 - math.cos(math.pi * t)) / 2,
    "1-sqrt": lambda t: 1 - math.sqrt(1 - t),  # transformers' warmup_type="1-sqrt"
}


@pytest.mark.parametrize("shape", list(WARMUP_WEIGHTS))
def test_warmup_shapes(shape):
    s = WSDSchedule(
        total=100, warmup=10, warmup_shape=shape, warmup_start_ratio=0.2, milestones="none", progress="start"
    )
    for p in range(11):  # every update of the warmup: 0.2 + 0.8 w(t)
        assert s.factor(p) == pytest.approx(0.2 + 0.8 * WARMUP_WEIGHTS[shape](p / 10), rel=1e-12), p
    assert s.factor(10) == 1.0


def test_warmup_shapes_where_the_candidate_formulas_differ():
    # at t=0.5, 1 - sqrt(1 - t) and 1 - sqrt(t) agree; at t=0.1 and 0.9 no two candidates do
    s = WSDSchedule(total=100, warmup=10, warmup_shape="1-sqrt", milestones="none", progress="start")
    assert s.factor(1) == pytest.approx(0.05131670194948623, rel=1e-12)  # 1 - sqrt(0.9): slow at first
    assert s.factor(9) == pytest.approx(0.683772233983162, rel=1e-12)  # 1 - sqrt(0.1): fast near the base LR
    c = WSDSchedule(total=100, warmup=10, warmup_shape="cosine", milestones="none", progress="start")
    assert c.factor(1) == pytest.approx(0.024471741852423234, rel=1e-12)  # (1 - cos(0.1 pi)) / 2
    assert c.factor(9) == pytest.approx(0.9755282581475768, rel=1e-12)
    lin = WSDSchedule(total=100, warmup=10, milestones="none", progress="start")
    assert (lin.factor(1), lin.factor(9)) == (pytest.approx(0.1), pytest.approx(0.9))
    # progress="end": the first update already runs at w(1/10), the warmup's last at the base LR
    e = WSDSchedule(total=100, warmup=10, warmup_shape="1-sqrt", milestones="none")
    assert (e.factor(0), e.factor(9)) == (pytest.approx(0.05131670194948623), 1.0)


def test_callable_decay_shape():
    s = WSDSchedule(total=10, decay_length=10, decay_shape=lambda t: (1 - t) ** 2, min_lr_ratio=0.5, progress="start")
    assert s.factor(5) == pytest.approx(0.5 + 0.5 * 0.25)
    assert s.to_dict()["decay_shape"].startswith("callable:")


# ---------------------------------------------------------------------------------------------- milestones


def test_one_decay_at_the_end_with_checkpoint_points():
    s = WSDSchedule(total=1000, warmup=100, decay_fraction=0.2)
    (ms,) = s.milestones_info
    assert (ms.at, ms.decay_length, ms.pre_decay, ms.post_decay, ms.final, ms.rewind) == (
        1000,
        200,
        800,
        1000,
        True,
        False,
    )
    assert s.factor(799) == 1.0 and s.factor(800) < 1.0 and s.factor(999) == 0.0


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (100_000, 2, (50_000, 100_000)),
        (200_000, 3, (50_000, 100_000, 200_000)),
        (200_000, 4, (25_000, 50_000, 100_000, 200_000)),
        (1000, 1, (1000,)),
    ],
)
def test_geometric_milestones_end_at_the_total_as_the_seed_documents(total, n, expected):
    s = WSDSchedule(total=total, milestones="geometric", num_milestones=n, decay_fraction=0.1)
    assert tuple(ms.at for ms in s.milestones_info) == expected


def test_wsd_s_returns_to_the_stable_lr_after_each_decay():
    s = WSDSchedule(total=400, milestones=(100, 200, 400), decay_fraction=0.1, decay_shape="linear")
    info = [(ms.period_start, ms.at, ms.decay_length, ms.pre_decay, ms.post_decay) for ms in s.milestones_info]
    assert info == [(0, 100, 10, 90, 100), (100, 200, 10, 190, 200), (200, 400, 20, 380, 400)]
    assert s.factor(99) == 0.0 and s.factor(100) == 1.0 and s.factor(189) == 1.0 and s.factor(199) == 0.0
    assert [ph.name for ph in s.segments()] == ["stable", "decay", "stable", "decay", "stable", "decay"]


def test_decay_length_per_milestone_and_fraction_rounding():
    s = WSDSchedule(total=300, milestones=(100, 300), decay_length=(5, 50))
    assert [ms.decay_length for ms in s.milestones_info] == [5, 50]
    # 0.29 * 100 is 28.999999999999996 in binary: the length is 29, not 28
    s = WSDSchedule(total=100, decay_fraction=0.29)
    assert s.milestones_info[0].decay_length == 29


def test_zero_length_decay_means_no_decay_but_keeps_the_save_point():
    s = WSDSchedule(total=100, warmup=10, milestones=(50, 100), decay_fraction=0.0)
    assert set(factors(s, start=10)) == {1.0}
    assert [(ms.pre_decay, ms.post_decay) for ms in s.milestones_info] == [(50, 50), (100, 100)]
    kinds = [e.kind for e in s.events_between(49, 50)]
    assert kinds == ["pre-decay", "post-decay"]


def test_no_milestones_is_a_run_to_cool_down_later():
    s = WSDSchedule(total=100, warmup=10, milestones="none")
    assert s.milestones_info == ()
    assert s.factor(99) == 1.0 and s.factor(500) == 1.0


def test_after_last_floor_and_stable():
    floor = WSDSchedule(total=100, milestones=(50,), decay_length=10, after_last="floor", min_lr_ratio=0.1)
    stable = WSDSchedule(total=100, milestones=(50,), decay_length=10, after_last="stable")
    assert floor.factor(60) == pytest.approx(0.1) and floor.phase_at(60).name == "floor"
    assert stable.factor(60) == 1.0 and stable.phase_at(60).name == "stable"


def test_events_between_for_steps_and_for_tokens():
    s = WSDSchedule(total=1000, milestones=(500, 1000), decay_fraction=0.2)
    assert [(e.kind, e.position) for e in s.events_between(399, 400)] == [("pre-decay", 400)]
    assert s.events_between(400, 401) == []
    everything = s.events_between(-1, 1000)
    assert [(e.kind, e.position) for e in everything] == [
        ("pre-decay", 400),
        ("post-decay", 500),
        ("pre-decay", 900),
        ("post-decay", 1000),
    ]
    # tokens: an update that crosses a point reaches it
    t = WSDSchedule(total=10_000, units="tokens", decay_length=2_000)
    assert [e.kind for e in t.events_between(7_900, 8_100)] == ["pre-decay"]


def test_phase_at():
    s = WSDSchedule(total=100, warmup=10, milestones=(50, 100), decay_length=(10, 20))
    assert s.phase_at(0).name == "warmup"
    ph = s.phase_at(45)
    assert (ph.name, ph.period, ph.start, ph.length, ph.offset) == ("decay", 0, 40, 10, 5)
    assert ph.progress == pytest.approx(0.6)
    ph = s.phase_at(60)
    assert (ph.name, ph.period, ph.start, ph.offset) == ("stable", 1, 50, 10)


# ---------------------------------------------------------------------------------------------- branching


def test_branching_rewinds_and_positions():
    s = WSDSchedule(total=1000, warmup=50, milestones=(250, 500, 1000), decay_fraction=0.2, mode="branching")
    got = [
        (m.at, m.decay_length, m.trajectory_pre_decay, m.pre_decay, m.post_decay, m.rewind, m.final)
        for m in s.milestones_info
    ]
    # each branch is a whole run of its budget: 20% of 250, of 500, of 1000
    assert got == [
        (250, 50, 200, 200, 250, True, False),
        (500, 100, 400, 450, 550, True, False),
        (1000, 200, 800, 950, 1150, False, True),
    ]
    assert s.end == 1150
    assert s.factor(249) == 0.0 and s.factor(250) == 1.0  # back to stable after the branch
    assert s.trajectory_position(250) == 200  # the branch's 50 steps were rewound
    assert s.trajectory_position(550) == 400
    assert s.trajectory_position(1150) == 1000


def test_branching_allows_branches_that_overlap_on_the_trajectory():
    s = WSDSchedule(total=1200, milestones=(1000, 1100, 1200), decay_length=200, mode="branching")
    assert [m.trajectory_pre_decay for m in s.milestones_info] == [800, 900, 1000]
    with pytest.raises(ConfigError, match="overlap"):
        WSDSchedule(total=1200, milestones=(1000, 1100, 1200), decay_length=200, mode="wsd-s")


# ---------------------------------------------------------------------------------------------- derived


def test_continuation_has_no_warmup_and_places_the_decay_by_the_new_length():
    s = WSDSchedule(total=1000, warmup=100, decay_fraction=0.1)
    c = s.continued(at=900, total=2000)
    assert c.origin == 900 and c.warmup == 0
    assert c.factor(900) == 1.0  # straight back to the stable LR, no warmup
    (ms,) = c.milestones_info
    assert (ms.period_start, ms.at, ms.decay_length, ms.pre_decay) == (900, 2000, 110, 1890)
    c2 = s.continued(at=900, total=2000, decay_length=200, decay_shape="linear")
    assert c2.milestones_info[0].pre_decay == 1800
    with pytest.raises(ConfigError, match="inside the warmup"):
        s.continued(at=50, total=2000)


def test_cooldown_branch_from_a_stable_step():
    s = WSDSchedule(total=1000, warmup=100, decay_fraction=0.1, decay_shape="linear")
    c = s.cooldown(at=500, length=50)
    assert (c.origin, c.total, c.end) == (500, 550, 550)
    assert c.factor(500) == pytest.approx(1 - 1 / 50) and c.factor(549) == 0.0
    for bad in (50, 950):  # warmup, decay
        with pytest.raises(ConfigError, match="stable-phase checkpoint or a pre-decay one"):
            s.cooldown(at=bad, length=10)


def test_cooldown_from_a_pre_decay_point_repeats_the_runs_own_decay():
    for mode in ("wsd-s", "branching"):
        s = WSDSchedule(total=1000, warmup=100, milestones=(400, 1000), decay_fraction=0.1, mode=mode)
        for ms in s.milestones_info:
            at = ms.trajectory_pre_decay
            assert s.is_pre_decay(at) and not s.is_pre_decay(at + 1)
            c = s.cooldown(at=at, length=ms.decay_length)
            assert [c.factor(at + i) for i in range(ms.decay_length)] == [
                s.factor(ms.pre_decay + i) for i in range(ms.decay_length)
            ]
        points = [ms.trajectory_pre_decay for ms in s.milestones_info]
        with pytest.raises(ConfigError, match=rf"pre-decay points: \[{points[0]}, {points[1]}\]"):
            s.cooldown(at=points[-1] + 1, length=10)


def test_rescaled_keeps_every_phase():
    s = WSDSchedule(total=10_000, warmup=500, milestones=(2_500, 5_000, 10_000), decay_fraction=0.1)
    small = s.rescaled(60)
    assert small.total == 60 and small.warmup == 3
    assert [m.at for m in small.milestones_info] == [15, 30, 60]
    assert {ph.name for ph in small.segments()} == {"warmup", "stable", "decay"}


def test_round_trip_through_dict_and_equality():
    s = WSDSchedule(total=500, warmup=10, milestones=[100, 500], decay_length=[10, 50], mode="branching")
    again = WSDSchedule.from_dict(s.to_dict())
    assert again == s and hash(again) == hash(s)
    assert isinstance(s.milestones, tuple)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(total=0), "total=0"),
        (dict(total=-5), "total=-5"),
        (dict(total=10.5), "total=10.5"),
        (dict(total=100, warmup=-1), "warmup=-1"),
        (dict(total=100, warmup_start_ratio=1.5), "start LR above the base LR"),
        (dict(total=100, min_lr_ratio=-0.1), "min_lr_ratio=-0.1"),
        (dict(total=100, min_lr_ratio=2.0), "min_lr_ratio=2.0"),
        (dict(total=100, min_lr_ratio=float("nan")), "min_lr_ratio=nan"),
        (dict(total=100, decay_fraction=1.5), "decay_fraction=1.5"),
        (dict(total=100, decay_fraction=0.1, decay_length=5), "not both"),
        (dict(total=100, decay_length=-3), "decay_length=-3"),
        (dict(total=100, decay_shape="inverse"), "needs a floor above 0"),
        (dict(total=100, decay_shape="exponential"), "needs a floor above 0"),
        (dict(total=100, decay_shape="zigzag"), "decay_shape='zigzag'"),
        (dict(total=100, warmup_shape="zigzag"), "warmup_shape='zigzag'"),
        (dict(total=100, warmup=90, decay_fraction=0.2), "runs into the decay"),
        (dict(total=100, milestones=(60, 40, 100)), "increasing order"),
        (dict(total=100, milestones=(50, 50, 100)), "increasing order"),
        (dict(total=100, milestones=(50, 150)), "outside"),
        (dict(total=100, milestones=(50, 100), decay_length=(60, 10)), "overlap"),
        (dict(total=100, milestones=(50, 100), decay_length=(10,)), "one length per milestone"),
        (dict(total=100, milestones=(50,)), "after_last"),
        (dict(total=100, after_last="floor"), "only applies"),
        (dict(total=100, milestones="geometric", num_milestones=9), "cannot hold"),
        (dict(total=100, num_milestones=3), "only read with milestones='geometric'"),
        (dict(total=100, decay_fraction=0.001), "rounds to a decay of 0"),
        (dict(total=100, mode="cyclic"), "mode='cyclic'"),
        (dict(total=100, units="epochs"), "units='epochs'"),
        (dict(total=100, progress="middle"), "progress='middle'"),
        (dict(total=100, origin=100), "origin=100"),
        (dict(total=100, milestones=(50,), decay_length=5, after_last="floor", mode="branching"), "branching"),
        (dict(total=100, decay_shape=lambda t: 2.0), "weight in [0, 1]"),
    ],
)
def test_invalid_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError) as info:
        WSDSchedule(**kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        WSDSchedule(total=100, warmup=-1, min_lr_ratio=3, decay_shape="zigzag")
    assert len(info.value.problems) == 3


def test_unknown_setting_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'warmup'"):
        WSDSchedule.from_dict({"total": 10, "warmpu": 3})


def test_positions_before_the_origin_are_refused():
    c = WSDSchedule(total=100, warmup=10).continued(at=50, total=200)
    with pytest.raises(ValueError, match="before this schedule's origin"):
        c.factor(10)
