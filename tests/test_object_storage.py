"""Checkpoint locations that are URLs (storage.py) and checkpoints on S3 (objstore.py, `wsd-pretrain ckpt cp`),
against a real S3 server (moto's, on 127.0.0.1: the ``s3_server`` fixture): the manager on an s3:// run on 1 and 2
gloo ranks (with no staging folder each rank streams its files straight to the bucket; with one each rank
uploads its own files; rank 0 commits after every rank reported; a resume reading in place from the bucket, FSDP2
on 2 ranks fetching only its ranges and its verification share), the lease, the Lightning integration, the tools.
The main job with no staging folder is in tests/test_object_storage_urls.py; a collapsed URL is refused
everywhere (never a local ./s3:/ tree)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from wsd_pretrain import WSDSchedule, WSDScheduler
from wsd_pretrain.checkpoint import format as F
from wsd_pretrain.checkpoint import objstore, objstore_tier, storage, tools
from wsd_pretrain.checkpoint.manager import CheckpointConfig, CheckpointManager
from wsd_pretrain.checkpoint.storage import ObjectURL, parse_location
from wsd_pretrain.cli import main as cli
from wsd_pretrain.errors import CheckpointError, ConfigError
from wsd_pretrain.model import LlamaLM, ModelConfig

CFG = ModelConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def _job(seed: int = 0) -> tuple[LlamaLM, torch.optim.Optimizer, WSDScheduler]:
    torch.manual_seed(seed)
    model = LlamaLM(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, WSDScheduler(opt, WSDSchedule(total=6, decay_length=2))


def _step(model, opt, sched) -> None:
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(sched.position))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    opt.zero_grad()
    sched.step()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with two committed checkpoints (pre-decay at 4, post-decay+final at 6)."""
    run = tmp_path_factory.mktemp("run")
    model, opt, sched = _job()
    mgr = CheckpointManager(
        run, model, opt, sched, config=CheckpointConfig(max_shard_size=60_000), hf_config=CFG.hf_config()
    )
    while not sched.finished:
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.close()
    return run


def test_locations(tmp_path, monkeypatch):
    """Plain paths and file:// stay local; s3:// is a URL; bad Azure containers, other schemes, bad buckets, '..'
    and a URL a Path() collapsed are refused, saying what to give, by the manager too: no ./s3:/ tree appears."""
    assert parse_location("runs/a") == Path("runs/a")
    assert parse_location(Path("/x/y")) == Path("/x/y")
    assert parse_location("file:///data/runs/a") == Path("/data/runs/a")
    assert parse_location("file://localhost/data/r%20a") == Path("/data/r a")
    url = parse_location("s3://ckpt/runs/a/")
    assert url == ObjectURL("s3", "ckpt", "runs/a") and str(url / "checkpoints") == "s3://ckpt/runs/a/checkpoints"
    for bad, says in (
        ("az://Container_A/runs/a", "Azure container name"),
        ("gs://bucket/a", "unsupported scheme"),
        ("s3://x/a", "bucket"),
        ("s3://ckpt/runs/../a", "'..'"),
        (Path("s3://ckpt/runs/a"), "'//' was lost"),
        ("file://otherhost/a", "not this machine"),
    ):
        with pytest.raises(ConfigError, match=says):
            parse_location(bad)

    monkeypatch.chdir(tmp_path)
    model, opt, sched = _job()
    with pytest.raises(ConfigError, match="'//' was lost"):
        CheckpointManager(Path("s3://ckpt/runs/a"), model, opt, sched)
    # a file:// run directory is the local folder
    mgr = CheckpointManager(f"file://{tmp_path}/run", model, opt, sched)
    assert mgr.run_dir == tmp_path / "run"
    with pytest.raises(ConfigError, match="'//' was lost"):  # a URL resume reads the bucket; a collapsed one is refused
        mgr.resume(Path("s3://ckpt/runs/a"))
    mgr.close()
    # the CLI: commands that only read and write local folders refuse a URL; argparse shows the message
    with pytest.raises(SystemExit):
        cli(["ckpt", "from-dcp", "s3://ckpt/runs/a", "out"])
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))


