"""Checkpoint merging (WSM): the coefficients against their formulas, `ckpt merge` against an in-memory average of
the same weights (fp32 to the last bit, bf16 to its rounding) on format 1, format 2 and multi-rank sharded
checkpoints and snapshots, and model-only snapshots: their cadence, retention, and that they never break resume."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from distributed_helpers import run_distributed
from wsd_pretrain import CheckpointError, WSDSchedule
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint.merge import MAX_DECAY_POINTS, merge_checkpoints, merge_coefficients
from wsd_pretrain.cli import main as cli

DATA = Path(__file__).with_name("data")
SHAPES = ("1-sqrt", "linear", "cosine", "inverse")


# ---------------------------------------------------------------------------------------------- coefficients


def test_uniform_and_ema_coefficients_are_their_formulas():
    assert merge_coefficients([10, 20, 30, 40], "uniform") == [0.25] * 4
    a = 0.8
    c = merge_coefficients([1, 2, 5, 9, 10], "ema", ema_decay=a)
    # the recurrence m <- a m + (1 - a) theta_j from theta_0, on symbolic one-hot "weights"
    m = [1.0, 0.0, 0.0, 0.0, 0.0]
    for j in range(1, 5):
        m = [a * x for x in m]
        m[j] += 1 - a
    assert c == pytest.approx(m, abs=1e-15)
    assert c[0] == a**4 and c[4] == 1 - a
    assert math.fsum(c) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
def test_decay_coefficients_reproduce_the_schedules_decay(shape):
    """WSM's equivalence, checked through the schedule itself (not shapes.py): a decay over the window of the
    checkpoints at p_0 < ... < p_k, where each update of a segment moves the weights by the same vector, ends exactly
    where the merge of the stable checkpoints lands."""
    floor = 0.05 if shape == "inverse" else 0.0
    positions = [40, 44, 46, 52, 60]
    c = merge_coefficients(positions, "decay", shape=shape, min_lr_ratio=floor)
    assert math.fsum(c) == pytest.approx(1.0, abs=1e-12)
    assert all(x >= -1e-12 for x in c)  # a decreasing LR gives non-negative weights
    sched = WSDSchedule(total=60, decay_length=20, decay_shape=shape, min_lr_ratio=floor)
    assert sched.milestones_info[0].pre_decay == positions[0]
    gen = random.Random(0)
    segment_update = [gen.uniform(-1, 1) for _ in positions[1:]]  # one "update" per segment, per unit of LR
    theta0 = 0.3
    stable = [theta0]  # the stable run: every update at the full LR
    decayed = theta0  # the decayed run: each update scaled by the schedule's LR factor
    for j, (a, b) in enumerate(zip(positions, positions[1:])):
        stable.append(stable[-1] + (b - a) * segment_update[j])
        decayed += sum(sched.factor(q) for q in range(a, b)) * segment_update[j]
    merged = sum(cj * t for cj, t in zip(c, stable))
    assert merged == pytest.approx(decayed, abs=1e-12)


def test_decay_coefficients_over_token_positions_and_refusals():
    # positions in tokens: the mean runs over MAX_DECAY_POINTS evenly spaced points, close to the update-exact form
    steps = merge_coefficients([0, 10_000, 20_000, 40_000], "decay", shape="linear")
    tokens = merge_coefficients([0, 10 * 2**20, 20 * 2**20, 40 * 2**20], "decay", shape="linear")
    assert 40 * 2**20 > MAX_DECAY_POINTS
    assert tokens == pytest.approx(steps, abs=1e-4)
    assert merge_coefficients([7], "decay") == [1.0]
    with pytest.raises(CheckpointError, match="--min-lr-ratio"):
        merge_coefficients([0, 5], "decay", shape="inverse")
    with pytest.raises(CheckpointError, match=r"increasing positions.*uniform"):
        merge_coefficients([5, 5], "decay")
    with pytest.raises(CheckpointError, match="one of"):
        merge_coefficients([1, 2], "mean")


# ---------------------------------------------------------------------------------------------- a 2-rank run with snapshots


def _train_with_snapshots(rank, world, run_dir):
    from engines import build, full_state
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    model, opt, sched, step = build("fsdp2", WSDSchedule(total=10, decay_length=2), rank)
    config = CheckpointConfig(snapshot_every=1, snapshot_keep=4, max_shard_size=1500, async_save=True, every_steps=4)
    mgr = CheckpointManager(run_dir, model, opt, sched, config=config)
    states = {}
    i = 0
    while not sched.finished:
        step(i)
        i += 1
        before = len(mgr.snapshots)
        mgr.maybe_save()
        if len(mgr.snapshots) > before:  # the weights the snapshot holds, through the engine's own API
            state = {k.removesuffix(":model"): v for k, v in full_state(model, opt).items() if k.endswith(":model")}
            state["scale"] = model.scale.detach().float().cpu()
            states[sched.position] = {k: v.flatten().tolist() for k, v in state.items()}
    mgr.close()
    return states


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("snaprun")
    states = run_distributed(_train_with_snapshots, args=(str(run),), timeout=600)[0]
    return run, {int(k): v for k, v in states.items()}


def _v1(ckpt: Path, group: str = "model") -> dict[str, torch.Tensor]:
    """A version-1 fixture's tensors read with safetensors alone."""
    index = ckpt / (
        f"{group}.safetensors.index.json" if group == "model" else f"train_state/{group}.safetensors.index.json"
    )
    out = {}
    for name, fname in json.loads(index.read_text())["weight_map"].items():
        with safe_open(str(index.parent / fname), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _read(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for fname in sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(str(folder / fname), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _average(sources: list[dict[str, torch.Tensor]], coeffs: list[float], names) -> dict[str, torch.Tensor]:
    """The in-memory merge: fp32 accumulation from the oldest to the newest."""
    out = {}
    for name in names:
        acc = torch.zeros_like(sources[-1][name], dtype=torch.float32)
        for c, src in zip(coeffs, sources):
            acc.add_(src[name].to(torch.float32), alpha=c)
        out[name] = acc
    return out


@pytest.mark.distributed
def test_snapshots_cadence_retention_and_resume(snapshot_run, tmp_path):
    run, states = snapshot_run
    snaps = F.list_snapshots(run)
    # every stable update makes one (positions 1..8; 9 and 10 are the decay); the newest 4 are kept
    assert sorted(states) == list(range(1, 9))
    assert [s.position for s in snaps] == [5, 6, 7, 8] and all(s.state == "complete" for s in snaps)
    ckpts = F.list_checkpoints(run)
    assert [c.name for c in ckpts] == [
        "step-000000004-periodic",
        "step-000000008-pre-decay+periodic",
        "step-000000010-post-decay+final",
    ]
    snap = snaps[-1].path
    m = F.load_manifest(snap)
    assert m["kinds"] == ["snapshot"] and set(m["groups"]) == {"model"} and m["state"] is None
    assert not any(rel.startswith("train_state/rng") for rel in m["files"])
    assert len({rec["rank"] for rec in m["files"].values()}) == 2  # shards written by both ranks
    # tools understand snapshots
    assert cli(["ckpt", "verify", str(snap)]) == 0
    assert cli(["ckpt", "list", str(run), "--json"]) == 0
    # resume takes the newest full checkpoint; a snapshot is refused with the reason and the alternative
    from engines import build
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    model, opt, sched, _ = build("torch", WSDSchedule(total=10, decay_length=2))
    mgr = CheckpointManager(run, model, opt, sched)
    try:
        assert mgr.resume("auto") and sched.position == 10
        with pytest.raises(CheckpointError, match=r"model-only snapshot.*ckpt merge"):
            mgr.load(snap)
    finally:
        mgr.close()


@pytest.mark.distributed
def test_merge_is_the_in_memory_average_on_every_format(snapshot_run, tmp_path):
    run, states = snapshot_run
    snaps = {s.position: s.path for s in F.list_snapshots(run)}
    mem = {p: {k: torch.tensor(v) for k, v in s.items()} for p, s in states.items()}
    v1 = _v1(DATA / "v1-ddp")  # format 1, position 3
    shapes = {k: t.shape for k, t in v1.items()}
    mem = {p: {k: v.view(shapes[k]) for k, v in s.items()} for p, s in mem.items()}

    # fp32, to the last bit: format 1, a full format-2 checkpoint and format-2 snapshots written by two FSDP2 ranks
    # in several shards, decay coefficients
    full = run / "checkpoints" / "step-000000004-periodic"
    inputs = [DATA / "v1-ddp", full, snaps[5], snaps[6], snaps[7], snaps[8]]
    out = merge_checkpoints(list(reversed(inputs)), tmp_path / "fp32", coefficients="decay", shape="1-sqrt")
    coeffs = merge_coefficients([3, 4, 5, 6, 7, 8], "decay", shape="1-sqrt")
    info = json.loads((out / "wsd_pretrain_merge.json").read_text())
    assert [r["position"] for r in info["inputs"]] == [3, 4, 5, 6, 7, 8]  # by position, whatever the order given
    assert [r["coefficient"] for r in info["inputs"]] == coeffs
    got = _read(out)
    want = _average([v1, mem[4], mem[5], mem[6], mem[7], mem[8]], coeffs, v1)
    assert set(got) == set(v1)
    for name in v1:
        assert got[name].dtype == torch.float32 and torch.equal(got[name], want[name]), name

    # bf16 inputs and output: format 1 written by DeepSpeed in bf16 + fp32 snapshots, uniform, cast at the end
    bf = _v1(DATA / "v1-ds2-bf16")
    out = merge_checkpoints([DATA / "v1-ds2-bf16", snaps[6], snaps[8]], tmp_path / "bf16", dtype="bf16")
    got = _read(out)
    want = _average([bf, mem[6], mem[8]], [1 / 3] * 3, bf)
    for name in bf:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name].to(torch.bfloat16)), name
        exact = (bf[name].double() + mem[6][name].double() + mem[8][name].double()) / 3
        ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)  # bf16 spacing at each value
        assert ((got[name].double() - exact).abs() <= 0.5 * ulp + 1e-6 * exact.abs() + 1e-30).all(), name

    # the fp32 master weights of a format-1 checkpoint (--source master), EMA coefficients
    master = _v1(DATA / "v1-ds2-bf16", "master")
    out = merge_checkpoints(
        [DATA / "v1-ds2-bf16", snaps[7], snaps[8]],
        tmp_path / "master",
        coefficients="ema",
        ema_decay=0.5,
        source="master",
        dtype="fp32",
    )
    got = _read(out)
    src = {**bf, **master}
    want = _average([src, mem[7], mem[8]], [0.25, 0.25, 0.5], bf)
    for name in bf:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.distributed
