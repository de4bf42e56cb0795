"""The models real jobs train (issue 24): torch.compile, activation checkpointing, both (torchtitan's recipe under
FSDP2), a model whose state_dict is not its parameters, Adafactor's factored moments, a GradScaler.

Every case goes through one invariant (:func:`check_invariant`): the committed checkpoint verifies, its model folder
holds each parameter and persistent buffer exactly once under the bare model's own name, and its own job (built
again from another seed, with the wrappers toggled where the case says so) resumes it exactly: every parameter,
buffer, optimizer tensor and param group bitwise, read through torch.distributed.checkpoint's own state_dict API
(an oracle independent of our adapters), and one more update after the resume lands bitwise where the run that went
straight on lands.

``torch.compile`` runs with ``backend="eager"`` here: dynamo still wraps the modules (``OptimizedModule``, the
``_orig_mod.`` names this file is about) and traces the forward, without inductor's C++ build, which takes minutes on
this 2-core machine; what is under test is the names and the state, not the kernels.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_helpers import run_distributed

SCHEDULE = {"total": 8, "warmup": 2, "decay_length": 2}


# ---------------------------------------------------------------------------------------------- building


def build(seed, *, ac=False, compile=None, optimizer="adamw", world=1, fsdp=False, ddp=False):
    """TinyLM (tied head, a buffer) with the wrappers asked for: ``ac`` wraps each block in checkpoint_wrapper,
    ``compile`` is "model" (the whole model) or "block" (each block, as torchtitan), ``fsdp`` shards each block then
    the root (torchtitan's order: AC, compile, fully_shard)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from engines import TinyLM
    from wsd_pretrain import WSDSchedule, WSDScheduler

    torch.manual_seed(seed)
    model = TinyLM()
    for i, block in enumerate(model.blocks):
        if ac:
            block = checkpoint_wrapper(block)
        if compile == "block":
            block = torch.compile(block, backend="eager")
        model.blocks[i] = block
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if compile == "model":
        model = torch.compile(model, backend="eager")
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adafactor":
        opt = torch.optim.Adafactor(params, lr=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(**SCHEDULE))
    return model, opt, sched


def train_step(model, opt, sched, i, rank=0, scaler=None):
    from engines import batch

    opt.zero_grad(set_to_none=True)
    if scaler is None:
        model(batch(i, rank)).backward()
        opt.step()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch(i, rank))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sched.step()


def canonical_state(model, opt):
    """Every tensor and param group under torch.distributed.checkpoint's canonical names (full tensors, fp32 CPU
    copies are not made: bitwise, in their own dtypes)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()

    options = StateDictOptions(full_state_dict=True)
    out = {f"{k}:model": full(v) for k, v in get_model_state_dict(model, options=options).items()}
    osd = get_optimizer_state_dict(model, opt, options=options)
    for pname, state in osd["state"].items():
        for key, value in state.items():
            out[f"{pname}:optimizer/{key}"] = full(value) if isinstance(value, torch.Tensor) else value
    out["param_groups"] = json.dumps(osd["param_groups"], sort_keys=True, default=str)
    return out


def differences(a, b):
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                out.append(k)
        elif x != y:
            out.append(k)
    return out


def model_folder_names(ckpt: Path) -> list[str]:
    """Every tensor name in the checkpoint's model shards, with repeats (a name written twice shows twice)."""
    from wsd_pretrain.checkpoint.safetensors_io import read_header

    names = []
    for f in sorted(ckpt.glob("model-*.safetensors")):
        names += [k for k in read_header(f).tensors]
    return names


def bare_names() -> list[str]:
    """What the model folder must hold: the bare TinyLM's state_dict, its tied head once (under the first name)."""
    from engines import TinyLM

    return sorted(k for k in TinyLM().state_dict() if k != "head.weight")


