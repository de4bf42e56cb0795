"""Every entry point on an s3:// location, against the moto server (the ``s3_server`` fixture): the main job with no
staging folder (checkpoints streamed to the bucket, a preempted job resumed in place from the bucket into an empty
log folder, exactly as the uninterrupted run), ``write_mode: rank0`` on the bucket, and the checkpoint tools and
workflow commands given URLs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_object_storage import _job, _step

from integration_helpers import preempted_at
from wsd_pretrain.checkpoint import objstore, storage
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.checkpoint.storage import parse_location, store_for
from wsd_pretrain.cli import main as cli
from wsd_pretrain.errors import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["train.progress=false", "train.eval_every=8", "train.eval_batches=2", "data.max_bytes=1000000"]


def _bucket_json_lines(url: str, name: str) -> list[dict]:
    loc = parse_location(url)
    raw, _ = store_for(loc).get((loc / name).key)
    return [json.loads(line) for line in raw.decode().splitlines()]


def _checksums(url: str, name: str) -> dict[str, str]:
    loc = parse_location(url) / "checkpoints" / name
    m, _, _ = objstore.load_manifest(store_for(loc), loc)
    return {rel: rec["hash"] for rel, rec in m["files"].items()}


def test_main_job_on_s3_without_staging(s3_server, tmp_path, monkeypatch):
    """`wsd-pretrain train --run-dir s3://...` with no staging folder (in this process: one rank): checkpoints are
    streamed to the bucket; a job preempted at update 4 is run again with an empty log folder, resumes from the
    bucket and ends bitwise where the uninterrupted run ends, with the pre-decay and post-decay checkpoints on the
    bucket and the run's config and metrics (each update once) beside them."""
    from wsd_pretrain import train

    monkeypatch.chdir(ROOT)  # the stdlib corpus and relative paths as a user's shell has them
    bucket = s3_server.bucket()
    straight, victim = f"s3://{bucket}/runs/straight", f"s3://{bucket}/runs/victim"
    args = ["--total-steps", "8", *QUICK]
    done = train.run(["--run-dir", straight, "--log-dir", str(tmp_path / "logs-straight"), *args])
    assert done["position"] == 8 and not done["preempted"]

    with preempted_at(4):
        stopped = train.run(["--run-dir", victim, "--log-dir", str(tmp_path / "logs-a"), *args])
    assert stopped["preempted"] and stopped["position"] == 4
    fresh = tmp_path / "logs-b"  # another machine: nothing local but the command
    resumed = train.run(["--run-dir", victim, "--log-dir", str(fresh), *args, "tracking.tensorboard=true"])
    assert resumed["position"] == 8 and not resumed["preempted"]

    final = "step-000000008-post-decay+final"
    names = [i.name for i in objstore.list_run(parse_location(victim)) if i.state == "complete"]
    assert names == ["step-000000004-preempt", "step-000000007-pre-decay", final], names
    # weights, optimizer, trainer, data and RNG state: every object's checksum equals the uninterrupted run's
    assert _checksums(victim, final) == _checksums(straight, final)
    losses = {m["step"]: m["loss"] for m in _bucket_json_lines(straight, "metrics.jsonl") if "loss" in m}
    got = [(m["step"], m["loss"]) for m in _bucket_json_lines(victim, "metrics.jsonl") if "loss" in m]
    assert [s for s, _ in got] == list(range(1, 9)), "each update once: the bucket's metrics were continued"
    assert dict(got) == losses and resumed["loss"] == done["loss"]
    assert (fresh / "metrics.jsonl").is_file() and (fresh / "config.yaml").is_file()
    assert any((fresh / "tensorboard").iterdir()), "TensorBoard beside the metrics, checkpoints logged from the bucket"
    loc = parse_location(victim)
    assert store_for(loc).head((loc / "config.yaml").key) is not None
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()
    assert cli(["ckpt", "verify", victim]) == 0
    # a cooldown branch from the bucket's stable checkpoint into a new run on the bucket (read in place)
    cool = f"s3://{bucket}/runs/cool"
    stable = f"{victim}/checkpoints/step-000000004-preempt"
    cooldown = ["--cooldown-from", stable, "--cooldown-steps", "2"]
    branch = train.run(["--run-dir", cool, "--log-dir", str(tmp_path / "logs-cool"), *cooldown, *QUICK])
    assert branch["position"] == 6
    lrs = [m["lr"] for m in _bucket_json_lines(cool, "metrics.jsonl") if "loss" in m]
    assert len(lrs) == 2 and lrs[0] > lrs[1] == 0.0
    names = [i.name for i in objstore.list_run(parse_location(cool)) if i.state == "complete"]
    assert names == ["step-000000006-post-decay+final"], names


