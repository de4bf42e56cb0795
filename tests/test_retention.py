"""Retention's rule (wsd_pretrain/checkpoint/retention.py), every case: which committed checkpoints are deleted for
each keep_last and keep_milestones, and that the newest complete checkpoint never is."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsd_pretrain.checkpoint.retention import checkpoints_to_delete

MILESTONE = {"pre-decay", "post-decay", "final"}
# the kind combinations checkpoint names can carry (the manager saves a sorted set of these)
KIND_SETS = [
    ("periodic",),
    ("preempt",),
    ("pre-decay",),
    ("post-decay",),
    ("final",),
    ("imported",),
    ("pre-decay", "periodic"),
    ("post-decay", "periodic", "final"),
    ("periodic", "final"),
    ("preempt", "periodic"),
]


@dataclass(frozen=True)
class Ckpt:
    name: str
    kinds: list[str] = field(default_factory=list)


def make(kind_sets) -> list[Ckpt]:
    return [Ckpt(f"step-{i:09d}-{'+'.join(k)}", list(k)) for i, k in enumerate(kind_sets)]


def expected_kept(ckpts: list[Ckpt], keep_last: int, keep_milestones: bool, just_written: str | None) -> set[str]:
    """The rule as the docs state it, written independently of the implementation."""
    kept = set()
    if ckpts:
        kept.add(ckpts[-1].name)
    if just_written is not None:
        kept.add(just_written)
    for c in ckpts:
        if "imported" in c.kinds or (keep_milestones and MILESTONE & set(c.kinds)):
            kept.add(c.name)
    rotating = [c for c in ckpts if "imported" not in c.kinds and not (keep_milestones and MILESTONE & set(c.kinds))]
    for c in rotating[::-1][:keep_last]:
        kept.add(c.name)
    return kept


def check(ckpts: list[Ckpt], keep_last: int, keep_milestones: bool, just_written: str | None = None) -> None:
    deleted = checkpoints_to_delete(
        ckpts, keep_last=keep_last, keep_milestones=keep_milestones, just_written=just_written
    )
    names = [c.name for c in deleted]
    # the newest complete checkpoint and the one just written are never deleted, whatever the settings
    if ckpts:
        assert ckpts[-1].name not in names
    assert just_written not in names
    # the result is the input less the kept ones, in the input's order (oldest first)
    kept = expected_kept(ckpts, keep_last, keep_milestones, just_written)
    assert names == [c.name for c in ckpts if c.name not in kept]
    # protected kinds survive
    for c in deleted:
        assert "imported" not in c.kinds
        if keep_milestones:
            assert not MILESTONE & set(c.kinds)
    # applying retention again to what is left deletes nothing more (it is a fixed point)
    left = [c for c in ckpts if c.name not in names]
    again = checkpoints_to_delete(left, keep_last=keep_last, keep_milestones=keep_milestones, just_written=just_written)
    assert again == []


def test_every_sequence_of_up_to_four_checkpoints():
    """Exhaustive: every sequence of 0-4 checkpoints over every kind combination, keep_last 0-3, both
    keep_milestones, with and without a just-written one."""
    cases = 0
    for n in range(5):
        for kinds in itertools.product(KIND_SETS, repeat=n):
            ckpts = make(kinds)
            for keep_last, keep_milestones in itertools.product(range(4), (True, False)):
                check(ckpts, keep_last, keep_milestones)
                if ckpts:
                    check(ckpts, keep_last, keep_milestones, just_written=ckpts[0].name)
                cases += 1
    assert cases == sum(len(KIND_SETS) ** n for n in range(5)) * 8


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(KIND_SETS), max_size=30),
    st.integers(0, 12),
    st.booleans(),
    st.data(),
)
def test_longer_runs(kinds, keep_last, keep_milestones, data):
    ckpts = make(kinds)
    just = data.draw(st.sampled_from([None, *[c.name for c in ckpts]]))
    check(ckpts, keep_last, keep_milestones, just)


@pytest.mark.parametrize("keep_last", [0, 1, 5])
@pytest.mark.parametrize("keep_milestones", [True, False])
def test_the_newest_is_kept_even_when_nothing_else_would_be(keep_last, keep_milestones):
    # keep_last=0 (no periodic kept) and no protected kinds: rule 1 alone keeps the newest
    ckpts = make([("periodic",), ("preempt",), ("periodic",)])
    deleted = [c.name for c in checkpoints_to_delete(ckpts, keep_last=keep_last, keep_milestones=keep_milestones)]
    assert ckpts[-1].name not in deleted
    assert deleted == [c.name for c in ckpts[: max(0, 3 - max(1, keep_last))]]


def test_what_the_defaults_do_on_a_typical_run():
    # keep_last=2, keep_milestones=True: the milestones and the two newest periodic ones stay
    ckpts = make(
        [
            ("periodic",),
            ("pre-decay", "periodic"),
            ("periodic",),
            ("post-decay",),
            ("periodic",),
            ("preempt",),
            ("imported",),
        ]
    )
    deleted = checkpoints_to_delete(ckpts, keep_last=2, keep_milestones=True)
    assert [c.name for c in deleted] == [ckpts[0].name, ckpts[2].name]
    # keep_milestones=False: milestones rotate with the rest; the import stays
    deleted = checkpoints_to_delete(ckpts, keep_last=2, keep_milestones=False)
    assert [c.name for c in deleted] == [c.name for c in ckpts[:4]]
    # the checkpoint just written is kept even when it is not the newest by position (a resume from an older one)
    deleted = checkpoints_to_delete(ckpts, keep_last=1, keep_milestones=False, just_written=ckpts[2].name)
    assert ckpts[2] not in deleted and ckpts[4] in deleted


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_keep_last_is_refused(bad):
    with pytest.raises(ValueError, match="keep_last"):
        checkpoints_to_delete(make([("periodic",)]), keep_last=bad, keep_milestones=True)