def check_invariant(ckpt: Path) -> dict:
    from wsd_pretrain.checkpoint.tools import verify_checkpoint_files

    names = model_folder_names(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return {
        "verify": verify_checkpoint_files(ckpt),
        "names_once": sorted(names) == bare_names() and len(names) == len(set(names)),
        "names": sorted(names),
        "index": sorted(index) == bare_names(),
    }


def manager(run, model, opt, sched, **kw):
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    cfg = CheckpointConfig(at_milestones=False, at_end=False, on_preemption=False, keep_last=5)
    return CheckpointManager(run, model, opt, sched, config=cfg, **kw)


def save_and_resume(run, first, second, rank=0, steps=3, scaler_of=None):
    """Train ``first`` (build kwargs) ``steps`` updates, save, train one more; build ``second`` from another seed,
    resume, compare the state right after the resume and after the same one more update."""
    model, opt, sched = build(0, **first)
    scaler = scaler_of() if scaler_of else None
    mgr = manager(run, model, opt, sched, scaler=scaler)
    for i in range(steps):
        train_step(model, opt, sched, i, rank, scaler)
    ckpt = mgr.save(["periodic"])
    saved = canonical_state(model, opt)
    saved_scaler = scaler.state_dict() if scaler else None
    train_step(model, opt, sched, steps, rank, scaler)
    straight = canonical_state(model, opt)
    mgr.close()

    model2, opt2, sched2 = build(1, **second)
    scaler2 = scaler_of(init_scale=2.0**4) if scaler_of else None
    mgr2 = manager(run, model2, opt2, sched2, scaler=scaler2)
    mgr2.resume(ckpt.name)
    resumed = canonical_state(model2, opt2)
    resumed_scaler = scaler2.state_dict() if scaler2 else None
    train_step(model2, opt2, sched2, steps, rank, scaler2)
    after = canonical_state(model2, opt2)
    mgr2.close()
    return {
        "ckpt": str(ckpt),
        "resumed_differs": differences(saved, resumed),
        "after_differs": differences(straight, after),
        "scaler": [saved_scaler, resumed_scaler],
        "keys": len(saved),
    }


# ---------------------------------------------------------------------------------------------- the name rule


def test_canonical_names_follow_torch_distributed_checkpoint():
    """The rule (checkpoint/names.py) agrees with torch.distributed.checkpoint's ``_get_fqns`` on every parameter
    and state_dict key of every wrapper combination, and keeps a user's own submodule called ``module``."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    from wsd_pretrain.checkpoint.names import canonical_name

    for kw in ({"ac": True}, {"compile": "model"}, {"compile": "block", "ac": True}, {"compile": "model", "ac": True}):
        model, _, _ = build(0, **kw)
        keys = [n for n, _ in model.named_parameters(remove_duplicate=False)] + list(model.state_dict())
        for key in keys:
            assert {canonical_name(model, key)} == _get_fqns(model, key), (kw, key)
            assert "_orig_mod" not in canonical_name(model, key)
            assert "_checkpoint_wrapped_module" not in canonical_name(model, key)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)

    wrapped = torch.nn.DataParallel(Holder())
    assert canonical_name(wrapped, "module.module.weight") == "module.weight"


@pytest.mark.parametrize(
    "first,second",
    [
        ({"compile": "model", "ac": True}, {}),  # saved compiled + checkpointed, resumed bare
        ({}, {"compile": "block", "ac": True}),  # saved bare, resumed as torchtitan wraps the blocks
        ({"compile": "block"}, {"compile": "model", "ac": True}),  # per-block compile <-> whole-model compile
    ],
    ids=["wrapped-to-bare", "bare-to-wrapped", "block-to-model"],
)
def test_toggled_wrappers_resume_exactly(tmp_path, first, second):
    torch._dynamo.reset()
    out = save_and_resume(tmp_path / "run", first, second)
    inv = check_invariant(Path(out["ckpt"]))
    assert inv["verify"] == []
    assert inv["names_once"], inv["names"]
    assert inv["index"]
    assert out["resumed_differs"] == [] and out["after_differs"] == [], out


def test_compiled_checkpoint_loads_under_the_bare_names(tmp_path):
    """The model folder of a compiled, checkpointed run loads into the bare model with load_state_dict(strict)."""
    from safetensors.torch import load_file

    from engines import TinyLM

    torch._dynamo.reset()
    model, opt, sched = build(0, compile="model", ac=True)
    mgr = manager(tmp_path / "run", model, opt, sched)
    train_step(model, opt, sched, 0)
    ckpt = mgr.save(["periodic"])
    mgr.close()
    tensors = {}
    for f in ckpt.glob("model-*.safetensors"):
        tensors.update(load_file(f))
    bare = TinyLM()
    missing, unexpected = bare.load_state_dict(tensors, strict=False)
    assert unexpected == [] and missing == ["head.weight"]  # the tied alias, saved once under embed.weight
    assert torch.equal(bare.blocks[1][1].weight, model._orig_mod.blocks[1]._checkpoint_wrapped_module[1].weight)


# ---------------------------------------------------------------------------------------------- odd state_dicts


def _odd_models():
    from engines import TinyLM

    class Renamed(TinyLM):
        def state_dict(self, *args, **kwargs):
            sd = super().state_dict(*args, **kwargs)
            return {k.replace("blocks.", "layers."): v for k, v in sd.items()}

    class ExtraState(TinyLM):
        def get_extra_state(self):
            return {"version": 3}

        def set_extra_state(self, state):
            pass

    added = TinyLM()
    added._register_state_dict_hook(lambda module, sd, prefix, local: sd.__setitem__(prefix + "rope", torch.ones(2)))
    replaced = TinyLM()
    replaced._register_state_dict_hook(
        lambda module, sd, prefix, local: sd.__setitem__(prefix + "embed.weight", sd[prefix + "embed.weight"] * 2)
    )
    return {
        "renamed": (Renamed(), "layers.0.0.weight"),
        "extra-state": (ExtraState(), "_extra_state"),
        "hook-adds": (added, "rope"),
        "hook-replaces": (replaced, "embed.weight"),
    }


def test_state_dict_that_is_not_the_parameters_is_refused_when_built(tmp_path):
    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    for case, (model, key) in _odd_models().items():
        opt = torch.optim.AdamW(model.parameters())
        sched = WSDScheduler(opt, WSDSchedule(**SCHEDULE))
        with pytest.raises(CheckpointError, match="state_dict\\(\\) does not match") as err:
            CheckpointManager(tmp_path / case, model, opt, sched)
        assert key in str(err.value), (case, str(err.value))
        assert not (tmp_path / case / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- optimizer state


def test_adafactor_resumes_exactly_on_one_process(tmp_path):
    torch._dynamo.reset()
    out = save_and_resume(tmp_path / "run", {"optimizer": "adafactor"}, {"optimizer": "adafactor"})
    inv = check_invariant(Path(out["ckpt"]))
    assert inv["verify"] == [] and inv["names_once"]
    assert out["resumed_differs"] == [] and out["after_differs"] == [], out
    index = json.loads((Path(out["ckpt"]) / "train_state" / "state.index.json").read_text())["tensors"]
    assert index["optimizer/blocks.0.1.weight/col_var"]["shape"] == [1, 16]  # factored: [rows, 1] and [1, cols]
    assert index["optimizer/blocks.0.1.weight/row_var"]["shape"] == [32, 1]


# ---------------------------------------------------------------------------------------------- loss scaler


def test_grad_scaler_is_saved_and_restored(tmp_path):
    """A GradScaler handed to the manager comes back with its scale and growth tracker; one that was not saved
    (a checkpoint without it) keeps its own state and says so."""

    def scaler_of(init_scale=2.0**10):
        return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)

    out = save_and_resume(tmp_path / "run", {}, {}, scaler_of=scaler_of)
    saved, resumed = out["scaler"]
    assert saved == resumed and saved["_growth_tracker"] == 1 and saved["scale"] == 2.0**11
    assert out["resumed_differs"] == [] and out["after_differs"] == [], out
    trainer = json.loads((Path(out["ckpt"]) / "train_state" / "trainer.json").read_text())
    assert trainer["scaler"]["scale"] == 2.0**11


def test_scaler_without_a_state_dict_is_refused(tmp_path):
    from wsd_pretrain import ConfigError

    model, opt, sched = build(0)
    with pytest.raises(ConfigError, match="loss scaler itself"):
        manager(tmp_path / "run", model, opt, sched, scaler=object())


# ---------------------------------------------------------------------------------------------- 2 processes


class RowFactored(torch.optim.Optimizer):
    """SGD that also keeps a factored second moment per matrix (the mean of the squared gradient per row, shape
    [rows, 1]), as Adafactor does: state of another shape than its parameter."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() >= 2:
                    self.state[p]["row_sq"] = p.grad.pow(2).mean(-1, keepdim=True)
                p.add_(p.grad, alpha=-group["lr"])


def _two_ranks(rank, world, root):
    import torch.distributed as dist

    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler

    root = Path(root)
    out = {}
    torch._dynamo.reset()
    # torchtitan's recipe: per-block checkpoint_wrapper + per-block compile + fully_shard; resumed with the same
    # wrappers (bitwise, 2 ranks), then without any (FSDP2 alone)
    recipe = {"ac": True, "compile": "block", "fsdp": True}
    out["titan"] = save_and_resume(root / "titan", recipe, recipe, rank)
    out["titan-bare"] = save_and_resume(root / "titan-bare", recipe, {"fsdp": True}, rank)

    def scaler_of(init_scale=2.0**10):
        return torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)

    # DDP around a compiled, checkpointed model with Adafactor and a GradScaler, resumed as plain DDP
    out["ddp"] = save_and_resume(
        root / "ddp",
        {"ddp": True, "compile": "model", "ac": True, "optimizer": "adafactor"},
        {"ddp": True, "optimizer": "adafactor"},
        rank,
        scaler_of=scaler_of,
    )
    # Adafactor under FSDP2: torch's own step fails on DTensor parameters; an optimizer whose state has another
    # shape than its sharded parameter (factored moments) is refused at the first save, on every rank, nothing written
    model, opt, sched = build(0, fsdp=True, optimizer="adafactor")
    try:
        train_step(model, opt, sched, 0, rank)
        out["fsdp-adafactor-step"] = "ran"
    except Exception as exc:
        out["fsdp-adafactor-step"] = f"{type(exc).__name__}: {exc}"[:300]
    model, _, _ = build(0, fsdp=True)
    opt = RowFactored(model.parameters())
    sched = WSDScheduler(opt, WSDSchedule(**SCHEDULE))
    mgr = manager(root / "fsdp-factored", model, opt, sched)
    train_step(model, opt, sched, 0, rank)
    try:
        mgr.save(["periodic"])
        out["fsdp-factored-save"] = "saved"
    except CheckpointError as exc:
        out["fsdp-factored-save"] = str(exc)
    mgr.close()
    out["fsdp-factored-left"] = sorted(p.name for p in (root / "fsdp-factored" / "checkpoints").glob("*"))
    dist.barrier()
    for case in ("titan", "titan-bare", "ddp"):
        out[case]["invariant"] = check_invariant(Path(out[case]["ckpt"])) if rank == 0 else None
    return out


