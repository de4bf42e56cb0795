"""Meta-device initialisation (wsd_pretrain/init.py, ``LlamaLM.init_weights``, the FSDP2 engine's build): every
layout starts from the same bits as the whole model in one process, and a rank allocates only its share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_helpers import run_distributed
from wsd_pretrain.init import philox4x32, standard_normal_box, tensor_key
from wsd_pretrain.model import LlamaLM, ModelConfig

SMALL = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2)


def test_philox_matches_the_random123_known_answers():
    def words(*values):
        return [torch.tensor([v], dtype=torch.int64) for v in values]

    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in philox4x32(words(*counter), key)) == expected


def test_a_box_is_the_slice_of_the_whole_tensor_bit_for_bit_and_the_draws_are_normal():
    key = tensor_key(1234, "model.layers.0.mlp.up_proj.weight")
    whole = standard_normal_box(key, (300, 257), (0, 0), (300, 257), torch.device("cpu"))
    # odd boxes: a row, a column, a corner (where a vectorised loop's scalar tail falls differs in each)
    for offset, shape in (((0, 0), (300, 257)), ((17, 3), (1, 250)), ((0, 256), (300, 1)), ((151, 129), (149, 128))):
        box = standard_normal_box(key, (300, 257), offset, shape, torch.device("cpu"))
        assert torch.equal(box, whole[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]])
    assert abs(float(whole.mean())) < 0.02 and abs(float(whole.std()) - 1) < 0.02
    assert 0.03 < float((whole.abs() > 2).double().mean()) < 0.06  # 4.55% beyond 2 sigma
    other = standard_normal_box(
        tensor_key(1235, "model.layers.0.mlp.up_proj.weight"), (300, 257), (0, 0), (3, 3), "cpu"
    )
    assert not torch.equal(other, whole[:3, :3]), "another seed, other weights"


def test_a_model_built_on_meta_and_initialised_in_place_equals_the_eager_build():
    eager = LlamaLM(SMALL, seed=7)
    with torch.device("meta"):
        lazy = LlamaLM(SMALL, seed=7)
    assert lazy.lm_head.weight.is_meta
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    for (name, a), (_, b) in zip(eager.state_dict().items(), lazy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(eager.inv_freq, lazy.inv_freq), "the rotary table is recomputed after to_empty"
    std = float(eager.model.layers[0].mlp.up_proj.weight.detach().std())
    assert 0.018 < std < 0.022 and float(eager.model.layers[1].mlp.down_proj.weight.detach().std()) < std / 2
    # without a seed the model is torch's global generator's choice, as before
    torch.manual_seed(0)
    a = LlamaLM(SMALL)
    torch.manual_seed(0)
    b = LlamaLM(SMALL)
    torch.manual_seed(1)
    c = LlamaLM(SMALL)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_a_70b_wide_model_is_built_on_meta_without_drawing_anything():
    """The FSDP2 engine's first step at 70B's width (4 of its 80 layers, to keep the test fast): shapes only, no
    storage, and the constructor draws nothing (init_weights runs after to_empty)."""
    import yaml

    recipe = Path(__file__).resolve().parent.parent / "configs/llama_70b_tp8.yaml"
    cfg = ModelConfig(**{**yaml.safe_load(recipe.read_text())["model"], "num_layers": 4})
    with torch.device("meta"):
        big = LlamaLM(cfg, seed=0)
    assert all(p.is_meta for p in big.parameters()) and big.inv_freq.is_meta
    assert sum(p.numel() for p in big.parameters()) == cfg.num_parameters() > 4e9


def _full_params(built) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in built.module.named_parameters():
        out[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
    return out


def _four(rank: int, world: int) -> list[str]:
    """TP 2 x FSDP2 2 (FSDP2 over TP: strided shards) and PP 2 x FSDP2 2 against one process, gathered."""
    from wsd_pretrain.train import build_engine, resolve_job

    reference = LlamaLM(ModelConfig(), seed=0).state_dict()
    mismatch = []
    for label, parallel in (("tp2_dp2", {"tp": 2, "dp_shard": 2}), ("pp2_dp2", {"pp": 2, "dp_shard": 2})):
        job = resolve_job({"train": {"engine": "fsdp2", "micro_batch_size": 4}, "parallel": parallel})
        for name, value in _full_params(build_engine(job, job.schedule, torch.device("cpu"), 1)).items():
            if not torch.equal(value, reference[name]):
                mismatch.append(f"{label}: {name}")
    return mismatch


@pytest.mark.slow
@pytest.mark.distributed
def test_tp_and_pp_over_fsdp2_on_4_ranks_start_from_the_same_bits():
    """The default test's path on the 4-process configs' layouts (FSDP2's strided shards over TP's)."""
    assert run_distributed(_four, world_size=4, timeout=600) == [[], [], [], []]


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _layouts(rank: int, world: int) -> dict:
    """Build the tiny job on 2 ranks on each layout with the job's own build_engine; compare every parameter,
    gathered to full, with the whole model built in this process; then build a ~135 MB model with FSDP2 and
    measure the peak resident memory the build added."""
    import torch.distributed as dist

    from wsd_pretrain.train import build_engine, resolve_job

    reference = LlamaLM(ModelConfig(), seed=resolve_job({}).train.seed).state_dict()
    out: dict = {"mismatch": [], "names": {}}
    layouts = {
        "ddp": {"train": {"engine": "ddp"}},
        "fsdp2": {"train": {"engine": "fsdp2"}},
        "tp2": {"train": {"engine": "fsdp2"}, "parallel": {"tp": 2, "dp_shard": 1}},
        "pp2": {"train": {"engine": "fsdp2", "micro_batch_size": 4}, "parallel": {"pp": 2, "dp_shard": 1}},
    }
    for label, config in layouts.items():
        job = resolve_job(config)
        built = build_engine(job, job.schedule, torch.device("cpu"), tokens_per_step=1)
        full = _full_params(built)
        out["names"][label] = sorted(full)
        for name, value in full.items():
            if not torch.equal(value, reference[name]):
                out["mismatch"].append(f"{label}: {name}")
        dist.barrier()
    # memory: a model of ~135 MB of fp32 weights, mostly the embedding and the output layer, FSDP2 on 2 ranks
    big = {"vocab_size": 32768, "hidden_size": 512, "intermediate_size": 512, "num_layers": 1, "num_heads": 4}
    job = resolve_job({"train": {"engine": "fsdp2"}, "model": {**big, "num_kv_heads": 2}})
    out["model_bytes"] = job.model.num_parameters() * 4
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _rss_kb("VmRSS")
    built = build_engine(job, job.schedule, torch.device("cpu"), tokens_per_step=1)
    out["peak_added"] = (_rss_kb("VmHWM") - before) * 1024
    out["local_bytes"] = sum(p.to_local().numel() * 4 for p in built.module.parameters())
    return out


@pytest.mark.distributed
def test_every_layout_starts_from_the_same_bits_and_a_rank_allocates_its_share(tmp_path):
    """One process, DDP, FSDP2, TP 2 and PP 2 (FSDP2 engine: built on meta, cut, materialised) on 2 real ranks:
    every parameter gathered to full equals the whole model built in one process, bitwise, and on PP the stages'
    names are the whole model's. Building a ~135 MB model with FSDP2 adds about a rank's half to its peak
    resident memory, never the whole model (which the build before this allocated on every rank)."""
    results = run_distributed(_layouts, world_size=2, timeout=600)
    for r in results:
        assert r["mismatch"] == []
    whole = sorted(LlamaLM(ModelConfig(), seed=0).state_dict())
    for label in ("ddp", "fsdp2", "tp2"):
        assert results[0]["names"][label] == whole
    pp = results[0]["names"]["pp2"] + results[1]["names"]["pp2"]
    assert sorted(pp) == whole and len(pp) == len(whole), "the two stages hold the whole model, each name once"
    for r in results:
        share = r["local_bytes"]
        assert share == pytest.approx(r["model_bytes"] / 2, rel=0.01)
        # the rank's shards plus the drawing's temporaries and allocator slack; the whole model would be 135 MB more
        assert r["peak_added"] < share + 0.35 * r["model_bytes"], r