def test_merge_cli_and_its_refusals(snapshot_run, tmp_path, capsys):
    run, _ = snapshot_run
    snaps = [s.path for s in F.list_snapshots(run)]
    out = tmp_path / "merged"
    assert cli(["ckpt", "merge", str(run), "--last", "3", "--out", str(out), "--shape", "linear"]) == 0
    text = capsys.readouterr().out
    assert "step-000000006-snapshot" in text and "step-000000005-snapshot" not in text and "written to" in text
    info = json.loads((out / "wsd_pretrain_merge.json").read_text())
    assert [r["coefficient"] for r in info["inputs"]] == merge_coefficients([6, 7, 8], "decay", shape="linear")
    # a non-empty output, an output inside an input, a floorless inverse decay, a checkpoint given twice
    assert cli(["ckpt", "merge", str(snaps[0]), str(snaps[1]), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["ckpt", "merge", str(snaps[0]), "--out", str(snaps[0] / "merged")]) == 2
    assert "inside the input checkpoint" in capsys.readouterr().err
    assert not (snaps[0] / "merged").exists()
    assert cli(["ckpt", "merge", *map(str, snaps[:2]), "--out", str(tmp_path / "x"), "--shape", "inverse"]) == 2
    assert "--min-lr-ratio" in capsys.readouterr().err
    assert cli(["ckpt", "merge", str(snaps[0]), str(snaps[0]), "--out", str(tmp_path / "y")]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    # checkpoints of another model (same names, other shapes): refused, naming the tensor and both checkpoints
    from engines import TinyLM
    from wsd_pretrain import WSDScheduler
    from wsd_pretrain.checkpoint.manager import CheckpointManager

    other = TinyLM(dim=8)
    opt = torch.optim.AdamW(other.parameters())
    mgr = CheckpointManager(tmp_path / "other", other, opt, WSDScheduler(opt, WSDSchedule(total=4, decay_length=1)))
    small = mgr.save(["periodic"])
    mgr.close()
    assert (
        cli(["ckpt", "merge", str(small), str(snaps[0]), "--out", str(tmp_path / "z"), "--coefficients", "uniform"])
        == 2
    )
    err = capsys.readouterr().err
    assert "other models" in err and "blocks.0.0.bias" in err
    assert not (tmp_path / "z").exists()


def test_a_snapshot_replayed_after_a_resume_replaces_the_old_one(tmp_path):
    """A run killed after a snapshot resumes from an older checkpoint: the replayed snapshots are written again
    (replacing the ones the killed run wrote), and nothing else is touched."""
    from engines import build
    from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager

    config = CheckpointConfig(snapshot_every=1, snapshot_keep=10, every_steps=4, at_end=False)
    model, opt, sched, step = build("torch", WSDSchedule(total=10, decay_length=2))
    mgr = CheckpointManager(tmp_path, model, opt, sched, config=config)
    for i in range(6):
        step(i)
        mgr.maybe_save()
    mgr.close()  # as if killed after the snapshot at 6: the newest full checkpoint is at 4
    before = {s.position: s.manifest["created"] for s in F.list_snapshots(tmp_path)}
    assert sorted(before) == [1, 2, 3, 4, 5, 6]
    model, opt, sched, step = build("torch", WSDSchedule(total=10, decay_length=2))
    mgr = CheckpointManager(tmp_path, model, opt, sched, config=config)
    try:
        assert mgr.resume("auto") and sched.position == 4
        for i in range(4, 7):
            step(i)
            mgr.maybe_save()
    finally:
        mgr.close()
    snaps = F.list_snapshots(tmp_path)
    assert [s.position for s in snaps] == [1, 2, 3, 4, 5, 6, 7] and all(s.state == "complete" for s in snaps)
    assert [c.name for c in F.list_checkpoints(tmp_path)] == ["step-000000004-periodic"]
    assert not [p for p in (tmp_path / "snapshots").iterdir() if p.name.startswith(".")]


@pytest.mark.distributed
def test_the_main_job_merges_at_each_milestone_instead_of_decaying(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    args = [
        "wsm.enabled=true",
        "wsm.window=4",
        "checkpoint.snapshot_every=2",
        "checkpoint.snapshot_keep=3",
        "schedule.total=20",
        "schedule.warmup=2",
        "schedule.milestones=[10,20]",
        "train.progress=false",
        "train.eval_every=10",
        "train.eval_batches=1",
        "train.micro_batch_size=4",
        "data.max_bytes=200000",
        "data.seq_len=32",
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.intermediate_size=64",
    ]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "wsd_pretrain.train", "--run-dir", str(run)]
    # a wsm job without snapshots, or whose window retention would delete, is refused when the config is read
    from wsd_pretrain.config import apply_overrides
    from wsd_pretrain.errors import ConfigError
    from wsd_pretrain.train import resolve_job

    with pytest.raises(ConfigError, match=r"needs checkpoint\.snapshot_every"):
        resolve_job(apply_overrides({}, args[:1]))
    with pytest.raises(ConfigError, match="set snapshot_keep >= 3"):
        resolve_job(apply_overrides({}, [*args[:3], "checkpoint.snapshot_keep=2", *args[4:7]]))
    res = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert len(lrs) == 20 and set(lrs[2:]) == {3e-3}, "training stays at the stable LR"
    assert [m["merged"] for m in metrics if "merged" in m] == ["merged/step-000000010-wsm", "merged/step-000000020-wsm"]
    assert [c.name for c in F.list_checkpoints(run)] == ["step-000000020-final"]
    assert [s.position for s in F.list_snapshots(run)] == [16, 18, 20]
    first = json.loads((run / "merged/step-000000010-wsm/wsd_pretrain_merge.json").read_text())
    assert [r["position"] for r in first["inputs"]] == [6, 8, 10]
    assert [r["coefficient"] for r in first["inputs"]] == merge_coefficients([6, 8, 10], "decay", shape="1-sqrt")
    # the last merge is the average of the snapshots on disk, to the last bit, and loads with transformers
    out = run / "merged/step-000000020-wsm"
    coeffs = merge_coefficients([16, 18, 20], "decay", shape="1-sqrt")
    snaps = [_read(s.path) for s in F.list_snapshots(run)]
    got = _read(out)
    want = _average(snaps, coeffs, snaps[-1])
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.norm.weight"], got["model.norm.weight"])