def test_object_writer_multipart_and_abort(s3_server, monkeypatch):
    """A streamed object goes up as parallel multipart parts with our checksum computed on the way; an aborted one
    leaves no object and no multipart upload; a conditional create loses to an existing object (412)."""
    from wsd_pretrain.checkpoint.safetensors_io import new_hasher

    monkeypatch.setattr(storage, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part
    bucket = s3_server.bucket()
    store = storage.S3Store(bucket)
    data = os.urandom(12 * 1024 * 1024 + 123)
    w = store.writer("a/big.bin", "xxh3_128")
    for i in range(0, len(data), 1_000_000):
        w.write(data[i : i + 1_000_000])
    size, digest = w.close()
    h = new_hasher("xxh3_128")
    h.update(data)
    assert (size, digest) == (len(data), h.hexdigest())
    assert store.get("a/big.bin")[0] == data
    assert store.get_range("a/big.bin", 7_000_000, 10) == data[7_000_000:7_000_010]
    w = store.writer("a/dropped.bin", "xxh3_128")
    w.write(data)
    w.abort()
    assert store.head("a/dropped.bin") is None
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(storage.PreconditionFailed):
        store.put("a/big.bin", b"x", if_none_match=True)


def test_cp_list_inspect_verify_resume(trained, s3_server, tmp_path, capsys):
    """`ckpt cp` a run to S3 and back: list, inspect and verify on the URL; a damaged object is named; an
    unfinished prefix (no manifest) is never listed as complete; a racing writer of the same name is refused; the
    copy brought back resumes exactly; latest only moves forward (compare-and-swap)."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/runs/a"
    assert cli(["ckpt", "cp", str(trained), url]) == 0
    assert "2 checkpoint(s) copied" in capsys.readouterr().out
    assert cli(["ckpt", "cp", str(trained), url]) == 0  # again: nothing to copy
    assert "0 checkpoint(s) copied" in capsys.readouterr().out

    assert cli(["ckpt", "list", url, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["state"], i["latest"]) for i in listed] == [
        ("step-000000004-pre-decay", "complete", False),
        ("step-000000006-post-decay+final", "complete", True),
    ]
    assert cli(["ckpt", "inspect", url, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    local_info = tools.inspect_checkpoint(trained)
    assert info["position"] == 6 and info["tensors"] == local_info["tensors"]
    assert cli(["ckpt", "verify", url]) == 0
    assert "OK" in capsys.readouterr().out

    # an unfinished save: objects under a name without a manifest are invisible to readers
    store = storage.S3Store(bucket)
    store.put("runs/a/checkpoints/step-000000009-periodic/model-00001-of-00001.safetensors", b"partial")
    infos = objstore.list_run(parse_location(url))
    assert [i.state for i in infos] == ["complete", "complete", "unfinished"]
    assert objstore.resolve(parse_location(url)).name == "step-000000006-post-decay+final"

    # a racing writer of a name being written is refused before it writes anything
    src = trained / "checkpoints" / "step-000000006-post-decay+final"
    other = f"s3://{bucket}/runs/b"
    objstore._claim(store, parse_location(other) / "checkpoints" / src.name, replace_unfinished=False)
    with pytest.raises(CheckpointError, match="another writer claimed this name"):
        objstore.upload(src, parse_location(other))
    assert objstore.upload(src, parse_location(other), replace_unfinished=True).name == src.name
    with pytest.raises(CheckpointError, match="already exists"):
        objstore.upload(src, parse_location(other))
    objstore.set_latest(store, parse_location(url), "step-000000004-pre-decay")  # older: latest stays
    assert objstore.read_latest(store, parse_location(url))[0] == "step-000000006-post-decay+final"

    # back to a local run: verified on the way, committed by rename; it resumes exactly
    back = tmp_path / "back"
    assert cli(["ckpt", "cp", f"{url}/checkpoints/step-000000004-pre-decay", str(back)]) == 0
    capsys.readouterr()
    model, opt, sched = _job(seed=1)
    mgr = CheckpointManager(back, model, opt, sched, config=CheckpointConfig(max_shard_size=60_000))
    assert mgr.resume("latest") and sched.position == 4
    ref, ref_opt, ref_sched = _job()
    ref_mgr = CheckpointManager(trained, ref, ref_opt, ref_sched)
    ref_mgr.resume("step-000000004-pre-decay")
    ref_mgr.close()
    for _ in range(2):
        _step(model, opt, sched)
        _step(ref, ref_opt, ref_sched)
    mgr.close()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n

    # export-hf from the URL to a local folder loads with from_pretrained
    out = tmp_path / "hf"
    assert cli(["ckpt", "export-hf", url, str(out)]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ref.parameters())
    assert not any(p.name.startswith(".wsd-fetch-") for p in tmp_path.iterdir())
    assert cli(["ckpt", "reshard", url, str(tmp_path / "resharded"), "--max-shard-size", "30000"]) == 0
    assert tools.verify_checkpoint_files(tmp_path / "resharded") == []
    assert cli(["ckpt", "verify", url, "--sizes-only"]) == 0
    assert cli(["ckpt", "list", url, "--checksums"]) == 0
    assert "corrupt" not in capsys.readouterr().out

    # a damaged object is named by verify (exit 1) and by list; export refuses it
    shard = sorted((trained / "checkpoints" / "step-000000006-post-decay+final").glob("model-*.safetensors"))[0].name
    key = f"runs/a/checkpoints/step-000000006-post-decay+final/{shard}"
    raw = bytearray(store.get(key)[0])
    raw[-1] ^= 0xFF
    store.put(key, bytes(raw))
    capsys.readouterr()
    assert cli(["ckpt", "verify", url]) == 1
    assert f"BAD  {shard}: xxh3_128" in capsys.readouterr().out
    assert cli(["ckpt", "export-hf", url, str(tmp_path / "hf2")]) == 2
    assert "damaged" in capsys.readouterr().err
    # a manager resuming in place from the bucket (ranged GETs, empty staging folder) refuses it before it restores
    # anything; one whose staging folder holds the checkpoint reads it there (no ranged GET)
    model3, opt3, sched3 = _job(seed=3)
    before = [p.detach().clone() for p in model3.parameters()]
    mgr3 = CheckpointManager(url, model3, opt3, sched3, config=CheckpointConfig(staging_dir=str(tmp_path / "st")))
    with pytest.raises(CheckpointError, match=rf"failed verification: .*{re.escape(shard)}: \d+ bytes, xxh3_128"):
        mgr3.resume("latest")
    assert all(torch.equal(a, b) for a, b in zip(before, model3.parameters()))
    assert not (tmp_path / "st" / "checkpoints").exists()
    mgr3.close()
    gets = []
    real = storage.S3Store.get_range
    storage.S3Store.get_range = lambda self, *a: gets.append(a) or real(self, *a)
    try:
        mgr3 = CheckpointManager(url, model3, opt3, sched3, config=CheckpointConfig(staging_dir=str(back)))
        assert mgr3.resume("step-000000004-pre-decay") and sched3.position == 4 and gets == []
        mgr3.close()
    finally:
        storage.S3Store.get_range = real
    store.put(key, b"short")
    assert objstore.list_run(parse_location(url))[1].state == "corrupt"


def test_resume_in_place_cuts_a_large_fetch_into_fewer_larger_gets(trained, s3_server, monkeypatch):
    """A rank that fetches much from the bucket cuts its merged ranges into pieces larger than the smallest (about
    2 x THREADS of them, at most PIECE_MAX bytes each), not into many small GETs; the safetensors headers it needs
    come in batches fetched together (every model shard's in one, every state file's it restores from in one), each
    header once, not one serial GET per file; the resume is exact."""
    from wsd_pretrain.checkpoint import objread

    url = f"s3://{s3_server.bucket()}/runs/pieces"
    assert cli(["ckpt", "cp", str(trained), url]) == 0
    monkeypatch.setattr(objread, "HEADER_GUESS", 1024)  # tiny files: their data come in GETs of their own
    monkeypatch.setattr(objread, "PIECE", 1024)
    monkeypatch.setattr(objread, "PIECE_MAX", 8 * 1024)
    monkeypatch.setattr(objread, "THREADS", 2)
    gets: list[int] = []
    heads: list[str] = []  # the files whose first bytes (the header) were fetched
    real = storage.S3Store.get_range

    def counted(self, key: str, start: int, length: int) -> bytes:
        gets.append(length)
        if start == 0:
            heads.append(key.split("/step-000000004-pre-decay/", 1)[1])
        return real(self, key, start, length)

    batches: list[list[str]] = []
    real_headers = objread.RemoteCheckpoint.headers

    def batched(self, rels: list[str]) -> None:
        batches.append([r for r in rels if r not in self._headers])
        real_headers(self, rels)

    monkeypatch.setattr(storage.S3Store, "get_range", counted)
    monkeypatch.setattr(objread.RemoteCheckpoint, "headers", batched)
    model, opt, sched = _job(seed=5)
    mgr = CheckpointManager(url, model, opt, sched)
    assert mgr.resume("step-000000004-pre-decay") and sched.position == 4
    mgr.close()
    manifest = json.loads((trained / F.CHECKPOINTS / "step-000000004-pre-decay" / "manifest.json").read_text())
    shards = sorted(f for f in manifest["files"] if f.endswith(".safetensors") and "/" not in f)
    states = sorted(f for f in manifest["files"] if f.startswith(f"{F.TRAIN_STATE}/state-"))
    assert len(shards) > 1 and states, manifest["files"]
    assert [b for b in batches if b] == [shards, states], batches  # two batches, not one GET after another
    assert sorted(heads) == sorted(shards + states), heads  # each header fetched once, in its batch
    data = [n for n in gets if n != 1024]  # the headers' first GETs are 1024 bytes
    assert sum(data) > 4 * 8 * 1024  # much fetched: the largest pieces apply
    assert max(data) == 8 * 1024 and len([n for n in data if n == 8 * 1024]) >= len(data) // 2, sorted(data)
    ref, ref_opt, ref_sched = _job()
    ref_mgr = CheckpointManager(trained, ref, ref_opt, ref_sched)
    ref_mgr.resume("step-000000004-pre-decay")
    ref_mgr.close()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n


def test_hostile_manifest_refused(trained, s3_server):
    """A manifest naming '../x' or an absolute key is refused before any object is read or written."""
    bucket = s3_server.bucket()
    src = trained / "checkpoints" / "step-000000004-pre-decay"
    ckpt = parse_location(f"s3://{bucket}/runs/a/checkpoints/{src.name}")
    store = storage.S3Store(bucket)
    from wsd_pretrain.checkpoint.safetensors_io import new_hasher

    for rel in ("../../escape.bin", "/abs.bin"):
        m = json.loads((src / F.MANIFEST).read_text())
        m["files"][rel] = {"size": 1, "hash": "0" * 32, "rank": 0}
        raw = json.dumps(m).encode()
        h = new_hasher("xxh3_128")
        h.update(raw)
        store.put((ckpt / F.MANIFEST).key, raw)
        store.put((ckpt / F.MANIFEST_HASH).key, f"xxh3_128 {h.hexdigest()}\n".encode())
        with pytest.raises(CheckpointError, match="leaves the checkpoint"):
            objstore.load_manifest(store, ckpt)


def _s3_run(rank: int, world: int, url: str, staging: str) -> dict:
    """A user's loop on an s3:// run: saves through the staging tier (each rank uploading the files it wrote), a
    save whose upload fails on rank 1 only (every rank raises at the next wait, nothing of it is left on the
    bucket), then a new job with an empty staging folder resumes from the bucket and continues exactly like the
    job that was not stopped."""
    from wsd_pretrain.checkpoint import faults

    uploaded: list[str] = []
    fail_at: list[str] = []

    def hook(name: str) -> None:
        if name.startswith("upload-object:"):
            uploaded.append(name.split(":", 1)[1])
            if fail_at and rank == 1:
                raise OSError(f"injected upload failure on rank 1 at {name}")

    faults.fault_hook = hook
    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=1, keep_last=1, staging_dir=f"{staging}/a", max_shard_size=60_000)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    for _ in range(3):
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.wait()
    mine = sorted(uploaded)
    fail_at.append("on")
    failure = None
    _step(model, opt, sched)
    mgr.maybe_save()  # position 4: its upload fails on rank 1 ...
    try:
        mgr.wait()  # ... and every rank raises here
    except CheckpointError as exc:
        failure = str(exc)
    fail_at.clear()
    faults.fault_hook = None
    after_failure = [[i.name, i.state] for i in objstore.list_run(parse_location(url))]
    bucket = url[5:].split("/")[0]
    uploads = storage.S3Store(bucket).client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    mgr.close()
    names = [i.name for i in objstore.list_run(parse_location(url)) if i.state == "complete"]
    model2, opt2, sched2 = _job(seed=1)
    cfg2 = CheckpointConfig(every_steps=2, keep_last=1, staging_dir=f"{staging}/b", max_shard_size=60_000)
    mgr2 = CheckpointManager(url, model2, opt2, sched2, config=cfg2)
    assert mgr2.resume("auto") and sched2.position == 3
    resumed = {k: v.clone() for k, v in model2.state_dict().items()}
    _step(model2, opt2, sched2)
    for _ in range(2):
        _step(model, opt, sched)
        _step(model2, opt2, sched2)
    mgr2.close()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    sharded = _fsdp2_resume_in_place(url, f"{staging}/c", resumed)
    return {
        "sharded": sharded,
        "names": names,
        "same": same,
        "mine": mine,
        "failure": failure,
        "after_failure": after_failure,
        "uploads": len(uploads),
        "latest": objstore.read_latest(storage.S3Store(bucket), parse_location(url))[0],
    }


def _fsdp2_resume_in_place(url: str, staging: str, resumed: dict) -> dict:
    """FSDP2 resumes the plain job's checkpoint from the bucket with an empty staging folder: read in place, each
    rank's ranged GETs counted per object (a wrapper around the real store's ranged GET)."""
    from torch.distributed.fsdp import fully_shard

    from wsd_pretrain.checkpoint import objread

    model, opt, sched = _job(seed=2)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = WSDScheduler(opt, WSDSchedule(total=6, decay_length=2))
    fetched: dict[str, int] = {}
    real = storage.S3Store.get_range

    def counted(self, key: str, start: int, length: int) -> bytes:
        data = real(self, key, start, length)
        fetched[key] = fetched.get(key, 0) + len(data)
        return data

    storage.S3Store.get_range = counted
    objread.HEADER_GUESS = 1024  # tiny test files: data ranges are requests of their own, long headers take two
    try:
        cfg = CheckpointConfig(staging_dir=staging, max_shard_size=60_000)
        mgr = CheckpointManager(url, model, opt, sched, config=cfg)
        assert mgr.resume("auto") and sched.position == 3
        mgr.close()
    finally:
        storage.S3Store.get_range = real
        objread.HEADER_GUESS = 64 * 1024
    names = [name for name, _ in model.named_parameters()]
    same = bool(names) and all(torch.equal(p.full_tensor(), resumed[n]) for n, p in model.named_parameters())
    return {
        "same": same,
        "fetched": fetched,
        "local": os.listdir(staging) if os.path.isdir(staging) else [],
    }


def test_manager_on_s3_two_ranks(s3_server, tmp_path):
    """Two gloo ranks save to s3:// in a user's loop: each rank uploads exactly the files it wrote (the manifest's
    ``rank``), rank 0 commits last (manifest, latest by CAS, retention on the bucket); an upload that fails on rank
    1 alone raises on both ranks at the next wait and leaves neither objects nor multipart uploads; a new job
    resumes from the bucket alone and continues exactly."""
    from distributed_helpers import run_distributed

    url = f"s3://{s3_server.bucket()}/runs/two"
    results = run_distributed(_s3_run, world_size=2, args=(url, str(tmp_path)), env=s3_server.environ())
    store = storage.S3Store(url[5:].split("/")[0])
    for r in results:
        # periodic saves at 1 and 2 were removed by retention on the bucket (keep_last=1), manifest first
        assert r["names"] == ["step-000000003-periodic"]
        assert r["latest"] == r["names"][-1] and r["same"]
        assert r["failure"] and "rank 1: OSError: injected upload failure" in r["failure"], r["failure"]
        assert r["after_failure"] == [["step-000000003-periodic", "complete"]] and r["uploads"] == 0
    files = objstore.load_manifest(store, parse_location(url) / "checkpoints" / r["names"][-1])[0]["files"]
    assert {rec["rank"] for rec in files.values()} == {0, 1}
    for rank, r in enumerate(results):  # three saves, each rank its own files of each, nothing else
        own = sorted(rel for rel, rec in files.items() if rec["rank"] == rank)
        assert r["mine"] == sorted(own * 3), (rank, r["mine"], own)
    # FSDP2 on 2 ranks resumed it in place (nothing copied into its staging folder), bitwise: each rank fetched its
    # verification share whole (the files it wrote) and, of the other files, headers and the half of each tensor
    # its shard holds (plus whole scalars), never a whole file
    prefix = (parse_location(url) / "checkpoints" / r["names"][-1]).key + "/"
    tensors = {rel: rec for rel, rec in files.items() if rel.endswith(".safetensors")}
    for rank, r in enumerate(results):
        s = r["sharded"]
        assert s["same"] and "checkpoints" not in s["local"], s
        got = {k[len(prefix) :]: n for k, n in s["fetched"].items() if k.startswith(prefix)}
        assert set(got) <= set(files), set(got) - set(files)
        # (a range-written file's share is its owner's bytes and each holder's ranges: not the whole file)
        share = {rel for rel, rec in tensors.items() if rec["rank"] == rank and not rec.get("ranged")}
        others = {rel for rel in set(tensors) - share if tensors[rel]["size"] > 1024}  # bigger than the 1st GET
        assert all(got[rel] == tensors[rel]["size"] for rel in share), (got, share)  # verified whole, read once
        assert all(0 < got[rel] < tensors[rel]["size"] for rel in others), (rank, got, others)
        total = sum(tensors[rel]["size"] for rel in others)
        assert sum(got[rel] for rel in others) <= total // 2 + 1024 * len(others), (rank, got)


def _s3_direct(rank: int, world: int, url: str) -> dict:
    """Saves with no staging folder: every rank streams its files straight to the bucket (async saves); a save
    that fails mid-upload on rank 1 (its second multipart part) raises on every rank; a new job resumes from the
    bucket and continues exactly like the job that was not stopped."""
    from wsd_pretrain.checkpoint import faults

    fail: list[str] = []

    def hook(name: str) -> None:
        if fail and rank == 1 and name.startswith("upload-part:") and name.endswith(":2"):
            raise OSError(f"injected failure on rank 1 at {name}")

    faults.fault_hook = hook
    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=1, keep_last=1, async_save=True, max_shard_size=60_000)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    for _ in range(3):
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.wait()
    saved = str(mgr.last_saved)
    fail.append("on")
    part_size = storage.PART_SIZE
    if rank == 1:  # multipart uploads in flight on rank 1 when it fails; rank 0's objects are complete by then
        storage.PART_SIZE = 4096
    _step(model, opt, sched)
    mgr.maybe_save()
    failure = None
    try:
        mgr.wait()
    except CheckpointError as exc:
        failure = str(exc)
    storage.PART_SIZE = part_size
    fail.clear()
    faults.fault_hook = None
    bucket = url[5:].split("/")[0]
    store = storage.S3Store(bucket)
    objects = store.list(f"{url[6 + len(bucket) :]}/checkpoints/")[0]
    left = [
        o["key"] for o in objects if not o["key"].endswith("/latest") and "/step-000000003-periodic/" not in o["key"]
    ]
    uploads = store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    mgr.close()
    model2, opt2, sched2 = _job(seed=1)
    mgr2 = CheckpointManager(url, model2, opt2, sched2, config=CheckpointConfig(every_steps=100))
    assert mgr2.resume("auto") and sched2.position == 3
    _step(model2, opt2, sched2)
    for _ in range(2):
        _step(model, opt, sched)
        _step(model2, opt2, sched2)
    mgr2.close()
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    return {"saved": saved, "failure": failure, "left": len(left), "uploads": len(uploads), "same": same}


def test_manager_on_s3_direct_two_ranks(s3_server, tmp_path):
    """Two gloo ranks save an s3:// run with no staging folder: each rank streams its own files to the bucket
    (no local file written), rank 0 commits the manifest last; the checkpoint verifies, latest names it, retention
    ran on the bucket; a failure mid-upload on rank 1 raises on both and leaves no object and no multipart upload;
    a new 2-rank job resumes from the bucket and continues bitwise-equal."""
    from distributed_helpers import run_distributed

    url = f"s3://{s3_server.bucket()}/runs/direct"
    env = s3_server.environ() | {"TMPDIR": str(tmp_path)}  # the resume cache (storage.cache_dir) goes there
    results = run_distributed(_s3_direct, world_size=2, args=(url,), env=env)
    name = "step-000000003-periodic"
    for r in results:
        assert r["saved"] == f"{url}/checkpoints/{name}" and r["same"]
        assert r["failure"] and "rank 1: " in r["failure"] and "injected failure" in r["failure"], r["failure"]
        assert r["left"] == 0 and r["uploads"] == 0
    run = parse_location(url)
    assert [(i.name, i.state) for i in objstore.list_run(run)] == [(name, "complete")]
    store = storage.S3Store(run.bucket)
    assert objstore.read_latest(store, run)[0] == name
    files = objstore.load_manifest(store, run / "checkpoints" / name)[0]["files"]
    assert {rec["rank"] for rec in files.values()} == {0, 1} and not any(r.get("ranged") for r in files.values())
    assert cli(["ckpt", "verify", f"{url}/checkpoints/{name}"]) == 0
    assert store.head(f"{run.prefix}checkpoints/{name}/.claim") is None


def _killed_mid_upload(rank: int, world: int, url: str, staging: str | None, out: str) -> None:
    """A 2-rank job on ``url`` commits its save at 1; during the save at 2 rank 1 is SIGKILLed at the second
    multipart part of one of its objects. Rank 0 writes down the error it ends with."""
    import signal

    from wsd_pretrain.checkpoint import faults

    objstore_tier.LEASE_TTL_S = 2.0  # the next run takes the dead job's lease over 2 s after its last renewal
    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=1, staging_dir=staging, max_shard_size=60_000)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    _step(model, opt, sched)
    mgr.maybe_save()
    mgr.wait()
    if rank == 1:
        storage.PART_SIZE = 4096  # multipart uploads (never completed: moto's 5 MiB minimum)

        def hook(name: str) -> None:
            if name.startswith("upload-part:") and name.endswith(":2"):
                os.kill(os.getpid(), signal.SIGKILL)

        faults.fault_hook = hook
    _step(model, opt, sched)
    error = None
    try:
        mgr.maybe_save()
        mgr.wait()
    except CheckpointError as exc:
        error = str(exc)
    except Exception as exc:  # e.g. the transport's own error: not what a user should get
        error = f"not a CheckpointError: {type(exc).__name__}: {exc}"
    Path(out).write_text(json.dumps({"error": error}))
    os._exit(0)  # the process group cannot be torn down without rank 1


def test_a_rank_killed_mid_upload_fails_the_save_on_the_other_and_the_next_run_cleans(s3_server, tmp_path, monkeypatch):
    """One rank of a 2-rank job SIGKILLed mid-upload (a multipart upload in flight), on the direct streaming save
    and on the staging tier: the other rank's save fails with a CheckpointError naming it (not the transport's
    error), nothing of it is visible, and the next run removes its leftovers (multipart uploads included) and
    resumes the previous checkpoint. (tools/reliability.py --only s3ranks does this under torchrun.)"""
    import signal

    from distributed_helpers import _child, _context, free_port

    bucket = s3_server.bucket()
    env = s3_server.environ() | {"TMPDIR": str(tmp_path)}
    client = s3_server.client()
    left: dict[str, int] = {}
    for mode in ("direct", "staging"):
        url = f"s3://{bucket}/runs/{mode}"
        staging = str(tmp_path / mode) if mode == "staging" else None
        out = str(tmp_path / f"{mode}.json")
        ctx, port = _context(), free_port()
        procs = [
            ctx.Process(
                target=_child,
                args=(_killed_mid_upload, r, 2, port, (url, staging, out), str(tmp_path / f"{mode}-{r}"), env),
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
                p.join(5)
        assert procs[1].exitcode == -signal.SIGKILL, (mode, procs[1].exitcode)
        error = json.loads(Path(out).read_text())["error"]
        assert error and error.startswith(
            "checkpoint step-000000002-periodic was not written"
            if mode == "direct"
            else "uploading step-000000002-periodic"
        ), (mode, error)
        run = parse_location(url)
        assert [(i.name, i.state) for i in objstore.list_run(run) if i.state != "unfinished"] == [
            ("step-000000001-periodic", "complete")
        ]
        assert objstore.resolve(run).name == "step-000000001-periodic"
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=run.prefix).get("Uploads", [])
        left[mode] = len(uploads) + sum(i.state == "unfinished" for i in objstore.list_run(run))
    assert left["direct"] > 0  # the direct save's leftovers wait for the next run (rank 0 cannot know rank 1 stopped)
    monkeypatch.setattr(objstore_tier, "LEASE_TTL_S", 2.0)
    time.sleep(2.5)  # the dead jobs' leases expire
    for mode in ("direct", "staging"):
        url = f"s3://{bucket}/runs/{mode}"
        model, opt, sched = _job(seed=1)
        cfg = CheckpointConfig(staging_dir=str(tmp_path / f"{mode}-next") if mode == "staging" else None)
        mgr = CheckpointManager(url, model, opt, sched, config=cfg)
        assert mgr.resume("auto") and sched.position == 1
        mgr.close()
        run = parse_location(url)
        assert [(i.name, i.state) for i in objstore.list_run(run)] == [("step-000000001-periodic", "complete")]
        assert client.list_multipart_uploads(Bucket=bucket, Prefix=run.prefix).get("Uploads", []) == []


def test_manager_on_s3_lease_leftovers_failures(s3_server, tmp_path, monkeypatch):
    """The run lease: a second manager is refused with the run lock's message; a stale lease is taken over, its
    age read on the server's clock (a skewed holder's clock neither holds it forever nor loses it early). An
    interrupted save's objects (no manifest) and multipart uploads are removed by the next run. A failed upload
    raises at the next save."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/runs/one"
    store = storage.S3Store(bucket)
    model, opt, sched = _job()
    # leftovers of an interrupted run
    left = "runs/one/checkpoints/step-000000002-periodic/"
    store.put(left + "model-00001-of-00001.safetensors", b"partial")
    store.client.create_multipart_upload(Bucket=bucket, Key=left + "train_state/state-r00000-00001.safetensors")
    cfg = CheckpointConfig(every_steps=2, staging_dir=str(tmp_path / "a"))
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    assert store.list(left)[0] == [] and store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    with pytest.raises(CheckpointError, match=r"is in use by another run \(pid \d+ on .*give this run its own"):
        CheckpointManager(url, *_job()[:3], config=CheckpointConfig(staging_dir=str(tmp_path / "b")))
    for _ in range(2):
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.wait()  # uploaded
    assert [i.name for i in objstore.list_run(parse_location(url))] == ["step-000000002-periodic"]
    # the server loses the bucket: the next upload fails, and every rank hears it at the next wait
    objs, _ = store.list("")
    store.delete([o["key"] for o in objs])
    s3_server.client().delete_bucket(Bucket=bucket)
    for _ in range(2):
        _step(model, opt, sched)
        mgr.maybe_save()
    with pytest.raises(CheckpointError, match=r"uploading step-000000004-pre-decay\+periodic to s3://.* failed"):
        mgr.wait()
    s3_server.client().create_bucket(Bucket=bucket)
    mgr.close()
    # the lease's age is read on the server's clock, never from the holder's recorded expiry: a lease just
    # written by a host whose clock is far behind (its "expires" long past) is still held ...
    lease = "runs/one/.wsd_pretrain.lease"
    monkeypatch.setattr(objstore_tier, "LEASE_TTL_S", 1.5)
    store.put(lease, json.dumps({"holder": "pid 1 on behind", "since": "x", "expires": 0}).encode())
    with pytest.raises(CheckpointError, match=r"in use by another run \(pid 1 on behind"):
        CheckpointManager(url, *_job()[:3], config=CheckpointConfig(staging_dir=str(tmp_path / "c")))
    # ... and one not renewed for longer than the TTL is taken over, whatever a clock far ahead wrote in it
    store.put(lease, json.dumps({"holder": "pid 1 on ahead", "since": "x", "expires": time.time() + 1e6}).encode())
    time.sleep(2.6)
    mgr = CheckpointManager(url, *_job()[:3], config=CheckpointConfig(staging_dir=str(tmp_path / "c")))
    assert json.loads(store.get("runs/one/.wsd_pretrain.lease")[0])["holder"].startswith(f"pid {os.getpid()}")
    mgr.close()
    assert store.head("runs/one/.wsd_pretrain.lease") is None