def test_write_mode_rank0_on_s3(s3_server, tmp_path):
    """``write_mode: rank0`` on an s3:// run with no staging folder: rank 0 streams every object to the bucket; a
    new job resumes through rank 0's verified download of the checkpoint (not the in-place read) and continues
    exactly like the uninterrupted job."""
    url = f"s3://{s3_server.bucket()}/runs/rank0"
    cfg = CheckpointConfig(write_mode="rank0", max_shard_size=60_000)
    straight = _job()
    while not straight[2].finished:
        _step(*straight)
    model, opt, sched = _job()
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    while sched.position < 4:  # the pre-decay checkpoint at 4
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.close()
    names = [(i.name, i.state) for i in objstore.list_run(parse_location(url))]
    assert names == [("step-000000004-pre-decay", "complete")], names
    assert cli(["ckpt", "verify", url]) == 0
    model2, opt2, sched2 = _job(seed=1)
    mgr2 = CheckpointManager(url, model2, opt2, sched2, config=cfg)
    assert mgr2.resume("auto") and sched2.position == 4
    local = Path(mgr2.run_dir) / "checkpoints" / "step-000000004-pre-decay"
    assert (local / "manifest.json").is_file(), "rank 0 read a verified local copy"
    while not sched2.finished:
        _step(model2, opt2, sched2)
        mgr2.maybe_save()
    mgr2.close()
    for a, b in zip(straight[0].state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    names = [i.name for i in objstore.list_run(parse_location(url)) if i.state == "complete"]
    assert names[-1] == "step-000000006-post-decay+final", names
    shutil.rmtree(mgr2.run_dir)  # the node-local cache folder (storage.cache_dir) under the system's temp folder


def test_hf_trainer_on_s3(s3_server, tmp_path, monkeypatch):
    """The Hugging Face Trainer (real, on CPU) with ``WSDTrainerCallback("s3://...")``: its checkpoints are committed
    on the bucket; a Trainer stopped two updates after the pre-decay checkpoint is resumed on a "new machine" with
    ``resume_from_checkpoint=last_checkpoint(url)`` (a verified download of the files the Trainer reads: the model
    folder and trainer_state.json, no training state; the manager reads that in place from the bucket) and ends bit
    for bit where the uninterrupted Trainer ends; the final checkpoint's folder loads with ``from_pretrained``."""
    transformers = pytest.importorskip("transformers")
    import importlib.util

    from transformers import Trainer, TrainerCallback

    from wsd_pretrain.integrations.hf import WSDTrainerCallback, last_checkpoint, wsd_scheduler

    spec = importlib.util.spec_from_file_location("hf_example", ROOT / "docs" / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # the documented example's arguments, model and data

    class StopAt(TrainerCallback):  # the job dies here: nothing saved after the pre-decay checkpoint
        def __init__(self, step: int) -> None:
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    def fit(url: str, out: str, *, stop: int | None = None, resume: str | None = None) -> WSDTrainerCallback:
        args = example.training_args(str(tmp_path / out), 24)
        model = example.tiny_llama(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
        callback = WSDTrainerCallback(url)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=example.RandomTokens(40, 16, 128),
            optimizers=(optimizer, wsd_scheduler(optimizer, args, decay_fraction=0.25)),
            callbacks=[callback, *([StopAt(stop)] if stop else [])],
        )
        trainer.train(resume_from_checkpoint=last_checkpoint(url, training_state=resume) if resume else None)
        return callback

    bucket = s3_server.bucket()
    ref, cut = f"s3://{bucket}/hf/ref", f"s3://{bucket}/hf/cut"
    pre, post = "step-000000018-pre-decay", "step-000000024-post-decay+final"
    fit(ref, "ref")
    fit(cut, "cut", stop=20)
    assert [i.name for i in objstore.list_run(parse_location(cut)) if i.state == "complete"] == [pre]
    gets: list[tuple[str, int]] = []  # (key, bytes) of every ranged GET of the resume
    real_get_range = storage.S3Store.get_range

    def counted(self, key, start, length):
        data = real_get_range(self, key, start, length)
        gets.append((key, len(data)))
        return data

    monkeypatch.setattr(storage.S3Store, "get_range", counted)
    resumed = fit(cut, "cut2", resume="bucket")
    monkeypatch.undo()
    assert resumed.ckpt.resumed_from.name == pre
    # the node-local folder the Trainer read holds its files only: the model folder and trainer_state.json, never
    # the training state; it is no checkpoint (no manifest), so nothing lists or resumes it as one
    cache = Path(storage.cache_dir(parse_location(cut)))
    folder = cache / "hf-resume" / pre
    held = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    ckpt_url = parse_location(cut) / "checkpoints" / pre
    manifest, _, _ = objstore.load_manifest(store_for(ckpt_url), ckpt_url)
    state_files = sorted(rel for rel in manifest["files"] if rel.startswith("train_state/"))
    tensors = [rel for rel in state_files if rel.endswith(".safetensors")]  # the optimizer state (and master weights)
    assert tensors, state_files
    assert held == sorted([*(set(manifest["files"]) - set(state_files)), "trainer_state.json", "wsd-hf-resume.json"])
    assert not (cache / "checkpoints").exists(), "no local copy of the checkpoint"
    assert cli(["ckpt", "verify", str(folder)]) != 0
    # the training state was read from the bucket, in place: every optimizer file's bytes by ranged GETs
    read = {}
    for key, n in gets:
        read[key] = read.get(key, 0) + n
    for rel in tensors:
        assert read.get((ckpt_url / rel).key, 0) > 0, (rel, sorted(read))
    assert resumed.manager.loaded_from == cache / "checkpoints" / pre
    shutil.rmtree(cache, ignore_errors=True)
    for run in (ref, cut):
        assert [i.name for i in objstore.list_run(parse_location(run)) if i.state == "complete"] == [pre, post]
    # weights, optimizer state, scheduler, Trainer counters and RNG: the same bits as the uninterrupted Trainer
    assert _checksums(cut, post) == _checksums(ref, post)
    folder = last_checkpoint(cut, local_dir=tmp_path / "node3")
    assert folder is not None and Path(folder).name == post
    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    assert json.loads((Path(folder) / "trainer_state.json").read_text())["global_step"] == 24
    # training_state="node": the whole checkpoint on the node (a verified local checkpoint), which the manager reads
    # from disk: no ranged GET
    whole = last_checkpoint(cut, training_state="node")
    assert whole == str(cache / "checkpoints" / post) and cli(["ckpt", "verify", whole]) == 0
    gets.clear()
    monkeypatch.setattr(storage.S3Store, "get_range", counted)
    again = fit(cut, "cut3", resume="node")  # the copy is reused (same manifest), the manager reads it
    monkeypatch.undo()
    assert again.manager.loaded_from == Path(whole) and gets == []
    shutil.rmtree(cache, ignore_errors=True)
    assert isinstance(model, transformers.LlamaForCausalLM)


def _hf_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_example", ROOT / "docs" / "examples" / "hf_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)  # the documented example's arguments, model and data
    return example


def _hf_two_ranks(rank: int, world: int, bucket: str, tmp: str) -> dict:
    """One rank of test_hf_trainer_on_s3_two_ranks: a real Trainer (DDP on gloo) on the bucket."""
    from transformers import Trainer, TrainerCallback

    from wsd_pretrain.integrations import hf

    example = _hf_example()

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 7:  # the job dies one update after the pre-decay checkpoint at 6
                control.should_training_stop = True

    def fit(url: str, out: str, *, stop: bool = False, resume: str | None = None) -> hf.WSDTrainerCallback:
        args = example.training_args(f"{tmp}/{out}", 8)
        model = example.tiny_llama(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
        callback = hf.WSDTrainerCallback(url)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=example.RandomTokens(40, 16, 128),
            optimizers=(optimizer, hf.wsd_scheduler(optimizer, args, decay_fraction=0.25)),
            callbacks=[callback, *([StopAt()] if stop else [])],
        )
        trainer.train(resume_from_checkpoint=resume)
        return callback

    ref, cut = f"s3://{bucket}/hf2/ref", f"s3://{bucket}/hf2/cut"
    fit(ref, "ref")
    fit(cut, "cut", stop=True)
    real_list = objstore.list_run
    if rank == 1:  # rank 1's listing is stale (sees nothing): the decision is rank 0's, so it resumes all the same
        objstore.list_run = lambda *a, **k: []
    try:
        folder = hf.last_checkpoint(cut, training_state="bucket")
    finally:
        objstore.list_run = real_list
    resumed = fit(cut, "cut2", resume=folder)
    out = {
        "folder": folder,
        "resumed_from": resumed.ckpt.resumed_from.name,
        "local": sorted(os.listdir(folder)),
        # the default with two ranks on this node: the whole checkpoint downloaded once for both (a local checkpoint)
        "auto": hf.last_checkpoint(cut),
    }
    if rank == 0:  # rank 0 cannot list the bucket: every rank raises rank 0's error, none waits for the others

        def broken(*a, **k):
            raise OSError("injected listing failure")

        objstore.list_run = broken
    try:
        hf.last_checkpoint(cut)
        out["error"] = None
    except CheckpointError as exc:
        out["error"] = str(exc)
    finally:
        objstore.list_run = real_list
    return out


def test_hf_trainer_on_s3_two_ranks(s3_server, tmp_path):
    """Two ranks of a real Trainer (DDP, gloo) on the bucket: ``last_checkpoint(url)`` is decided once, by rank 0
    (rank 1, whose listing is made stale, resumes the same checkpoint), both ranks resume in place from the one
    node-local folder of the Trainer's files and end bit for bit where the uninterrupted 2-rank run ends; a listing
    that fails on rank 0 alone raises the same error on both ranks instead of leaving rank 1 in a collective."""
    pytest.importorskip("transformers")
    from distributed_helpers import run_distributed

    bucket = s3_server.bucket()
    env = s3_server.environ() | {"TMPDIR": str(tmp_path)}  # the node-local cache (storage.cache_dir) goes there
    results = run_distributed(_hf_two_ranks, world_size=2, args=(bucket, str(tmp_path)), env=env)
    pre, post = "step-000000006-pre-decay", "step-000000008-post-decay+final"
    assert results[0]["folder"] == results[1]["folder"] and Path(results[0]["folder"]).name == pre
    for r in results:
        assert r["resumed_from"] == pre
        assert "train_state" not in r["local"] and "manifest.json" not in r["local"], r["local"]
        assert r["error"] and "injected listing failure" in r["error"]
    assert results[0]["error"] == results[1]["error"]
    auto = results[0]["auto"]
    assert auto == results[1]["auto"] and Path(auto).parent.name == "checkpoints" and Path(auto).name == post
    assert (Path(auto) / "manifest.json").is_file() and (Path(auto) / "train_state").is_dir()
    assert _checksums(f"s3://{bucket}/hf2/cut", post) == _checksums(f"s3://{bucket}/hf2/ref", post)


def test_ckpt_commands_write_to_and_read_from_urls(s3_server, tmp_path, capsys):
    """The `wsd-pretrain ckpt` commands that were local-only, on a run saved to the bucket (with snapshots):
    reshard into the bucket (committed there: it lists, verifies and resumes exactly), export-hf into an empty prefix
    (refused when not empty), merge from URLs (--last K of the bucket's snapshots, and named checkpoints) into the
    bucket, to-dcp from a URL, from-deepspeed's refusal of a URL input."""
    from test_object_storage import CFG

    bucket = s3_server.bucket()
    run = f"s3://{bucket}/runs/tools"
    model, opt, sched = _job()
    cfg = CheckpointConfig(snapshot_every=1, max_shard_size=60_000)
    mgr = CheckpointManager(run, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    while not sched.finished:
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.close()
    pre, post = f"{run}/checkpoints/step-000000004-pre-decay", f"{run}/checkpoints/step-000000006-post-decay+final"
    snaps = [i.name for i in objstore.list_run(parse_location(run), snapshots=True) if i.state == "complete"]
    assert len(snaps) >= 2, snaps
    capsys.readouterr()

    # reshard from the bucket into the bucket: a committed checkpoint of another run that resumes exactly
    moved = f"s3://{bucket}/runs/resharded/checkpoints/step-000000006-post-decay+final"
    assert cli(["ckpt", "reshard", post, moved, "--max-shard-size", "30000"]) == 0
    assert cli(["ckpt", "verify", moved]) == 0
    assert cli(["ckpt", "reshard", post, moved]) == 2  # the name is taken: refused before any work
    assert cli(["ckpt", "reshard", post, f"s3://{bucket}/loose"]) == 2  # not <run>/checkpoints/<name>
    assert "checkpoints/NAME" in capsys.readouterr().err
    model2, opt2, sched2 = _job(seed=1)
    mgr2 = CheckpointManager(f"s3://{bucket}/runs/resharded", model2, opt2, sched2)
    assert mgr2.resume("auto") and sched2.position == 6
    mgr2.close()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    # export-hf and merge into the bucket; merge reads its inputs from URLs
    hf = f"s3://{bucket}/hf/final"
    assert cli(["ckpt", "export-hf", run, hf]) == 0
    assert cli(["ckpt", "export-hf", run, hf]) == 2  # not empty: refused
    merged = f"s3://{bucket}/hf/merged"
    assert cli(["ckpt", "merge", run, "--last", "2", "--coefficients", "uniform", "--out", merged]) == 0
    local_merge = tmp_path / "merged-local"
    assert cli(["ckpt", "merge", pre, post, "--coefficients", "uniform", "--out", str(local_merge)]) == 0
    assert cli(["ckpt", "cp", pre, str(tmp_path / "back")]) == 0
    assert cli(["ckpt", "to-dcp", pre, str(tmp_path / "dcp")]) == 0
    assert (tmp_path / "dcp" / ".metadata").is_file()
    with pytest.raises(SystemExit):  # a DeepSpeed folder is read locally only: argparse says to copy it first
        cli(["ckpt", "from-deepspeed", pre, str(tmp_path / "ds")])
    capsys.readouterr()
    store = store_for(parse_location(hf))
    for prefix, folder in ((hf, tmp_path / "hf-down"), (merged, tmp_path / "merged-down")):
        loc = parse_location(prefix)
        objects, _ = store.list(loc.prefix)
        assert any(o["key"].endswith("config.json") for o in objects)
        for o in objects:
            dest = folder / o["key"][len(loc.prefix) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get(o["key"])[0])
    from transformers import LlamaForCausalLM

    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf-down")
    key = "model.embed_tokens.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    LlamaForCausalLM.from_pretrained(tmp_path / "merged-down")
    info = json.loads((tmp_path / "merged-down" / "wsd_pretrain_merge.json").read_text())
    assert [r["name"] for r in info["inputs"]] == snaps[-2:]
