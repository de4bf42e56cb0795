"""configs/: the tiny default equals the built-in defaults; the DeepSpeed configs and the 1B multi-node recipe are
valid (sizes, batch arithmetic, schedule), though the recipe cannot run here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from wsd_pretrain import ConfigError, split_ds_config
from wsd_pretrain.config import load_config
from wsd_pretrain.train import JobConfig, deepspeed_plan, resolve_job

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_tiny_cpu_yaml_is_the_built_in_default():
    assert resolve_job(load_config(CONFIGS / "tiny_cpu.yaml")) == resolve_job({}) == JobConfig()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_carry_a_valid_wsd_section(stage):
    config, factory = split_ds_config(CONFIGS / f"ds_zero{stage}.json")
    assert config["zero_optimization"]["stage"] == stage and "scheduler" not in config
    assert factory is not None and factory.keywords["schedule"].total == 300


def test_the_1b_recipe_for_two_nodes_of_eight_gpus():
    job = resolve_job(load_config(CONFIGS / "llama_1b_2x8.yaml"), config_dir=CONFIGS)
    params = job.model.num_parameters()
    assert 1.0e9 < params < 1.2e9, params
    world = 2 * 8
    tokens_per_update = job.train.micro_batch_size * job.train.grad_accum * world * job.data.seq_len
    assert tokens_per_update == 1_048_576
    assert job.schedule.total * tokens_per_update == 52_428_800_000
    assert [m.at for m in job.schedule.milestones_info] == [12_500, 25_000, 50_000]
    assert job.train.engine == "deepspeed" and job.train.dtype == "bf16"
    ds, factory = split_ds_config(job.train.ds_config)
    assert ds["train_micro_batch_size_per_gpu"] == job.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == job.train.grad_accum
    assert ds["bf16"]["enabled"] is True
    # the ds_config's own WSD section says the same as the recipe's schedule section (both define it: they agree)
    assert factory.keywords["schedule"] == job.schedule
    assert job.model.hf_config()["num_hidden_layers"] == 22


def test_the_deepspeed_config_is_the_tiny_default_under_zero2():
    job = resolve_job(load_config(CONFIGS / "tiny_cpu_deepspeed.yaml"), config_dir=CONFIGS)
    default = JobConfig()
    assert (job.train.engine, job.train.ds_config, job.train.micro_batch_size, job.train.dtype) == (
        "deepspeed",
        str(CONFIGS / "ds_zero2.json"),  # read against the config file's folder
        8,
        "fp32",
    )
    # everything else is the tiny default's
    assert replace(job.train, engine="ddp", ds_config=None, micro_batch_size=16) == default.train
    assert (job.model, job.data, job.optimizer, job.schedule, job.checkpoint) == (
        default.model,
        default.data,
        default.optimizer,
        default.schedule,
        default.checkpoint,
    )
    # what DeepSpeed is given (the ds_config is relative to the config file): ZeRO-2, the train section's batch
    # size, no scheduler section (the job's schedule drives the LR), fp32
    ds = deepspeed_plan(job, {}).config
    assert ds["zero_optimization"]["stage"] == 2 and "scheduler" not in ds and "optimizer" not in ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 1)
    assert ds["bf16"] == {"enabled": False} and ds["fp16"]["enabled"] is False and ds["gradient_clipping"] == 1.0
    # the ds_config's own WSD section (for deepspeed_initialize users) is the same schedule
    _, factory = split_ds_config(job.train.ds_config)
    assert factory.keywords["schedule"] == job.schedule


def test_the_branching_config_places_two_branches_and_the_final_decay():
    job = resolve_job(load_config(CONFIGS / "tiny_cpu_branching.yaml"))
    s = job.schedule
    assert (s.mode, s.total, s.warmup, s.milestones, s.decay_fraction, s.decay_shape, s.min_lr_ratio) == (
        "branching",
        400,
        30,
        (100, 200, 400),
        0.2,
        "1-sqrt",
        0.0,
    )
    # each branch is 20% of its budget; positions count the branches, so the run does 400 + 20 + 40 updates
    assert [(m.at, m.decay_length, m.pre_decay, m.post_decay, m.rewind, m.final) for m in s.milestones_info] == [
        (100, 20, 80, 100, True, False),
        (200, 40, 180, 220, True, False),
        (400, 80, 380, 460, False, True),
    ]
    assert s.end == 460 and [m.trajectory_pre_decay for m in s.milestones_info] == [80, 160, 320]
    default = JobConfig()
    assert (job.model, job.data, job.optimizer, job.checkpoint, job.train) == (
        default.model,
        default.data,
        default.optimizer,
        default.checkpoint,
        default.train,
    )


def test_unknown_sections_and_keys_are_refused_with_hints():
    with pytest.raises(ConfigError, match="unknown section"):
        resolve_job({"modle": {}})
    with pytest.raises(ConfigError, match="did you mean 'hidden_size'"):
        resolve_job({"model": {"hiden_size": 64}})
    with pytest.raises(ConfigError, match="seq_len=512 is longer"):
        resolve_job({"data": {"seq_len": 512}})
    with pytest.raises(ConfigError) as info:
        resolve_job({"model": {"num_heads": 3}, "optimizer": {"lr": -1.0}})
    assert len(info.value.problems) == 3  # every problem of every section, at once


def test_values_of_the_wrong_type_are_refused_naming_field_value_and_type():
    with pytest.raises(ConfigError) as info:
        resolve_job(
            {
                "train": {"micro_batch_size": True, "seed": "zero", "dtype": "fp8"},  # yes/no is not a number
                "optimizer": {"lr": "high"},
                "data": {"paths": "a.txt"},
            }
        )
    assert info.value.problems == [
        "data: paths='a.txt': expected a list of str",
        "optimizer: lr='high': expected float",
        "train: micro_batch_size=True: expected int",
        "train: seed='zero': expected int",
        "train: dtype='fp8': expected one of 'fp32', 'bf16', 'fp16'",
    ]


def test_total_steps_rescales_and_save_every_sets_the_interval():
    job = resolve_job({}, total_steps=60, save_every=7)
    assert job.schedule.total == 60 and job.schedule.warmup == 6 and job.checkpoint.every_steps == 7
    (ms,) = job.schedule.milestones_info
    assert (ms.at, ms.decay_length, ms.pre_decay) == (60, 12, 48), "the 20% decay scales with the run"
    assert job.schedule == JobConfig().schedule.rescaled(60)
    assert json.loads(json.dumps(job.to_dict()))["schedule"]["total"] == 60