def test_lightning_on_s3(s3_server, tmp_path):
    """The Lightning integration on an s3:// run (the real Trainer on CPU, through the manager's staging tier): its
    checkpoints are committed on the bucket, and a new Trainer with an empty staging folder resumes from the
    bucket alone at the saved update and finishes the schedule there."""
    pl = pytest.importorskip("lightning.pytorch")

    from wsd_pretrain.integrations.lightning import ResumableDataLoader, WSDCheckpoint

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {
                "optimizer": opt,
                "lr_scheduler": {
                    "scheduler": WSDScheduler(opt, WSDSchedule(total=8, decay_length=2)),
                    "interval": "step",
                },
            }

    url = f"s3://{s3_server.bucket()}/runs/pl"
    loader = ResumableDataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=2)

    class Spy(WSDCheckpoint):
        resumed = None

        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            self.resumed = self.ckpt.resumed_from.name if self.ckpt.resumed_from else None

    def fit(max_steps: int, staging: str) -> Spy:
        callback = Spy(url, config=CheckpointConfig(staging_dir=str(tmp_path / staging)), check_max_steps=False)
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            callbacks=[callback],
            enable_checkpointing=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(), loader)
        callback.global_step = trainer.global_step
        return callback

    fit(7, "a")  # stopped after update 7: the pre-decay checkpoint at 6 is on the bucket
    names = [(i.name, i.state) for i in objstore.list_run(parse_location(url))]
    assert names == [("step-000000006-pre-decay", "complete")]
    second = fit(8, "b")  # an empty staging folder: resumed from the bucket
    assert second.global_step == 8 and second.resumed == "step-000000006-pre-decay"
    names = [i.name for i in objstore.list_run(parse_location(url)) if i.state == "complete"]
    assert names == ["step-000000006-pre-decay", "step-000000008-post-decay+final"]