@pytest.mark.distributed
def test_wrapped_models_on_two_ranks(tmp_path):
    results = run_distributed(_two_ranks, 2, args=(str(tmp_path),), timeout=400)
    for rank, out in enumerate(results):
        for case in ("titan", "titan-bare", "ddp"):
            assert out[case]["resumed_differs"] == [], (rank, case, out[case])
            assert out[case]["after_differs"] == [], (rank, case, out[case])
        assert out["ddp"]["scaler"][0] == out["ddp"]["scaler"][1] and out["ddp"]["scaler"][0]["_growth_tracker"] == 1
        assert out["ddp"]["keys"] > 30  # row_var / col_var of every matrix among them
    for case in ("titan", "titan-bare", "ddp"):
        inv = results[0][case]["invariant"]
        assert inv["verify"] == [] and inv["names_once"] and inv["index"], (case, inv)
    for out in results:
        assert out["fsdp-adafactor-step"] != "ran", out["fsdp-adafactor-step"]  # torch 2.13's Adafactor, on DTensors
        assert "FSDP2" in out["fsdp-factored-save"] and "row_sq" in out["fsdp-factored-save"], out["fsdp-factored-save"]
        assert out["fsdp-factored-left"] == []


def test_integrations_find_the_frameworks_scaler():
    """The integrations hand the manager the framework's own GradScaler: accelerate's prepared optimizer holds it
    (HF Trainer, accelerate, pytorch_accelerated), Lightning's precision plugin under 16-mixed."""
    pytest.importorskip("accelerate")
    pl = pytest.importorskip("lightning.pytorch")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from wsd_pretrain.integrations._common import scaler_of

    Accelerator(cpu=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    assert scaler_of(AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)) is scaler
    assert scaler_of(AcceleratedOptimizer(opt, device_placement=False)) is None
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)  # on a GPU, precision="16-mixed" makes this plugin
    trainer = pl.Trainer(accelerator="cpu", plugins=[plugin], logger=False, enable_checkpointing=False)
    assert getattr(trainer.precision_plugin, "scaler", None) is scaler  # where lightning.py looks


