"""The manager's guard rails (wsd_pretrain/checkpoint/guards.py): schedulers it cannot read are refused with what
to pass instead, wrappers are seen through, double stepping is refused, nothing fires twice at one position (a
hook before the optimizer step, accumulation micro-batches, the first call after a resume), a framework budget
that disagrees with the schedule is refused, and the seed-compatible scheduler keeps the seed's exact LRs."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from distributed_helpers import run_distributed
from wsd_pretrain import CheckpointConfig, CheckpointManager, ConfigError, WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint import check_total
from wsd_pretrain.compat import WSDLrScheduler


def _model_opt():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _update(model, opt, sched):
    model(torch.randn(3, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_a_scheduler_the_manager_cannot_read_is_refused_with_the_fix(tmp_path):
    model, opt = _model_opt()
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(ConfigError, match=r"needs a WSDScheduler .* got LambdaLR; build one with"):
        CheckpointManager(tmp_path, model, opt, lam)

    class Wrapper:  # an unknown wrapper: how often it steps the inner scheduler cannot be known
        def __init__(self, s):
            self.scheduler = s

    with pytest.raises(ConfigError, match=r"Wrapper wraps a WSDScheduler.*pass the inner scheduler"):
        CheckpointManager(tmp_path, model, opt, Wrapper(WSDScheduler(opt, WSDSchedule(total=8))))


def test_double_stepping_is_refused_and_a_repeated_call_fires_nothing(tmp_path):
    model, opt = _model_opt()
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    mgr = CheckpointManager(tmp_path, model, opt, sched)
    for _ in range(6):
        _update(model, opt, sched)
        saved = mgr.maybe_save()
    assert saved is not None and saved.name == "step-000000006-pre-decay"
    assert mgr.maybe_save() is None  # the same position again (a micro-batch, a hook before the step): nothing
    sched.step()
    sched.step()  # two scheduler steps for one update
    with pytest.raises(ConfigError, match=r"advanced by 2 updates \(from 6 to 8\).*stepped more than once"):
        mgr.maybe_save()
    mgr.close()


def test_after_a_resume_the_milestone_it_resumed_from_does_not_fire_again(tmp_path, caplog):
    model, opt = _model_opt()
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    with CheckpointManager(tmp_path, model, opt, sched, config=CheckpointConfig(every_steps=4)) as mgr:
        for _ in range(8):
            _update(model, opt, sched)
            mgr.maybe_save()
    names = [p.name for p in mgr.saves]
    assert names == ["step-000000004-periodic", "step-000000006-pre-decay", "step-000000008-post-decay+periodic+final"]

    # resume at the pre-decay point (position 6: its scheduler state says the last step reached it) and call
    # maybe_save before any update, as a framework hook that runs before the optimizer step does
    model, opt = _model_opt()
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    mgr = CheckpointManager(tmp_path, model, opt, sched, config=CheckpointConfig(every_steps=4))
    with caplog.at_level(logging.WARNING, logger="wsd_pretrain"):
        mgr.resume("step-000000006-pre-decay")
    assert "later checkpoints (step-000000008-post-decay+periodic+final)" in caplog.text
    assert sched.position == 6
    assert mgr.maybe_save() is None  # no "step-000000006-pre-decay already exists"
    _update(model, opt, sched)
    assert mgr.maybe_save() is None  # position 7: nothing due
    mgr.close()


def test_a_framework_budget_that_disagrees_with_the_schedule_is_refused():
    _, opt = _model_opt()
    sched = WSDScheduler(opt, WSDSchedule(total=100, warmup=5))
    check_total(sched, 100, framework="X")
    with pytest.raises(
        ConfigError, match=r"X max_steps=90 stops 10 updates before the schedule ends.*set max_steps=100"
    ):
        check_total(sched, 90, framework="X")
    with pytest.raises(ConfigError, match=r"runs 20 updates past the schedule's end.*total=120"):
        check_total(sched, 120, framework="X")
    for _ in range(30):
        sched.step()
    check_total(sched, 80, done=10, framework="X")  # 70 more updates each
    tokens = WSDScheduler(opt, WSDSchedule(total=10_000, units="tokens"), tokens_per_step=100)
    check_total(tokens, 3, framework="X")  # token schedules are not compared with a step budget


def test_the_seed_compatible_scheduler_keeps_the_seeds_learning_rates_under_the_manager(tmp_path):
    seed_mod = pytest.importorskip("pytorch_accelerated.schedulers.wsd_scheduler")
    kwargs = dict(total_steps=40, num_warmup_steps=4, decay_phase_ratio=0.25, num_checkpoints=3, lr_min=0.1)

    def lrs(run_dir, resume=None):
        model, opt = _model_opt()
        sched = WSDLrScheduler(opt, **kwargs)
        mgr = CheckpointManager(run_dir, model, opt, sched)
        if resume:
            mgr.resume(resume)
        out = {}
        while not mgr.scheduler.finished:
            _update(model, opt, sched)
            out[sched.get_current_step()] = opt.param_groups[0]["lr"]
            mgr.maybe_save()
        mgr.close()
        return out, [p.name for p in mgr.saves]

    ours, saves = lrs(tmp_path / "a")
    seed_model, seed_opt = _model_opt()
    seed = seed_mod.WSDLrScheduler(seed_opt, **kwargs)
    expected = {}
    for step in range(40):
        _update(seed_model, seed_opt, seed)
        expected[step] = seed_opt.param_groups[0]["lr"]
    assert all(math.isclose(ours[k], expected[k], rel_tol=1e-12) for k in expected), "the seed's exact LRs"
    # the seed callback's points: pre_decay_step and period_end of each period (checkpoints at 10, 20, 40)
    info = seed.get_decay_info()
    assert [(d["pre_decay_step"], d["period_end"]) for d in info] == [(8, 10), (18, 20), (35, 40)]
    assert saves == [
        "step-000000008-pre-decay",
        "step-000000010-post-decay",
        "step-000000018-pre-decay",
        "step-000000020-post-decay",
        "step-000000035-pre-decay",
        "step-000000040-post-decay+final",
    ]
    # resumed at the last pre-decay point into another run directory: the same LRs, the same checkpoints after it
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoints" / saves[4], tmp_path / "b" / "checkpoints" / saves[4])
    resumed, resaves = lrs(tmp_path / "b", resume="auto")
    assert resaves == [saves[5]]  # nothing re-fired at 35
    assert {k: v for k, v in ours.items() if k >= 35} == resumed


def _accelerate_on_two_ranks(rank, world):
    from accelerate import Accelerator

    from wsd_pretrain.integrations.accelerate import AccelerateCheckpointer

    accelerator = Accelerator(cpu=True)
    model, opt = _model_opt()
    model, opt = accelerator.prepare(model, opt)
    prepared = accelerator.prepare(WSDScheduler(opt.optimizer, WSDSchedule(total=8, decay_length=2)))
    try:
        CheckpointManager(f"/tmp/never-{rank}", model, opt, prepared)
        refused = ""
    except ConfigError as exc:
        refused = str(exc)
    return refused, accelerator.num_processes, AccelerateCheckpointer.__name__


@pytest.mark.distributed
def test_a_prepared_scheduler_stepping_once_per_process_is_refused_by_the_bare_manager():
    pytest.importorskip("accelerate")
    for refused, n, _ in run_distributed(_accelerate_on_two_ranks, world_size=2, timeout=120):
        assert n == 2
        assert "steps this scheduler 2 times per optimizer update" in refused
        assert "AccelerateCheckpointer" in refused


def test_a_model_on_the_meta_device_is_refused_when_the_manager_is_built(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    with pytest.raises(
        ConfigError, match=r"2 parameters or buffers on the meta device \(weight, bias\).*model\.to_empty"
    ):
        CheckpointManager(tmp_path, model, opt, sched)
    # nothing is held: materialized, the same model is accepted in the same directory, with an optimizer built
    # over its new parameters (to_empty replaces them: the old optimizer's are refused)
    model.to_empty(device="cpu")
    model.reset_parameters()
    with pytest.raises(ConfigError, match="the optimizer holds 2 parameters that the model does not have"):
        CheckpointManager(tmp_path, model, opt, sched)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    CheckpointManager(tmp_path, model, opt, WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))).close()


def test_an_optimizer_over_parameters_the_model_does_not_have_is_refused(tmp_path):
    model, _ = _model_opt()
    other = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW([*model.parameters(), *other.parameters()], lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    with pytest.raises(
        ConfigError,
        match=r"the optimizer holds 2 parameters that the model does not have \(shapes \(3, 3\), \(3,\)\).*model\.parameters\(\)",
    ):
        CheckpointManager(tmp_path, model, opt, sched)
    # frozen model parameters outside the optimizer are fine
    frozen = torch.optim.AdamW([model.weight], lr=1e-2)
    CheckpointManager(tmp_path, model, frozen, WSDScheduler(frozen, WSDSchedule(total=8))).close()


def test_after_close_every_method_refuses_and_the_lock_is_freed_by_with_and_by_garbage_collection(tmp_path):
    import gc

    from wsd_pretrain import CheckpointError

    model, opt = _model_opt()
    sched = WSDScheduler(opt, WSDSchedule(total=8, decay_length=2))
    with CheckpointManager(tmp_path, model, opt, sched) as first:
        _update(model, opt, sched)
        first.maybe_save()
    # the lock is free: a second manager on the directory is built; the closed one writes nothing any more
    second = CheckpointManager(tmp_path, model, opt, sched)
    for _ in range(5):
        _update(model, opt, sched)
    calls = {
        "maybe_save": first.maybe_save,
        "save": lambda: first.save(["periodic"]),
        "resume": first.resume,
        "load": lambda: first.load(tmp_path / "checkpoints" / "x"),
        "wait": first.wait,
        "request_preemption": first.request_preemption,
    }
    for name, call in calls.items():
        with pytest.raises(
            CheckpointError, match=rf"CheckpointManager\.{name}\(\) after close\(\).*build a new CheckpointManager"
        ):
            call()
    first.close()  # a second close does nothing
    assert not (tmp_path / "checkpoints").exists(), "nothing was written by the closed manager"

    # a second manager on the same directory in this process is told so, and how to close the first
    with pytest.raises(
        CheckpointError, match=r"in this same process \(pid \d+\): close the first one \(manager\.close\(\)"
    ):
        CheckpointManager(tmp_path, model, opt, sched)
    del second  # dropped without close() (a notebook cell run again)
    gc.collect()
    third = CheckpointManager(tmp_path, model, opt, sched)
    _update(model, opt, sched)
    assert third.maybe_save() is None
    _update(model, opt, sched)
    assert third.maybe_save().name == "step-000000008-post-decay+final"  # it saves
    third.close()


def _two_ranks_guard_and_log(rank: int, world: int, run_dir: str) -> dict:
    import logging

    from wsd_pretrain import CheckpointManager, ConfigError, WSDSchedule, WSDScheduler

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("wsd_pretrain")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    out: dict = {}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    # only rank 1's optimizer holds a parameter of another module: every rank raises, naming rank 1
    params = [*model.parameters(), *(torch.nn.Linear(3, 3).parameters() if rank == 1 else [])]
    opt = torch.optim.AdamW(params, lr=1e-2)
    try:
        CheckpointManager(run_dir, model, opt, WSDScheduler(opt, WSDSchedule(total=4, decay_length=1)))
        out["built"] = True
    except ConfigError as exc:
        out["error"] = str(exc)
    # a good manager: one save and one load; the per-checkpoint lines come from rank 0 only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=4, decay_length=1))
    with CheckpointManager(run_dir, model, opt, sched) as mgr:
        _update(model, opt, sched)
        path = mgr.save(["periodic"])
        mgr.load(path)
    out["written"] = [line for line in lines if "written in" in line]
    out["loaded"] = [line for line in lines if line.startswith("loaded checkpoint")]
    return out


@pytest.mark.distributed
def test_a_problem_on_one_rank_is_refused_on_every_rank_and_only_rank_0_logs_checkpoints(tmp_path):
    results = run_distributed(_two_ranks_guard_and_log, 2, args=(str(tmp_path),), timeout=240)
    for res in results:
        assert "built" not in res
        assert res["error"].startswith("invalid model or optimizer for the checkpoint manager: rank 1: the optimizer")
    assert len(results[0]["written"]) == 1
    assert results[0]["written"][0].startswith("checkpoint step-000000001-periodic written in ")
    assert len(results[0]["loaded"]) == 1 and "step-000000001-periodic" in results[0]["loaded"][0]
    assert results[1]["written"] == [] and results[1]["loaded"] == [], "rank 1 logs no checkpoint lines"