@pytest.mark.slow  # a minute on 2 cores; the default suite saves and resumes the manager on s3:// on 2 ranks above
def test_main_job_on_s3(s3_server, tmp_path):
    """`wsd-pretrain train --run-dir s3://...` with a staging folder (a separate process): its checkpoints are
    committed on the bucket and verify there, its metrics are in the staging folder, no ./s3:/ tree anywhere."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("RANK", None)
    url = f"s3://{s3_server.bucket()}/runs/job"
    quick = ["train.progress=false", "train.eval_every=8", "train.eval_batches=2", "data.max_bytes=2000000"]
    cmd = [sys.executable, "-m", "wsd_pretrain.train", "--run-dir", url, "--total-steps", "8", *quick]
    res = subprocess.run(
        [*cmd, f"checkpoint.staging_dir={tmp_path / 'stage'}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    infos = objstore.list_run(parse_location(url))
    assert [(i.name, i.state) for i in infos][-1] == ("step-000000008-post-decay+final", "complete")
    assert (tmp_path / "stage" / "metrics.jsonl").exists()
    assert not (root / "s3:").exists()
    assert cli(["ckpt", "verify", url]) == 0


def _stalled_store(rank: int, world: int, url: str, server_pid: int) -> dict:
    """A 2-rank job streaming to the bucket (no staging folder) with a 2 s limit per try: its save at 1 commits;
    during its save at 2 rank 1 stops the server (SIGSTOP: the sockets stay open, nothing answers) at its second
    multipart part, and rank 0 resumes it (SIGCONT) once its own save raised; the save at 3 stalls for less than the
    limit (stopped at rank 0's manifest, resumed 0.6 s later) and commits."""
    import signal
    import threading

    from wsd_pretrain.checkpoint import faults

    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=1, storage_timeout_s=2, max_shard_size=60_000, keep_last=10)
    mgr = CheckpointManager(url, model, opt, sched, config=cfg, hf_config=CFG.hf_config())
    _step(model, opt, sched)
    mgr.maybe_save()
    stopped: list[str] = []

    def stop_at(name: str) -> None:
        if rank == 1 and not stopped and name.startswith("upload-part:") and name.endswith(":2"):
            stopped.append(name)
            os.kill(server_pid, signal.SIGSTOP)

    if rank == 1:
        storage.PART_SIZE = 4096  # multipart uploads on rank 1 (never completed: moto's 5 MiB minimum)
    faults.fault_hook = stop_at
    _step(model, opt, sched)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.monotonic()
    error = None
    try:
        mgr.maybe_save()
    except CheckpointError as exc:
        error = str(exc)
    seconds = time.monotonic() - t0
    if rank == 0:
        os.kill(server_pid, signal.SIGCONT)
    faults.fault_hook = None
    storage.PART_SIZE = 16 * 1024 * 1024
    intact = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    def short_stall(name: str) -> None:
        if rank == 0 and name == "upload-manifest":
            os.kill(server_pid, signal.SIGSTOP)
            threading.Timer(0.6, os.kill, (server_pid, signal.SIGCONT)).start()

    faults.fault_hook = short_stall
    _step(model, opt, sched)
    mgr.maybe_save()  # commits: the store was silent for less than the limit
    faults.fault_hook = None
    mgr.close()
    return {"error": error, "seconds": seconds, "intact": intact, "stopped": stopped}