def test_names_without_their_module_drop_only_the_wrappers_own_segments():
    """from-deepspeed reads names with no module to walk: the segments only torch's wrappers use go, ``module``
    stays (a user's submodule may be called that)."""
    from wsd_pretrain.checkpoint.names import canonical_text

    assert canonical_text("_orig_mod.blocks.0._checkpoint_wrapped_module.1.weight") == "blocks.0.1.weight"
    assert canonical_text("_fsdp_wrapped_module.module.weight") == "module.weight"


def test_a_compiled_run_saved_before_the_name_rule_resumes_bare_or_compiled(tmp_path):
    """tests/data/v2-compiled/: a checkpoint the release before issue 24 wrote from a compiled TinyLM (its names
    all ``_orig_mod.…``; expected.safetensors holds its tensors under the bare names). It resumes into the bare model
    and into a compiled one, exactly: the reader maps the stored names to the bare ones."""
    from safetensors.torch import load_file

    data = Path(__file__).parent / "data" / "v2-compiled"
    expected = load_file(data / "expected.safetensors")
    for kw in ({}, {"compile": "model", "ac": True}):
        model, opt, sched = build(1, **kw)
        mgr = manager(tmp_path / f"run-{len(kw)}", model, opt, sched)
        # the fixture's AdamW ran with weight_decay 0.01, build()'s with 0.1: a resume refuses that unless asked
        mgr.load(data / "step-000000003-periodic", allow_changes=["weight_decay"])
        mgr.close()
        state = canonical_state(model, opt)
        got = {f"model/{k[: -len(':model')]}": v for k, v in state.items() if k.endswith(":model")}
        got |= {f"optimizer/{k.replace(':optimizer/', '/')}": v for k, v in state.items() if ":optimizer/" in k}
        got.pop("model/head.weight")
        assert sorted(got) == sorted(expected)
        assert [k for k in expected if not torch.equal(got[k], expected[k])] == []
        assert sched.position == 3
