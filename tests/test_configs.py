"""configs/: the tiny default equals the built-in defaults; the DeepSpeed configs and the 1B multi-node recipe are
valid (sizes, batch arithmetic, schedule), though the recipe cannot run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsd_pretrain import ConfigError, split_ds_config
from wsd_pretrain.config import load_config
from wsd_pretrain.train import JobConfig, resolve_job

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


@pytest.mark.parametrize("name", ["tiny_cpu_deepspeed.yaml", "tiny_cpu_branching.yaml"])
def test_other_configs_resolve(name):
    job = resolve_job(load_config(CONFIGS / name), config_dir=CONFIGS)
    assert job.schedule.total > 0


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


def test_total_steps_rescales_and_save_every_sets_the_interval():
    job = resolve_job({}, total_steps=60, save_every=7)
    assert job.schedule.total == 60 and job.schedule.warmup == 6 and job.checkpoint.every_steps == 7
    assert json.loads(json.dumps(job.to_dict()))["schedule"]["total"] == 60
