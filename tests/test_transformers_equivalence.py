"""Where transformers' get_wsd_schedule and ours define the same curve, they give the same numbers.

transformers reads the LR at the start of each update and warms up from ``min_lr_ratio``; that is our
``progress="start"`` with ``warmup_start_ratio=min_lr_ratio``. Our default ``progress="end"`` is the same curve one
update earlier: ours(s) == transformers(s + 1).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from wsd_pretrain import WSDSchedule, WSDScheduler

optimization = pytest.importorskip("transformers.optimization")

W, S, D = 7, 20, 13
TOTAL = W + S + D


def hf_lrs(warmup_type, decay_type, min_ratio, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = optimization.get_wsd_schedule(
        opt,
        num_warmup_steps=W,
        num_decay_steps=D,
        num_training_steps=TOTAL,
        warmup_type=warmup_type,
        decay_type=decay_type,
        min_lr_ratio=min_ratio,
    )
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # the LR the next update runs at
        opt.step()
        sched.step()
    return out


def our_lrs(schedule, steps):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = WSDScheduler(opt, schedule)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


CASES = list(itertools.product(["linear", "cosine", "1-sqrt"], ["linear", "cosine", "1-sqrt"], [0.0, 0.1]))


@pytest.mark.parametrize(("warmup_type", "decay_type", "min_ratio"), CASES)
def test_start_convention_equals_transformers(warmup_type, decay_type, min_ratio):
    ours = WSDSchedule(
        total=TOTAL,
        warmup=W,
        warmup_shape=warmup_type,
        warmup_start_ratio=min_ratio,
        decay_length=D,
        decay_shape=decay_type,
        min_lr_ratio=min_ratio,
        progress="start",
    )
    assert our_lrs(ours, TOTAL + 5) == pytest.approx(
        hf_lrs(warmup_type, decay_type, min_ratio, TOTAL + 5), rel=1e-12, abs=1e-15
    )


@pytest.mark.parametrize(("warmup_type", "decay_type", "min_ratio"), CASES)
def test_end_convention_is_transformers_one_update_earlier(warmup_type, decay_type, min_ratio):
    ours = WSDSchedule(
        total=TOTAL,
        warmup=W,
        warmup_shape=warmup_type,
        warmup_start_ratio=min_ratio,
        decay_length=D,
        decay_shape=decay_type,
        min_lr_ratio=min_ratio,
    )
    hf = hf_lrs(warmup_type, decay_type, min_ratio, TOTAL + 1)
    assert our_lrs(ours, TOTAL) == pytest.approx(hf[1:], rel=1e-12, abs=1e-15)
    # the difference that matters: our first update does not run at the warmup's start (0 by default)
    assert ours.factor(0) > min_ratio
