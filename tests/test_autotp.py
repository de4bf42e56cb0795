"""DeepSpeed AutoTP (``"tensor_parallel": {"autotp_size": 2}``) on a tiny transformers Llama, ZeRO-1, real gloo
ranks. One spawn checks, on 2 ranks (TP 2):

* the manager refuses the job when it is built, on every rank, naming AutoTP, what it split and the fix, and writes
  nothing (given the engine, or its module with the TP slices inside);
* ``autotp_partition`` describes each rank's actual slice: ``full[box]`` of the imported full tensor is the rank's
  parameter, bit for bit;

then, in this process, DeepSpeed's own checkpoint of that job (``engine.save_checkpoint``) imported with
``from-deepspeed``: it verifies; its master weights and Adam moments equal DeepSpeed's own consolidation of an AutoTP
checkpoint, the universal-checkpoint conversion (``ds_to_universal``; ``zero_to_fp32`` does not understand AutoTP);
its model folder loads with ``from_pretrained`` and computes the TP engine's loss; a one-process job without TP
resumes it with those values. The slow test runs the same on 4 ranks (TP 2 x DP 2) at ZeRO-2 in bf16 (fp32 masters
beside the bf16 weights)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from distributed_helpers import run_distributed

pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed

VOCAB = 64


def _llama_config():
    # 4 query heads, 2 key/value heads (GQA): AutoTP cuts q/k/v/gate/up/lm_head on dim 0, o/down on dim 1
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


def _batch(i: int, dp_rank: int) -> torch.Tensor:
    """The same tokens on the ranks of one TP group (AutoTP checks it), others on each data-parallel rank."""
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(100 * i + dp_rank))


def _autotp_job(rank, world, root, tp, stage, dtype):
    from pathlib import Path

    from wsd_pretrain import CheckpointError, WSDSchedule, WSDScheduler, deepspeed_initialize
    from wsd_pretrain.checkpoint.deepspeed_adapter import _live_autotp_map, autotp_partition
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_llama_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=8, warmup=2, decay_length=2))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "tensor_parallel": {"autotp_size": tp},
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed_initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    for i in range(3):
        x = _batch(i, rank // tp)
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
    refused = {}
    for what, target in (("engine", engine), ("module", engine.module)):
        try:
            CheckpointManager(f"{root}/run-{what}", target, opt, sched, config=CheckpointConfig(on_preemption=False))
            refused[what] = "accepted"
        except CheckpointError as exc:
            refused[what] = str(exc)
        refused[what + "-wrote"] = sorted(p.name for p in Path(f"{root}/run-{what}").glob("**/*"))
    engine.save_checkpoint(f"{root}/ds")
    x = _batch(3, 0)
    with torch.no_grad():
        loss = float(engine(input_ids=x, labels=x).loss)
    parts = {}
    for name, p in engine.module.named_parameters():
        entry = _live_autotp_map(p)
        part = autotp_partition(entry, name, tp) if entry is not None else None
        tp_rank = rank % tp
        parts[name] = {
            "dim": None if part is None else part.dim,
            "box": None if part is None else [list(x) for x in part.boxes[tp_rank]],
            "shard": p.detach().float().flatten().tolist(),
        }
    return {"refused": refused, "loss": loss, "parts": parts, "sched": sched.position}


def _check(tmp_path, results, tp, dp, dtype):
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    from wsd_pretrain import WSDSchedule, WSDScheduler
    from wsd_pretrain.checkpoint import format as F
    from wsd_pretrain.checkpoint import tools
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
    from wsd_pretrain.checkpoint.store import CheckpointStore

    for rank, r in enumerate(results):
        for what in ("engine", "module"):
            text = r["refused"][what]
            assert "AutoTP" in text and "from-deepspeed" in text and "engine.save_checkpoint" in text, (rank, text)
            assert r["refused"][what + "-wrote"] == [], "a refused manager writes nothing"
        assert f"autotp_size = {tp}" in r["refused"]["engine"]
        assert "dim 0: model.layers.0.self_attn.q_proj.weight" in r["refused"]["engine"]
        assert "dim 1: model.layers.0.self_attn.o_proj.weight" in r["refused"]["engine"]
        assert "model.layers.0.self_attn.q_proj.weight" in r["refused"]["module"]

    out = tmp_path / "ours"
    tools.from_deepspeed(tmp_path / "ds", out, max_shard_size=20_000, hf_config=_llama_config().to_dict())
    ckpt = F.resolve_checkpoint(out)
    assert ckpt.name == "step-000000003-imported" and tools.verify_checkpoint_files(ckpt) == []
    layout = F.load_manifest(ckpt)["layout"]
    assert (layout["tensor_parallel"], layout["data_parallel"]) == (tp, dp)
    with CheckpointStore(ckpt, F.load_manifest(ckpt)) as store:
        ours = {g: {n: store.read(g, n) for n in store.names(g)} for g in F.GROUP_NAMES}

    # each rank's slice is full[box] of the imported tensor, as autotp_partition says (the dims AutoTP cut)
    dims = {}
    for rank, r in enumerate(results):
        for name, part in r["parts"].items():
            full = ours["model"][name]
            index = (
                tuple(slice(o, o + n) for o, n in zip(*part["box"]))
                if part["box"]
                else tuple(slice(None) for _ in full.shape)
            )
            assert full[index].float().flatten().tolist() == part["shard"], (rank, name)
            dims[name] = part["dim"]
    assert dims["model.layers.0.mlp.gate_proj.weight"] == 0 and dims["lm_head.weight"] == 0
    assert dims["model.layers.1.mlp.down_proj.weight"] == 1 and dims["model.norm.weight"] is None

    # DeepSpeed's own consolidation of an AutoTP checkpoint: the universal checkpoint (fp32, exp_avg, exp_avg_sq, step)
    uni = tmp_path / "universal"
    step_dir = next((tmp_path / "ds").glob("global_step*"))
    args = dict(num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True)
    ds_to_universal(
        argparse.Namespace(input_folder=str(step_dir), output_folder=str(uni), inject_missing_state=False, **args)
    )
    names = list(ours["model"])
    assert len(names) == 21
    master = ours["master"] if dtype == "bf16" else ours["model"]  # fp32 master weights
    assert len(master) == 21
    for name in names:
        if dtype == "bf16":  # the model's own bf16 weights are the masters rounded, as DeepSpeed keeps them
            assert torch.equal(ours["model"][name], master[name].to(torch.bfloat16)), name
        for state, mine in (
            ("fp32", master[name]),
            ("exp_avg", ours["optimizer"][f"{name}/exp_avg"]),
            ("exp_avg_sq", ours["optimizer"][f"{name}/exp_avg_sq"]),
        ):
            ref = torch.load(uni / "zero" / name / f"{state}.pt", weights_only=False)["param"]  # DeepSpeed's pickle
            assert mine.shape == ref.shape and torch.equal(mine, ref), (name, state)
        assert ours["optimizer"][f"{name}/step"].item() == 3

    # the model folder loads with from_pretrained and computes what the TP engine computed (fp32: to rounding)
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    assert all(torch.equal(p.detach().float(), ours["model"][n].float()) for n, p in hf.named_parameters())
    if dtype == "fp32":
        x = _batch(3, 0)
        with torch.no_grad():
            loss = float(hf(input_ids=x, labels=x).loss)
        assert math.isclose(loss, results[0]["loss"], rel_tol=1e-5), (loss, results[0]["loss"])

    # a job without tensor parallelism resumes it: the weights and Adam moments, whole
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(_llama_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = WSDScheduler(opt, WSDSchedule(total=8, warmup=2, decay_length=2))
    mgr = CheckpointManager(tmp_path / "resumed", model, opt, sched, config=CheckpointConfig(on_preemption=False))
    mgr.load(ckpt)
    mgr.close()
    assert sched.position == results[0]["sched"] == 3
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), master[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ours["optimizer"][f"{name}/{key}"]), (name, key)


def test_autotp_is_refused_at_build_and_its_deepspeed_checkpoint_imports_as_deepspeed_merges_it(tmp_path):
    results = run_distributed(_autotp_job, world_size=2, args=(str(tmp_path), 2, 1, "fp32"), timeout=600)
    _check(tmp_path, results, tp=2, dp=1, dtype="fp32")


@pytest.mark.slow
def test_autotp_with_data_parallel_zero2_bf16_on_four_ranks(tmp_path):
    results = run_distributed(_autotp_job, world_size=4, args=(str(tmp_path), 2, 2, "bf16"), timeout=900)
    _check(tmp_path, results, tp=2, dp=2, dtype="bf16")