def test_a_store_that_stops_answering_fails_the_save_on_every_rank_then_the_next_commits(s3_server, tmp_path):
    """The server stops answering mid-save (SIGSTOP of moto: connections open, no answer), a 2-rank job with
    ``storage_timeout_s=2``: the save fails on both ranks with a CheckpointError saying the store stopped answering
    and naming the object, within a bound a hang would blow; training state intact, nothing of that save visible;
    once the server answers again the next save (with a stall shorter than the limit) commits. Bad limits are
    refused when the manager is built. (tools/reliability.py --only hang does this under torchrun.)"""
    import signal

    from distributed_helpers import run_distributed

    for bad in (0, -1, "60", True, 7200):
        with pytest.raises(ConfigError, match="storage_timeout_s"):
            CheckpointConfig(storage_timeout_s=bad)
    with pytest.raises(ConfigError, match="storage_save_minutes"):
        CheckpointConfig(storage_save_minutes=0)
    with pytest.raises(ConfigError, match=r"not less than timeout_minutes=20 .* raise timeout_minutes"):
        CheckpointManager("s3://b-x/run", *_job(), config=CheckpointConfig(timeout_minutes=20))
    url = f"s3://{s3_server.bucket()}/runs/hang"
    env = s3_server.environ() | {"TMPDIR": str(tmp_path)}
    try:
        results = run_distributed(_stalled_store, world_size=2, args=(url, s3_server.proc.pid), env=env)
    finally:
        os.kill(s3_server.proc.pid, signal.SIGCONT)
    assert results[1]["stopped"], "rank 1 never reached its second part"
    for r in results:
        assert r["error"] and r["error"].startswith("checkpoint step-000000002-periodic was not written"), r
        assert "StorageTimeout" in r["error"] and "the object store stopped answering: no answer for" in r["error"]
        assert re.search(r"step-000000002-periodic/\S+: [A-Z-]+( \d+)?: the object store stopped", r["error"])
        assert r["seconds"] < 120 and r["intact"], r  # the limits' worst case is about 20 s; a hang, minutes
    run = parse_location(url)
    states = {i.name: i.state for i in objstore.list_run(run)}
    assert states.get("step-000000002-periodic", "unfinished") == "unfinished", states
    assert [n for n, s in states.items() if s == "complete"] == ["step-000000001-periodic", "step-000000003-periodic"]
    assert objstore.resolve(run).name == "step-000000003-periodic"


