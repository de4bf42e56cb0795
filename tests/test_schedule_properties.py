"""Property-based tests (hypothesis): invariants every valid schedule keeps, and no invalid one slips through."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsd_pretrain import ConfigError, WSDSchedule

SHAPES = ["linear", "cosine", "1-sqrt", "inverse", "exponential"]


@st.composite
def schedules(draw):
    total = draw(st.integers(1, 3000))
    n = draw(st.integers(0, min(5, total)))
    milestones = tuple(sorted(draw(st.sets(st.integers(1, total), min_size=n, max_size=n))))
    if milestones and draw(st.booleans()):
        milestones = (*milestones[:-1], total) if milestones[-1] != total else milestones
    mode = draw(st.sampled_from(["wsd-s", "branching"]))
    after_last = None
    if milestones and milestones[-1] < total:
        after_last = "stable" if mode == "branching" else draw(st.sampled_from(["floor", "stable"]))
    shape = draw(st.sampled_from(SHAPES))
    floor = draw(st.floats(0.001 if shape in ("inverse", "exponential") else 0.0, 1.0))
    kwargs = dict(
        total=total,
        warmup=draw(st.integers(0, total // 3)),
        warmup_shape=draw(st.sampled_from(["linear", "cosine", "1-sqrt"])),
        warmup_start_ratio=draw(st.floats(0.0, 1.0)),
        milestones=milestones if milestones else "none",
        decay_shape=shape,
        min_lr_ratio=floor,
        mode=mode,
        after_last=after_last,
        progress=draw(st.sampled_from(["end", "start"])),
    )
    if draw(st.booleans()):
        kwargs["decay_fraction"] = draw(st.floats(0.0, 1.0))
    else:
        kwargs["decay_length"] = draw(st.integers(0, max(1, total // 4)))
    try:
        return WSDSchedule(**kwargs)
    except ConfigError:
        assume(False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(schedules())
def test_factor_is_bounded_and_phases_behave(s: WSDSchedule):
    lo = min(s.warmup_start_ratio, s.min_lr_ratio) - 1e-12
    prev_kind, prev_value = None, None
    for p in range(s.origin, s.end):
        f = s.factor(p)
        assert math.isfinite(f) and lo <= f <= 1 + 1e-12
        ph = s.phase_at(p)
        if ph.name == "stable":
            assert f == 1.0
        elif ph.name == "floor":
            assert f == s.min_lr_ratio
        elif ph.name == "decay" and prev_kind == "decay" and ph.offset > 0:
            assert f <= prev_value + 1e-12, "a decay never goes up"
        elif ph.name == "warmup" and prev_kind == "warmup":
            assert f >= prev_value - 1e-12, "a warmup never goes down"
        prev_kind, prev_value = ph.name, f


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(schedules())
def test_phases_tile_the_run_and_decays_reach_the_floor(s: WSDSchedule):
    phases = s.segments()
    assert phases[0].start == s.origin
    starts = [ph.start + ph.offset for ph in phases]
    ends = [st_ + (ph.length - ph.offset) for st_, ph in zip(starts, phases)]
    assert starts[1:] == ends[:-1] and ends[-1] == s.end, "phases cover [origin, end) without gap or overlap"
    for ms in s.milestones_info:
        assert ms.post_decay - ms.pre_decay == ms.decay_length
        if ms.decay_length and s.progress == "end":
            assert math.isclose(s.factor(ms.post_decay - 1), s.min_lr_ratio, abs_tol=1e-12)
        if ms.decay_length:
            assert s.phase_at(ms.pre_decay).name == "decay"
            assert s.phase_at(ms.pre_decay).period == ms.index
            if ms.pre_decay > s.origin:  # the update before the pre-decay point is not part of this decay
                before = s.phase_at(ms.pre_decay - 1)
                assert before.name != "decay" or before.period < ms.index


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(schedules())
def test_every_milestone_has_its_two_events_in_order(s: WSDSchedule):
    events = s.events_between(s.origin - 1, s.end)
    assert len(events) == 2 * len(s.milestones_info)
    assert [e.position for e in events] == sorted(e.position for e in events)
    # stepping one position at a time meets the same events
    stepped = [e for p in range(s.origin, s.end + 1) for e in s.events_between(p - 1, p)]
    assert stepped == events
    # in WSD-S mode the milestones are the post-decay points on the one trajectory
    if s.mode == "wsd-s":
        assert [m.post_decay for m in s.milestones_info] == [m.at for m in s.milestones_info]
        assert all(s.trajectory_position(p) == p for p in (s.origin, s.end))
    else:
        assert s.trajectory_position(s.end) == s.total


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(-10, 500),
    warmup=st.integers(-5, 500),
    fraction=st.floats(-0.5, 1.5) | st.just(math.nan) | st.just(math.inf),
    floor=st.floats(-0.5, 1.5) | st.just(math.nan),
    milestones=st.lists(st.integers(-10, 600), max_size=4),
    shape=st.sampled_from([*SHAPES, "bogus"]),
)
def test_any_setting_either_builds_a_sound_schedule_or_raises_config_error(
    total, warmup, fraction, floor, milestones, shape
):
    try:
        s = WSDSchedule(
            total=total,
            warmup=warmup,
            decay_fraction=fraction,
            min_lr_ratio=floor,
            milestones=tuple(milestones) or "end",
            decay_shape=shape,
            after_last="stable" if milestones and milestones[-1] != total else None,
        )
    except ConfigError as exc:
        assert str(exc)
        return
    for p in range(s.origin, s.end + 2):
        assert math.isfinite(s.factor(p))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(schedules(), st.data())
def test_continuation_and_cooldown_are_valid_schedules(s: WSDSchedule, data):
    assume(s.mode == "wsd-s" and s.total >= 4)
    at = data.draw(st.integers(max(s.warmup, 1), s.total - 1))
    c = s.continued(at=at, total=s.total * 2, decay_fraction=0.5, decay_length=None, milestones="end", after_last=None)
    assert c.factor(at) == 1.0 or c.phase_at(at).name == "decay"
    assert c.milestones_info[-1].post_decay == s.total * 2
    if s.phase_at(at).name == "stable":
        cd = s.cooldown(at=at, length=3)
        assert cd.end == at + 3 and cd.phase_at(at).name == "decay"
