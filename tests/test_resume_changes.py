"""Changed settings on resume through the Python API (issue 22, item 3): another optimizer class, state that does
not fit, and changed hyperparameters are refused before anything is restored (or applied and logged, per field)."""

from __future__ import annotations

import logging

import pytest
import torch

from distributed_helpers import run_distributed
from wsd_pretrain import WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint.manager import CheckpointManager
from wsd_pretrain.errors import CheckpointError

SCHEDULE = WSDSchedule(total=6, warmup=1, decay_length=2)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))


def _adamw(model, **kw):
    return torch.optim.AdamW(model.parameters(), **({"lr": 0.01, "betas": (0.9, 0.95), "eps": 1e-8} | kw))


def _sgd(model, **kw):
    return torch.optim.SGD(model.parameters(), **({"lr": 0.01, "momentum": 0.9} | kw))


def _write(run_dir, make_opt, steps: int = 2) -> None:
    """A short run that saves a checkpoint after ``steps`` updates."""
    model = _model()
    opt = make_opt(model)
    sched = WSDScheduler(opt, SCHEDULE)
    torch.manual_seed(1)
    with CheckpointManager(run_dir, model, opt, sched) as mgr:
        for _ in range(steps):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
            sched.step()
        mgr.save(["periodic"])


def _resume(run_dir, make_opt, **kw):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_opt(model)
    sched = WSDScheduler(opt, SCHEDULE)
    with CheckpointManager(run_dir, model, opt, sched) as mgr:
        try:
            mgr.resume("latest", **kw)
        finally:
            untouched = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return model, opt, sched, untouched


@pytest.mark.parametrize(
    ("written", "resumed", "names"),
    [(_adamw, _sgd, ("AdamW", "SGD")), (_sgd, _adamw, ("SGD", "AdamW")), (_adamw, torch.optim.Adam, ("AdamW", "Adam"))],
)
def test_another_optimizer_class_is_refused_before_anything_is_restored(tmp_path, written, resumed, names):
    _write(tmp_path, written)
    model = _model()
    opt = resumed(model.parameters(), lr=0.01) if resumed is torch.optim.Adam else resumed(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, model, opt, WSDScheduler(opt, SCHEDULE)) as mgr:
        with pytest.raises(CheckpointError) as err:
            mgr.resume("latest", allow_changes=True)  # allowing hyperparameter changes does not allow another class
    assert f"the checkpoint's optimizer is {names[0]} and this one is {names[1]}" in str(err.value)
    assert f"Build the job with {names[0]}" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "nothing restored"
    assert not opt.state, "no optimizer state restored"


def test_state_keys_that_do_not_fit_are_refused(tmp_path):
    """An SGD state without momentum buffers written under another class name is caught by its keys: here an SGD
    whose state (momentum_buffer) goes into an optimizer that already holds Adam's keys."""
    from wsd_pretrain.checkpoint.resume_checks import state_keys_problem

    problem = state_keys_problem("SGD", "AdamW", {"0.weight": {"momentum_buffer": [8, 4]}}, {})
    assert "holds ['momentum_buffer'] (written by SGD), which AdamW does not keep" in problem
    held = {"0.weight": ["exp_avg", "exp_avg_sq", "step"]}
    assert state_keys_problem("AdamW", "AdamW", {"0.weight": {"exp_avg": [8, 4], "step": []}}, held) is None
    assert "does not keep (['foo'])" in state_keys_problem("X", "Custom", {"0.weight": {"foo": []}}, held)


def test_changed_hyperparameters_are_refused_or_applied_per_field(tmp_path, caplog):
    _write(tmp_path, _adamw)
    # lr, betas, weight_decay: refused, with both values and the way to apply them
    for change, text in (
        ({"lr": 0.03}, "lr (param group 0): 0.01 -> 0.03"),
        ({"betas": (0.8, 0.99)}, "betas (param group 0): [0.9, 0.95] -> [0.8, 0.99]"),
        ({"weight_decay": 0.5}, "weight_decay (param group 0): 0.01 -> 0.5"),
    ):
        with pytest.raises(CheckpointError) as err:
            _resume(tmp_path, lambda m, change=change: _adamw(m, **change))
        assert text in str(err.value) and "--allow-optimizer-change" in str(err.value)
        assert "allow_changes=True" in str(err.value)
    # eps: applied, and logged
    caplog.set_level(logging.INFO, logger="wsd_pretrain")
    _, opt, _, _ = _resume(tmp_path, lambda m: _adamw(m, eps=1e-6))
    assert opt.param_groups[0]["eps"] == 1e-6 and "eps (param group 0): 1e-08 -> 1e-06" in caplog.text
    # allowed on purpose: every new value is in force after the resume (the LR through the scheduler)
    caplog.clear()
    _, opt, sched, _ = _resume(tmp_path, lambda m: _adamw(m, lr=0.03, betas=(0.8, 0.99)), allow_changes=True)
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and sched.base_lrs == [0.03]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.03 * SCHEDULE.factor(sched.position))
    assert "lr (param group 0): 0.01 -> 0.03 (checkpoint -> this job) applied" in caplog.text
    _, opt, _, _ = _resume(tmp_path, lambda m: _adamw(m, weight_decay=0.5), allow_changes=["weight_decay"])
    assert opt.param_groups[0]["weight_decay"] == 0.5
    # the same settings: no change, nothing logged
    caplog.clear()
    _resume(tmp_path, _adamw)
    assert "applied" not in caplog.text


def _refusals_on_every_rank(rank: int, world: int, run_dir: str) -> list[str]:
    out = []
    _write(run_dir, _adamw)  # every rank saves (the same weights: the same seed)
    for make in (_sgd, lambda m: _adamw(m, lr=0.5)):
        try:
            _resume(run_dir, make)
            out.append("resumed")
        except CheckpointError as exc:
            out.append(str(exc))
    return out


@pytest.mark.distributed
def test_refusals_reach_every_rank(tmp_path):
    results = run_distributed(_refusals_on_every_rank, 2, args=(str(tmp_path),), timeout=120)
    assert results[0] == results[1]
    assert "optimizer is AdamW and this one is SGD" in results[0][0]
    assert "lr (param group 0): 0.01 -> 0.5" in results[0][1]