def test_save_deadline_and_the_lease_renewed_before_a_claim(s3_server, monkeypatch):
    """``storage_save_minutes``: a save past its time on object storage sends no new request and fails naming the
    limit. The lease: when its heartbeat could not renew it for over half its TTL, a save's claim renews it first,
    and a lease another run took over meanwhile stops the save with the lease's message (never written on)."""
    url = f"s3://{s3_server.bucket()}/runs/limits"
    model, opt, sched = _job()
    cfg = CheckpointConfig(every_steps=1, storage_save_minutes=1e-5)  # 0.6 ms: over before the first object
    mgr = CheckpointManager(url, model, opt, sched, config=cfg)
    _step(model, opt, sched)
    with pytest.raises(CheckpointError, match=r"this save's time on object storage ran out \(.*storage_save_minutes"):
        mgr.maybe_save()
    lease = mgr._remote.lease
    lease._renewed -= lease.ttl  # the heartbeat has not renewed it for a whole TTL (the store did not answer)
    etag = lease._etag
    lease.check()  # renewed now, by If-Match on its own ETag
    assert lease._etag != etag and lease.held
    store = storage.S3Store(parse_location(url).bucket)
    store.put(f"{parse_location(url).key}/{objstore_tier.LEASE_NAME}", b'{"holder": "another run"}')  # taken over
    lease._renewed -= lease.ttl
    _step(model, opt, sched)
    with pytest.raises(CheckpointError, match="the run lease was taken over by another run"):
        mgr.maybe_save()
    assert not lease.held
    mgr.close()
    storage.configure_timeouts()
