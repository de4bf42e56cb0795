"""The main job in 3-D (the ``parallel:`` section, wsd_pretrain/parallel.py): the ready 4-process configs run under
torchrun with a save, a kill and a resume; the layout is validated when the config is read (each error naming the
fix); the 70B and 405B recipes fit a GPU by the size arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import QUICK, ROOT, _checkpoints, _env, _metrics, _run, kill_when, torchrun

from wsd_pretrain import ConfigError
from wsd_pretrain.config import load_config
from wsd_pretrain.parallel import Layout, memory_per_gpu, stage_layers
from wsd_pretrain.train import deepspeed_plan, resolve_job

CONFIGS = ROOT / "configs"


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["position"]: m["loss"] for m in _metrics(run_dir) if "loss" in m}


FINAL = "step-000000008-post-decay+periodic+final"


def _killed_and_resumed(tmp_path: Path, config: str, *extra: str, nproc: int = 4) -> tuple[Path, dict[int, float]]:
    """Run ``config`` on ``nproc`` processes for 8 updates (a checkpoint at 4), kill every process once update 6 is
    logged, and run the same command again: it resumes, ends with the final checkpoint, and the updates the killed
    run made after the checkpoint at 4 are trained again from it bit for bit. Returns the run directory and the
    losses of updates 1-8."""
    run_dir = tmp_path / "run"
    args = ["--config", config, "--run-dir", str(run_dir), "--total-steps", "8", "--save-every", "4", *QUICK, *extra]

    def logged_6() -> bool:
        return (run_dir / "metrics.jsonl").exists() and max(_losses(run_dir), default=0) >= 6

    kill_when(torchrun(nproc, *args), logged_6, timeout=400)
    before = _losses(run_dir)
    assert "step-000000004-periodic" in _checkpoints(run_dir) and max(before) < 8, "killed mid-run"
    res = _run(torchrun(nproc, *args))  # the same command resumes
    assert "resumed" in res.stderr
    assert _checkpoints(run_dir)[-1] == FINAL
    after = _losses(run_dir)
    assert sorted(after) == list(range(1, 9))
    replayed = [p for p in before if p > 4]
    assert replayed and all(after[p] == before[p] for p in replayed), (before, after)
    return run_dir, after


ON_4 = pytest.mark.slow  # the default suite runs the same configs with dp 1 on 2 processes (the same code paths)


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "nproc"),
    [
        ("tiny_cpu_tp2_dp2.yaml", 2),
        ("tiny_cpu_pp2_dp2.yaml", 2),
        pytest.param("tiny_cpu_tp2_dp2.yaml", 4, marks=ON_4),
        pytest.param("tiny_cpu_pp2_dp2.yaml", 4, marks=ON_4),
    ],
)
def test_3d_config_saves_is_killed_and_resumes_exactly(tmp_path, config, nproc):
    """tp 2 x dp 2 (torchtitan's plan, sequence parallel, FSDP2) and pp 2 x dp 2 (two stages under the full
    model's names, 1F1B over 4 microbatches, FSDP2 in each stage), as shipped on 4 processes, and with dp 1 on 2
    (four processes on 2 cores cost the default suite twice the time of two)."""
    dp = nproc // 2
    extra = () if dp == 2 else ("parallel.dp_shard=1",)
    run_dir, after = _killed_and_resumed(tmp_path, f"configs/{config}", *extra, nproc=nproc)
    # the same model and data whichever way it is cut: the first update's loss is the unsplit model's on the same
    # data-parallel batches (the tiny default's seed: 5.5597 on one process, 5.5745 on two DDP ranks; ln 256 = 5.545
    # is a uniform guess), and it learns
    unsplit = {1: 5.5597, 2: 5.5745}[dp]
    assert after[1] == pytest.approx(unsplit, abs=2e-4) and after[8] < after[1] - 1.0
    manifest = json.loads((run_dir / "checkpoints" / FINAL / "manifest.json").read_text())
    assert manifest["world_size"] == nproc and manifest["tokens"] == 8 * dp * 16 * 128  # dp data-parallel ranks
    # every TP shard, FSDP row and pipeline stage is in the model folder: the whole model under its own names
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / FINAL)
    assert model.config.num_hidden_layers == 4 and model.model.layers[3].mlp.down_proj.weight.shape == (128, 352)
    verify = _run([sys.executable, "-m", "wsd_pretrain.cli", "ckpt", "verify", str(run_dir / "checkpoints" / FINAL)])
    assert verify.stdout.startswith("OK")


@pytest.mark.distributed
def test_deepspeed_pipeline_config_saves_is_killed_and_resumes_exactly(tmp_path):
    """configs/tiny_cpu_deepspeed_pp2.yaml on 2 processes: DeepSpeed's PipelineEngine, 2 stages, ZeRO-1, 2 pipeline
    microbatches per micro-step; saved, killed, resumed bit for bit, its model folder the whole model under its
    Hugging Face names."""
    run_dir, after = _killed_and_resumed(tmp_path, "configs/tiny_cpu_deepspeed_pp2.yaml", nproc=2)
    # the unsplit model's first loss (tiny_cpu_deepspeed.yaml with ZeRO-1 on one process: 5.55946; the pipeline
    # averages its two microbatches' means), and it learns
    assert after[1] == pytest.approx(5.55946, abs=2e-4) and after[8] < after[1] - 1.0
    ckpt = run_dir / "checkpoints" / FINAL
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["tokens"] == 8 * 1 * 8 * 128  # 1 data-parallel rank
    assert manifest["layout"]["pipeline_stages"] == 2
    # both stages' tensors, each once, under the model's own names (not the PipelineModule's "<layer>.<name>")
    from wsd_pretrain.model import LlamaLM, ModelConfig

    names = set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"])
    assert names == set(LlamaLM(ModelConfig()).state_dict()), names ^ set(LlamaLM(ModelConfig()).state_dict())
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 4 and model.model.layers[3].mlp.down_proj.weight.shape == (128, 352)
    verify = _run([sys.executable, "-m", "wsd_pretrain.cli", "ckpt", "verify", str(ckpt)])
    assert verify.stdout.startswith("OK")


# ---------------------------------------------------------------------------------------------- validation


def _problems(config: dict, world: int | None = None, monkeypatch=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        if world is not None and monkeypatch is not None:
            monkeypatch.setenv("WORLD_SIZE", str(world))
        resolve_job(config)
    return info.value.problems


def test_the_layout_is_refused_at_config_load_naming_each_fix(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    fsdp = {"train": {"engine": "fsdp2"}}
    # the product against the launcher's world size
    problems = _problems({**fsdp, "parallel": {"tp": 2, "dp_shard": 2}}, 8, monkeypatch)
    assert problems == [
        "dp_shard 2 x dp_replicate 1 x tp 2 x pp 1 = 4, but the job has 8 processes: make the product equal the "
        "world size (e.g. parallel.dp_shard=4), or launch 4 processes"
    ]
    assert "launch a multiple of 6" in _problems({**fsdp, "parallel": {"tp": 2, "pp": 3}}, 8, monkeypatch)[0]
    monkeypatch.delenv("WORLD_SIZE")
    # divisibility by tp: heads, kv heads, ffn, vocab; tied embeddings; the sequence (sequence parallelism)
    problems = _problems(
        {
            **fsdp,
            "parallel": {"tp": 4},
            "model": {"num_kv_heads": 2, "intermediate_size": 350, "vocab_size": 258, "tie_embeddings": True},
            "data": {"seq_len": 126},
        }
    )
    text = "\n".join(problems)
    for expected in (
        "model.num_kv_heads=2 is not divisible by parallel.tp=4",
        "model.intermediate_size=350 is not divisible by parallel.tp=4",
        "model.vocab_size=258 is not divisible by parallel.tp=4",
        "set model.tie_embeddings=false",
        "data.seq_len=126 is not divisible by parallel.tp=4",
    ):
        assert expected in text, text
    # pipeline: stages need layers, microbatches divide the micro batch and 1F1B needs one per stage
    problems = _problems({**fsdp, "parallel": {"pp": 8, "microbatches": 3}, "train": {"engine": "fsdp2"}})
    text = "\n".join(problems)
    assert "model.num_layers=4 is fewer than parallel.pp=8" in text
    assert "train.micro_batch_size=16 is not divisible by parallel.microbatches=3" in text
    assert "1F1B needs at least one microbatch per stage" in text
    # the engines: ddp has no mesh; DeepSpeed refuses AutoTP as the manager does, pipeline stages and HSDP
    assert "set train.engine=fsdp2" in _problems({"parallel": {"tp": 2}})[0]
    ds = {"train": {"engine": "deepspeed", "ds_config": str(CONFIGS / "ds_zero1.json"), "micro_batch_size": 8}}
    text = "\n".join(_problems({**ds, "parallel": {"tp": 2, "pp": 3, "dp_replicate": 2, "pp_schedule": "gpipe"}}))
    assert "DeepSpeed AutoTP, which the checkpoint manager refuses today" in text
    assert "parallel.dp_replicate=2 with engine=deepspeed" in text
    # DeepSpeed's pipeline: the same layers on every stage, its own 1F1B schedule, ZeRO 0/1
    assert "model.num_layers=4 is not divisible by parallel.pp=3" in text and "set parallel.pp_schedule=1f1b" in text
    piped = {**ds, "parallel": {"pp": 2}, "model": {"tie_embeddings": True}}  # tied: a TiedLayerSpec
    plan = deepspeed_plan(resolve_job(piped), piped)
    assert plan.config["train_micro_batch_size_per_gpu"] == 4 and plan.config["gradient_accumulation_steps"] == 2
    # the checkpoint's names: the PipelineModule's layer index dropped (the layers carry the model's names)
    from wsd_pretrain.ds_pipe import hf_name

    assert hf_name("3.model.layers.2.mlp.up_proj.weight") == "model.layers.2.mlp.up_proj.weight"
    assert hf_name("tied_modules.embed.model.embed_tokens.weight") == "model.embed_tokens.weight"
    with pytest.raises(ConfigError, match="not a PipelineModule layer's parameter name"):
        hf_name("lm_head.weight")
    zero2 = {**piped, "train": {**ds["train"], "zero_stage": 2}}
    with pytest.raises(
        ConfigError, match=r"ZeRO stage 2 .* with parallel.pp=2: DeepSpeed.s PipelineEngine runs ZeRO 0"
    ):
        deepspeed_plan(resolve_job(zero2), zero2)
    # bad values of the section itself
    text = "\n".join(_problems({"parallel": {"tp": 0, "dp_shard": -2}}))
    assert "tp=0: a whole number >= 1" in text and "dp_shard=-2: a whole number >= 1, or -1" in text
    assert (
        "pp_schedule='zigzag': expected one of 'gpipe', '1f1b'" in _problems({"parallel": {"pp_schedule": "zigzag"}})[0]
    )


def test_a_ds_config_with_autotp_is_refused_like_the_manager_refuses_it(tmp_path):
    cfg = json.loads((CONFIGS / "ds_zero1.json").read_text())
    cfg["tensor_parallel"] = {"autotp_size": 2}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    from wsd_pretrain.train import deepspeed_plan

    job = resolve_job({"train": {"engine": "deepspeed", "ds_config": str(path)}})
    with pytest.raises(ConfigError, match=r"tensor_parallel.autotp_size=2: DeepSpeed AutoTP.*parallel.tp"):
        deepspeed_plan(job, {})


# ---------------------------------------------------------------------------------------------- recipes


def test_the_70b_and_405b_recipes_fit_an_80gb_gpu_by_the_size_arithmetic(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    gb = 1e9
    # 70B: TP 8 inside a node x FSDP2 32 across 32 nodes
    job = resolve_job(load_config(CONFIGS / "llama_70b_tp8.yaml"), config_dir=CONFIGS)
    assert 70.0e9 < job.model.num_parameters() < 71.0e9
    monkeypatch.setenv("WORLD_SIZE", "256")
    assert resolve_job(load_config(CONFIGS / "llama_70b_tp8.yaml"), config_dir=CONFIGS) == job
    layout = job.parallel.resolved(256)
    assert layout == Layout(pp=1, dp_replicate=1, dp_shard=32, tp=8)
    mem = memory_per_gpu(
        job.model,
        layout,
        micro_batch_size=job.train.micro_batch_size,
        seq_len=job.data.seq_len,
        activation_checkpointing=job.train.activation_checkpointing,
    )
    # params, grads, two Adam moments in fp32 over 256 ranks: 16 bytes x 70.6B / 256 = 4.4 GB, a little more at
    # the busiest rank
    assert 4.3 * gb < mem["state"] < 4.8 * gb, mem
    assert mem["total"] < 60 * gb, mem  # under 80 GB with room for the allocator and NCCL buffers
    # 405B: TP 8 x PP 16 x DP 128 on 16,384 GPUs; 126 layers as 7, 8 x 14, 7
    monkeypatch.setenv("WORLD_SIZE", "16384")
    job = resolve_job(load_config(CONFIGS / "llama_405b_3d.yaml"), config_dir=CONFIGS)
    assert 400e9 < job.model.num_parameters() < 410e9
    layout = job.parallel.resolved(16384)
    assert layout == Layout(pp=16, dp_replicate=1, dp_shard=128, tp=8)
    assert [len(r) for r in stage_layers(126, 16)] == [7] + [8] * 14 + [7]
    mem = memory_per_gpu(
        job.model,
        layout,
        micro_batch_size=job.train.micro_batch_size,
        seq_len=job.data.seq_len,
        microbatches=job.parallel.microbatches,
        activation_checkpointing=job.train.activation_checkpointing,
    )
    assert mem["state"] < 1 * gb and mem["total"] < 60 * gb, mem
    # the arithmetic is the one that says what does not fit: the same 405B without PP (1,024 ranks, TP 8 x FSDP
    # 128) and without activation checkpointing needs more than a GPU has
    big = memory_per_gpu(job.model, Layout(1, 1, 128, 8), micro_batch_size=1, seq_len=job.data.seq_len)
    assert big["total"] > 80 * gb, big


def test_recipe_launch_scripts_check_the_layout_against_the_nodes_before_launching():
    env = {**_env(), "PYTHON": sys.executable, "LAUNCHER": "none"}
    env.pop("WORLD_SIZE", None)
    # 4 nodes of 8 are 32 GPUs, not the recipe's 256: refused on this machine, naming the product and the fix
    bad = subprocess.run(
        ["bash", "launch/llama_70b_tp8.sh"], cwd=ROOT, env={**env, "NNODES": "4"}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "= 256, but the job has 32 processes" in bad.stderr, bad.stderr
    # the recipe's own node count passes the check and reaches the launcher choice
    ok = subprocess.run(["bash", "launch/llama_405b_3d.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 2 and "LAUNCHER=none: slurm, torchrun or deepspeed" in ok.stderr, ok.stderr


@pytest.mark.distributed
@pytest.mark.slow  # the default suite runs both layouts' build, save and same-layout resume above
def test_a_pipeline_checkpoint_resumes_on_hsdp_with_tensor_parallelism(tmp_path):
    """pp 2 x dp 2 saves at update 4; HSDP 2 x TP 2 resumes it (another mesh: the manager reads each rank's boxes)
    and trains the same updates 5-8 as the pipeline did, to float rounding (reductions differ by layout)."""
    quick = ["--total-steps", "8", "--save-every", "4", *QUICK]
    pp = tmp_path / "pp"
    _run(torchrun(4, "--config", "configs/tiny_cpu_pp2_dp2.yaml", "--run-dir", str(pp), *quick))
    other = tmp_path / "hsdp"
    ckpt = pp / "checkpoints" / "step-000000004-periodic"
    res = _run(
        torchrun(
            4,
            "--config",
            "configs/tiny_cpu_tp2_dp2.yaml",
            "--run-dir",
            str(other),
            "--resume",
            str(ckpt),
            *quick,
            "parallel.dp_replicate=2",
            "parallel.dp_shard=1",
        )
    )
    assert "resumed" in res.stderr
    a, b = _losses(pp), _losses(other)
    assert sorted(b) == [5, 6, 7, 8]
    assert all(b[p] == pytest.approx(a[p], rel=1e-5) for p in b), (a, b)
